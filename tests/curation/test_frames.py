"""FrameSampleStage: the right frames, in display orientation and size, from both decoders."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import input_row, mean_diff, reference_frames, write_rotated_video, write_sar_video
from PIL import Image

import curation.stages.frames as frames_mod
from curation.config import CurationConfig
from curation.media import fit_max_side
from curation.stages.frames import FrameSampleStage, frame_indices
from curation.stages.probe import ProbeStage
from curation.stages.split import SceneSplitStage

DATA = Path(__file__).resolve().parents[1] / "data"
CFG = CurationConfig()
N = CFG.frames.num_frames


def pipeline(rows: list[dict], cfg: CurationConfig = CFG) -> list[dict]:
    rows = ProbeStage(cfg.probe, cfg.kind).process_batch(rows)
    rows = SceneSplitStage(cfg.split).process_batch(rows)  # frames sampled below
    return FrameSampleStage(cfg.frames, cfg.probe).process_batch(rows)


def sampled(path, **kw) -> list[dict]:
    rows = pipeline([input_row(path, **kw)])
    assert all(r["status"] is None for r in rows), [r["reasons"] for r in rows]
    return rows


def clip_indices(row: dict) -> list[int]:
    fps = row["fps"]
    return frame_indices(round(row["span"]["start"] * fps), round(row["span"]["end"] * fps), N)


@pytest.fixture(scope="module")
def corpus_rows(corpus):
    root, labels = corpus
    rows = []
    for lab in labels:
        if lab["expect"] != "valid" or "kind_mismatch" in (lab["expect_pair_failures"] or []):
            continue
        if lab.get("target"):
            rows.append(input_row(root / lab["source"], lab["kind"], root / lab["target"]))
        else:
            rows.append(input_row(root / lab["path"]))
    out = pipeline(rows)
    assert [r["reasons"] for r in out if r["status"]] == []
    return out


def test_stage_shape_and_pickles():
    stage = FrameSampleStage(CFG.frames, CFG.probe)
    assert stage.name == "frames" and not stage.uses_model and stage.resources.cpus == 1
    assert pickle.loads(pickle.dumps(stage)).num_frames == N


def test_frame_indices():
    assert frame_indices(0, 80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_indices(72, 144, 8) == [76, 85, 94, 103, 112, 121, 130, 139]
    assert frame_indices(10, 13, 8) == [10, 11, 12]  # fewer frames than asked: each once
    assert frame_indices(5, 5, 8) == []


def test_video_clips_get_uniform_frames_inside_the_span(corpus_rows):
    clips = [r for r in corpus_rows if r["kind"] == "video"]
    assert len(clips) >= 10
    for r in clips:
        assert len(r["frames"]) == len(r["frame_times"]) == min(N, r["num_frames"])
        times = r["frame_times"]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert times[0] >= 0 and times[-1] < r["span"]["end"] - r["span"]["start"]
        # centres of N equal segments: the first and last frames sit half a segment in
        seg = r["duration"] / len(times)
        assert times[0] == pytest.approx(seg / 2, abs=1 / r["fps"])
        shape = fit_max_side(np.zeros((r["height"], r["width"], 3), np.uint8)).shape
        for f in r["frames"]:
            assert f.shape == shape
        assert r["frames_decoder"] == "decord"


def test_frames_are_exactly_the_frames_of_the_clip(corpus):
    root, labels = corpus
    (lab,) = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"]
    clips = sampled(root / lab["path"])
    ref = reference_frames(root / lab["path"])
    for clip in clips:
        for f, i in zip(clip["frames"], clip_indices(clip), strict=True):
            assert mean_diff(f, ref[i]) < 0.5, (clip["span"], i)


def test_pyav_fallback_gives_the_same_frames(corpus, monkeypatch):
    root, labels = corpus
    (lab,) = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"]
    decord_rows = sampled(root / lab["path"])

    def refuse(*args, **kwargs):
        raise RuntimeError("decord refuses")

    monkeypatch.setattr(frames_mod, "_decord_frames", refuse)
    pyav_rows = FrameSampleStage(CFG.frames, CFG.probe).process_batch(
        [{k: v for k, v in r.items() if k != "frames"} for r in decord_rows]
    )
    assert decord_rows[-1]["span"]["start"] > frames_mod.SEEK_AFTER_S  # the seeking path
    for a, b in zip(decord_rows, pyav_rows, strict=True):
        assert b["frames_decoder"] == "pyav" and b["frame_times"] == a["frame_times"]
        for fa, fb in zip(a["frames"], b["frames"], strict=True):
            assert mean_diff(fa, fb) < 0.5


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="no AV1 encoder in PyAV")
def test_file_decord_cannot_read_falls_back_to_pyav(tmp_path):
    """decord's bundled FFmpeg 4.1 has no AV1 decoder; PyAV's has (dav1d)."""
    path = tmp_path / "av1.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 96, 3), np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libsvtav1", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"preset": "12"}
        for i in range(24):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1))))
        out.mux(stream.encode(None))
    (row,) = sampled(path)
    assert row["codec"] == "av1" and row["frames_decoder"] == "pyav"
    ref = reference_frames(path)
    for f, i in zip(row["frames"], clip_indices(row), strict=True):
        assert mean_diff(f, ref[i]) < 0.5


def test_broken_random_access_is_decoded_correctly():
    """Seeking into this old x264 4:4:4 footage gives garbage (decord too); frames must not."""
    path = DATA / "cockatoo_9s.mp4"
    rows = sampled(path)
    assert len(rows) == 2 and all(r["frames_decoder"] == "pyav" for r in rows)
    ref = reference_frames(path)
    for row in rows:
        for f, i in zip(row["frames"], clip_indices(row), strict=True):
            expected = fit_max_side(ref[i])
            assert mean_diff(f, expected) < 1.0, (row["span"], i)


def _rotated_video(tmp_path: Path, rotation: int, height: int, width: int) -> Path:
    """Upright picture with red in the top-left quadrant, stored rotated."""
    upright = np.full((height, width, 3), 40, np.uint8)
    upright[: height // 2, : width // 2] = (230, 20, 20)
    return write_rotated_video(tmp_path / f"rot{rotation}.mp4", upright, rotation)


def _check_upright(frame: np.ndarray, height: int, width: int) -> None:
    assert frame.shape == (height, width, 3)
    h, w = height // 2, width // 2
    top_left = frame[4 : h - 4, 4 : w - 4].mean(axis=(0, 1))
    bottom_right = frame[h + 4 : -4, w + 4 : -4].mean(axis=(0, 1))
    assert top_left[0] > 180 and top_left[1] < 60, top_left
    assert bottom_right.max() < 70, bottom_right


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_rotation_is_applied(tmp_path, monkeypatch, rotation, decoder):
    if decoder == "pyav":
        monkeypatch.setattr(frames_mod, "_decord_frames", lambda *a: 1 / 0)
    (row,) = sampled(_rotated_video(tmp_path, rotation, 96, 64))
    assert row["frames_decoder"] == decoder and row["rotation"] == rotation
    _check_upright(row["frames"][0], 96, 64)


def test_rotated_size_decord_cannot_handle(tmp_path):
    """decord 0.6.0 raises on some rotated sizes (64x48): the PyAV fallback takes over."""
    (row,) = sampled(_rotated_video(tmp_path, 90, 64, 48))
    _check_upright(row["frames"][0], 64, 48)


def test_corpus_rotated_video_has_display_orientation(corpus_rows):
    (row,) = [r for r in corpus_rows if r["kind"] == "video" and r["rotation"] == 90]
    assert row["height"] > row["width"]
    assert row["frames"][0].shape[:2] == (row["height"], row["width"])


def test_non_square_pixels_are_resized_to_display_size(tmp_path):
    (row,) = sampled(write_sar_video(tmp_path / "sar.mp4"))
    assert (row["width"], row["height"]) == (128, 64)
    assert all(f.shape == (64, 128, 3) for f in row["frames"])


def test_large_real_video_is_downscaled():
    (row,) = sampled(DATA / "counter.mp4")
    assert len(row["frames"]) == N and row["frame_times"][0] == pytest.approx(0.1)
    assert row["frames"][0].shape == (360, 640, 3)  # 1920x1080 fit to 640


def test_images_give_one_rgb_frame(corpus_rows):
    images = [r for r in corpus_rows if r["kind"] == "image"]
    assert len(images) >= 10
    for r in images:
        assert r["frame_times"] == [0.0] and len(r["frames"]) == 1
        f = r["frames"][0]
        assert f.shape == fit_max_side(np.zeros((r["height"], r["width"], 3), np.uint8)).shape


def test_grayscale_and_alpha_images(tmp_path):
    (gray,) = sampled(DATA / "camera.png")
    f = gray["frames"][0]
    assert (
        f.shape == (512, 512, 3)
        and (f[..., 0] == f[..., 1]).all()
        and (f[..., 1] == f[..., 2]).all()
    )
    src = np.asarray(Image.open(DATA / "camera.png").convert("L"))
    assert (f[..., 0] == src).all()

    (horse,) = sampled(DATA / "horse.png")
    rgba = np.asarray(Image.open(DATA / "horse.png").convert("RGBA"))
    f = horse["frames"][0]
    assert f.shape == (328, 400, 3)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)  # composited on white
    assert (alpha < 1).any() and (alpha == 1).any()
    assert np.abs(f - expected).max() <= 1

    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 10, 10))
    pal.save(tmp_path / "pal.png", transparency=0)
    (row,) = sampled(tmp_path / "pal.png")
    f = row["frames"][0]
    assert tuple(f[5, 5]) == (10, 200, 30) and tuple(f[5, 15]) == (255, 255, 255)

    for mode in ("I;16", "CMYK"):
        img = Image.new("RGB", (16, 8), (120, 60, 30))
        img = img.convert("L").convert(mode) if mode == "I;16" else img.convert(mode)
        ext = "png" if mode == "I;16" else "jpg"
        img.save(tmp_path / f"m.{ext}")
        (row,) = sampled(tmp_path / f"m.{ext}")
        assert row["frames"][0].shape == (8, 16, 3)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 40), (20, 20, 200))
    img.paste((230, 20, 20), (0, 0, 40, 40))  # red on the stored left half
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: red on top
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (row,) = sampled(tmp_path / "phone.jpg")
    f = row["frames"][0]
    assert f.shape == (80, 40, 3) == (row["height"], row["width"], 3)
    assert f[10, 20, 0] > 180 and f[70, 20, 2] > 150


def test_edit_pairs_get_target_frames(corpus_rows):
    pairs = [r for r in corpus_rows if r["kind"] in ("image_edit", "video_edit")]
    assert {r["kind"] for r in pairs} == {"image_edit", "video_edit"}
    for r in pairs:
        n = 1 if r["kind"] == "image_edit" else N
        assert len(r["frames"]) == len(r["target_frames"]) == n
        assert "span" not in r or r["span"] is None
        src, tgt = r["frames"][0], r["target_frames"][0]
        assert src.shape[:2] == fit_max_side(np.zeros((r["height"], r["width"]))).shape
        assert (
            tgt.shape[:2] == fit_max_side(np.zeros((r["target_height"], r["target_width"]))).shape
        )
    videos = [r for r in pairs if r["kind"] == "video_edit"]
    for r in videos:  # whole videos: N frames spread over all 2 s
        assert r["frame_times"][0] == pytest.approx(r["duration"] / (2 * N), abs=1 / r["fps"])
    changed = [
        max(mean_diff(a, b) for a, b in zip(r["frames"], r["target_frames"], strict=True))
        for r in videos
    ]
    assert max(changed) > 5 and min(changed) < 0.5  # real edits differ; the identical pair not


def test_undecodable_inputs_are_decode_errors(corpus, tmp_path):
    root, labels = corpus
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    video_row = {
        **input_row(junk, "video"),
        "fps": 24.0,
        "num_frames": 48,
        "span": {"start": 0.0, "end": 2.0},
        "width": 320,
        "height": 180,
    }
    truncated = next(
        lab for lab in labels if lab["corrupt"] == "truncated" and lab["format"] == "jpeg"
    )
    image_row = input_row(root / truncated["path"], "image")
    out = FrameSampleStage(CFG.frames, CFG.probe).process_batch([video_row, image_row])
    for row in out:
        assert row["status"] == "error" and row["reasons"][0].startswith("decode_error: "), row
