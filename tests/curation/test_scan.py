"""curation.scan: one decoding pass gives PySceneDetect's cuts and the frame stage's frames."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from edits import FPS, dip, dissolve, real_shots
from helpers import input_row, mean_diff, reference_frames, write_rotated_video
from scenedetect import ContentDetector, FrameTimecode

import curation.scan as scan_mod
from curation.config import CurationConfig
from curation.media import SWS_THREADS, to_rgb
from curation.sample_data.videos import encode_video
from curation.scan import ContentScore, Sampling, scan_video
from curation.stages.frames import FrameSampleStage, frame_indices
from curation.stages.probe import ProbeStage
from curation.stages.split import SceneSplitStage, scene_bounds, stride_frames
from curation.transitions import GradualDetector

DATA = Path(__file__).resolve().parents[1] / "data"
CFG = CurationConfig()
N = CFG.frames.num_frames


def probed(path) -> dict:
    (out,) = ProbeStage(CFG.probe).process_batch([input_row(path)])
    assert out["status"] is None, out["reasons"]
    return out


def clips_of(row: dict, cfg: CurationConfig = CFG, sample: bool = True) -> list[dict]:
    stage = SceneSplitStage(cfg.split, cfg.frames if sample else None)
    return stage.process_batch([row])


def indices(row: dict) -> list[int]:
    fps = row["fps"]
    return frame_indices(round(row["span"]["start"] * fps), round(row["span"]["end"] * fps), N)


def detection_frames(path) -> list[np.ndarray]:
    """The BGR frames the scan scores, made the same way."""
    scale, convert, out = VideoReformatter(), VideoReformatter(), []
    with av.open(str(path)) as container:
        for f in container.decode(video=0):
            w, h = scan_mod.detection_size(f.width, f.height)
            small = scale.reformat(f, w, h, interpolation=Interpolation.AREA)
            out.append(convert.reformat(small, format="bgr24").to_ndarray())
    return out


def test_content_score_gives_pyscenedetects_cuts(corpus):
    """Same frames in, same cuts out as ContentDetector (scores computed with OpenCV)."""
    root, labels = corpus
    cut = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"][0]
    rng = np.random.default_rng(0)
    flicker = [rng.integers(0, 255, (36, 64, 3), np.uint8) for _ in range(40)]  # merged flashes
    cases = [
        (detection_frames(root / cut["path"]), float(cut["fps"])),
        (detection_frames(DATA / "cockatoo_9s.mp4"), 20.0),
        (detection_frames(DATA / "fades.mp4"), 25.0),
        ([np.zeros((36, 64, 3), np.uint8)] * 20 + flicker + [flicker[0]] * 30, 24.0),
    ]
    found_any = 0
    for frames, fps in cases:
        for threshold in (12.0, 27.0, 60.0):
            theirs, ours = ContentDetector(threshold=threshold), ContentScore(threshold, fps)
            expected, got = [], []
            for i, bgr in enumerate(frames):
                expected += [c.frame_num for c in theirs.process_frame(FrameTimecode(i, fps), bgr)]
                got += ours(i, bgr)
            assert got == expected, (threshold, got, expected)
            found_any += bool(got)
    assert found_any >= 4


def test_one_thread_conversions_give_the_default_pixels():
    """swscale on ``SWS_THREADS`` (one) converts and scales to the same pixels as with its
    default (a thread per CPU): the detection frames, the kept frames, ``to_rgb``."""
    for name in ("counter.mp4", "fades.mp4"):  # 1920x1080 h264, 480x320 mpeg4
        with av.open(str(DATA / name)) as container:
            frames = list(itertools.islice(container.decode(video=0), 12))
        one, default, rgb = VideoReformatter(), VideoReformatter(), VideoReformatter()
        for f in frames:
            assert np.array_equal(to_rgb(f, rgb), f.to_ndarray(format="rgb24"))
            for size, fmt in (((256, 144), "bgr24"), ((f.width // 3 * 2, f.height // 4 * 2), None)):
                a = one.reformat(f, *size, interpolation=Interpolation.AREA, threads=SWS_THREADS)
                b = default.reformat(f, *size, interpolation=Interpolation.AREA)
                if fmt:
                    a, b = a.reformat(format=fmt, threads=SWS_THREADS), b.reformat(format=fmt)
                assert np.array_equal(a.to_ndarray(), b.to_ndarray()), (name, size)


def test_clips_and_frames_equal_the_two_pass_result(corpus):
    """Every generated video: the same clips as detection + frame stage, the same frame times,
    the decoder's own pixels at those frames."""
    root, labels = corpus
    videos = [
        lab
        for lab in labels
        if lab["true_kind"] == "video" and lab["expect"] == "valid" and not lab.get("target")
    ]
    assert len(videos) >= 8
    frames_stage = FrameSampleStage(CFG.frames, CFG.probe)
    for lab in videos:
        row = probed(root / lab["path"])
        one = clips_of(row)
        two = frames_stage.process_batch(clips_of(row, sample=False))
        assert [c["span"] for c in one] == [c["span"] for c in two], lab["id"]
        ref = reference_frames(root / lab["path"])
        for a, b in zip(one, two, strict=True):
            assert a["frames_decoder"] == "pyav", lab["id"]
            assert a["frame_times"] == b["frame_times"], lab["id"]
            for f, g, i in zip(a["frames"], b["frames"], indices(a), strict=True):
                assert f.shape == g.shape and f.dtype == np.uint8
                # rotation and display size as the frame stage applies them
                assert mean_diff(f, g) < 1.0, (lab["id"], i)
                if not lab.get("rotation") and max(f.shape) == max(ref[i].shape):
                    assert mean_diff(f, ref[i]) == 0.0, (lab["id"], i)  # not re-encoded


