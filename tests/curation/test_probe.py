"""ProbeStage against the generated corpus (ground-truth labels) and real files in tests/data."""

from __future__ import annotations

import pickle
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import find, input_row, write_rotated_video, write_sar_video
from PIL import Image

from curation.config import CurationConfig
from curation.probing import probe_file, random_access_ok, sniff_family
from curation.sample_data.render import landscape, rng_for
from curation.sample_data.videos import encode_video
from curation.stages.probe import ProbeStage

DATA = Path(__file__).resolve().parents[1] / "data"
# label "corrupt" field -> reason tag
CORRUPT_REASONS = {
    "truncated": "decode_error",
    "header_only": "decode_error",
    "empty": "empty_file",
    "random_bytes": "not_media",
}


def label_row(root: Path, label: dict) -> dict:
    if label.get("target"):
        return input_row(root / label["source"], label["kind"], root / label["target"])
    return input_row(root / label["path"])


@pytest.fixture(scope="module")
def probed(corpus):
    root, labels = corpus
    rows = ProbeStage(CurationConfig().probe).process_batch(
        [label_row(root, lab) for lab in labels]
    )
    assert len(rows) == len(labels)
    return {lab["id"]: (lab, row) for lab, row in zip(labels, rows, strict=True)}


def plain_video(labels) -> dict:
    return find(
        labels,
        true_kind="video",
        claimed_kind="video",
        container="mp4",
        cuts_s=[],
        rotation=0,
        duration=3.0,
    )


def probe_one(row: dict, **overrides) -> dict:
    cfg = CurationConfig.model_validate(overrides) if overrides else CurationConfig()
    (out,) = ProbeStage(cfg.probe, cfg.kind).process_batch([row])
    return out


def test_stage_shape_and_pickles():
    stage = ProbeStage(CurationConfig().probe)
    assert stage.name == "probe" and not stage.uses_model and stage.resources.cpus == 1
    assert pickle.loads(pickle.dumps(stage)).limits == stage.limits


def test_valid_media_match_their_labels(probed):
    checked = 0
    for lab, row in probed.values():
        if lab["expect"] != "valid" or lab["kind"] in ("image_edit", "video_edit"):
            continue
        assert row["status"] is None, (lab["id"], row["reasons"])
        assert row["kind"] == lab["true_kind"], lab["id"]
        assert (row["width"], row["height"]) == (lab["display_width"], lab["display_height"])
        assert row["rotation"] == (lab["rotation"] or 0), lab["id"]
        assert row["sample_aspect_ratio"] == 1.0 and row["has_audio"] is False
        if lab["true_kind"] == "video":
            assert row["codec"] == lab["codec"] and row["container"] == lab["container"]
            assert row["fps"] == pytest.approx(lab["fps"]), lab["id"]
            assert row["num_frames"] == lab["num_frames"], lab["id"]
            # within one frame period (Matroska stores millisecond timestamps)
            assert row["duration"] == pytest.approx(lab["duration"], abs=1 / lab["fps"])
            assert random_access_ok(row["source_uri"], row["duration"]) is True
        else:
            assert row["container"] == lab["format"] and row["codec"] == lab["format"]
            assert (row["num_frames"], row["duration"], row["fps"]) == (1, 0.0, None)
        checked += 1
    assert checked >= 20


def test_rotated_video_reports_display_size(probed):
    (lab, row), *_ = [(lab, row) for lab, row in probed.values() if lab.get("rotation") == 90]
    assert (row["width"], row["height"]) == (lab["height"], lab["width"])
    assert row["rotation"] == 90 and row["width"] < row["height"]


def test_corrupt_files_become_error_rows_with_the_expected_reason(probed):
    corrupt = [(lab, row) for lab, row in probed.values() if lab["expect"] == "error"]
    assert len(corrupt) >= 6
    for lab, row in corrupt:
        name, reason = lab["id"], CORRUPT_REASONS[lab["corrupt"]]
        assert row["status"] == "error", name
        assert len(row["reasons"]) == 1 and row["reasons"][0].split(":")[0] == reason, (
            name,
            row["reasons"],
        )
        assert row["kind"] == lab["claimed_kind"]  # the contract needs a kind on every row


