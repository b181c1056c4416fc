"""One decode pass per video: its scene cuts and the sampled frames of every clip.

Scene split has to look at every frame of a video, and frame sampling needs a few frames of
every clip; decoding the video twice (once for the detector, once more to seek to the
samples) cost more than the decoding itself. ``scan_video`` decodes each video once,
sequentially, with PyAV, ``batch_size`` frames at a time (the scaling, the content score and
the gradual detector each run over the batch in a row; then the frames are kept and the clips
closed in frame order, as if one by one):

- **cuts.** Each frame is scaled to ``detection_size`` (``DETECT_WIDTH`` wide; swscale on one
  thread, in the decoder's own pixel format, then converted to BGR) and scored as PySceneDetect's
  ``ContentDetector`` scores it: the mean absolute difference of hue, saturation and value to
  the previous frame, averaged over the three. ``ContentScore`` computes that number with OpenCV
  (``absdiff`` + ``mean`` on uint8) instead of int32 numpy arrays (the same number in a third
  of the time; a test checks that the cut lists are equal), and PySceneDetect's own
  ``FlashFilter`` (merge mode, ``MIN_SCENE_LEN`` frames) turns scores over the threshold into
  cuts, as in ``ContentDetector``.
- **gradual transitions.** The same detection frames go to ``transitions.GradualDetector``
  (dissolves and fades, which no single frame step shows). A content cut inside a transition
  is one of its steps and is dropped; the transition's own frames belong to neither clip
  (``drop_transitions``), or the clips meet at its cut.
- **frames.** The decoded frames of the clip being read are kept (the decoder's frames
  themselves; frames larger than the sample size are first scaled down in their own pixel
  format) until the clip's end is certain: a boundary (cut or transition), or its stride end,
  once no boundary can still be reported before it or swallow it (the flash filter reports a
  cut at most ``MIN_SCENE_LEN`` frames late, the gradual detector a transition at most its
  ``delay``).
  Then its ``n`` frames (``frames.frame_indices``: the centres of ``n`` equal segments) become
  RGB arrays in display orientation and size, exactly as the frame stage makes them, and the
  kept frames are let go. A clip whose kept frames would pass ``MAX_KEPT_BYTES`` is not
  sampled here: its row leaves without frames and the frame stage decodes them by seeking.

Clip bounds follow ``clip_bounds`` (clips between boundaries, strides of ``max_len`` frames,
each end named by how it was found), on the frame count the probe measured (``num_frames``);
frames past it are not read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from scenedetect import FrameTimecode
from scenedetect.detector import FlashFilter

from curation.media import SWS_THREADS, to_rgb
from curation.transitions import GradualDetector, Transition

if TYPE_CHECKING:
    from curation.transnet import TransNetDetector

logger = logging.getLogger(__name__)

DETECT_WIDTH = 256  # cuts are scored on frames this wide (PySceneDetect's own working width)
MIN_SCENE_LEN = 15  # frames: PySceneDetect's ContentDetector default
MAX_KEPT_BYTES = 192 * 1024 * 1024  # decoded frames kept per video while its clip is open
# Frames decoded before they are scored: each kind of work then runs on a batch in a row, with
# its code and data still in the CPU's caches (decoding one frame evicts them). On the 14-clip
# bench set (mostly 320x180 to 480x270) 8 frames took the scan's own work from ~340 to ~250 us
# a frame. Large frames come fewer at a time (``BATCH_BYTES``): batches of 8 3840x2160 frames
# took a scanning process's peak 70-170 MB higher than batches of 1 (with and without samples)
# and were slower (0.42 s against 0.35 s for 60 frames); 1920x1080 was as fast in 2 as in 8.
BATCH = 8
BATCH_BYTES = 8 * 1024 * 1024


def batch_size(width: int, height: int) -> int:
    """Frames decoded before they are scored: ``BATCH``, fewer where these would pass
    ``BATCH_BYTES`` (a frame counted as 8-bit 4:2:0, 1.5 bytes a pixel): 1280x720 6,
    1920x1080 2, 3840x2160 1."""
    return max(1, min(BATCH, BATCH_BYTES // max(1, width * height * 3 // 2)))


def detection_size(width: int, height: int) -> tuple[int, int]:
    """The size a frame is scored at: ``DETECT_WIDTH`` wide at most, its aspect kept, an even
    height (swscale converts 4:2:0 to BGR on its fast path only then: 256x171, a 3:2 frame's,
    took 138 us against 56 at 256x170; 256x455, 9:16, 397 against 155 at 256x454)."""
    w = min(width, DETECT_WIDTH)
    return w, max(2, 2 * round(height * w / width / 2))


class ContentScore:
    """PySceneDetect's ``ContentDetector`` (default weights: hue, saturation, value, no edges)
    with its flash filter; frames are fed in order, cuts come back as frame numbers."""

    def __init__(self, threshold: float, fps: float, min_scene_len: int = MIN_SCENE_LEN):
        self.threshold = threshold
        self.fps = float(fps)
        self.filter = FlashFilter(FlashFilter.Mode.MERGE, min_scene_len)
        self.delay = self.filter.max_behind  # a cut is reported at most this many frames late
        self.previous: np.ndarray | None = None

    def score(self, bgr: np.ndarray) -> float:
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        previous, self.previous = self.previous, hsv
        if previous is None:
            return 0.0
        hue, sat, lum, _ = cv2.mean(cv2.absdiff(hsv, previous))
        return (hue + sat + lum) / 3.0

    def __call__(self, index: int, bgr: np.ndarray) -> list[int]:
        above = self.score(bgr) >= self.threshold
        cuts = self.filter.filter(FrameTimecode(index, self.fps), above)
        return [int(c.frame_num) for c in cuts]


@dataclass
class Sampling:
    """What the scan samples per clip: ``n`` frames turned to display orientation (``rotation``,
    counter-clockwise) and display size ``display`` (width, height), longer side <= max_side."""

    n: int
    max_side: int
    display: tuple[int, int]
    rotation: int = 0


@dataclass(frozen=True)
class Boundary:
    """Where one clip ends (``end``, exclusive) and the next begins (``start``): the same
    frame for a cut; the frames between are a transition's, in neither clip."""

    end: int
    start: int
    kind: str  # cut | dissolve | fade | stride


