"""One decode pass per video: its scene cuts and the sampled frames of every clip.

Scene split has to look at every frame of a video, and frame sampling needs a few frames of
every clip; decoding the video twice (once for the detector, once more to seek to the
samples) cost more than the decoding itself. ``scan_video`` decodes each video once,
sequentially, with PyAV:

- **cuts.** Each frame is scaled to ``DETECT_WIDTH`` pixels wide (swscale, in the decoder's
  own pixel format, then converted to BGR) and scored as PySceneDetect's ``ContentDetector``
  scores it: the mean absolute difference of hue, saturation and value to the previous
  frame, averaged over the three. ``ContentScore`` computes that number with OpenCV
  (``absdiff`` + ``mean`` on uint8) instead of int32 numpy arrays (the same number in a third
  of the time; a test checks that the cut lists are equal), and PySceneDetect's own
  ``FlashFilter`` (merge mode, ``MIN_SCENE_LEN`` frames) turns scores over the threshold into
  cuts, as in ``ContentDetector``.
- **frames.** The decoded frames of the clip being read are kept (the decoder's frames
  themselves; frames larger than the sample size are first scaled down in their own pixel
  format) until the clip's end is certain: a cut, or its stride end once no cut can still be
  reported before it (the flash filter reports a cut at most ``MIN_SCENE_LEN`` frames late).
  Then its ``n`` frames (``frames.frame_indices``: the centres of ``n`` equal segments) become
  RGB arrays in display orientation and size, exactly as the frame stage makes them, and the
  kept frames are let go. A clip whose kept frames would pass ``MAX_KEPT_BYTES`` is not
  sampled here: its row leaves without frames and the frame stage decodes them by seeking.

Clip bounds follow ``split.scene_bounds`` (scenes between cuts, strides of ``max_len``
frames), on the frame count the probe measured (``num_frames``); frames past it are not read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from scenedetect import FrameTimecode
from scenedetect.detector import FlashFilter

logger = logging.getLogger(__name__)

DETECT_WIDTH = 256  # cuts are scored on frames this wide (PySceneDetect's own working width)
MIN_SCENE_LEN = 15  # frames: PySceneDetect's ContentDetector default
MAX_KEPT_BYTES = 192 * 1024 * 1024  # decoded frames kept per video while its clip is open


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


@dataclass
class Scan:
    """What one pass found: cut frame numbers, frames decoded, and the frames of each clip
    (``(start, end)`` frame bounds -> (RGB frames, their frame numbers)); a clip missing from
    ``samples`` was not sampled (too large to keep, or no sampling asked)."""

    cuts: list[int] = field(default_factory=list)
    frames_read: int = 0
    samples: dict[tuple[int, int], tuple[list[np.ndarray], list[int]]] = field(default_factory=dict)


class _Clips:
    """The clip being read: its start, the frames kept for it, and closing it when its end is
    certain (``split.scene_bounds`` rules, applied as cuts arrive)."""

    def __init__(self, max_len: int, delay: int, sampling: Sampling | None, scan: Scan):
        self.max_len, self.delay, self.sampling, self.scan = max_len, delay, sampling, scan
        self.start = 0
        self.pending: list[int] = []  # cuts after ``start``, in order
        self.kept: dict[int, av.VideoFrame] = {}
        self.kept_bytes = 0
        self.overflow = False  # the open clip's frames passed MAX_KEPT_BYTES: not sampled
        self.reformatter = VideoReformatter()

    def keep(self, index: int, frame: av.VideoFrame) -> av.VideoFrame:
        """Keep frame ``index`` for sampling; returns it as kept (scaled down when larger)."""
        if self.sampling is None:
            return frame
        frame = self._small(frame)
        self.kept[index] = frame
        self.kept_bytes += sum(p.buffer_size for p in frame.planes)
        if self.kept_bytes > MAX_KEPT_BYTES:
            # Give up on this clip; keep only what the next clip may still need (its start is
            # at most ``delay`` frames back when this one closes).
            self.overflow = True
            self._drop_before(index - self.delay)
        return frame

    def _small(self, frame: av.VideoFrame) -> av.VideoFrame:
        """The frame scaled (in its own pixel format) to the size the sample will have."""
        s = self.sampling
        assert s is not None
        scale = s.max_side / max(s.display)
        if scale >= 1:
            return frame
        size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
        return self.reformatter.reformat(
            frame, width=size[0], height=size[1], interpolation=Interpolation.AREA
        )

    def _drop_before(self, index: int) -> None:
        for i in [i for i in self.kept if i < index]:
            frame = self.kept.pop(i)
            self.kept_bytes -= sum(p.buffer_size for p in frame.planes)

    def advance(self, index: int, cuts: list[int], total: int | None) -> None:
        """After frame ``index``: close every clip whose end is now certain."""
        self.pending += [c for c in cuts if c > self.start and (total is None or c < total)]
        while True:
            stride_end = self.start + self.max_len
            if total is not None:
                stride_end = min(stride_end, total)
            if self.pending and self.pending[0] <= stride_end:
                end = self.pending.pop(0)
            elif index >= stride_end + self.delay - 1 and (total is None or stride_end < total):
                end = stride_end  # no cut inside it can still be reported
            else:
                return
            self._close(end)

    def finish(self, frames_read: int, total: int | None) -> None:
        """After the last frame: close the clips left (up to ``total``, else frames read)."""
        from curation.stages.split import scene_bounds

        last = total or frames_read
        for a, b in scene_bounds(self.pending, last, self.max_len, start=self.start):
            self._close(b, first=a)

    def _close(self, end: int, first: int | None = None) -> None:
        start = self.start if first is None else first
        if self.sampling is not None and not self.overflow and end > start:
            self._sample(start, end)
        self.start = end
        self.pending = [c for c in self.pending if c > end]
        self._drop_before(end)
        # the next clip is sampled only if every one of its frames is still kept
        self.overflow = bool(self.kept) and min(self.kept) > end

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
            rgb = rotate_to_display(self.kept[i].to_ndarray(format="rgb24"), s.rotation)
            frames.append(np.ascontiguousarray(to_display(rgb, s.display, s.max_side)))
        self.scan.samples[(start, end)] = (frames, wanted)


def scan_video(
    path: str,
    fps: float,
    total: int | None,
    threshold: float,
    max_len: int,
    sampling: Sampling | None = None,
) -> Scan:
    """Decode ``path`` once (PyAV, from the start): cuts and, with
    ``sampling``, the sampled frames of every clip. ``total`` is the frame count the probe
    measured (frames past it are not read); None reads to the end.

    Raises what PyAV raises for a file it cannot decode, and ValueError when no frame decodes.
    """
    scan = Scan()
    detector = ContentScore(threshold, fps)
    clips = _Clips(max_len, detector.delay, sampling, scan)
    scale, convert = VideoReformatter(), VideoReformatter()
    index = -1
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            index += 1
            if total is not None and index >= total:
                break
            kept = clips.keep(index, frame)  # scaled down already when larger than a sample
            # Scaled in its own pixel format, then converted: scaling and converting in one
            # swscale call tints near-black pixels, and hue and saturation amplify any tint.
            width = min(kept.width, DETECT_WIDTH)
            height = max(2, round(kept.height * width / kept.width))
            small = scale.reformat(kept, width, height, interpolation=Interpolation.AREA)
            cuts = detector(index, convert.reformat(small, format="bgr24").to_ndarray())
            scan.cuts += cuts
            clips.advance(index, cuts, total)
    scan.frames_read = index + 1 if total is None else min(index + 1, total)
    if scan.frames_read <= 0:
        raise ValueError("no frame decoded")
    clips.finish(scan.frames_read, total)
    return scan
