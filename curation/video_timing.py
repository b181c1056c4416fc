"""A video stream's timing, measured from its packets: never taken from what the container claims.

A Matroska ``DURATION`` tag or Segment duration is plain text/bytes anyone can edit, so
``timing`` returns a ``num_frames``, ``duration`` and ``fps`` that agree with each other and
with the stream's packets (its docstring says what is checked and what it costs), and an fps
outside [``MIN_FPS``, ``MAX_FPS``] is an error. The probe (``curation.probing``) asks it for
every video; ``seek`` also starts ``curation.probing.random_access_ok``'s mid-file check.

Reason tags raised (``SampleError``): ``decode_error``, ``too_long``, ``implausible_fps``,
``unverifiable_duration``.
"""

from __future__ import annotations

import logging
from fractions import Fraction

import av

from curation.config import ProbeConfig
from curation.stages.base import SampleError

# Frame rates outside these limits are forged or broken timing, not footage: below one frame a
# second is a slideshow or a stretched duration (a 3-s clip claiming 4 h has 0.006 fps), above
# 1000 a squeezed one (no camera or screen delivers that as video).
MIN_FPS = 1.0
MAX_FPS = 1000.0
# A claimed duration agrees with the packets within the larger of these (millisecond timestamps,
# whether the last frame's period is counted, a rounded tag).
DURATION_TOLERANCE_S = 0.05
DURATION_TOLERANCE_FRAMES = 2

logger = logging.getLogger(__name__)


def _count_packets(
    path: str, index: int, stop_after_s: float | None = None
) -> tuple[int, float | None, bool]:
    """Frames of stream ``index`` by demuxing (no decoding), the pts extent in seconds, and
    whether the last packet carried its own duration.

    With ``stop_after_s`` the count stops as soon as the extent exceeds it (the caller only
    needs to know the stream is longer than that); the returned extent is then over the limit.
    """
    n = 0
    first = last = None
    last_has_duration = False
    with av.open(path) as container:
        stream = container.streams[index]
        tb = stream.time_base
        for packet in container.demux(stream):
            if packet.size == 0:  # flush packet
                continue
            n += 1
            if packet.pts is not None and tb is not None:
                start = packet.pts * tb
                end = start + (packet.duration or 0) * tb
                first = start if first is None else min(first, start)
                if last is None or end >= last:
                    last, last_has_duration = end, bool(packet.duration)
                if stop_after_s is not None and float(last - first) > stop_after_s:
                    break
    if first is None or last is None:
        return n, None, False
    return n, float(last - first), last_has_duration


def seek(container: av.container.InputContainer, index: int, at_s: Fraction | float):
    """(stream ``index``, its time base, its start in seconds) with the container sought to the
    keyframe at or before ``at_s`` seconds after the start; None when it has no time base."""
    stream = container.streams[index]
    tb = stream.time_base
    if tb is None:
        return None
    t0 = stream.start_time * tb if stream.start_time is not None else 0
    container.seek(int((t0 + at_s) / tb), stream=stream, backward=True)
    return stream, tb, t0


def _tail_end(path: str, index: int, at_s: float) -> tuple[float, bool] | None:
    """Where stream ``index`` really ends (seconds after its start, and whether the last packet
    carried its own duration), found by seeking to ``at_s`` and demuxing from the keyframe
    before it to the end of the file: one GOP for a file that is that long, the last GOP for
    one that is shorter. None when the file cannot seek or has no timestamps."""
    try:
        with av.open(path) as container:
            sought = seek(container, index, Fraction(at_s))
            if sought is None:
                return None
            stream, tb, t0 = sought
            end, has_duration = None, False
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                stop = (packet.pts + (packet.duration or 0)) * tb
                if end is None or stop >= end:
                    end, has_duration = stop, bool(packet.duration)
    except (av.FFmpegError, OverflowError, ValueError):
        return None
    return None if end is None else (float(end - t0), has_duration)