def test_strides_and_cuts_every_clip_sampled(corpus):
    root, labels = corpus
    lab = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"][0]
    row = probed(root / lab["path"])
    ref = reference_frames(root / lab["path"])
    for max_clip_s in (0.5, 1.0, 2.5, 60.0):
        cfg = CurationConfig.model_validate(
            {"split": {"max_clip_s": max_clip_s, "min_clip_s": 0.2}}
        )
        max_len = stride_frames(max_clip_s, row["fps"])
        result = scan_video(
            row["source_uri"],
            row["fps"],
            row["num_frames"],
            cfg.split.threshold,
            max_len,
            Sampling(N, 640, (row["width"], row["height"])),
        )
        bounds = scene_bounds(result.cuts, row["num_frames"], max_len)
        assert sorted(result.samples) == bounds, max_clip_s
        for (a, b), (frames, wanted) in result.samples.items():
            assert wanted == frame_indices(a, b, N)
            for f, i in zip(frames, wanted, strict=True):
                assert mean_diff(f, ref[i]) == 0.0
        clips = clips_of(row, cfg)
        assert all("frames" in c for c in clips) and len(clips) == len(bounds)


def test_batches_give_what_frame_by_frame_gives(tmp_path, monkeypatch):
    """Frames scanned ``BATCH`` at a time: the same cuts, transitions, clips and samples as one
    at a time, whatever the batch size (a dissolve and a dip to black between real shots, on a
    3:2 frame whose detection height is rounded to even, 256x171 -> 256x170)."""
    cockatoo, realshort = real_shots()
    frames = dissolve(cockatoo, realshort, 60, 20, tail=40) + dip(realshort, cockatoo, 10, 16)
    frames = [cv2.resize(f, (300, 200), interpolation=cv2.INTER_AREA) for f in frames]
    path = tmp_path / "edits.mp4"
    encode_video(path, iter(frames), 300, 200, FPS)
    results = []
    for batch in (1, 5, scan_mod.BATCH):
        monkeypatch.setattr(scan_mod, "BATCH", batch)
        scan = scan_video(
            str(path), FPS, len(frames), CFG.split.threshold, 3 * FPS,
            Sampling(N, 640, (300, 200)), GradualDetector(FPS),
        )  # fmt: skip
        results.append(scan)
    first = results[0]
    assert [t.kind for t in first.transitions] == ["dissolve", "fade"], first.transitions
    assert first.frames_read == len(frames) and len(first.samples) == len(first.clips)
    for scan in results[1:]:
        assert (scan.cuts, scan.transitions, scan.clips) == (
            first.cuts, first.transitions, first.clips,
        )  # fmt: skip
        assert scan.frames_read == first.frames_read
        assert scan.samples.keys() == first.samples.keys()
        for bounds, (got, wanted) in scan.samples.items():
            assert wanted == first.samples[bounds][1]
            for f, g in zip(got, first.samples[bounds][0], strict=True):
                assert np.array_equal(f, g)