def test_mislabelled_extensions_are_detected_by_content(probed):
    mislabelled = [
        (lab, row)
        for lab, row in probed.values()
        if lab["expect"] == "valid" and lab["true_kind"] and lab["claimed_kind"] != lab["true_kind"]
    ]
    assert {lab["true_kind"] for lab, _ in mislabelled} == {"image", "video"}
    for lab, row in mislabelled:
        assert row["status"] is None and row["kind"] == lab["true_kind"], lab["id"]
        assert Path(row["source_uri"]).suffix.lstrip(".") not in (row["container"], "jpg")
        assert (row["width"], row["height"]) == (lab["width"], lab["height"])
        if lab["true_kind"] == "video":
            assert (row["num_frames"], row["fps"]) == (lab["num_frames"], lab["fps"])


def test_edit_pairs_get_target_dims(probed):
    pairs = [
        (lab, row) for lab, row in probed.values() if lab["kind"] in ("image_edit", "video_edit")
    ]
    assert len(pairs) == 11
    for lab, row in pairs:
        if "kind_mismatch" in lab["expect_pair_failures"]:
            continue
        assert row["status"] is None, (lab["id"], row["reasons"])
        assert row["kind"] == lab["kind"]
        assert [row["width"], row["height"]] == lab["source_size"]
        assert [row["target_width"], row["target_height"]] == lab["target_size"]
        expected_frames = 1 if lab["kind"] == "image_edit" else 48
        assert row["num_frames"] == row["target_num_frames"] == expected_frames


def test_edit_pair_of_image_and_video_is_a_kind_mismatch(probed):
    ((_, row),) = [
        p for p in probed.values() if "kind_mismatch" in (p[0]["expect_pair_failures"] or [])
    ]
    assert row["status"] == "error"
    assert row["reasons"] == ["kind_mismatch: image_edit pair: source is image, target is video"]


def test_edit_pair_kind_is_detected_when_not_given(corpus):
    root, labels = corpus
    lab = find(labels, kind="video_edit", expect_pair_ok=True)
    row = probe_one(input_row(root / lab["source"], None, root / lab["target"]))
    assert row["kind"] == "video_edit" and row["target_num_frames"] == 48


def test_forced_kind_must_match_content(corpus):
    root, labels = corpus
    image = root / find(labels, true_kind="image", claimed_kind="image", format="jpeg")["path"]
    video = root / plain_video(labels)["path"]
    row = probe_one(input_row(image, "video"))
    assert row["status"] == "error"
    assert row["reasons"] == ["kind_mismatch: forced video, content is image"]
    row = probe_one(input_row(video, "image"))
    assert row["reasons"] == ["kind_mismatch: forced image, content is video"]
    pair = find(labels, kind="image_edit", expect_pair_ok=True)
    row = probe_one(input_row(root / pair["source"], "video_edit", root / pair["target"]))
    assert row["reasons"] == ["kind_mismatch: forced video_edit, content is image_edit"]
    ok = probe_one(input_row(video, "video"))
    assert ok["status"] is None and ok["kind"] == "video"


def test_config_kind_forces_rows_without_kind(corpus):
    root, labels = corpus
    image = root / find(labels, true_kind="image", claimed_kind="image")["path"]
    row = probe_one(input_row(image), kind="video")
    assert row["reasons"] == ["kind_mismatch: forced video, content is image"]


def test_edit_kind_without_target(corpus):
    root, labels = corpus
    image = root / find(labels, true_kind="image", claimed_kind="image")["path"]
    row = probe_one(input_row(image, "image_edit"))
    assert row["reasons"] == ["missing_target: kind image_edit needs a target_uri"]


def test_target_errors_name_the_side(corpus):
    root, labels = corpus
    image = root / find(labels, true_kind="image", claimed_kind="image")["path"]
    empty = root / find(labels, corrupt="empty")["path"]
    row = probe_one(input_row(image, "image_edit", empty))
    assert row["status"] == "error" and row["reasons"][0].startswith("empty_file: target: ")


def test_absurd_size_and_too_long(corpus):
    root, labels = corpus
    image = root / find(labels, true_kind="image", claimed_kind="image")["path"]
    video = root / plain_video(labels)["path"]
    for path in (image, video):
        row = probe_one(input_row(path), probe={"max_pixels": 1000})
        assert row["status"] == "error" and row["reasons"][0].startswith("absurd_size: "), row
        row = probe_one(input_row(path), probe={"max_file_bytes": 100})
        assert row["reasons"][0].startswith("absurd_size: "), row
    row = probe_one(input_row(video), probe={"max_duration_s": 1.0})
    assert row["reasons"] == ["too_long: 3.0 s > probe.max_duration_s (1.0)"]
    assert probe_one(input_row(video), probe={"max_duration_s": 3.5})["status"] is None


