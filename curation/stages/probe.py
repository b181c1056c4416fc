"""Probe: what each input really is (from its bytes, never its extension), and its geometry.

For every input the probe detects the kind from content (a JPEG named ``.mp4`` is an image,
an MP4 named ``.png`` is a video), checks the kind the user forced or the manifest gave, and
fills the probe columns of the sample contract. Sizes are *display* sizes: the pixel aspect
ratio and the rotation metadata (video display matrix, EXIF orientation) are applied.

A file passes only when a first frame actually decodes, so header-only and truncated files
become ``decode_error`` rows here instead of failing later. Edit pairs are probed on both sides
(``target_*`` columns) and must be image/image or video/video.

Columns set: ``kind`` (detected), ``container``, ``codec``, ``width``/``height`` (display),
``rotation``, ``sample_aspect_ratio``, ``has_audio``, ``fps`` (average), ``num_frames``,
``duration``; ``target_width``/``target_height``/``target_num_frames`` for edit pairs. Rows
that fail before their kind is known get the kind their file name claims.

Video timing is measured, not taken from what the container claims (a Matroska ``DURATION``
tag or Segment duration is plain text/bytes anyone can edit): ``num_frames``, ``duration`` and
``fps`` agree with each other and with the stream's packets (see ``_timing`` for what is
checked and what it costs), and an fps outside [``MIN_FPS``, ``MAX_FPS``] is an error.

Reason tags: ``empty_file``, ``not_found``, ``not_media``, ``decode_error``,
``no_video_stream``, ``unsupported_codec``, ``absurd_size``, ``too_long``, ``implausible_fps``,
``unverifiable_duration``, ``kind_mismatch``, ``missing_target``.
"""

from __future__ import annotations

import logging
import os
import warnings
from fractions import Fraction
from typing import Any, ClassVar

import av
from PIL import Image, UnidentifiedImageError

from catalog.schema import EDIT_KINDS
from curation.config import ProbeConfig
from curation.media import local_path
from curation.stages.base import Resources, Row, SampleError, Stage, claimed_kind

Image.init()
# Still-image formats recognised by Pillow. Formats without a magic number (TGA, SPIDER...)
# are left out on purpose: Pillow would "recognise" random bytes as them.
_PIL_WANTED = (
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "JPEG2000",
    "PPM",
    "AVIF",
    "QOI",
    "ICO",
    "PSD",
    "SGI",
    "DDS",
)
PIL_FORMATS = tuple(f for f in _PIL_WANTED if f in Image.OPEN)
# Pillow format -> container name (MPO is a multi-picture JPEG).
_PIL_NAMES = {"MPO": "jpeg", "JPEG2000": "jpeg2000"}
# EXIF orientation -> (display rotation in CCW degrees, width/height swapped)
EXIF_ROTATION = {
    1: (0, False),
    2: (0, False),
    3: (180, False),
    4: (180, False),
    5: (90, True),
    6: (270, True),
    7: (270, True),
    8: (90, True),
}
# FFmpeg demuxers that "open" text files as video (ANSI art): not media for a curation corpus.
_PSEUDO_VIDEO_FORMATS = {"tty"}
SNIFF_BYTES = 64
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


def sniff_family(head: bytes) -> str | None:
    """'image' / 'video' when ``head`` starts like a known media file, else None.

    Used only to tell a *broken* media file (``decode_error``) from something that was never
    media (``not_media``) once the real decoders have refused it.
    """
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")):
        return "image"
    if head.startswith((b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ")):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "image" if brand in (b"avif", b"avis", b"heic", b"heix", b"mif1") else "video"
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba")):
        return "video"
    if head[:4] == b"RIFF" and head[8:11] == b"AVI":
        return "video"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):  # ASF / WMV
        return "video"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):  # QuickTime without ftyp
        return "video"
    return None


def normalize_rotation(degrees: float | int | None) -> int:
    """Any angle -> 0/90/180/270 (nearest quarter turn, counter-clockwise)."""
    if not degrees:
        return 0
    return int(round(float(degrees) / 90.0)) % 4 * 90


def _container_name(container: av.container.InputContainer, head: bytes) -> str:
    name = container.format.name
    if name.startswith("mov,mp4"):
        brand = (container.metadata.get("major_brand") or "").strip().lower()
        if brand == "qt":
            return "mov"
        return "3gp" if brand.startswith("3g") else "mp4"
    if name.startswith("matroska"):
        return "webm" if b"webm" in head else "matroska"
    return name.split(",")[0]


