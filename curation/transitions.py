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

For every frame (a window's middle) and half-widths ``k`` from ``min_s / 2`` to ``max_s / 2``
seconds, a window passes when its net change is at least ``MIN_NET`` levels (RMS over the
thumbnail) and ``SETTLED`` times each side's own change, no step is more than ``MAX_STEP`` of
it, and the middle frame is within ``MAX_BEND`` of it from the ends' average. Passing middles
closer than ``MERGE_S`` are one transition, judged by its best window: its frames are those
whose progress from A to B (projection on the segment between the window's ends) lies in
(``EDGE``, ``1 - EDGE``), and the shots are cut where the progress passes one half. A
transition that passes through a flat frame (black, white or any one colour: ``FLAT``, or
``FADED`` of the shots' own spread) is a ``fade``; a fade-out and a fade-in that meet (a dip
to black) are one fade, cut at its flattest frame.

The thresholds are set so that no window passes on real single-shot footage with fast camera
and subject motion (the cockatoo fixture); the price is that a long dissolve between two shots
that both move fast can be missed: over 1-2 s such a shot's own change on the thumbnail is
more than half the change across the shots, and the window no longer stands out.

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
MERGE_S = 0.25  # passing middles this close (s) are one transition


@dataclass(frozen=True)
class Transition:
    """Frames ``[start, end)`` belong to neither shot; the shots are cut at ``cut``."""

    start: int
    end: int
    cut: int
    kind: str  # "dissolve" | "fade" ("cut" from the TransNetV2 backend: start == end == cut)


def features(bgr: np.ndarray) -> np.ndarray:
    """The thumbnail (block means) of one detection frame, float32, flattened. The frame is
    first cropped to whole blocks (at most a block's width and height less): OpenCV's area
    resize by whole factors is 3x faster than by fractional ones."""
    h, w = bgr.shape[:2]
    bh, bw = max(1, h // THUMB[1]), max(1, w // THUMB[0])
    whole = bgr[: bh * THUMB[1], : bw * THUMB[0]]
    return cv2.resize(whole, THUMB, interpolation=cv2.INTER_AREA).astype(np.float32).ravel()


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
        self.every = 2 if self.fps >= 16 else 1  # middles judged: every n-th frame
        # a middle is judged `reach` frames late and its run closes `merge` middles later; a
        # fade waits up to `reach // 2` frames more for a fade-in to meet it
        self.delay = self.reach + self.merge + self.reach // 2 + 2
        self.keep = 2 * self.reach + 4 * self.merge + 8  # frames the oldest open middle needs
        self.x = np.zeros((2 * self.keep, THUMB[0] * THUMB[1] * 3), np.float32)
        self.step = np.zeros(2 * self.keep, np.float32)  # step[i]: RMS change frame i -> i + 1
        self.n = 0  # rows of x in use
        self.first = 0  # frame number of x[0]
        self.last = -1  # frame number of the newest frame
        self.run: list[tuple[int, int, float]] = []  # passing (middle, k, score)
        self.held: Transition | None = None  # a fade-out waiting for a fade-in

    def __call__(self, index: int, bgr: np.ndarray) -> list[Transition]:
        if self.n == len(self.x):  # keep the newest `keep` frames
            drop = self.n - self.keep
            self.x[: self.keep] = self.x[drop:]
            self.step[: self.keep] = self.step[drop:]
            self.n, self.first = self.keep, self.first + drop
        self.x[self.n] = features(bgr)
        if self.n:
            self.step[self.n - 1] = _rms(self.x[self.n], self.x[self.n - 1])
        self.n += 1
        self.last = index
        return self._middle(index - self.reach)

    def finish(self) -> list[Transition]:
        """After the last frame: middles nearer the end than ``reach`` have no settled frames
        after them and are not judged; close what is open."""
        out = self._close_run()
        if self.held is not None:
            out.append(self.held)
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
        if self.held is not None and t - self.held.end > self.reach // 2 and not self.run:
            out.append(self.held)
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
        ok = (net >= SETTLED * settle) & (bend <= MAX_BEND * net) & (largest <= MAX_STEP * net)
        if not ok.any():
            return None
        score = np.where(ok, net / np.maximum(settle, 1.0), -1.0)
        i = int(score.argmax())
        return int(ks[i]), float(score[i])

    def _close_run(self) -> list[Transition]:
        if not self.run:
            return []
        t, k, _ = max(self.run, key=lambda r: r[2])
        self.run = []
        found, flat_at = self._extent(t, k)
        held, self.held = self.held, None
        out = [] if held is None else [held]
        if flat_at is not None and flat_at < t:  # out of a flat frame: a fade-in
            if held is not None and found.start - held.end <= self.reach // 2:
                return [self._dip(held, found)]
            return out + [found]
        if flat_at is not None:  # into a flat frame: a fade-out, held for a fade-in to meet
            self.held = found
            return out
        return out + [found]

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
