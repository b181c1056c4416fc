"""Watermark scorer: a head trained here on tiny-CLIP embeddings, and the static-overlay cue.

The watermark head is fitted on embeddings of scenes drawn like the sample corpus (same
overlay styles, other scenes) and evaluated on the corpus' own labelled images, which it never
saw. See ``tests/tiny_models.py`` for why the tiny CLIP's image tower is trained first.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import frames_row, torch_threads
from PIL import Image
from tiny_models import (
    EMBED_DIM,
    TINY_RN,
    TINY_VIT,
    auc,
    build_clip,
    designed_laion_head_state,
    save_clip,
    train_watermark_tower,
    watermark_training_set,
)

from core.weights import WeightsError
from curation.clip import EMBEDDING_COLUMN, ClipEmbedder, ClipSpec
from curation.config import CurationConfig
from curation.heads import (
    AESTHETIC_HEAD,
    WatermarkHead,
    fit_watermark_head,
    watermark_head_relative,
)
from curation.media import fit_max_side
from curation.stages.aesthetic import AestheticStage, clip_spec
from curation.stages.base import MissingWeights, check_required
from curation.stages.watermark import WatermarkStage, static_overlay_score

SELECT_MAX_WATERMARK_STATIC = CurationConfig().select.max_watermark_static


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Models dir with the trained tiny CLIP and a watermark head fitted on its embeddings."""
    with torch_threads(1):
        images, labels, masks, scenes = watermark_training_set()
        model = train_watermark_tower(images, labels, masks, scenes)
        models = tmp_path_factory.mktemp("models")
        save_clip(model, models / "open_clip" / f"{TINY_RN}.safetensors")
        # the head is fitted like one would be on a real CLIP: embeddings of labelled frames
        # through the stage's own embedding path (loaded back from disk)
        subset = [
            i for i, s in enumerate(scenes) if i == 0 or scenes[i - 1] != s or labels[i - 1] == 0
        ]
        embedder = ClipEmbedder(ClipSpec.resolve(TINY_RN, None, models))
        emb = embedder.embed([images[i] for i in subset])
        head = fit_watermark_head(emb, labels[subset], TINY_RN)
        head.save(models / watermark_head_relative(TINY_RN))
    return models


def image_row(path: Path, **extra) -> dict:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return {
        "key": path.name,
        "kind": "image",
        "status": "accepted",
        "reasons": [],
        "frames": [fit_max_side(rgb)],
        **extra,
    }


