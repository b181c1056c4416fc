"""MotionStage on the synthetic corpus: known pans in px/frame -> diagonals per second."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import av
import numpy as np
import pytest

from curation.config import MotionConfig
from curation.media import fit_max_side
from curation.stages.motion import MotionStage

ALGORITHMS = ("dis", "farneback")
CLASS_ORDER = {"static": 0, "slow": 1, "fast": 2}


def video_row(path: Path, num_frames: int = 8, kind: str = "video") -> dict:
    """Uniformly sampled frames as the frames stage delivers them (PNG bytes + times)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        idx = np.linspace(0, len(decoded) - 1, num_frames).round().astype(int)
        picked = [decoded[i] for i in idx]
        return {
            "kind": kind,
            "status": "accepted",
            "frames": [fit_max_side(f.to_ndarray(format="rgb24")) for f in picked],
            "frame_times": [float(f.pts * stream.time_base) for f in picked],
        }


@pytest.fixture(scope="module")
def clips(corpus):
    """(root, labels of the clips of a known camera motion, their rows by label id)."""
    root, labels = corpus
    # Clips with a known camera motion class; the cut clip is left out because pairs that
    # straddle its hard cuts do not measure motion (the split stage removes cuts first).
    videos = [
        lab for lab in labels if lab["kind"] == "video" and lab["motion"] and not lab["cuts_s"]
    ]
    rows = {lab["id"]: video_row(root / lab["path"]) for lab in videos}
    return root, videos, rows


def expected_motion(label: dict) -> float:
    """Ground truth: pan in px/frame x fps / diagonal of the coded frame."""
    return label["pan_px_per_frame"] * label["fps"] / math.hypot(label["width"], label["height"])


def stage(algorithm: str) -> MotionStage:
    s = MotionStage(MotionConfig(algorithm=algorithm))
    s.setup()
    return s


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_static_slow_fast_are_separated(clips, algorithm):
    _, videos, rows = clips
    s = stage(algorithm)
    scores = {lab["id"]: s.process_row(rows[lab["id"]]) for lab in videos}
    by_class: dict[str, list[float]] = {"static": [], "slow": [], "fast": []}
    for lab in videos:
        out = scores[lab["id"]]
        by_class[lab["motion"]].append(out["motion"])
        assert out["motion_min"] <= out["motion"] <= out["motion_max"]
        # Each clip is a pure pan: the score is its speed in diagonals per second.
        assert out["motion"] == pytest.approx(expected_motion(lab), rel=0.15, abs=1e-3), lab["id"]
    assert max(by_class["static"]) < 1e-3
    assert min(by_class["slow"]) > 0.03  # 1 px/frame at 24 fps on 480x270 is 0.044
    # Clear margins: every slow pan is far above every static clip, every fast pan is more than
    # twice every slow pan (slowest fast pan 0.35 vs fastest slow pan 0.13 in this corpus).
    assert min(by_class["slow"]) > 30 * max(max(by_class["static"]), 1e-4)
    assert min(by_class["fast"]) > 2 * max(by_class["slow"])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_named_pans(clips, algorithm):
    """The three reference clips: same size, 0 / 1 / 8 px per frame."""
    _, _, rows = clips
    s = stage(algorithm)
    static = s.process_row(rows["static_320x180.mp4"])["motion"]
    slow = s.process_row(rows["pan_slow_480x270.mp4"])["motion"]
    fast = s.process_row(rows["pan_fast_480x270.mp4"])["motion"]
    assert static < 1e-3 < slow < fast
    assert slow == pytest.approx(24 / math.hypot(480, 270), rel=0.05)
    assert fast == pytest.approx(8 * 24 / math.hypot(480, 270), rel=0.05)
    assert fast / slow == pytest.approx(8, rel=0.1)


def test_score_is_per_second_not_per_sample_gap(clips):
    """Fewer samples mean larger gaps between them; the score must not change."""
    root, _, rows = clips
    s = stage("dis")
    dense = s.process_row(rows["pan_slow_480x270.mp4"])["motion"]
    sparse = s.process_row(video_row(root / "videos/pan_slow_480x270.mp4", num_frames=3))["motion"]
    assert sparse == pytest.approx(dense, rel=0.05)


def test_stills_and_single_frames_get_no_motion(clips):
    _, _, rows = clips
    s = stage("dis")
    frames = rows["pan_fast_480x270.mp4"]["frames"]
    for row in (
        {"kind": "image", "frames": frames[:1], "frame_times": [0.0]},
        {"kind": "image_edit", "frames": frames[:1], "frame_times": [0.0]},
        {"kind": "video", "frames": frames[:1], "frame_times": [0.0]},
        {"kind": "video", "frames": [], "frame_times": []},
        # two samples of the same instant (a clip shorter than the sample count)
        {"kind": "video", "frames": frames[:2], "frame_times": [0.5, 0.5]},
    ):
        out = s.process_row(row)
        assert out["motion"] is None and out["motion_min"] is None and out["motion_max"] is None


def test_video_edit_is_scored_on_its_source_frames(clips):
    _, _, rows = clips
    s = stage("dis")
    row = dict(rows["pan_slow_480x270.mp4"], kind="video_edit")
    assert s.process_row(row)["motion"] == pytest.approx(
        s.process_row(rows["pan_slow_480x270.mp4"])["motion"]
    )


def test_mismatched_frame_times_mark_the_row(clips):
    _, _, rows = clips
    row = dict(rows["pan_slow_480x270.mp4"], frame_times=[0.0])
    (out,) = stage("dis").process_batch([row])
    assert out["status"] == "error"
    assert out["reasons"][0].startswith("bad_frame_times")


def test_stage_declaration_and_pickling():
    s = MotionStage(MotionConfig())
    assert (s.name, s.resources.cpus, s.uses_model) == ("motion", 1, False)
    s.setup()
    clone = pickle.loads(pickle.dumps(s))
    frame = np.zeros((90, 160, 3), np.uint8)
    row = {"kind": "video", "frames": [frame] * 2, "frame_times": [0.0, 1.0]}
    assert clone.process_row(row)["motion"] == 0.0
