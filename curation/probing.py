"""What a file is, from its bytes (never its extension), and its geometry: the probe's readers.

``probe_file`` detects the kind from content (a JPEG named ``.mp4`` is an image, an MP4 named
``.png`` is a video) and returns the probe columns of the sample contract. Still images go
through Pillow, everything else through FFmpeg (PyAV); an image format only FFmpeg reads is
decoded as one picture. Sizes are *display* sizes: the pixel aspect ratio and the rotation
metadata (video display matrix, EXIF orientation) are applied. A file passes only when a first
frame actually decodes, so header-only and truncated files are ``decode_error`` here instead
of failing later. Video timing is measured from the packets (``curation.video_timing``).

``random_access_ok`` is the check frame sampling asks for before it seeks in a video.
The stage that fills the columns of every row is ``curation.stages.probe``.
"""

from __future__ import annotations

import os
import warnings
from fractions import Fraction
from typing import Any

import av
from PIL import Image, UnidentifiedImageError

from curation.config import ProbeConfig
from curation.media import local_path
from curation.stages.base import SampleError
from curation.video_timing import seek, timing

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
    return _still_image(name, name, int(width), int(height), rotation)


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
    codec = container.streams.video[0].codec_context.name
    return _still_image(fmt, codec, frame.width, frame.height, 0)


def _still_image(container: str, codec: str, width: int, height: int, rotation: int) -> dict:
    """The probe columns of a still image: one frame, no timing, square pixels."""
    return {
        "kind": "image",
        "container": container,
        "codec": codec,
        "width": width,
        "height": height,
        "rotation": rotation,
        "sample_aspect_ratio": 1.0,
        "has_audio": False,
        "fps": None,
        "num_frames": 1,
        "duration": 0.0,
    }


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
    num_frames, fps, duration = timing(path, container, stream, limits, what)

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
            sought = seek(container, container.streams.video[0].index, duration / 2)
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
