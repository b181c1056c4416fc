"""Aesthetic scorer and the weight loading it shares with the watermark scorer.

Models are tiny open_clip architectures built here (``tests/tiny_models.py``), saved where a
real run finds real weights and loaded back through ``curation.weights`` / ``curation.clip`` / ``curation.heads``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import frames_row
from PIL import Image
from tiny_models import (
    EMBED_DIM,
    TINY_RN,
    TINY_VIT,
    build_clip,
    designed_laion_head_state,
    laion_head_state,
    register_tiny_configs,
    save_clip,
)

from core.weights import WeightsError, resolve_weights
from curation.clip import (
    ClipEmbedder,
    ClipSpec,
    import_open_clip,
    load_clip,
    shared_embeddings,
)
from curation.config import CurationConfig
from curation.heads import AESTHETIC_HEAD, AestheticHead
from curation.sample_data.render import landscape, rng_for
from curation.stages.aesthetic import AestheticStage
from curation.stages.base import MissingWeights, check_required

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.fixture(scope="module")
def tiny_vit():
    return build_clip(TINY_VIT, seed=0)


def scene(name: str, w: int = 160, h: int = 120, palette: str = "day") -> np.ndarray:
    return landscape(rng_for(7, name), h, w, palette)


def make_models(root: Path, model, head_state: dict | None = None, suffix=".safetensors") -> Path:
    save_clip(model, root / "open_clip" / f"{TINY_VIT}{suffix}")
    head = root / AESTHETIC_HEAD
    head.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head_state or designed_laion_head_state(EMBED_DIM), head)
    return root


def config(models: Path | None, **aesthetic) -> CurationConfig:
    return CurationConfig(models_dir=models, aesthetic={"clip_model": TINY_VIT, **aesthetic})


def aesthetic_stage(cfg: CurationConfig) -> AestheticStage:
    return AestheticStage(cfg.aesthetic, models_dir=cfg.models_dir)


def reference_embeddings(weights: Path, images: list[np.ndarray]) -> np.ndarray:
    """open_clip's own encode_image on the whole frame squashed to the input size."""
    open_clip = import_open_clip()
    model, _, pre = open_clip.create_model_and_transforms(
        TINY_VIT, pretrained=str(weights), image_resize_mode="squash"
    )
    with torch.no_grad():
        x = torch.stack([pre(Image.fromarray(im)) for im in images])
        return model.eval().encode_image(x, normalize=True).numpy()


# ---------------------------------------------------------------------- weight lookup


def test_resolve_prefers_explicit_then_models_dir_then_env_then_user_cache(tmp_path, monkeypatch):
    rel = "aesthetic/head.pth"
    home, env, cfg_dir = tmp_path / "home", tmp_path / "env", tmp_path / "cfg"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OMNIFORGE_MODELS", str(env))
    user = home / ".cache/omniforge/models" / rel
    # nothing exists: the primary expected path is reported
    assert resolve_weights(None, rel, cfg_dir) == cfg_dir / rel
    assert resolve_weights(None, rel, None) == env / rel
    monkeypatch.delenv("OMNIFORGE_MODELS")
    assert resolve_weights(None, rel, None) == user
    monkeypatch.setenv("OMNIFORGE_MODELS", str(env))
    for path in (user, env / rel):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        assert resolve_weights(None, rel, cfg_dir) == path  # first root that has it
    (cfg_dir / rel).parent.mkdir(parents=True)
    (cfg_dir / rel).write_bytes(b"x")
    assert resolve_weights(None, rel, cfg_dir) == cfg_dir / rel
    assert resolve_weights(tmp_path / "mine.pth", rel, cfg_dir) == tmp_path / "mine.pth"
    # CLIP checkpoints: .safetensors, .pt or .bin
    (env / "open_clip").mkdir()
    (env / "open_clip" / "ViT-B-32.bin").write_bytes(b"x")
    assert ClipSpec.resolve("ViT-B-32", None, cfg_dir).weights == env / "open_clip/ViT-B-32.bin"
    assert (
        ClipSpec.resolve("ViT-X", None, cfg_dir).weights == cfg_dir / "open_clip/ViT-X.safetensors"
    )


def test_missing_weights_stop_the_pipeline_at_start_naming_path_and_source(tmp_path):
    stage = aesthetic_stage(config(tmp_path / "models", clip_model="ViT-L-14"))
    with pytest.raises(MissingWeights) as err:
        check_required([stage])
    msg = str(err.value)
    assert (
        f"open_clip ViT-L-14 weights not found at {tmp_path}/models/open_clip/ViT-L-14.safetensors"
        in msg
    )
    assert "huggingface-cli download timm/vit_large_patch14_clip_224.openai" in msg
    assert (
        f"LAION aesthetic head not found at {tmp_path}/models/aesthetic/sac+logos+ava1-l14-linearMSE.pth"
        in msg
    )
    assert "christophschuhmann/improved-aesthetic-predictor" in msg
    # an explicit path is reported as given
    stage = aesthetic_stage(config(None, clip_weights=tmp_path / "x.safetensors"))
    assert stage.required_files()[0].path == tmp_path / "x.safetensors"
    with pytest.raises(MissingWeights, match="x.safetensors"):
        load_clip(TINY_VIT, tmp_path / "x.safetensors")