def test_rows_already_in_error_pass_through(corpus):
    root, labels = corpus
    empty = root / find(labels, corrupt="empty")["path"]
    row = {**input_row(empty, "image"), "status": "error", "reasons": ["x"]}
    assert ProbeStage(CurationConfig().probe).process_batch([row]) == [row]


def test_missing_file(tmp_path):
    row = probe_one(input_row(tmp_path / "nope.mp4"))
    assert row["reasons"][0].startswith("not_found: ") and row["kind"] == "video"


def test_unknown_codec_is_unsupported(corpus, tmp_path):
    root, labels = corpus
    data = (root / find(labels, container="matroska", codec="h264")["path"]).read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    path = tmp_path / "unknown_codec.mkv"
    path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_OMNIFORGE/XYZ"))  # same length
    row = probe_one(input_row(path))
    assert row["status"] == "error" and row["reasons"][0].startswith("unsupported_codec: ")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    row = probe_one(input_row(path))
    assert row["reasons"][0].startswith("no_video_stream: "), row["reasons"]


def _rotated(tmp_path: Path, rotation: int) -> Path:
    upright = landscape(rng_for(0, f"rot{rotation}"), 64, 48, "day")  # display: 48 wide, 64 high
    return write_rotated_video(tmp_path / f"rot{rotation}.mp4", upright, rotation)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata(tmp_path, rotation):
    info = probe_file(str(_rotated(tmp_path, rotation)), CurationConfig().probe)
    assert info["rotation"] == rotation
    assert (info["width"], info["height"]) == (48, 64)


def test_sample_aspect_ratio_gives_display_width(tmp_path):
    info = probe_file(str(write_sar_video(tmp_path / "sar.mp4")), CurationConfig().probe)
    assert info["sample_aspect_ratio"] == pytest.approx(4 / 3)
    assert (info["width"], info["height"]) == (128, 64)


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_variable_frame_rate(tmp_path, fmt):
    """30 frames alternating 20 ms / 60 ms: average 25.4 fps, 1.18 s, every frame counted."""
    path = tmp_path / f"vfr.{'mkv' if fmt == 'matroska' else 'mp4'}"
    img = landscape(rng_for(0, "vfr"), 64, 96, "day")
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(img, i, 1)))
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += 20 if i % 2 == 0 else 60
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    info = probe_file(str(path), CurationConfig().probe)
    assert info["num_frames"] == 30
    assert info["duration"] == pytest.approx(1.18, abs=0.01)
    assert info["fps"] == pytest.approx(30 / 1.18, rel=0.01)


def test_real_videos():
    limits = CurationConfig().probe
    counter = probe_file(str(DATA / "counter.mp4"), limits)
    assert counter == {
        "kind": "video",
        "container": "mp4",
        "codec": "h264",
        "width": 1920,
        "height": 1080,
        "rotation": 0,
        "sample_aspect_ratio": 1.0,
        "has_audio": False,
        "fps": 10.0,
        "num_frames": 30,
        "duration": 3.0,
    }
    fades = probe_file(str(DATA / "fades.mp4"), limits)
    assert (fades["codec"], fades["width"], fades["height"]) == ("mpeg4", 480, 320)
    assert (fades["fps"], fades["num_frames"], fades["duration"]) == (25.0, 250, 10.0)
    short = probe_file(str(DATA / "realshort.mp4"), limits)
    assert short["has_audio"] is True and short["num_frames"] == 36
    assert short["fps"] == pytest.approx(30000 / 999.33, rel=1e-3)
    assert short["duration"] == pytest.approx(1.2, abs=0.01)


def test_broken_random_access_is_flagged():
    """Old x264 4:4:4 footage decodes only from its first frame (needs the x264 version SEI)."""
    path = str(DATA / "cockatoo_9s.mp4")
    info = probe_file(path, CurationConfig().probe)
    assert (info["width"], info["height"], info["num_frames"], info["fps"]) == (1280, 720, 180, 20)
    assert random_access_ok(path, info["duration"]) is False


def test_real_images():
    limits = CurationConfig().probe
    gray = probe_file(str(DATA / "camera.png"), limits)
    assert (gray["kind"], gray["container"], gray["width"], gray["height"]) == (
        "image",
        "png",
        512,
        512,
    )
    horse = probe_file(str(DATA / "horse.png"), limits)
    assert (horse["width"], horse["height"]) == (400, 328)