@dataclass(frozen=True)
class Clip:
    """Frames ``[start, end)`` and how each end was found: ``video`` (the video's own first
    or last frame), ``cut``, ``dissolve``, ``fade`` or ``stride`` (``split.max_clip_s``)."""

    start: int
    end: int
    start_by: str
    end_by: str


def clip_bounds(
    boundaries: list[Boundary],
    num_frames: int,
    max_len: int,
    start: int = 0,
    start_by: str = "video",
) -> list[Clip]:
    """The clips from ``start`` to ``num_frames`` between ``boundaries``, each cut into
    strides of ``max_len`` frames; boundaries at or past ``num_frames`` are ignored."""
    clips: list[Clip] = []
    for b in sorted(boundaries, key=lambda b: (b.end, b.start)):
        if b.start <= start:
            continue  # behind the clip being made
        if b.end >= num_frames:
            break
        clips += _strides(start, b.end, max_len, start_by, b.kind)
        start, start_by = b.start, b.kind
    return clips + _strides(start, num_frames, max_len, start_by, "video")


def _strides(a: int, b: int, max_len: int, first_by: str, last_by: str) -> list[Clip]:
    out = []
    while a < b:
        end = min(a + max_len, b)
        out.append(Clip(a, end, first_by, last_by if end == b else "stride"))
        a, first_by = end, "stride"
    return out


@dataclass
class Scan:
    """What one pass found: the content detector's cuts, the gradual transitions, the clips
    between them, frames decoded, and the frames of each clip (``(start, end)`` frame bounds
    -> (RGB frames, their frame numbers)); a clip missing from ``samples`` was not sampled
    (too large to keep, or no sampling asked)."""

    cuts: list[int] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    clips: list[Clip] = field(default_factory=list)
    frames_read: int = 0
    samples: dict[tuple[int, int], tuple[list[np.ndarray], list[int]]] = field(default_factory=dict)