def _stream_duration(stream: av.video.stream.VideoStream) -> float | None:
    """Duration the stream claims: its header field, else a Matroska ``DURATION`` tag."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            return None
    return None


def _agree(claimed: float, measured: float, period: float | None) -> bool:
    """Whether a claimed duration matches a measured one (ms timestamps, last-frame period)."""
    tolerance = max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_FRAMES * (period or 0.0))
    return abs(claimed - measured) <= tolerance


def _too_long(what: str, duration: float, limits: ProbeConfig, at_least: bool = False):
    more = "at least " if at_least else ""
    return SampleError(
        "too_long",
        f"{what}{more}{duration:.1f} s > probe.max_duration_s ({limits.max_duration_s})",
    )


def timing(
    path: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    limits: ProbeConfig,
    what: str,
) -> tuple[int, float, float]:
    """(num_frames, fps, duration) of the video stream, checked against its packets.

    What a file *claims* (stream header duration, Matroska ``DURATION`` tag, container
    duration) is never taken on trust:

    - ISO-BMFF (MP4/MOV/3GP): the frame count and the stream duration come from the sample
      tables that drive demuxing (FFmpeg already ignores forged ``mvhd``/``mdhd``/``tkhd``
      durations), so they are only checked against each other: ``frames / fps`` must match the
      duration. No extra I/O.
    - every other container, and an ISO-BMFF whose numbers disagree: all packets of the stream
      are demuxed (I/O of the whole file, no decoding) for the packet count and the pts extent;
      a claimed duration that disagrees with the extent by more than ``DURATION_TOLERANCE_S``
      or ``DURATION_TOLERANCE_FRAMES`` frame periods is replaced by the extent, and the fps is
      derived from count / duration. A claim over ``probe.max_duration_s`` makes the row
      ``too_long`` only when the packets found by a seek to the claimed end (one GOP demuxed)
      end past the limit too; the full count stops once the extent passes the limit.

    Raises SampleError: ``decode_error`` (no video packets), ``too_long``,
    ``unverifiable_duration`` (no usable packet timestamps and no frame rate: nothing to check
    the claim against), ``implausible_fps`` (outside [MIN_FPS, MAX_FPS]).
    """
    rate = stream.average_rate or stream.guessed_rate
    rate = float(rate) if rate else None
    claimed = _stream_duration(stream)
    if claimed is None and container.duration:
        claimed = container.duration / av.time_base  # may include a longer audio track
    header_frames = stream.frames or 0
    iso_bmff = container.format.name.startswith("mov,mp4")

    if (
        iso_bmff
        and header_frames > 0
        and claimed
        and rate
        and _agree(claimed, header_frames / rate, 1.0 / rate)
    ):
        num_frames, fps, duration = header_frames, rate, claimed
    else:
        if claimed is not None and claimed > limits.max_duration_s:
            # Too long if the packets say so too: checked at the claimed end, not trusted.
            tail = _tail_end(path, stream.index, claimed)
            if tail is not None:
                end, has_duration = tail
                if not has_duration and rate:
                    end += 1.0 / rate
                if end > limits.max_duration_s:
                    raise _too_long(what, end, limits)
        try:
            num_frames, extent, has_duration = _count_packets(
                path, stream.index, stop_after_s=limits.max_duration_s
            )
        except av.FFmpegError as e:
            raise SampleError("decode_error", f"{what}demuxing the video stream: {e}") from e
        if num_frames <= 0:
            raise SampleError("decode_error", f"{what}{container.format.name}: no video packets")
        if extent is not None and extent > limits.max_duration_s:
            raise _too_long(what, extent, limits, at_least=True)
        measured = None
        if extent is not None:
            if has_duration:
                measured = extent
            elif rate:
                measured = extent + 1.0 / rate  # the last frame lasts one frame period
            elif num_frames > 1:
                measured = extent * num_frames / (num_frames - 1)
        elif rate:
            measured = num_frames / rate  # no timestamps: the header rate is all there is
        if not measured or measured <= 0:
            shown = f"{claimed:.3f} s" if claimed is not None else "none"
            raise SampleError(
                "unverifiable_duration",
                f"{what}{num_frames} packets without usable timestamps and no frame rate; "
                f"the claimed duration ({shown}) cannot be checked",
            )
        period = measured / num_frames
        if claimed and _agree(claimed, measured, period):
            duration = claimed
        else:
            if claimed:
                logger.info(
                    "%s: claimed duration %.3f s, packets hold %.3f s: using the packets",
                    path,
                    claimed,
                    measured,
                )
            duration = measured
        fps = rate
        if num_frames > 1:
            # Header rates of such streams are often a guess from the first packets (VFR).
            average = num_frames / duration
            if not fps or abs(average - fps) > 0.01 * fps:
                fps = average
        if not fps:
            fps = num_frames / duration
    if duration > limits.max_duration_s:
        raise _too_long(what, duration, limits)
    if not MIN_FPS <= fps <= MAX_FPS:
        raise SampleError(
            "implausible_fps",
            f"{what}{fps:.4g} fps ({num_frames} frames in {duration:.3f} s) outside "
            f"[{MIN_FPS:g}, {MAX_FPS:g}]",
        )
    return int(num_frames), float(fps), float(duration)