def test_exif_orientation_swaps_display_size(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    Image.new("RGB", (80, 40), (200, 10, 10)).save(path, exif=exif)
    info = probe_file(str(path), CurationConfig().probe)
    assert (info["width"], info["height"], info["rotation"]) == (40, 80, 270)


def test_sniff_family():
    assert sniff_family(b"\x89PNG\r\n\x1a\n" + b"\0" * 8) == "image"
    assert sniff_family(b"\0\0\0\x20ftypisom") == "video"
    assert sniff_family(b"\x1a\x45\xdf\xa3....") == "video"
    assert sniff_family(b"hello world") is None


# ------------------------------------------------------------------ forged container timing
# An attacker edits the numbers a container *claims* (same byte length, file still valid); the
# probe must report what the stream really holds.

REAL_TAG = b"00:00:03.000000000"  # Matroska DURATION tag of a 3-s stream, ASCII


def _clip(path: Path, seconds: float = 3.0, fps: int = 30, container: str = "matroska") -> Path:
    img = landscape(rng_for(0, "forged"), 64, 96, "day")
    frames = (np.roll(img, 2 * i, 1) for i in range(round(seconds * fps)))
    encode_video(path, frames, 96, 64, fps, container=container)
    return path


def _segment_duration(ms: float) -> bytes:
    """Matroska Segment Info ``Duration`` element: ID 0x4489, 8-byte float, in 1 ms units."""
    return b"\x44\x89\x88" + struct.pack(">d", ms)


def _forge(path: Path, *edits: tuple[bytes, bytes]) -> Path:
    data = path.read_bytes()
    for old, new in edits:
        assert len(old) == len(new) and data.count(old) == 1, old
        data = data.replace(old, new)
    out = path.with_name(f"forged_{path.name}")
    out.write_bytes(data)
    return out


def _mp4_box(data: bytes, name: bytes) -> int:
    assert data.count(name) == 1, name
    return data.index(name) - 4  # the box starts with its 4-byte size


def _forge_mp4_stts(path: Path, scale: Fraction) -> Path:
    """Scale every sample delta of the video track's time-to-sample table (stts)."""
    data = bytearray(path.read_bytes())
    box = _mp4_box(data, b"stts")
    (entries,) = struct.unpack(">I", data[box + 12 : box + 16])
    for k in range(entries):
        at = box + 16 + 8 * k
        count, delta = struct.unpack(">II", data[at : at + 8])
        data[at : at + 8] = struct.pack(">II", count, int(delta * scale))
    out = path.with_name(f"forged_{path.name}")
    out.write_bytes(bytes(data))
    return out


FORGERIES = {
    # the reproduced case: 3 s that claim 3 h 59 min, tag only or tag + segment duration
    "tag_4h": [(REAL_TAG, b"03:59:00.000000000")],
    "tag_and_segment_4h": [
        (REAL_TAG, b"03:59:00.000000000"),
        (_segment_duration(3000.0), _segment_duration(14_340_000.0)),
    ],
    "segment_4h": [(_segment_duration(3000.0), _segment_duration(14_340_000.0))],
    # a stream claimed shorter than it is (would give 300 fps and a 0.3-s clip)
    "tag_and_segment_0.3s": [
        (REAL_TAG, b"00:00:00.300000000"),
        (_segment_duration(3000.0), _segment_duration(300.0)),
    ],
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_matroska_duration_is_replaced_by_the_measured_one(tmp_path, forgery):
    forged = _forge(_clip(tmp_path / "clip.mkv"), *FORGERIES[forgery])
    with av.open(str(forged)) as c:  # FFmpeg really reads the forged claim
        claims = {c.duration / av.time_base, _tag_seconds(c.streams.video[0])}
    assert claims - {3.0}, claims
    info = probe_file(str(forged), CurationConfig().probe)
    assert info["num_frames"] == 90
    assert info["duration"] == pytest.approx(3.0, abs=1 / 30)
    assert info["fps"] == pytest.approx(30.0, rel=0.01)
    assert random_access_ok(str(forged), info["duration"]) is True
    row = probe_one(input_row(forged))
    assert row["status"] is None and row["duration"] == info["duration"]


def _tag_seconds(stream) -> float:
    h, m, s = stream.metadata["DURATION"].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_forged_duration_does_not_decide_the_length_limit(tmp_path):
    # 3 s claiming 3 h 59 min: not too long for a 60-s limit
    forged = _forge(_clip(tmp_path / "short.mkv"), *FORGERIES["tag_and_segment_4h"])
    row = probe_one(input_row(forged), probe={"max_duration_s": 60.0})
    assert row["status"] is None and row["duration"] == pytest.approx(3.0, abs=1 / 30)
    # 12 s claiming 3 s: too long for a 5-s limit, measured from the packets
    long = _clip(tmp_path / "long.mkv", seconds=12.0, fps=10)
    forged = _forge(
        long,
        (b"00:00:12.000000000", REAL_TAG),
        (_segment_duration(12000.0), _segment_duration(3000.0)),
    )
    row = probe_one(input_row(forged), probe={"max_duration_s": 5.0})
    assert row["status"] == "error" and row["reasons"][0].startswith("too_long: at least 5."), row
    # an honest long file is still refused from its claim, checked at the claimed end
    row = probe_one(input_row(long), probe={"max_duration_s": 5.0})
    assert row["reasons"] == ["too_long: 12.0 s > probe.max_duration_s (5.0)"]
    # 12 s claiming 5 h: too long, but the message gives what the packets hold
    forged = _forge(
        long,
        (b"00:00:12.000000000", b"05:00:00.000000000"),
        (_segment_duration(12000.0), _segment_duration(18_000_000.0)),
    )
    row = probe_one(input_row(forged), probe={"max_duration_s": 5.0})
    assert row["reasons"] == ["too_long: 12.0 s > probe.max_duration_s (5.0)"]


def test_forged_mp4_header_durations_are_ignored(tmp_path):
    """mvhd / tkhd / mdhd durations 4780x too long: the sample tables still say 3 s."""
    path = _clip(tmp_path / "clip.mp4", container="mp4")
    data = bytearray(path.read_bytes())
    for name, at in ((b"mvhd", 24), (b"tkhd", 28), (b"mdhd", 24)):  # version-0 boxes
        box = _mp4_box(data, name)
        (value,) = struct.unpack(">I", data[box + at : box + at + 4])
        data[box + at : box + at + 4] = struct.pack(">I", value * 4780)
    forged = tmp_path / "forged_headers.mp4"
    forged.write_bytes(bytes(data))
    info = probe_file(str(forged), CurationConfig().probe)
    assert (info["num_frames"], info["fps"], info["duration"]) == (90, 30.0, 3.0)


def _slideshow(path: Path, seconds_per_frame: float, frames: int = 20) -> Path:
    """An honest file whose frames are ``seconds_per_frame`` apart (millisecond timestamps)."""
    img = landscape(rng_for(0, "slideshow"), 64, 96, "day")
    tb = Fraction(1, 1000)
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=Fraction(1000, round(seconds_per_frame * 1000)))
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = tb
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(img, 4 * i, 1)))
            frame.pts, frame.time_base = round(i * seconds_per_frame * 1000), tb
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_implausible_fps_is_an_error_row(tmp_path):
    # a real slideshow: one frame every 2 s
    row = probe_one(input_row(_slideshow(tmp_path / "slides.mkv", 2.0)))
    assert row["status"] == "error" and row["kind"] == "video"
    (reason,) = row["reasons"]
    assert reason == "implausible_fps: 0.5 fps (20 frames in 40.000 s) outside [1, 1000]"
    # MP4 sample tables forged: 3 s stretched to 3 h 59 min (0.006 fps), squeezed to 6 ms
    # (the muxer writes a 15360 Hz track clock: 512 ticks a frame)
    mp4 = _clip(tmp_path / "clip.mp4", container="mp4")
    stretched = probe_one(input_row(_forge_mp4_stts(mp4, Fraction(4780))))
    assert stretched["reasons"][0].startswith("implausible_fps: 0.006276 fps"), stretched
    squeezed = probe_one(input_row(_forge_mp4_stts(mp4, Fraction(1, 512))))
    assert squeezed["reasons"][0].startswith("implausible_fps: 1.536e+04 fps"), squeezed
    # the limits are inclusive and a 1-fps time-lapse is fine
    ok = probe_one(input_row(_slideshow(tmp_path / "timelapse.mkv", 1.0, frames=4)))
    assert ok["status"] is None, ok["reasons"]
    assert (ok["fps"], ok["num_frames"], ok["duration"]) == (1.0, 4, 4.0)