class _Clips:
    """The clip being read: its start, the frames kept for it, and closing it when its end is
    certain: ``delay`` frames after a boundary, when no detector can still report one
    before it (or a transition that swallows a cut)."""

    def __init__(self, max_len: int, delay: int, sampling: Sampling | None, scan: Scan):
        self.max_len, self.delay, self.sampling, self.scan = max_len, delay, sampling, scan
        self.start, self.start_by = 0, "video"
        self.pending: list[Boundary] = []  # boundaries after ``start``, in order
        self.kept: dict[int, av.VideoFrame] = {}
        self.kept_bytes = 0
        self.overflow = False  # the open clip's frames passed MAX_KEPT_BYTES: not sampled
        self.reformatter = VideoReformatter()  # kept frames to sample size
        self.rgb = VideoReformatter()  # sampled frames to RGB

    def shrink(self, frame: av.VideoFrame) -> av.VideoFrame:
        """The frame as it would be kept: scaled down to the sample size when larger."""
        return frame if self.sampling is None else self._small(frame)

    def keep(self, index: int, frame: av.VideoFrame) -> None:
        """Keep frame ``index`` (as ``shrink`` made it) for sampling."""
        if self.sampling is None:
            return
        self.kept[index] = frame
        self.kept_bytes += sum(p.buffer_size for p in frame.planes)
        if self.kept_bytes > MAX_KEPT_BYTES:
            # Give up on this clip; keep only what the next clip may still need (its start is
            # at most ``delay`` frames back when this one closes).
            self.overflow = True
            self._drop_before(index - self.delay)

    def _small(self, frame: av.VideoFrame) -> av.VideoFrame:
        """The frame scaled (in its own pixel format) to the size the sample will have."""
        s = self.sampling
        assert s is not None
        scale = s.max_side / max(s.display)
        if scale >= 1:
            return frame
        size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
        return self.reformatter.reformat(
            frame, size[0], size[1], interpolation=Interpolation.AREA, threads=SWS_THREADS
        )

    def _drop_before(self, index: int) -> None:
        for i in [i for i in self.kept if i < index]:
            frame = self.kept.pop(i)
            self.kept_bytes -= sum(p.buffer_size for p in frame.planes)

    def cuts(self, cuts: list[int]) -> None:
        self._add([Boundary(c, c, "cut") for c in cuts])

    def transition(self, t: Transition, drop: bool) -> None:
        """A transition: the content detector's cuts inside it are its own steps, not cuts."""
        self.pending = [
            b for b in self.pending if not (b.kind == "cut" and t.start - 1 <= b.end <= t.end)
        ]
        self._add([Boundary(t.start, t.end, t.kind) if drop else Boundary(t.cut, t.cut, t.kind)])

    def _add(self, boundaries: list[Boundary]) -> None:
        new = [b for b in boundaries if b.start > self.start]
        if new:
            self.pending = sorted(self.pending + new, key=lambda b: (b.end, b.start))

    def advance(self, index: int, total: int | None) -> None:
        """After frame ``index``: close every clip whose end is now certain."""
        while True:
            stride_end = self.start + self.max_len
            if total is not None:
                stride_end = min(stride_end, total)
            first = self.pending[0] if self.pending else None
            if first is not None and first.end <= stride_end and first.end < (total or 1 << 62):
                if index < first.end + self.delay - 1:
                    return
                self.pending.pop(0)
                self._close(first.end, first.start, first.kind)
            elif index >= stride_end + self.delay - 1 and (total is None or stride_end < total):
                self._close(stride_end, stride_end, "stride")  # no boundary can still come
            else:
                return

    def finish(self, frames_read: int, total: int | None) -> None:
        """After the last frame: close the clips left (up to ``total``, else frames read)."""
        last = total or frames_read
        for clip in clip_bounds(self.pending, last, self.max_len, self.start, self.start_by):
            self._emit(clip)

    def _close(self, end: int, next_start: int, kind: str) -> None:
        if end > self.start:
            self._emit(Clip(self.start, end, self.start_by, kind))
        self.start, self.start_by = max(self.start, next_start), kind
        self.pending = [
            Boundary(max(b.end, self.start), b.start, b.kind)
            for b in self.pending
            if b.start > self.start
        ]
        self._drop_before(self.start)
        # the next clip is sampled only if every one of its frames is still kept
        self.overflow = bool(self.kept) and min(self.kept) > self.start

    def _emit(self, clip: Clip) -> None:
        self.scan.clips.append(clip)
        if self.sampling is not None and not self.overflow and clip.end > clip.start:
            self._sample(clip.start, clip.end)

    def _sample(self, start: int, end: int) -> None:
        from curation.stages.frames import frame_indices, rotate_to_display, to_display

        s = self.sampling
        assert s is not None
        if not self.kept:
            return
        last = max(self.kept)
        # the decoder may give a frame or two fewer than the packets: stay inside
        wanted = [min(i, last) for i in frame_indices(start, end, s.n)]
        if any(i not in self.kept for i in wanted):
            return
        frames = []
        for i in wanted:
            rgb = rotate_to_display(to_rgb(self.kept[i], self.rgb), s.rotation)
            frames.append(np.ascontiguousarray(to_display(rgb, s.display, s.max_side)))
        self.scan.samples[(start, end)] = (frames, wanted)


