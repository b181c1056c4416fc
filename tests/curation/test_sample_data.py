"""The synthetic corpus is what its labels say it is, and it is reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from curation.sample_data import (
    EDITS_FILE,
    FIELDS,
    LABELS_FILE,
    generate,
    load_edits,
    load_labels,
)
from curation.sample_data.images import IMAGES, render_image

PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def root(corpus) -> Path:
    return corpus[0]


@pytest.fixture(scope="module")
def labels(corpus) -> list[dict]:
    return corpus[1]


def by_id(labels: list[dict], id_: str) -> dict:
    (lab,) = [lab for lab in labels if lab["id"] == id_]
    return lab


def valid(labels: list[dict], kind: str) -> list[dict]:
    return [lab for lab in labels if lab["kind"] == kind and lab["expect"] == "valid"]


@lru_cache(maxsize=32)
def frames(path: str, fmt: str = "gray") -> tuple[np.ndarray, ...]:
    with av.open(path) as c:
        return tuple(f.to_ndarray(format=fmt) for f in c.decode(video=0))


def gray_f32(path: Path) -> list[np.ndarray]:
    return [f.astype(np.float32) for f in frames(str(path))]


def mean_abs_diffs(fr: list[np.ndarray]) -> np.ndarray:
    """diffs[i] = mean |frame[i+1] - frame[i]|, i.e. indexed by the earlier frame."""
    return np.array([np.abs(b - a).mean() for a, b in zip(fr, fr[1:], strict=False)])


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def region(img: np.ndarray, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


def outside(img: np.ndarray, box: list[int]) -> np.ndarray:
    mask = np.ones(img.shape[:2], bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = False
    return img[mask]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def pyav_fails(path: Path) -> bool:
    """True when PyAV cannot open the file or decodes no video frame from it."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return True
            return sum(1 for _ in c.decode(video=0)) == 0
    except av.error.FFmpegError:
        return True


