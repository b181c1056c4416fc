"""SceneSplitStage: frame-accurate cuts on the generated corpus, strides, real footage."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import find, input_row

from catalog.schema import make_key
from curation.config import CurationConfig
from curation.sample_data.render import landscape, rng_for
from curation.sample_data.videos import encode_video
from curation.stages.probe import ProbeStage
from curation.stages.split import SceneSplitStage, scene_bounds, stride_frames

DATA = Path(__file__).resolve().parents[1] / "data"


def cut_video(labels) -> dict:
    (lab,) = [lab for lab in labels if lab.get("cut_frames") and lab["claimed_kind"] == "video"]
    return lab


def uncut_videos(labels) -> list[dict]:
    return [
        lab
        for lab in labels
        if lab["true_kind"] == "video" and lab["expect"] == "valid" and not lab["cut_frames"]
    ]


def probed(path: Path | str, kind: str | None = None, target: Path | str | None = None) -> dict:
    row = {**input_row(path, kind, target), "caption": "c"}
    (out,) = ProbeStage(CurationConfig().probe).process_batch([row])
    assert out["status"] is None, out["reasons"]
    return out


def split(row: dict, **overrides) -> list[dict]:
    cfg = CurationConfig.model_validate(overrides) if overrides else CurationConfig()
    return SceneSplitStage(cfg.split).process_batch([row])


def spans(clips: list[dict]) -> list[tuple[float, float]]:
    return [(c["span"]["start"], c["span"]["end"]) for c in clips]


def test_stage_shape_and_pickles():
    stage = SceneSplitStage(CurationConfig().split)
    assert stage.name == "split" and not stage.uses_model and stage.resources.cpus == 1
    assert pickle.loads(pickle.dumps(stage)).threshold == 27.0


def test_cuts_land_within_two_frames_of_the_truth(corpus):
    root, labels = corpus
    lab = cut_video(labels)
    row = probed(root / lab["path"])
    clips = split(row)
    assert all(c["status"] is None for c in clips)
    assert len(clips) == len(lab["cut_frames"]) + 1
    fps = lab["fps"]
    starts = [round(c["span"]["start"] * fps) for c in clips]
    assert starts[0] == 0
    for found, truth in zip(starts[1:], lab["cut_frames"], strict=True):
        assert abs(found - truth) <= 2, (starts, lab["cut_frames"])
    # contiguous, covering the whole video, one clip row per scene
    assert clips[-1]["span"]["end"] == pytest.approx(lab["duration"])
    for a, b in zip(clips, clips[1:], strict=False):
        assert a["span"]["end"] == b["span"]["start"]
    assert sum(c["num_frames"] for c in clips) == lab["num_frames"]
    for c in clips:
        s, e = c["span"]["start"], c["span"]["end"]
        assert c["parent_key"] == row["key"] and c["key"] == make_key(row["source_uri"], (s, e))
        assert c["duration"] == pytest.approx(e - s)
        assert c["num_frames"] == round(e * fps) - round(s * fps)
        assert c["caption"] == "c" and c["width"] == lab["width"]  # the rest is copied
    assert len({c["key"] for c in clips}) == len(clips)


def test_videos_without_cuts_give_one_clip(corpus):
    root, labels = corpus
    videos = uncut_videos(labels)
    assert {lab["motion"] for lab in videos} >= {"static", "slow", "fast"}
    for lab in videos:
        clips = split(probed(root / lab["path"]))
        assert spans(clips) == [(0.0, pytest.approx(lab["duration"]))], lab["id"]
        assert clips[0]["num_frames"] == lab["num_frames"]


def test_short_scenes_are_kept(corpus):
    """select rejects clips under min_clip_s (too_short); split must still emit them."""
    root, labels = corpus
    lab = min(uncut_videos(labels), key=lambda lab: lab["duration"])
    assert lab["duration"] < CurationConfig().split.min_clip_s
    clips = split(probed(root / lab["path"]))
    assert len(clips) == 1 and clips[0]["duration"] == pytest.approx(lab["duration"])


def test_long_scenes_are_cut_in_strides(corpus):
    root, labels = corpus
    lab = find(labels, true_kind="video", duration=4.0, fps=24, cut_frames=[])
    clips = split(probed(root / lab["path"]), split={"max_clip_s": 1.5, "min_clip_s": 0.5})
    assert [round(c["duration"], 6) for c in clips] == [1.5, 1.5, 1.0]
    assert [c["num_frames"] for c in clips] == [36, 36, 24]
    assert spans(clips) == [(0.0, 1.5), (1.5, 3.0), (3.0, 4.0)]
    # strides restart at every cut: 3 s scenes with 2.5 s strides
    lab = cut_video(labels)
    assert lab["cuts_s"] == [3.0, 6.0] and lab["duration"] == 9.0
    clips = split(probed(root / lab["path"]), split={"max_clip_s": 2.5, "min_clip_s": 0.5})
    assert [round(c["duration"], 6) for c in clips] == [2.5, 0.5] * 3


def test_disabled_split_keeps_the_whole_video(corpus):
    root, labels = corpus
    lab = cut_video(labels)
    clips = split(probed(root / lab["path"]), split={"enabled": False})
    assert spans(clips) == [(0.0, lab["duration"])] and clips[0]["num_frames"] == lab["num_frames"]


def test_images_and_edit_pairs_pass_through(corpus):
    root, labels = corpus
    image = probed(root / find(labels, true_kind="image", claimed_kind="image")["path"])
    lab = find(labels, kind="video_edit", expect_pair_ok=True)
    pair = probed(root / lab["source"], "video_edit", root / lab["target"])
    out = SceneSplitStage(CurationConfig().split).process_batch([image, pair])
    assert out == [image, pair]
    assert "span" not in out[1]


def test_detector_failure_is_split_failed(corpus, tmp_path):
    root, labels = corpus
    row = probed(root / uncut_videos(labels)[0]["path"])
    bad = tmp_path / "gone.mp4"
    bad.write_bytes(b"\0" * 1000)
    (out,) = split({**row, "source_uri": str(bad)})
    assert out["status"] == "error" and out["reasons"][0].startswith("split_failed: ")


def test_scene_bounds():
    assert scene_bounds([], 10, 100) == [(0, 10)]
    assert scene_bounds([4, 0, 10, 4], 10, 100) == [(0, 4), (4, 10)]
    assert scene_bounds([5], 12, 3) == [(0, 3), (3, 5), (5, 8), (8, 11), (11, 12)]


def test_counter_fixture_is_one_three_second_clip():
    clips = split(probed(DATA / "counter.mp4"))
    assert spans(clips) == [(0.0, 3.0)] and clips[0]["num_frames"] == 30


def test_fades_are_boundaries_and_their_frames_are_dropped():
    """fades.mp4: black, fade in, then two dips through black (3.36 s, 6.72 s) between flat
    grey and white. Each fade ends a clip; its frames are in neither neighbour."""
    clips = split(probed(DATA / "fades.mp4"))
    assert [(c["boundaries"]["start"], c["boundaries"]["end"]) for c in clips] == [
        ("video", "fade"),
        ("fade", "fade"),
        ("fade", "fade"),
        ("fade", "video"),
    ]
    for black in (3.36, 6.72):
        assert not any(c["span"]["start"] <= black < c["span"]["end"] for c in clips)
    assert clips[-1]["span"]["end"] == pytest.approx(10.0)
    assert sum(c["num_frames"] for c in clips) < 250  # the fades' own frames are dropped


def test_fades_without_dropping_meet_at_their_middle():
    clips = split(probed(DATA / "fades.mp4"), split={"drop_transitions": False})
    assert sum(c["num_frames"] for c in clips) == 250
    assert [c["span"]["start"] for c in clips[1:]] == [c["span"]["end"] for c in clips[:-1]]
    assert [round(c["span"]["start"], 1) for c in clips[2:]] == pytest.approx([3.3, 6.6], abs=0.3)


@pytest.mark.parametrize("n", [10, 40])
def test_a_cross_dissolve_between_real_shots_ends_both_clips(tmp_path, n):
    """cockatoo, an ``n``-frame cross-dissolve (both shots playing; 0.5 s and 2 s of video)
    from frame 60 on, realshort: two clips, each sampled in the one pass, the dissolve's
    frames in neither (its first and last frame found within 6 frames, 0.3 s of video)."""
    from edits import FPS, H, W, dissolve, real_shots

    cockatoo, realshort = real_shots()
    path = tmp_path / "edit.mp4"
    encode_video(path, iter(dissolve(cockatoo, realshort, 60, n)), W, H, FPS)
    row = probed(path)
    clips = SceneSplitStage(CurationConfig().split, CurationConfig().frames).process_batch([row])
    assert [(c["boundaries"]["start"], c["boundaries"]["end"]) for c in clips] == [
        ("video", "dissolve"),
        ("dissolve", "video"),
    ]
    first, second = clips
    end, start = round(first["span"]["end"] * FPS), round(second["span"]["start"] * FPS)
    assert abs(end - 60) <= 6 and abs(start - (60 + n)) <= 6, (end, start)
    assert end < start  # the mixed frames are dropped
    assert all(len(c["frames"]) == CurationConfig().frames.num_frames for c in clips)


def test_content_cuts_only():
    clips = split(probed(DATA / "fades.mp4"), split={"gradual": False})
    assert {c["boundaries"]["start"] for c in clips} <= {"video", "cut"}


def test_real_footage_cut():
    """Cockatoo (first 9 s): the bird fills the frame at 7.85 s, which the detector calls a cut."""
    clips = split(probed(DATA / "cockatoo_9s.mp4"))
    assert len(clips) == 2
    assert abs(round(clips[1]["span"]["start"] * 20) - 157) <= 2
    assert clips[-1]["span"]["end"] == pytest.approx(9.0)


def test_very_short_real_clip():
    clips = split(probed(DATA / "realshort.mp4"))
    assert len(clips) == 1 and clips[0]["num_frames"] == 36
    assert clips[0]["span"]["end"] == pytest.approx(1.2, abs=0.01)


# ------------------------------------------------------------------ forged container timing


def _forged_matroska(tmp_path: Path) -> Path:
    """A real 3-s, 30-fps Matroska clip whose DURATION tag and Segment duration say 3 h 59 min
    (edited in place, same byte length: the file stays valid)."""
    path = tmp_path / "clip.mkv"
    img = landscape(rng_for(0, "forged"), 64, 96, "day")
    encode_video(
        path, (np.roll(img, 2 * i, 1) for i in range(90)), 96, 64, 30, "libx264", "matroska"
    )
    data = path.read_bytes()
    for old, new in (
        (b"00:00:03.000000000", b"03:59:00.000000000"),
        (
            b"\x44\x89\x88" + struct.pack(">d", 3000.0),
            b"\x44\x89\x88" + struct.pack(">d", 14_340_000.0),
        ),
    ):
        assert data.count(old) == 1
        data = data.replace(old, new)
    forged = tmp_path / "forged.mkv"
    forged.write_bytes(data)
    return forged


def test_forged_duration_gives_clips_inside_the_real_video(tmp_path):
    row = probed(_forged_matroska(tmp_path))
    clips = split(row, split={"max_clip_s": 1.0, "min_clip_s": 0.5})
    assert all(c["status"] is None for c in clips)
    assert [c["num_frames"] for c in clips] == [30, 30, 30]
    assert spans(clips) == [(0.0, 1.0), (1.0, 2.0), (2.0, pytest.approx(3.0))]
    for c in clips:
        assert c["duration"] <= 1.0 and c["span"]["end"] <= 3.0 + 1e-9
    # default limits: the whole clip, not 90 one-frame clips of 159 s
    (clip,) = split(row)
    assert clip["num_frames"] == 90 and clip["span"]["end"] == pytest.approx(3.0)


def test_a_frame_longer_than_max_clip_s_is_an_error_not_a_clip(tmp_path):
    """The row an unchecked probe made of the forged file: 90 frames over 14340 s."""
    row = probed(_forged_matroska(tmp_path))
    row = {**row, "fps": 90 / 14340.0, "duration": 14340.0}
    (out,) = split(row)
    assert out["status"] == "error"
    assert out["reasons"] == [
        "split_failed: one frame lasts 159 s (fps=0.006276) > split.max_clip_s (60.0)"
    ]


def test_strides_never_exceed_max_clip_s(corpus):
    root, labels = corpus
    row = probed(root / uncut_videos(labels)[0]["path"])
    # 1.142857 * 7 = 7.999999: an 8-frame stride would be 1.4e-7 s too long
    row = {**row, "fps": 7.0, "num_frames": 30, "duration": 30 / 7}
    clips = split(row, split={"enabled": False, "max_clip_s": 1.142857, "min_clip_s": 0.5})
    assert [c["num_frames"] for c in clips] == [7, 7, 7, 7, 2]
    assert all(c["duration"] <= 1.142857 for c in clips)
    assert clips[-1]["span"]["end"] == pytest.approx(30 / 7)
    for fps in (30000 / 1001, 24000 / 1001, 25.0, 7.0, 30 / 1.18, 1000.0, 1.0):
        for max_clip_s in (0.5, 1.0, 1.001, 2.142857, 2.5, 60.0, 60.06, 97.097):
            n = stride_frames(max_clip_s, fps)
            assert n / fps <= max_clip_s < (n + 1) / fps, (fps, max_clip_s, n)
    assert stride_frames(60.0, 1 / 159) == 0