def video_frames(path: Path, n: int = 8) -> list[np.ndarray]:
    """n frames at the centres of n equal segments (like the frames stage), <= 640 px."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = [min(len(frames) - 1, int((i + 0.5) * len(frames) / n)) for i in range(n)]
    return [fit_max_side(frames[i]) for i in picks]


def watermark_stage(cfg: CurationConfig) -> WatermarkStage:
    clip = clip_spec(cfg.aesthetic, cfg.models_dir)
    return WatermarkStage(cfg.watermark, clip, cfg.models_dir, cfg.aesthetic.batch_size)


def wm_config(models: Path, arch: str = TINY_RN, **watermark) -> CurationConfig:
    select = {} if watermark.get("static_overlay", True) else {"max_watermark_static": None}
    return CurationConfig(
        models_dir=models, aesthetic={"clip_model": arch}, watermark=watermark, select=select
    )


# ----------------------------------------------------------------- watermark probability


def test_head_probability_separates_the_corpus_images(corpus, trained):
    root, labels = corpus
    items = [lab for lab in labels if lab["kind"] == "image" and lab["path"].startswith("images/")]
    stage = watermark_stage(wm_config(trained))
    assert (stage.name, stage.uses_model, stage.resources.cpus) == ("watermark", True, 0.5)
    check_required([stage])
    out = stage.process_batch([image_row(root / lab["path"]) for lab in items])
    scores = {lab["id"]: r["watermark"] for lab, r in zip(items, out, strict=True)}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert all(r["watermark_static"] is None for r in out)  # images: no static-overlay cue
    pos = [scores[lab["id"]] for lab in items if lab["has_watermark"]]
    neg = [scores[lab["id"]] for lab in items if not lab["has_watermark"]]
    kept = [
        scores[lab["id"]]
        for lab in items
        if not lab["has_watermark"] and not lab["expect_filtered"]
    ]
    print(f"\nwatermark probability on the corpus images: {scores}")
    print(
        f"AUC all {auc(pos, neg):.3f}, AUC pipeline-sized {auc(pos, kept):.3f}, "
        f"min watermarked {min(pos):.3f}, max clean {max(neg):.3f} / sized {max(kept):.3f}"
    )
    assert len(pos) == 3 and len(neg) == 10
    # Every watermarked image above every clean image of a size / aspect the pipeline keeps;
    # the 64x48 thumbnail and the 1:4 strip (rejected by select for size / aspect anyway)
    # are the tiny model's hardest negatives.
    assert min(pos) > max(kept)
    assert auc(pos, neg) >= 0.9


def test_video_takes_the_max_over_frames_and_edits_both_sides(corpus, trained):
    root, _ = corpus
    clean = np.asarray(Image.open(root / "images/square_512.jpg").convert("RGB"))
    marked = np.asarray(Image.open(root / "images/classic_480x360.jpg").convert("RGB"))
    stage = watermark_stage(wm_config(trained, static_overlay=False))
    p_clean, p_marked = (
        r["watermark"]
        for r in stage.process_batch([frames_row("image", [clean]), frames_row("image", [marked])])
    )
    out = stage.process_batch(
        [
            frames_row("video", [clean, clean, marked, clean]),
            frames_row("video", [clean, clean]),
            {**frames_row("image_edit", [marked]), "target_frames": [clean]},
            {**frames_row("image_edit", [clean]), "target_frames": [clean]},
        ]
    )
    assert out[0]["watermark"] == pytest.approx(p_marked, abs=1e-5)
    assert out[1]["watermark"] == pytest.approx(p_clean, abs=1e-5)
    assert out[2]["watermark"] == pytest.approx(p_marked, abs=1e-5)  # either side counts
    assert out[3]["watermark"] == pytest.approx(p_clean, abs=1e-5)
    assert all(r["watermark_static"] is None for r in out)  # static_overlay off


# -------------------------------------------------------------------- static overlay cue


def test_static_overlay_cue_flags_the_logo_video_only(corpus, trained):
    root, labels = corpus
    videos = {
        lab["id"]: lab
        for lab in labels
        if lab["kind"] == "video" and lab["path"].startswith("videos/")
    }
    scores = {
        name: static_overlay_score(video_frames(root / lab["path"])) for name, lab in videos.items()
    }
    print(f"\nwatermark_static of the corpus videos: {scores}")
    marked = [n for n, lab in videos.items() if lab["has_watermark"]]
    assert marked == ["watermark_480x270.mp4"]
    assert scores[marked[0]] > SELECT_MAX_WATERMARK_STATIC  # select rejects it
    for name, lab in videos.items():
        if lab["motion"] == "static":  # nothing moves: a logo cannot be told from the scene
            assert scores[name] is None, name
        elif name not in marked:
            assert scores[name] is not None and scores[name] < 0.1, name
    # a single frame, or the same frame repeated: not measurable
    frames = video_frames(root / videos[marked[0]]["path"])
    assert static_overlay_score(frames[:1]) is None
    assert static_overlay_score([frames[0]] * 4) is None
    # through the stage: video rows get both columns
    stage = watermark_stage(wm_config(trained))
    out = stage.process_batch([frames_row("video", frames)])[0]
    assert out["watermark_static"] == pytest.approx(scores[marked[0]])
    assert 0.0 <= out["watermark"] <= 1.0


# ------------------------------------------------------------- shared CLIP embeddings


def test_embeddings_from_the_aesthetic_stage_are_reused(tmp_path):
    models = tmp_path / "models"
    save_clip(build_clip(TINY_VIT, seed=0), models / "open_clip" / f"{TINY_VIT}.safetensors")
    (models / "aesthetic").mkdir()
    torch.save(designed_laion_head_state(EMBED_DIM), models / AESTHETIC_HEAD)
    torch.manual_seed(5)
    WatermarkHead(EMBED_DIM, TINY_VIT).save(models / watermark_head_relative(TINY_VIT))
    cfg = wm_config(models, TINY_VIT)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(3)]
    rows = [frames_row("video", frames), frames_row("image", frames[:1])]

    scored = AestheticStage(cfg.aesthetic, models_dir=cfg.models_dir).process_batch(rows)
    assert all(EMBEDDING_COLUMN in r for r in scored)
    reusing = watermark_stage(cfg)
    shared = reusing.process_batch(scored)
    assert not reusing.embedder.loaded  # CLIP never ran in the watermark stage
    alone = watermark_stage(cfg)
    fresh = alone.process_batch(rows)
    assert alone.embedder.loaded
    for a, b in zip(shared, fresh, strict=True):
        assert a["watermark"] == pytest.approx(b["watermark"], abs=1e-6)
        assert a["aesthetic"] is not None
        assert a[EMBEDDING_COLUMN]["key"] == b[EMBEDDING_COLUMN]["key"]
        np.testing.assert_allclose(
            a[EMBEDDING_COLUMN]["emb"], b[EMBEDDING_COLUMN]["emb"], atol=1e-6
        )
    # an embedding made by another model / weights file is not reused
    other = [
        {**r, EMBEDDING_COLUMN: {**r[EMBEDDING_COLUMN], "key": "ViT-B-32|/elsewhere.pt|squash"}}
        for r in scored
    ]
    stage = watermark_stage(cfg)
    again = stage.process_batch(other)
    assert stage.embedder.loaded
    assert [r["watermark"] for r in again] == pytest.approx(
        [r["watermark"] for r in fresh], abs=1e-6
    )
    # the stage ships to workers without its models
    clone = pickle.loads(pickle.dumps(reusing))
    assert clone.head is None and not clone.embedder.loaded


# ------------------------------------------------------------------- weights handling


def test_missing_weights_are_named_at_start_up(tmp_path):
    stage = watermark_stage(wm_config(tmp_path / "models", "ViT-B-32"))
    with pytest.raises(MissingWeights) as err:
        check_required([stage])
    msg = str(err.value)
    assert (
        f"open_clip ViT-B-32 weights not found at {tmp_path}/models/open_clip/ViT-B-32.safetensors"
        in msg
    )
    assert (
        f"watermark head for ViT-B-32 not found at {tmp_path}/models/watermark/ViT-B-32-watermark-head.safetensors"
        in msg
    )
    assert "curation.heads.fit_watermark_head" in msg


def test_watermark_head_format_is_checked(tmp_path):
    torch.manual_seed(0)
    head = WatermarkHead(EMBED_DIM, TINY_VIT)
    path = head.save(tmp_path / "head.safetensors")
    loaded = WatermarkHead.load(path)
    assert loaded.clip_model == TINY_VIT and loaded.input_size == EMBED_DIM
    emb = np.eye(EMBED_DIM, dtype=np.float32)[:4]
    want = torch.softmax(head.linear(torch.from_numpy(emb)), -1)[:, 1].detach().numpy()
    np.testing.assert_allclose(loaded.probability(emb), want, rtol=1e-6)
    with pytest.raises(ValueError, match="takes 32-d embeddings, got shape"):
        loaded.probability(np.zeros((1, 8), np.float32))

    from safetensors.torch import save_file

    save_file(
        {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, str(tmp_path / "keys.safetensors")
    )
    with pytest.raises(
        WeightsError,
        match=r"keys.safetensors is not a watermark head .*missing keys \['linear.bias', 'linear.weight'\]",
    ):
        WatermarkHead.load(tmp_path / "keys.safetensors")
    save_file(
        {"linear.weight": torch.zeros(3, 4), "linear.bias": torch.zeros(3)},
        str(tmp_path / "three.safetensors"),
    )
    with pytest.raises(WeightsError, match=r"expected linear.weight \(2, D\)"):
        WatermarkHead.load(tmp_path / "three.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(os.urandom(300))
    with pytest.raises(WeightsError, match="cannot read weights file .*corrupt.safetensors"):
        WatermarkHead.load(tmp_path / "corrupt.safetensors")

    # a head fitted on another CLIP model is refused when the stage starts
    models = tmp_path / "models"
    head.save(models / watermark_head_relative(TINY_RN))
    with pytest.raises(
        WeightsError,
        match="fitted on omniforge-tiny-vit embeddings, the configured CLIP model is omniforge-tiny-rn",
    ):
        watermark_stage(wm_config(models)).setup()


def test_fit_watermark_head_learns_a_separable_toy_problem():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, EMBED_DIM)).astype(np.float32)
    labels = emb[:, 3] > 0.2
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    head = fit_watermark_head(emb, labels, "toy")
    p = head.probability(emb)
    assert ((p > 0.5) == labels).mean() > 0.95 and head.clip_model == "toy"
    with pytest.raises(ValueError, match="needs both watermarked and clean"):
        fit_watermark_head(emb, np.zeros(200, bool))