# ---------------------------------------------------------------------- CLIP loading


def test_clip_checkpoints_load_strictly_and_mismatches_fail_loudly(tmp_path, tiny_vit):
    register_tiny_configs()
    st = save_clip(tiny_vit, tmp_path / "vit.safetensors")
    pt = save_clip(tiny_vit, tmp_path / "vit.pt")
    ref = tiny_vit.state_dict()
    for path in (st, pt):
        model, _ = load_clip(TINY_VIT, path)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    # same layout, other input size: open_clip would interpolate the position embedding
    with pytest.raises(
        WeightsError, match=r"does not match open_clip omniforge-tiny-vit-96.*positional_embedding"
    ):
        load_clip(TINY_VIT + "-96", st)
    with pytest.raises(WeightsError, match="Missing key"):
        load_clip(TINY_RN, st)  # another architecture altogether
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(WeightsError, match=f"cannot read weights file {bad}"):
        load_clip(TINY_VIT, bad)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=f"cannot load {bad_pt} as open_clip {TINY_VIT}"):
        load_clip(TINY_VIT, bad_pt)
    with pytest.raises(ValueError, match="unknown open_clip architecture 'no-such-arch'"):
        load_clip("no-such-arch", st)


def test_hf_hub_weights_come_from_the_local_cache_only(tmp_path, monkeypatch, tiny_vit):
    register_tiny_configs()
    import json

    from tiny_models import CONFIGS

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    missing = ClipSpec.resolve("tiny", "hf-hub:org/tiny", None)
    with pytest.raises(MissingWeights) as err:
        check_required([_Needs(missing)])
    assert str(cache / "models--org--tiny" / "snapshots") in str(err.value)
    assert "huggingface-cli download org/tiny" in str(err.value)

    snap = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    save_clip(tiny_vit, snap / "open_clip_model.safetensors")
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIGS[TINY_VIT]}))
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    spec = ClipSpec.resolve("tiny", Path("hf-hub:org/tiny"), None)  # config fields are Paths
    assert spec.weights == snap / "open_clip_model.safetensors" and spec.hf_repo == "org/tiny"
    check_required([_Needs(spec)])
    img = scene("hf")
    got = ClipEmbedder(spec).embed([img])
    want = ClipEmbedder(ClipSpec(TINY_VIT, save_clip(tiny_vit, tmp_path / "v.safetensors")))
    np.testing.assert_allclose(got, want.embed([img]), atol=1e-6)


class _Needs:
    name = "needs"

    def __init__(self, spec: ClipSpec):
        self.spec = spec

    def required_files(self):
        return self.spec.required_files()


# ---------------------------------------------------------------------- the head


def laion_reference(state: dict[str, torch.Tensor], emb: np.ndarray) -> np.ndarray:
    """The published MLP has no activations: a chain of affine maps (dropout off)."""
    x = emb.astype(np.float64)
    for i in (0, 2, 4, 6, 7):
        x = (
            x @ state[f"layers.{i}.weight"].double().numpy().T
            + state[f"layers.{i}.bias"].double().numpy()
        )
    return x[:, 0]


def test_laion_head_loads_in_its_published_format_and_reproduces_its_output(tmp_path):
    state = laion_head_state(EMBED_DIM, seed=3)
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, pth)  # how the published file was written: a plain state dict
    emb = np.random.default_rng(0).normal(size=(5, EMBED_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    head = AestheticHead.load(pth)
    assert head.input_size == EMBED_DIM and not head.training
    np.testing.assert_allclose(head.score(emb), laion_reference(state, emb), rtol=1e-5, atol=1e-5)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "head.safetensors"))
    np.testing.assert_allclose(
        AestheticHead.load(tmp_path / "head.safetensors").score(emb), head.score(emb)
    )
    designed = tmp_path / "designed.pth"
    torch.save(designed_laion_head_state(EMBED_DIM), designed)
    np.testing.assert_allclose(
        AestheticHead.load(designed).score(emb), 5 + 4 * emb[:, 0], atol=1e-6
    )
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")  # lightning-style checkpoint
    assert AestheticHead.load(tmp_path / "wrapped.pth").input_size == EMBED_DIM