def scan_video(
    path: str,
    fps: float,
    total: int | None,
    threshold: float,
    max_len: int,
    sampling: Sampling | None = None,
    gradual: GradualDetector | None = None,
    drop_transitions: bool = True,
    learned: TransNetDetector | None = None,
) -> Scan:
    """Decode ``path`` once (PyAV, from the start): cuts, gradual transitions (with
    ``gradual``: its frames are dropped from both clips with ``drop_transitions``, else the
    clips meet at its cut), the clips between them and, with ``sampling``, the sampled frames
    of every clip. With ``learned`` (TransNetV2), cuts and transitions both come from it and
    the other two detectors do not run. ``total`` is the frame count the probe measured
    (frames past it are not read); None reads to the end.

    Raises what PyAV raises for a file it cannot decode, and ValueError when no frame decodes.
    """
    scan = Scan()
    detector = ContentScore(threshold, fps)
    delay = detector.delay
    if learned is not None:  # TransNetV2 finds the hard cuts too
        delay = learned.delay
    elif gradual is not None:  # a transition may still swallow a cut this late
        delay += gradual.delay + 2 * gradual.reach
    clips = _Clips(max_len, delay, sampling, scan)
    scale, convert = VideoReformatter(), VideoReformatter()

    def found(boundaries: list[Transition]) -> None:
        for t in boundaries:
            if t.kind == "cut":
                scan.cuts.append(t.cut)
                clips.cuts([t.cut])
            else:
                scan.transitions.append(t)
                clips.transition(t, drop_transitions)

    def detection_frame(kept: av.VideoFrame) -> np.ndarray:
        # Scaled in its own pixel format, then converted: scaling and converting in one
        # swscale call tints near-black pixels, and hue and saturation amplify any tint.
        width, height = detection_size(kept.width, kept.height)
        small = scale.reformat(
            kept, width, height, interpolation=Interpolation.AREA, threads=SWS_THREADS
        )
        return convert.reformat(small, format="bgr24", threads=SWS_THREADS).to_ndarray()

    index = -1
    with av.open(path) as container:
        stream = container.streams.video[0]
        decoded = islice(container.decode(stream), total)  # frames past ``total``: not read
        size = batch_size(stream.codec_context.width, stream.codec_context.height)
        for batch in iter(lambda: list(islice(decoded, size)), []):
            # Each pass over the batch runs one kind of work (swscale, the content score, the
            # gradual detector) on its frames in a row; frame by frame, then, in order, the
            # frames are kept and the clips told what was found.
            first = index + 1
            kept = [clips.shrink(frame) for frame in batch]  # scaled to the sample size
            del batch  # the full-size frames (unless kept as they are)
            bgrs = [detection_frame(k) for k in kept]
            nothing: list[list] = [[] for _ in bgrs]
            if learned is not None:
                cuts, events = nothing, [learned(first + i, bgr) for i, bgr in enumerate(bgrs)]
            else:
                cuts = [detector(first + i, bgr) for i, bgr in enumerate(bgrs)]
                events = nothing
                if gradual is not None:
                    events = [gradual(first + i, bgr) for i, bgr in enumerate(bgrs)]
            for i, frame in enumerate(kept):
                index = first + i
                clips.keep(index, frame)
                scan.cuts += cuts[i]
                clips.cuts([c for c in cuts[i] if total is None or c < total])
                found(events[i])
                clips.advance(index, total)
    scan.frames_read = index + 1
    if scan.frames_read <= 0:
        raise ValueError("no frame decoded")
    if learned is not None:
        found([t for t in learned.finish() if t.kind != "cut" or total is None or t.cut < total])
    elif gradual is not None:
        found(gradual.finish())
    clips.finish(scan.frames_read, total)
    return scan