def test_large_frames_come_fewer_at_a_time(monkeypatch):
    """A batch holds at most ``BATCH_BYTES`` of decoded frames (4K comes one at a time); the
    1080p fixture, scanned two frames at a time, gives what one at a time gives."""
    sizes = [(480, 270), (1280, 720), (1920, 1080), (3840, 2160), (0, 0)]
    assert [scan_mod.batch_size(w, h) for w, h in sizes] == [8, 6, 2, 1, 8]
    row = probed(DATA / "counter.mp4")
    asked = []
    batch_size = scan_mod.batch_size
    monkeypatch.setattr(
        scan_mod, "batch_size", lambda w, h: asked.append((w, h)) or batch_size(w, h)
    )
    results = []
    for batch in (scan_mod.BATCH, 1):
        monkeypatch.setattr(scan_mod, "BATCH", batch)
        results.append(scan_video(
            str(DATA / "counter.mp4"), row["fps"], row["num_frames"], CFG.split.threshold,
            3 * round(row["fps"]), Sampling(N, 640, (1920, 1080)), GradualDetector(row["fps"]),
        ))  # fmt: skip
    assert asked == [(1920, 1080)] * 2
    two, one = results
    assert (two.cuts, two.transitions, two.clips, two.frames_read) == (
        one.cuts, one.transitions, one.clips, one.frames_read,
    )  # fmt: skip
    assert two.samples.keys() == one.samples.keys() and two.samples
    for bounds, (got, _) in two.samples.items():
        for f, g in zip(got, one.samples[bounds][0], strict=True):
            assert np.array_equal(f, g)


def test_large_frames_are_scaled_before_they_are_kept():
    """1080p footage: frames are kept at the sample size (not 1920x1080) and still match."""
    row = probed(DATA / "counter.mp4")
    (clip,) = clips_of(row)
    ref = reference_frames(DATA / "counter.mp4")
    for f, i in zip(clip["frames"], indices(clip), strict=True):
        assert f.shape == (360, 640, 3)
        expected = cv2.resize(ref[i], (640, 360), interpolation=cv2.INTER_AREA)
        assert mean_diff(f, expected) < 2.0, i


def test_rotated_video_frames_are_upright(tmp_path):
    upright = np.full((96, 64, 3), 40, np.uint8)
    upright[:48, :32] = (230, 20, 20)
    (clip,) = clips_of(probed(write_rotated_video(tmp_path / "rot90.mp4", upright, 90)))
    frame = clip["frames"][0]
    assert frame.shape == (96, 64, 3) and clip["frames_decoder"] == "pyav"
    assert frame[4:44, 4:28].mean(axis=(0, 1))[0] > 180 and frame[52:-4, 36:-4].max() < 70


def test_clip_too_large_to_keep_is_left_to_the_frame_stage(corpus, monkeypatch):
    """Past MAX_KEPT_BYTES the clip leaves unsampled, the next clips are sampled again, and the
    frame stage gives the unsampled clip the same frames."""
    root, labels = corpus
    lab = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"][0]
    row = probed(root / lab["path"])
    with av.open(row["source_uri"]) as container:
        frame = next(container.decode(video=0))
        frame_bytes = sum(p.buffer_size for p in frame.planes)
    # Cuts at 72 and 144 (24 fps). Room for 60 frames: strides of 36 frames fit (kept until
    # 14 frames past their end, when no cut can still be reported inside), 72-frame scenes not.
    # (Content cuts only: the gradual detector keeps frames about 8 s longer.)
    monkeypatch.setattr(scan_mod, "MAX_KEPT_BYTES", 60 * frame_bytes)
    split = {"max_clip_s": 1.5, "min_clip_s": 0.2, "gradual": False}
    clips = clips_of(row, CurationConfig.model_validate({"split": split}))
    assert len(clips) == 6 and all("frames" in c for c in clips)
    clips = clips_of(row, CurationConfig.model_validate({"split": {"gradual": False}}))
    assert len(clips) == 3 and not any("frames" in c for c in clips)
    sampled = FrameSampleStage(CFG.frames, CFG.probe).process_batch(clips)
    monkeypatch.setattr(scan_mod, "MAX_KEPT_BYTES", 10**12)
    expected = clips_of(row)
    for a, b in zip(sampled, expected, strict=True):
        assert a["frame_times"] == b["frame_times"]
        for f, g in zip(a["frames"], b["frames"], strict=True):
            assert mean_diff(f, g) < 1.0


def test_a_file_pyav_cannot_decode_is_split_by_pyscenedetect(corpus, monkeypatch):
    root, labels = corpus
    lab = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"][0]
    row = probed(root / lab["path"])

    def refuse(*args, **kwargs):
        raise av.InvalidDataError(1094995529, "refused by the test")

    monkeypatch.setattr("curation.stages.split.scan_video", refuse)
    fallback = clips_of(row)
    monkeypatch.undo()
    assert [c["span"] for c in fallback] == [c["span"] for c in clips_of(row)]
    assert not any("frames" in c for c in fallback)  # sampled later by the frame stage