def test_laion_head_rejects_other_files(tmp_path):
    state = laion_head_state(EMBED_DIM)
    cases = {
        "missing.pth": {k: v for k, v in state.items() if k != "layers.7.bias"},
        "extra.pth": {**state, "layers.1.weight": torch.zeros(3)},
        "shape.pth": {**state, "layers.2.weight": torch.zeros(128, 7)},
    }
    for name, bad in cases.items():
        torch.save(bad, tmp_path / name)
    with pytest.raises(
        WeightsError,
        match=r"missing.pth is not a LAION aesthetic head .*missing keys \['layers.7.bias'\]",
    ):
        AestheticHead.load(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \['layers.1.weight'\]"):
        AestheticHead.load(tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match="shape.pth does not fit the LAION aesthetic head"):
        AestheticHead.load(tmp_path / "shape.pth")
    (tmp_path / "corrupt.pth").write_bytes(os.urandom(512))
    with pytest.raises(WeightsError, match="cannot read weights file .*corrupt.pth"):
        AestheticHead.load(tmp_path / "corrupt.pth")
    torch.save({"layers": [1, 2]}, tmp_path / "notensors.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        AestheticHead.load(tmp_path / "notensors.pth")
    with pytest.raises(MissingWeights):
        AestheticHead.load(tmp_path / "absent.pth")


# ---------------------------------------------------------------------- the stage


def test_stage_scores_images_videos_and_edit_targets(tmp_path, tiny_vit):
    models = make_models(tmp_path / "models", tiny_vit)
    stage = aesthetic_stage(config(models, batch_size=5))
    assert (stage.name, stage.uses_model, stage.resources.cpus, stage.batch_size) == (
        "aesthetic",
        True,
        0.5,
        5,
    )
    check_required([stage])
    imgs = [scene("a"), scene("b", 200, 90, "sunset"), scene("c", 90, 160, "night")]
    rows = [frames_row("image", [im]) for im in imgs]
    rows.append(frames_row("video", imgs, frame_times=[0.0, 1.0, 2.0]))
    rows.append(frames_row("image_edit", [imgs[0]], target_frames=[imgs[2]]))
    rows.append(frames_row("video_edit", imgs, target_frames=[im for im in imgs[1:]]))
    rows.append({**frames_row("image", [imgs[0]]), "status": "error", "reasons": ["probe: x"]})
    rows.append(frames_row("image", []))  # nothing to score
    rows.append({**frames_row("image", []), "frames": [b"not a png"]})
    stage.setup()
    out = stage.process_batch(rows)

    want = (
        5 + 4 * reference_embeddings(models / "open_clip" / f"{TINY_VIT}.safetensors", imgs)[:, 0]
    )
    assert len(set(np.round(want, 4))) == 3  # the three images really score differently
    got = [r.get("aesthetic") for r in out]
    np.testing.assert_allclose(got[:3], want, atol=1e-5)
    assert got[3] == pytest.approx(want.min(), abs=1e-5)  # video: min over its frames
    assert got[4] == pytest.approx(want[2], abs=1e-5)  # image edit: the target
    assert got[5] == pytest.approx(want[1:].min(), abs=1e-5)  # video edit: the target's frames
    assert all(0 <= v <= 10 for v in got[:6])
    assert out[6] == rows[6]  # rows in error pass through untouched
    assert out[7]["aesthetic"] is None and out[7]["status"] == "accepted"
    assert out[8]["status"] == "error" and out[8]["reasons"][0].startswith(
        "decode_error: aesthetic"
    )

    # the embeddings stay in the row for the watermark stage: one vector per frame
    emb = shared_embeddings(out[3], stage.embedder.key)
    assert emb.shape == (3, EMBED_DIM) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert stage.embedder.key == f"{TINY_VIT}|{models / 'open_clip' / TINY_VIT}.safetensors|squash"

    # one row at a time gives the same numbers as the batched forward pass
    single = [stage.process_row(r)["aesthetic"] for r in rows[:6]]
    np.testing.assert_allclose(single, got[:6], atol=1e-5)


def test_scores_are_clamped_to_the_schema_range(tmp_path, tiny_vit):
    img = scene("clamp")
    for offset, expected in ((50.0, 10.0), (-50.0, 0.0)):
        models = make_models(
            tmp_path / f"m{offset}", tiny_vit, designed_laion_head_state(EMBED_DIM, offset=offset)
        )
        stage = aesthetic_stage(config(models))
        assert stage.process_batch([frames_row("image", [img])])[0]["aesthetic"] == expected


def test_head_and_clip_must_belong_together(tmp_path, tiny_vit):
    models = make_models(tmp_path / "models", tiny_vit, laion_head_state(EMBED_DIM * 2))
    with pytest.raises(
        WeightsError, match="takes 64-d embeddings but open_clip omniforge-tiny-vit produces 32-d"
    ):
        aesthetic_stage(config(models)).setup()


def test_stage_pickles_without_its_models(tmp_path, tiny_vit):
    import pickle

    models = make_models(tmp_path / "models", tiny_vit)
    stage = aesthetic_stage(config(models))
    stage.setup()
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.head is None and not clone.embedder.loaded
    img = scene("pickle")
    assert clone.process_batch([frames_row("image", [img])])[0]["aesthetic"] == pytest.approx(
        stage.process_batch([frames_row("image", [img])])[0]["aesthetic"]
    )