def pil_fails(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return False
    except OSError:  # UnidentifiedImageError and "image file is truncated" are both OSErrors
        return True


# --- corpus-level -------------------------------------------------------------------------


def test_corpus_is_small(root):
    # generation speed is a benchmark concern (bench/), not a test
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 15 * 2**20, f"corpus is {total / 2**20:.1f} MiB"


def test_labels_file_roundtrip_and_schema(root, labels):
    assert load_labels(root) == labels
    assert (root / LABELS_FILE).read_text().count("\n") == len(labels)
    assert len({lab["id"] for lab in labels}) == len(labels)
    for lab in labels:
        assert list(lab) == list(FIELDS), lab["id"]
        assert lab["expect"] in ("valid", "error")
        assert lab["kind"] in ("image", "video", "image_edit", "video_edit")
        path = root / lab["path"]
        assert path.is_file(), lab["path"]
        assert not Path(lab["path"]).is_absolute() and "\\" not in lab["path"]
        data = path.read_bytes()
        assert lab["size_bytes"] == len(data)
        assert lab["sha256"] == hashlib.sha256(data).hexdigest()


def test_corpus_covers_required_cases(labels):
    kinds = Counter(lab["kind"] for lab in labels if not lab["path"].startswith("corrupt/"))
    assert kinds["image"] >= 12 and kinds["video"] >= 10
    assert kinds["image_edit"] >= 6 and kinds["video_edit"] >= 3
    corrupt = [lab for lab in labels if lab["path"].startswith("corrupt/")]
    assert len(corrupt) >= 8
    assert {lab["corrupt"] for lab in corrupt} == {
        "truncated",
        "empty",
        "random_bytes",
        "header_only",
        None,
    }
    videos = valid(labels, "video")
    assert {v["motion"] for v in videos} >= {"static", "slow", "fast"}
    assert {v["container"] for v in videos} == {"mp4", "matroska"}
    assert {v["codec"] for v in videos} == {"h264", "mpeg4"}
    assert {v["fps"] for v in videos} == {24, 30}
    assert any(v["rotation"] == 90 for v in videos)
    assert any(v["cut_frames"] for v in videos)
    assert any(v["height"] > v["width"] for v in videos)
    assert any(v["duration"] < 2 and "too_short" in v["expect_filtered"] for v in videos)
    assert all(2 <= v["duration"] <= 9 for v in videos if "too_short" not in v["expect_filtered"])
    failures = {
        f for lab in labels if lab["expect_pair_failures"] for f in lab["expect_pair_failures"]
    }
    assert failures == {"identical", "aspect_mismatch", "no_instruction", "kind_mismatch"}


# --- images -------------------------------------------------------------------------------


def test_images_match_labels(root, labels):
    images = valid(labels, "image")
    assert {lab["format"] for lab in images} == {"jpeg", "png", "webp"}
    for lab in images:
        with Image.open(root / lab["path"]) as im:
            assert im.size == (lab["width"], lab["height"]), lab["id"]
            assert im.format == PIL_FORMAT[lab["format"]], lab["id"]
            assert im.mode == lab["mode"], lab["id"]
        arr = cv2.imread(str(root / lab["path"]), cv2.IMREAD_UNCHANGED)
        assert arr.shape[:2] == (lab["height"], lab["width"]), lab["id"]


def test_image_aspect_ratios_and_filter_flags(labels):
    images = [lab for lab in valid(labels, "image") if lab["path"].startswith("images/")]
    ratios = {round(lab["width"] / lab["height"], 2) for lab in images}
    assert ratios >= {1.0, 1.78, 0.56, 1.33, 1.5, 2.0, 3.0, 0.25}
    strip = by_id(labels, "strip_200x800.png")
    assert strip["width"] * 4 == strip["height"] and strip["expect_filtered"] == ["aspect_ratio"]
    tiny = by_id(labels, "tiny_64x48.jpg")
    assert (tiny["width"], tiny["height"]) == (64, 48) and tiny["expect_filtered"] == ["too_small"]
    assert max(lab["width"] for lab in images) == 1280
    dup = by_id(labels, "square_512_dup_384.jpg")
    assert dup["duplicate_of"] == "images/square_512.jpg"


@pytest.mark.parametrize("spec", [s for s in IMAGES if s.text or s.watermark], ids=lambda s: s.name)
def test_overlays_are_where_the_labels_say(root, labels, spec):
    """Each labelled box holds its overlay, and the overlay lies entirely inside the boxes."""
    lab = by_id(labels, Path(spec.path).name)
    assert lab["has_text"] == bool(spec.text) and lab["has_watermark"] == bool(spec.watermark)
    on_disk = rgb(root / spec.path)
    full, _ = render_image(spec, seed=0)
    full = full.astype(np.float32)
    overlays = {"text": lab["text_boxes"], "watermark": [lab["watermark_box"]]}
    for what, boxes in overlays.items():
        if not lab[f"has_{what}"]:
            assert not boxes or boxes == [None]
            continue
        clean, _ = render_image(spec, 0, text=what != "text", watermark=what != "watermark")
        clean = clean.astype(np.float32)
        inside_any = np.zeros(full.shape[:2], bool)
        for box in boxes:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= lab["width"] and 0 <= y0 < y1 <= lab["height"]
            inside_any[y0:y1, x0:x1] = True
            # Film grain and JPEG noise swamp plain differences; the overlay's own change
            # (render with minus render without) must however show up in the file.
            in_file = region(on_disk - clean, box).ravel()
            overlay = region(full - clean, box).ravel()
            assert np.abs(overlay).mean() > 5, what
            assert np.corrcoef(in_file, overlay)[0, 1] > 0.6, what
        # The boxes are tight: the overlay changed no pixel outside them.
        changed = np.any(full != clean, axis=2)
        assert changed.any() and not (changed & ~inside_any).any(), what


# --- videos -------------------------------------------------------------------------------


def test_videos_match_labels_pyav(root, labels):
    for lab in valid(labels, "video"):
        with av.open(str(root / lab["path"])) as c:
            s = c.streams.video[0]
            assert (s.codec_context.width, s.codec_context.height) == (lab["width"], lab["height"])
            assert s.codec_context.name == lab["codec"], lab["id"]
            assert float(s.average_rate) == pytest.approx(lab["fps"], abs=0.01), lab["id"]
            expected_format = "matroska" if lab["container"] == "matroska" else "mp4"
            assert expected_format in c.format.name.split(","), (lab["id"], c.format.name)
            assert c.duration / 1e6 == pytest.approx(lab["duration"], abs=1.5 / lab["fps"])
            decoded = list(c.decode(video=0))
        assert len(decoded) == lab["num_frames"], lab["id"]
        assert lab["duration"] == pytest.approx(lab["num_frames"] / lab["fps"])
        assert decoded[0].format.name == "yuv420p"
        assert decoded[0].rotation == lab["rotation"], lab["id"]


def test_videos_match_labels_decord(root, labels):
    from decord import VideoReader, cpu

    for lab in valid(labels, "video"):
        vr = VideoReader(str(root / lab["path"]), ctx=cpu(0))
        assert len(vr) == lab["num_frames"], lab["id"]
        assert vr.get_avg_fps() == pytest.approx(lab["fps"], abs=0.01), lab["id"]
        # decord applies the display matrix, so it returns display-oriented frames.
        assert vr[0].shape == (lab["display_height"], lab["display_width"], 3), lab["id"]


def test_static_videos_do_not_change(root, labels):
    static = [lab for lab in valid(labels, "video") if lab["motion"] == "static"]
    assert len(static) >= 2
    for lab in static:
        diffs = mean_abs_diffs(gray_f32(root / lab["path"]))
        assert diffs.max() < 0.5, (lab["id"], diffs.max())


def test_pan_speed_matches_label(root, labels):
    """Global shift between consecutive frames (phase correlation) equals ``pan_vector``."""
    measured = {}
    for lab in valid(labels, "video"):
        if lab["motion"] not in ("slow", "fast") or lab["has_text"] or lab["has_watermark"]:
            continue  # static overlays pull phase correlation towards zero
        fr = gray_f32(root / lab["path"])
        skip = {c - 1 for c in lab["cut_frames"]}
        shifts = np.array(
            [
                cv2.phaseCorrelate(a, b)[0]
                for i, (a, b) in enumerate(zip(fr, fr[1:], strict=False))
                if i not in skip
            ]
        )
        med = np.median(shifts, axis=0)
        expected = np.array(lab["pan_vector"], float)
        tol = 0.2 + 0.05 * lab["pan_px_per_frame"]
        assert np.abs(med - expected).max() <= tol, (lab["id"], med, expected)
        assert np.hypot(*expected) == pytest.approx(lab["pan_px_per_frame"])
        measured[lab["id"]] = (lab["motion"], float(np.hypot(*med)))
    slow = [v for m, v in measured.values() if m == "slow"]
    fast = [v for m, v in measured.values() if m == "fast"]
    assert len(slow) >= 3 and len(fast) >= 2
    assert max(slow) < min(fast)


def test_scene_cuts_at_labelled_frames(root, labels):
    cut_videos = [lab for lab in valid(labels, "video") if lab["cut_frames"]]
    assert cut_videos
    for lab in cut_videos:
        assert lab["cut_frames"] == [round(t * lab["fps"]) for t in lab["cuts_s"]]
        diffs = mean_abs_diffs(gray_f32(root / lab["path"]))
        # diffs[i] compares frames i and i+1, so a cut at frame c shows up at diffs[c - 1].
        spikes = sorted(int(i) + 1 for i in np.argsort(diffs)[-len(lab["cut_frames"]) :])
        for got, want in zip(spikes, lab["cut_frames"], strict=True):
            assert abs(got - want) <= 1, (lab["id"], spikes, lab["cut_frames"])
        near = {c + d for c in lab["cut_frames"] for d in (-2, -1, 0)}
        calm = np.delete(diffs, sorted(near))
        assert calm.max() < 0.3 * diffs[[c - 1 for c in lab["cut_frames"]]].min()


def test_subtitle_segments_cover_the_clip(labels):
    lab = by_id(labels, "subtitles_480x270.mp4")
    segs = lab["text_segments"]
    assert [s["text"] for s in segs] == lab["text"] and len(segs) >= 4
    assert segs[0]["start_frame"] == 0 and segs[-1]["end_frame"] == lab["num_frames"]
    for a, b in zip(segs, segs[1:], strict=False):
        assert a["end_frame"] == b["start_frame"]
        assert b["start_s"] - a["start_s"] == pytest.approx(1.0)
    for s in segs:
        x0, y0, x1, y1 = s["box"]
        assert y0 > lab["height"] * 0.7 and y1 <= lab["height"] and x1 <= lab["width"]


def test_video_watermark_is_a_static_overlay(root, labels):
    """Averaged over time the panning background blurs out; the logo stays sharp."""
    lab = by_id(labels, "watermark_480x270.mp4")
    mean = np.mean(gray_f32(root / lab["path"]), axis=0)
    edges = np.abs(cv2.Sobel(mean, cv2.CV_32F, 0, 1))
    x0, y0, x1, y1 = box = lab["watermark_box"]
    mirrored = [lab["width"] - x1, y0, lab["width"] - x0, y1]  # same rows, other corner
    assert region(edges, box).mean() > 3 * region(edges, mirrored).mean()


# --- OCR ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ocr():
    rapidocr = pytest.importorskip("rapidocr")
    engine = rapidocr.RapidOCR()

    def detect(img_bgr: np.ndarray) -> list[tuple[list[float], float]]:
        out = engine(np.ascontiguousarray(img_bgr), use_det=True, use_cls=False, use_rec=False)
        if out.boxes is None:
            return []
        boxes = [[q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()] for q in out.boxes]
        return list(zip(boxes, out.scores, strict=True))

    return detect


def covered(label_box: list[int], found: list[float]) -> float:
    """Fraction of the labelled box that a detected box covers."""
    ix = max(0.0, min(label_box[2], found[2]) - max(label_box[0], found[0]))
    iy = max(0.0, min(label_box[3], found[3]) - max(label_box[1], found[1]))
    return ix * iy / ((label_box[2] - label_box[0]) * (label_box[3] - label_box[1]))


def test_ocr_finds_labelled_text_and_nothing_on_clean_images(root, labels, ocr):
    lab = by_id(labels, "wide_640x360.jpg")
    found = ocr(cv2.imread(str(root / lab["path"])))
    assert any(covered(lab["text_boxes"][0], b) > 0.8 and s > 0.7 for b, s in found), found

    sub = by_id(labels, "subtitles_480x270.mp4")
    seg = sub["text_segments"][1]
    frame = frames(str(root / sub["path"]), "bgr24")[(seg["start_frame"] + seg["end_frame"]) // 2]
    found = ocr(frame)
    assert any(covered(seg["box"], b) > 0.8 and s > 0.7 for b, s in found), found

    clean = by_id(labels, "square_512.jpg")
    assert not clean["has_text"] and not clean["has_watermark"]
    assert ocr(cv2.imread(str(root / clean["path"]))) == []


# --- corrupt and mislabelled files --------------------------------------------------------


def test_corrupt_files_fail_to_decode(root, labels):
    broken = [lab for lab in labels if lab["expect"] == "error"]
    assert len(broken) >= 6
    for lab in broken:
        path = root / lab["path"]
        assert pil_fails(path), lab["id"]
        # FFmpeg's JPEG decoder conceals a truncated scan; every other broken file must fail.
        if not (lab["corrupt"] == "truncated" and lab["true_kind"] == "image"):
            assert pyav_fails(path), lab["id"]
    assert (root / "corrupt/empty.jpg").stat().st_size == 0
    assert (root / "corrupt/header_only.png").read_bytes()[:16] == b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"
    header = (root / "corrupt/header_only.mp4").read_bytes()
    assert header[4:8] == b"ftyp" and len(header) <= 64
    full = (root / "corrupt/clip_really_mp4.png").read_bytes()
    truncated = (root / "corrupt/truncated.mp4").read_bytes()
    assert full.startswith(truncated) and 0.3 < len(truncated) / len(full) < 0.5


def test_mislabelled_files_decode_as_their_true_kind(root, labels):
    photo = by_id(labels, "photo_really_jpeg.mp4")
    assert (photo["kind"], photo["claimed_kind"], photo["expect"]) == ("image", "video", "valid")
    with Image.open(root / photo["path"]) as im:
        assert im.format == "JPEG" and im.size == (photo["width"], photo["height"])

    clip = by_id(labels, "clip_really_mp4.png")
    assert (clip["kind"], clip["claimed_kind"], clip["expect"]) == ("video", "image", "valid")
    assert pil_fails(root / clip["path"])
    assert len(frames(str(root / clip["path"]))) == clip["num_frames"]


# --- edit pairs ---------------------------------------------------------------------------


def edit_labels(labels: list[dict]) -> list[dict]:
    return [lab for lab in labels if lab["kind"] in ("image_edit", "video_edit")]


def test_edit_manifest_matches_labels(root, labels):
    rows = load_edits(root)
    edits = edit_labels(labels)
    assert (root / EDITS_FILE).is_file() and len(rows) == len(edits)
    for row, lab in zip(rows, edits, strict=True):
        assert (row["source"], row["target"], row["kind"]) == (
            lab["source"],
            lab["target"],
            lab["kind"],
        )
        assert lab["path"] == lab["source"]
        assert (root / row["source"]).is_file() and (root / row["target"]).is_file()
        missing = "no_instruction" in lab["expect_pair_failures"]
        assert ("instruction" not in row) == missing == (lab["instruction"] is None)
        assert lab["expect_pair_ok"] == (not lab["expect_pair_failures"])


def test_negative_edit_pairs_fail_their_check(root, labels):
    edits = {lab["id"]: lab for lab in edit_labels(labels)}
    for lab in edits.values():
        src, tgt = root / lab["source"], root / lab["target"]
        same = src.read_bytes() == tgt.read_bytes()
        assert same == ("identical" in lab["expect_pair_failures"]), lab["id"]
        w0, h0 = lab["source_size"]
        w1, h1 = lab["target_size"]
        mismatch = abs(w0 / h0 - w1 / h1) > 0.05
        assert mismatch == ("aspect_mismatch" in lab["expect_pair_failures"]), lab["id"]
        if lab["kind"] == "image_edit" and "kind_mismatch" not in lab["expect_pair_failures"]:
            assert Image.open(tgt).size == (w1, h1)
        if lab["kind"] == "image_edit":
            assert Image.open(src).size == (w0, h0)

    bad_kind = edits["edit_kind_mismatch"]
    assert not pil_fails(root / bad_kind["source"])
    assert pil_fails(root / bad_kind["target"]) and not pyav_fails(root / bad_kind["target"])


def test_positive_image_edits_change_what_the_instruction_says(root, labels):
    positives = [lab for lab in edit_labels(labels) if lab["expect_pair_ok"]]
    assert sum(lab["kind"] == "image_edit" for lab in positives) >= 4
    for lab in positives:
        if lab["kind"] != "image_edit":
            continue
        src, tgt = rgb(root / lab["source"]), rgb(root / lab["target"])
        diff = np.abs(src - tgt).mean(axis=2)
        if lab["edit_box"]:
            inside, rest = (
                region(diff, lab["edit_box"]).mean(),
                outside(diff, lab["edit_box"]).mean(),
            )
            assert inside > 30 and inside > 5 * rest, (lab["id"], inside, rest)
        else:
            assert diff.mean() > 10, lab["id"]

    red = by_id(labels, "edit_red_square")
    r, g, b = region(rgb(root / red["target"]), red["edit_box"]).mean(axis=(0, 1))
    assert r > 150 and g < 80 and b < 80
    r, g, b = region(rgb(root / red["source"]), red["edit_box"]).mean(axis=(0, 1))
    assert b > 150 and r < 80
    gray = rgb(root / by_id(labels, "edit_grayscale")["target"])
    assert np.abs(gray - gray.mean(axis=2, keepdims=True)).mean() < 3


def test_positive_video_edits(root, labels):
    tint = by_id(labels, "edit_warm_tint")
    src = np.array(frames(str(root / tint["source"]), "rgb24"), np.float32)
    tgt = np.array(frames(str(root / tint["target"]), "rgb24"), np.float32)
    assert src.shape == tgt.shape
    assert tgt[..., 0].mean() > src[..., 0].mean() + 10
    assert tgt[..., 2].mean() < src[..., 2].mean() - 20

    ball = by_id(labels, "edit_red_ball")
    src = np.array(frames(str(root / ball["source"]), "rgb24"), np.float32)
    tgt = np.array(frames(str(root / ball["target"]), "rgb24"), np.float32)
    diff = np.abs(tgt - src).mean(axis=3)
    box = ball["edit_box"]
    # x264 re-encodes the grain differently in the two files, hence only a 3x margin.
    assert region(diff.mean(axis=0), box).mean() > 3 * outside(diff.mean(axis=0), box).mean()
    # The ball moves left to right: the column where the clips differ most moves with it.
    ball_cols = [int(np.argmax(d.sum(axis=0))) for d in diff]
    width = ball["source_size"][0]
    assert ball_cols[0] < width * 0.2 and ball_cols[-1] > width * 0.8
    assert np.all(np.diff(ball_cols) >= 0)


# --- determinism --------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs(root, tmp_path):
    again = generate(tmp_path / "again", seed=0)
    assert again == load_labels(root)
    assert tree_digest(tmp_path / "again") == tree_digest(root)

    generate(tmp_path / "other", seed=1)
    other = tree_digest(tmp_path / "other")
    first = tree_digest(root)
    assert other.keys() == first.keys()
    images = [k for k in first if k.startswith("images/")]
    assert images and all(other[k] != first[k] for k in images)
    assert other[LABELS_FILE] != first[LABELS_FILE]


# Code run in a child process: encode every clip of ``VIDEOS`` and print {id: sha256}.
_ENCODE_VIDEOS = """
import json, sys
from pathlib import Path
from curation.sample_data.videos import write_videos
root = Path(sys.argv[1])
(root / "videos").mkdir(parents=True)
print(json.dumps({lab["id"]: lab["sha256"] for lab in write_videos(root, 0)}))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="MALLOC_PERTURB_ is a glibc malloc feature",
)
def test_videos_do_not_depend_on_uninitialised_memory(tmp_path):
    """Encoders must not read memory they never wrote.

    Such reads make the bytes depend on what earlier allocations left behind, which the
    same-seed test above only catches by chance. glibc's MALLOC_PERTURB_ fills every fresh
    allocation with a chosen byte, so two children with different fill bytes must agree.
    """
    repo = Path(__file__).resolve().parents[2]
    digests = []
    for fill in ("1", "170"):
        env = {**os.environ, "MALLOC_PERTURB_": fill}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        out = subprocess.run(
            [sys.executable, "-c", _ENCODE_VIDEOS, str(tmp_path / fill)],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        digests.append(json.loads(out.stdout.strip().splitlines()[-1]))
    differing = sorted(k for k in digests[0] if digests[0][k] != digests[1].get(k))
    assert digests[0].keys() == digests[1].keys() and not differing, differing