def _check_pixels(width: int, height: int, limits: ProbeConfig, what: str) -> None:
    if width * height > limits.max_pixels:
        raise SampleError(
            "absurd_size",
            f"{what}{width}x{height} = {width * height} pixels > probe.max_pixels "
            f"({limits.max_pixels})",
        )


def _probe_image(path: str, img: Image.Image, limits: ProbeConfig, what: str) -> dict[str, Any]:
    fmt = img.format or "unknown"
    width, height = img.size
    _check_pixels(width, height, limits, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise SampleError("absurd_size", f"{what}{e}") from e
    except Exception as e:  # truncated data, bad chunks...
        raise SampleError("decode_error", f"{what}{fmt} image does not decode: {e}") from e
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF must not make a decodable image an error
        orientation = 1
    rotation, swapped = EXIF_ROTATION.get(orientation, (0, False))
    if swapped:
        width, height = height, width
    name = _PIL_NAMES.get(fmt, fmt.lower())
    return {
        "kind": "image",
        "container": name,
        "codec": name,
        "width": int(width),
        "height": int(height),
        "rotation": rotation,
        "sample_aspect_ratio": 1.0,
        "has_audio": False,
        "fps": None,
        "num_frames": 1,
        "duration": 0.0,
    }


def _probe_pipe_image(container: av.container.InputContainer, what: str, limits) -> dict:
    """An image format FFmpeg reads but Pillow does not: decode the one picture with PyAV."""
    fmt = container.format.name.removesuffix("_pipe")
    try:
        frame = next(container.decode(video=0), None)
    except av.FFmpegError as e:
        raise SampleError("decode_error", f"{what}{fmt} image does not decode: {e}") from e
    if frame is None:
        raise SampleError("decode_error", f"{what}{fmt} image has no decodable picture")
    _check_pixels(frame.width, frame.height, limits, what)
    return {
        "kind": "image",
        "container": fmt,
        "codec": container.streams.video[0].codec_context.name,
        "width": frame.width,
        "height": frame.height,
        "rotation": 0,
        "sample_aspect_ratio": 1.0,
        "has_audio": False,
        "fps": None,
        "num_frames": 1,
        "duration": 0.0,
    }


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


def _seek(container: av.container.InputContainer, index: int, at_s: Fraction | float):
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
            sought = _seek(container, index, Fraction(at_s))
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


def _timing(
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


def random_access_ok(path: str, duration: float | None, check_frames: int = 3) -> bool:
    """Whether a decoder that starts at a keyframe mid-file gives sound frames (video stream 0).

    Checked on a fresh decoder that seeks to the middle: FFmpeg flags the frames corrupt when
    they depend on what it never saw. Real cases: open GOPs, and old x264 4:4:4 streams whose
    decoding needs the encoder-version SEI of the first frame (FFmpeg applies a workaround only
    after seeing it). decord returns broken pictures for such files without any error, so frame
    sampling decodes them with PyAV from the start instead. Asked by frame sampling, only for
    the videos it has to seek in.
    """
    if not duration:
        return True
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return True
            sought = _seek(container, container.streams.video[0].index, duration / 2)
            if sought is None:
                return True
            stream = sought[0]
            for k, frame in enumerate(container.decode(stream)):
                if frame.is_corrupt:
                    return False
                if k + 1 >= check_frames:
                    break
    except av.FFmpegError:
        return False
    return True


def _probe_video(
    path: str, container: av.container.InputContainer, head: bytes, limits: ProbeConfig, what: str
) -> dict[str, Any]:
    fmt = container.format.name
    videos = [
        s
        for s in container.streams.video
        if not (s.disposition & av.stream.Disposition.attached_pic)
    ]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        if not container.streams:
            raise SampleError("not_media", f"{what}{fmt} container without streams")
        raise SampleError("no_video_stream", f"{what}{fmt} has only {', '.join(kinds)}")
    stream = videos[0]
    cc = stream.codec_context
    if cc is None:
        raise SampleError("unsupported_codec", f"{what}no decoder for the video stream ({fmt})")
    codec = cc.codec.canonical_name if cc.codec is not None else cc.name

    width, height = cc.width, cc.height
    if width and height:
        _check_pixels(width, height, limits, what)
    num_frames, fps, duration = _timing(path, container, stream, limits, what)

    # Decode the first frame: a header alone must not pass, and the frame carries the rotation.
    try:
        first = next(container.decode(stream), None)
    except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
        raise SampleError("unsupported_codec", f"{what}{codec}: {e}") from e
    except av.FFmpegError as e:
        raise SampleError("decode_error", f"{what}{codec} in {fmt}: {e}") from e
    if first is None:
        raise SampleError("decode_error", f"{what}{codec} in {fmt}: no frame decodes")
    if not (width and height):
        width, height = first.width, first.height
        _check_pixels(width, height, limits, what)
    rotation = normalize_rotation(first.rotation)

    sar = stream.sample_aspect_ratio or cc.sample_aspect_ratio
    sar = Fraction(sar) if sar and sar > 0 else Fraction(1)
    display_w, display_h = max(1, round(width * sar)), height
    if rotation in (90, 270):
        display_w, display_h = display_h, display_w

    return {
        "kind": "video",
        "container": _container_name(container, head),
        "codec": codec,
        "width": int(display_w),
        "height": int(display_h),
        "rotation": rotation,
        "sample_aspect_ratio": float(sar),
        "has_audio": bool(container.streams.audio),
        "fps": fps,
        "num_frames": num_frames,
        "duration": duration,
    }


def probe_file(uri: str, limits: ProbeConfig, what: str = "") -> dict[str, Any]:
    """Probe one medium by content. Returns the probe columns plus ``kind`` (image | video).

    ``what`` prefixes error details (``"target: "`` for the target side of an edit pair).
    Raises SampleError for anything that is not a decodable image or video within limits.
    """
    path = local_path(uri)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as e:
        raise SampleError("not_found", f"{what}{uri}") from e
    if size == 0:
        raise SampleError("empty_file", f"{what}{uri} has 0 bytes")
    if size > limits.max_file_bytes:
        raise SampleError(
            "absurd_size", f"{what}{size} bytes > probe.max_file_bytes ({limits.max_file_bytes})"
        )
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    family = sniff_family(head)

    # 1. Still images through Pillow (reads the header only until load()).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise SampleError("absurd_size", f"{what}{e}") from e
    except UnidentifiedImageError:
        img = None
    except Exception as e:  # a recognised header that is broken
        if family == "image":
            raise SampleError("decode_error", f"{what}broken image header: {e}") from e
        img = None
    if img is not None:
        with img:
            return _probe_image(path, img, limits, what)

    # 2. Everything else through FFmpeg.
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        if family is not None:
            raise SampleError("decode_error", f"{what}{family} file does not open: {e}") from e
        raise SampleError("not_media", f"{what}unrecognised content ({size} bytes)") from e
    with container:
        fmt = container.format.name
        if fmt in _PSEUDO_VIDEO_FORMATS:
            raise SampleError("not_media", f"{what}content read as {fmt!r} (text), not media")
        if fmt.endswith("_pipe") or fmt == "image2":
            if family == "image" or not container.streams.video:
                name = fmt.removesuffix("_pipe")
                raise SampleError("decode_error", f"{what}{name} image does not decode")
            return _probe_pipe_image(container, what, limits)
        return _probe_video(path, container, head, limits, what)


class ProbeStage(Stage):
    """Detect the kind from content and fill the probe columns (and ``target_*`` for edits)."""

    name: ClassVar[str] = "probe"
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 8
    uses_model: ClassVar[bool] = False

    def __init__(self, cfg: ProbeConfig, kind: str = "auto"):
        self.limits = cfg
        self.default_kind = None if kind == "auto" else kind

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out = super().process_batch(rows)
        # The contract needs a kind on every row: an input that failed before its kind was known
        # keeps the kind its file name claims.
        return [r if r.get("kind") else {**r, "kind": claimed_kind(r)} for r in out]

    def process_row(self, row: Row) -> Row:
        forced = row.get("kind") or self.default_kind
        target = row.get("target_uri")
        if forced in EDIT_KINDS and not target:
            raise SampleError("missing_target", f"kind {forced} needs a target_uri")
        src = probe_file(row["source_uri"], self.limits, "source: " if target else "")
        out = dict(row)
        out.update({k: v for k, v in src.items() if k != "kind"})
        if target:
            tgt = probe_file(target, self.limits, "target: ")
            if src["kind"] != tgt["kind"]:
                pair = forced if forced in EDIT_KINDS else "edit"
                raise SampleError(
                    "kind_mismatch",
                    f"{pair} pair: source is {src['kind']}, target is {tgt['kind']}",
                )
            kind = f"{src['kind']}_edit"
            out.update(
                target_width=tgt["width"],
                target_height=tgt["height"],
                target_num_frames=tgt["num_frames"],
            )
        else:
            kind = src["kind"]
        if forced is not None and forced != kind:
            raise SampleError("kind_mismatch", f"forced {forced}, content is {kind}")
        out["kind"] = kind
        return out
