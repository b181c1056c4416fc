"""Gradual transitions (cross-dissolves, fades) found without weights.

A cut is one large frame-to-frame change; a dissolve spreads the change from one shot to the
next over many frames, each no larger than what motion inside a shot causes, so a
consecutive-frame detector (PySceneDetect's content detector) sees nothing. Two facts about a
dissolve from shot A to shot B (frame ``(1 - a) A + a B``, ``a`` rising from 0 to 1) make it
visible:

- **It is linear in pixel space.** Any average over a region mixes the same way, so on a
  thumbnail of block means (``THUMB`` blocks: a pan or a moving subject shifts detail inside a
  block and barely moves its mean) the frames of the transition lie near the segment between
  the last frame of A and the first frame of B, the middle one near their average, and no
  single step is a large part of the way (a cut is one step).
- **The change is across shots** (twin comparison, made relative). Over a window of ``2k``
  frames around the middle, the net change between the window's ends is much larger than each
  shot's own change over the ``k`` frames just outside the window. Motion in one shot (a pan,
  a zoom, a subject walking through) changes the picture at about the same rate inside and
  outside any window, and a camera flash returns to where it was, so neither passes.

- **It mixes two pictures.** The fine structure of two unrelated shots does not line up, so
  mixing them halves it: the detail (variance of what a 5x5 box blur removes from a small
  grey image) of ``(1 - a) A + a B`` is about ``(1 - a)^2 D_A + a^2 D_B``, half the shots'
  average at the middle. Motion keeps the detail (a subject that starts to move after a
  pause passes the first two tests over a short window, and is rejected here).

For every frame (a window's middle) and half-widths ``k`` from ``min_s / 2`` to ``max_s / 2``
seconds, a window passes when its net change is at least ``MIN_NET`` levels (RMS over the
thumbnail), no step is more than ``MAX_STEP`` of it, the detail of its middle half (mean) is
at most ``DIP`` of its ends' and

- the net change is at least ``SETTLED`` times each side's own change and the middle frame
  within ``MAX_BEND`` of it from the ends' average, or
- for windows of ``MIX_MIN_S`` or more, the detail dips to ``MAX_DIP``: then both shots may
  move nearly as much as they change across (``MIX_SETTLED``, ``MIX_BEND``), as in a long
  dissolve between two shots that move fast.

Passing middles closer than ``MERGE_S`` are one run, judged by its window of largest net
change (the shortest half-width within ``KNEE`` of it: the whole change, not more). Its frames
are those whose progress from A to B (projection on the segment between the window's ends)
lies in (``EDGE``, ``1 - EDGE``), and the shots are cut where the progress passes one half.
Part of a long dissolve can pass on its own: transitions that overlap are one, the larger. A
transition that passes through a flat frame (black, white or any one colour: ``FLAT``, or
``FADED`` of the shots' own spread) is a ``fade``; a fade-out and a fade-in that meet (a dip
to black) are one fade, cut at its flattest frame.

The thresholds are set so that no window passes on real single-shot footage with fast camera
and subject motion (the cockatoo fixture, all 14 s) while dissolves of 0.5-2 s between it and
another real shot are found; the price is that dissolves between two shots with much the same
fine structure (one scene, two angles) halve less of it and can be missed when both move fast.

The detector is fed the detection frames of the scene scan in order and reports each
transition ``delay`` frames after its last frame at most.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

THUMB = (16, 9)  # thumbnail blocks (width, height): block means of the detection frame
MIN_NET = 24.0  # RMS change over the window (0-255 levels) a transition reaches at least
SETTLED = 2.0  # net change over the window >= this x each shot's own change next to it
MAX_STEP = 0.4  # no single frame step may be more than this part of the net change
MAX_BEND = 0.35  # middle frame's distance from the ends' average, as a part of the net change
EDGE = 0.1  # a transition spans the frames whose progress from A to B is in (EDGE, 1 - EDGE)
FLAT = 6.0  # a frame whose levels spread (std over the thumbnail) less than this is flat
FADED = 0.25  # ... or less than this part of the spread of the shots at the window's ends
KNEE = 0.85  # a run's window: the shortest with this part of the largest net change
MERGE_S = 0.25  # passing middles this close (s) are one run
DETAIL = (64, 36)  # the detail image (grey, block means) whose fine structure a mix halves
DIP = 0.8  # the detail of a window's middle half: at most this part of its ends'
MIX_MIN_S = 0.8  # windows this long (s) or longer whose middle half's detail is at most
MAX_DIP = 0.65  # this part of the ends' pass as a mix when the net change is at least
MIX_SETTLED = 1.05  # this x each shot's own change and the middle frame is at most
MIX_BEND = 0.55  # this part of the net change from the ends' average


@dataclass(frozen=True)
class Transition:
    """Frames ``[start, end)`` belong to neither shot; the shots are cut at ``cut``."""

    start: int
    end: int
    cut: int
    kind: str  # "dissolve" | "fade" ("cut" from the TransNetV2 backend: start == end == cut)


def features(bgr: np.ndarray) -> tuple[np.ndarray, float]:
    """The thumbnail (block means) of one detection frame, float32, flattened, and its detail
    (the variance of the fine structure of a grey ``DETAIL`` image). The frame is first
    cropped to whole blocks (at most a block's width and height less)."""
    h, w = bgr.shape[:2]
    if h >= DETAIL[1] and w >= DETAIL[0]:
        bh, bw = h // DETAIL[1], w // DETAIL[0]
        small = _shrink(bgr[: bh * DETAIL[1], : bw * DETAIL[0]], DETAIL)
    else:  # a tiny frame: its own pixels are the detail
        small = bgr[: max(1, h // THUMB[1]) * THUMB[1], : max(1, w // THUMB[0]) * THUMB[0]]
    thumb = _shrink(small, THUMB).astype(np.float32).ravel()
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
    _, sd = cv2.meanStdDev(cv2.subtract(grey, cv2.blur(grey, (5, 5))))
    return thumb, float(sd[0, 0]) ** 2


def _shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Block means of ``image`` (a whole number of blocks) at ``size``: OpenCV's area resize,
    by halves while both factors are even (its fast path: two halvings cost a third of one
    step by 4, the 256x144 detection frame to 64x36), then the rest in one step."""
    w, h = size
    while image.shape[1] % (2 * w) == 0 and image.shape[0] % (2 * h) == 0:
        half = (image.shape[1] // 2, image.shape[0] // 2)
        image = cv2.resize(image, half, interpolation=cv2.INTER_AREA)
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    d = a - b
    return float(np.sqrt(np.dot(d, d) / d.size))


def _spread(x: np.ndarray) -> float:
    """The spread of a thumbnail's levels: small only for a flat (one-colour) frame."""
    return float(x.std())


def _fadedness(x: np.ndarray) -> float:
    """Smallest for the frame a fade passes through: flat first, then dark (fades are
    through black far more often than through white)."""
    return float(x.std() + x.mean() / 8)


class GradualDetector:
    """Feed frames in order (``__call__``); call ``finish`` after the last one."""

    def __init__(self, fps: float, min_s: float = 0.4, max_s: float = 2.2):
        self.fps = float(fps)
        lo = max(2, round(min_s * self.fps / 2))
        hi = max(lo, round(max_s * self.fps / 2))
        ks: list[int] = []  # every frame count for short windows, ~15 % apart for long ones
        k = lo
        while k <= hi:
            ks.append(k)
            k = max(k + 1, round(k * 1.15))
        self.ks = np.array(ks)
        self.reach = 2 * ks[-1]  # frames a middle needs on each side
        self.merge = max(1, round(MERGE_S * self.fps))
        self.mix_k = round(MIX_MIN_S * self.fps / 2)
        self.every = 2 if self.fps >= 16 else 1  # middles judged: every n-th frame
        # a middle is judged `reach` frames late and a transition is held `reach` middles
        # after its end for one that overlaps or meets it
        self.delay = 2 * self.reach + self.merge + 2
        self.keep = 2 * self.reach + 4 * self.merge + 8  # frames the oldest open middle needs
        self.x = np.zeros((2 * self.keep, THUMB[0] * THUMB[1] * 3), np.float32)
        self.step = np.zeros(2 * self.keep, np.float32)  # step[i]: RMS change frame i -> i + 1
        self.detail = np.zeros(2 * self.keep, np.float32)
        self.n = 0  # rows of x in use
        self.first = 0  # frame number of x[0]
        self.last = -1  # frame number of the newest frame
        self.run: list[tuple[int, int, float]] = []  # passing (middle, k, score)
        # the newest transition (its score, whether it fades out), held for the next one
        self.held: tuple[Transition, float, bool] | None = None

    def __call__(self, index: int, bgr: np.ndarray) -> list[Transition]:
        if self.n == len(self.x):  # keep the newest `keep` frames
            drop = self.n - self.keep
            self.x[: self.keep] = self.x[drop:]
            self.step[: self.keep] = self.step[drop:]
            self.detail[: self.keep] = self.detail[drop:]
            self.n, self.first = self.keep, self.first + drop
        self.x[self.n], self.detail[self.n] = features(bgr)
        if self.n:
            self.step[self.n - 1] = _rms(self.x[self.n], self.x[self.n - 1])
        self.n += 1
        self.last = index
        return self._middle(index - self.reach)

    def finish(self) -> list[Transition]:
        """After the last frame: middles nearer the end than ``reach`` have no settled frames
        after them and are not judged; close what is open."""
        out = self._close_run() if self.run else []
        if self.held is not None:
            out.append(self.held[0])
            self.held = None
        return out

    # -- internals --------------------------------------------------------------------------

    def _at(self, i: int) -> np.ndarray:
        return self.x[i - self.first]  # frame numbers first .. last

    def _middle(self, t: int) -> list[Transition]:
        out: list[Transition] = []
        # every other middle from 16 fps on: a transition is 8+ frames long, and its extent
        # comes from the frames' progress, not from where the middle was judged
        best = self._judge(t) if t >= 0 and t % self.every == 0 else None
        if best is not None:
            self.run.append((t, *best))
        elif self.run and t - self.run[-1][0] > self.merge:
            out += self._close_run()
        # a later transition starts at t - reach at the earliest: one that may still overlap
        # the held one (or, for a fade-out, meet it) waits
        if self.held is not None and t - self.held[0].end > self.reach and not self.run:
            out.append(self.held[0])
            self.held = None
        return out

    def _judge(self, t: int) -> tuple[int, float] | None:
        """The best passing half-width at middle ``t`` and its score, or None (every
        half-width at once: numpy over the half-widths that fit the frames kept)."""
        ks = self.ks[self.ks <= (t - self.first) // 2]
        if not len(ks):
            return None
        r = t - self.first  # row of the middle
        x = self.x
        net = np.sqrt(np.mean((x[r + ks] - x[r - ks]) ** 2, axis=1))
        big = net >= MIN_NET  # most middles stop here: nothing changes much around them
        if not big.any():
            return None
        ks, net = ks[big], net[big]
        xa, xb = x[r - ks], x[r + ks]
        settle = np.maximum(
            np.sqrt(np.mean((xa - x[r - 2 * ks]) ** 2, axis=1)),
            np.sqrt(np.mean((x[r + 2 * ks] - xb) ** 2, axis=1)),
        )
        bend = np.sqrt(np.mean((x[r] - (xa + xb) / 2) ** 2, axis=1))
        # the largest step inside each window [t - k, t + k]: steps k back and k ahead
        kmax = int(ks[-1])
        back, ahead = self.step[r - kmax : r][::-1], self.step[r : r + kmax]
        largest = np.maximum.accumulate(np.maximum(back, ahead))[ks - 1]
        # a long mix: the detail of the window's middle half (mean, so that one soft frame
        # of the encoder does not count) against its ends'
        c = np.concatenate(([0.0], np.cumsum(self.detail[r - kmax : r + kmax + 1])))
        half = ks // 2
        middle = (c[kmax + half + 1] - c[kmax - half]) / (2 * half + 1)
        ends = (self.detail[r - ks] + self.detail[r + ks]) / 2
        # (+ 1: a fade between flat colours has no detail at its ends to halve)
        mix = (ks >= self.mix_k) & (middle <= MAX_DIP * ends + 1)
        ok = (largest <= MAX_STEP * net) & (
            ((net >= SETTLED * settle) & (bend <= MAX_BEND * net) & (middle <= DIP * ends + 1))
            | (mix & (net >= MIX_SETTLED * settle) & (bend <= MIX_BEND * net))
        )
        if not ok.any():
            return None
        best = float(net[ok].max())
        i = int(np.flatnonzero(ok & (net >= KNEE * best))[0])
        return int(ks[i]), best

    def _close_run(self) -> list[Transition]:
        """The run's transition, judged by its best window, is held until no later one can
        overlap it (part of a long dissolve can pass on its own: the two are one transition,
        judged by the larger change) or meet it (a fade-out and a fade-in: one fade)."""
        t, k, score = max(self.run, key=lambda r: r[2])
        self.run = []
        found, flat_at = self._extent(t, k)
        fading_out = flat_at is not None and flat_at >= t
        if self.held is None:
            self.held = (found, score, fading_out)
            return []
        held, held_score, held_fading_out = self.held
        fading_in = flat_at is not None and not fading_out
        if held_fading_out and fading_in and found.start - held.end <= self.reach // 2:
            self.held = (self._dip(held, found), max(score, held_score), False)  # a dip
            return []
        if found.start < held.end:  # they overlap: one transition
            if score > held_score:
                self.held = (found, score, fading_out)
            return []
        self.held = (found, score, fading_out)
        return [held]

    def _extent(self, t: int, k: int) -> tuple[Transition, int | None]:
        """Where the frames around ``t`` go from A (progress 0) to B (1), and the flattest
        frame near them when the transition is a fade (None for a dissolve)."""
        xa, xb = self._at(t - k), self._at(t + k)
        d = xb - xa
        dd = float(np.dot(d, d))
        lo, hi = max(self.first, t - 2 * k), min(self.last, t + 2 * k)

        def progress(i: int) -> float:
            return float(np.dot(self._at(i) - xa, d)) / dd

        start = t
        while start - 1 >= lo and progress(start - 1) > EDGE:
            start -= 1
        end = t + 1
        while end <= hi and progress(end) < 1 - EDGE:
            end += 1
        cut = next((i for i in range(start, end) if progress(i) >= 0.5), t)
        flattest = min(range(lo, hi + 1), key=lambda i: _fadedness(self._at(i)))
        faded = _spread(self._at(flattest)) < max(FLAT, FADED * max(_spread(xa), _spread(xb)))
        kind = "fade" if faded else "dissolve"
        return Transition(start, end, cut, kind), (flattest if faded else None)

    def _dip(self, out: Transition, into: Transition) -> Transition:
        """A fade-out and a fade-in that meet: one fade, cut at its flattest frame."""
        frames = range(max(out.cut, self.first), min(into.cut, self.last) + 1)
        cut = min(frames, key=lambda i: _fadedness(self._at(i)), default=out.end)
        return Transition(out.start, into.end, cut, "fade")
