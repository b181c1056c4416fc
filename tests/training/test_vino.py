"""VINO's paper features: boundary tokens that wrap each reference's latents in the MMDiT
(the VLM's states at <|vision_start|> / <|vision_end|> through ``boundary_connector``,
vino.txt:111) and the VLM's video input at the task's rate and frame cap (vino.txt:475)."""

from __future__ import annotations

import core.compat  # noqa: F401  (before transformers / diffusers)

# isort: split
import copy
import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

from catalog.shards import ShardWriter, bucket_name, sample_json
from training.data.batch import TaskBatch, vlm_frame_indices
from training.data.loaders import TaskLoader
from training.models.geometry import pos_embed_3d
from training.models.latent_stream import LatentRef
from training.models.registry import build_model
from training.models.vino import Reference
from training.recipe import Recipe
from training.trainer import StageSpec, Trainer, process_group

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("vino", "tiny")


def pixels(b, t, seed, h=16, w=24):
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def text(model, b=2):
    ids, mask = model.tokenize(["make it red", "add a hat"][:b])
    return ids, mask, torch.ones(b, dtype=torch.bool)


# -- boundary tokens ------------------------------------------------------------------------


def test_boundary_tokens_sit_exactly_between_the_latent_segments(model):
    """An image reference and a video reference, then the target: each reference's latents are
    wrapped in its own start / end tokens, on one timeline, the target last."""
    keep = torch.ones(2, dtype=torch.bool)
    refs = [Reference(pixels(2, 1, 1), keep), Reference(pixels(2, 9, 2), keep)]
    ids, mask, keep_text = text(model)
    with torch.no_grad():
        _, _, marks = model.condition(ids, mask, keep_text, refs)
        vae, mmdit = model.groups["vae"], model.groups["mmdit"]
        latents = [vae.encode(r.pixels) for r in refs]  # (2, 1, 8, 2, 3), (2, 3, 8, 2, 3)
        x = vae.encode(pixels(2, 9, 3))
        wrapped = [LatentRef(z, *m, keep) for z, m in zip(latents, marks, strict=True)]
        stream = mmdit.stream(x, wrapped)
        embed = [mmdit.stream(z).tokens for z in (*latents, x)]  # each segment alone
    n1, n2, nt = (e.shape[1] for e in embed)  # 6, 18, 18 tokens
    assert stream.boundaries == [0, n1 + 1, n1 + 2, n1 + n2 + 3]
    assert stream.tokens.shape[1] == n1 + n2 + nt + 4
    assert stream.target == slice(n1 + n2 + 4, n1 + n2 + nt + 4)
    order = [marks[0][0], embed[0], marks[0][1], marks[1][0], embed[1], marks[1][1], embed[2]]
    expected = torch.cat([o if o.dim() == 3 else o[:, None] for o in order], 1)
    assert torch.equal(stream.tokens, expected)
    t = stream.positions[:, 0].tolist()
    assert t[0] == 0 and set(t[1 : n1 + 1]) == {1} and t[n1 + 1] == 2  # image: st, 1 frame, ed
    assert t[n1 + 2] == 3 and set(t[n1 + 3 : n1 + n2 + 3]) == {4, 5, 6} and t[n1 + n2 + 3] == 7
    assert sorted(set(t[stream.target])) == [8, 9, 10]  # the target after every reference
    assert stream.positions[stream.boundaries, 1:].abs().sum() == 0  # markers at (y, x) = 0
    assert stream.key_mask.all()
    # the two references' markers differ (states of different VLM positions)
    assert not torch.allclose(marks[0][1], marks[1][1])


def test_without_references_the_stream_is_the_base_models_input(model):
    """t2i / t2v: the target alone at positions 0.., exactly the text-to-video MMDiT's input."""
    mmdit = model.groups["mmdit"]
    x = model.groups["vae"].encode(pixels(2, 9, 4))
    stream = mmdit.stream(x)
    assert stream.boundaries == [] and stream.target == slice(0, stream.tokens.shape[1])
    grid = torch.stack(torch.meshgrid(*map(torch.arange, (3, 2, 3)), indexing="ij"), -1)
    assert torch.equal(stream.positions, grid.reshape(-1, 3).float())
    from training.models.geometry import pos_embed_at

    assert torch.allclose(pos_embed_at(stream.positions, 64), pos_embed_3d(3, 2, 3, 64))


def test_the_vlm_wraps_each_reference_in_its_vision_markers(model):
    """The VLM's input holds <|vision_start|> / <|vision_end|> around each reference's visual
    tokens, and the boundary tokens are ``boundary_connector`` of the VLM's states there."""
    seen = {}
    hook = model.groups["vlm"].register_forward_hook(
        lambda mod, args, out: seen.update(embeds=args[0], hidden=out)
    )
    keep = torch.ones(2, dtype=torch.bool)
    refs = [Reference(pixels(2, 1, 1), keep), Reference(pixels(2, 9, 2), keep)]
    try:
        with torch.no_grad():
            _, key_mask, marks = model.condition(*text(model), refs)
    finally:
        hook.remove()
    vlm = model.groups["vlm"]
    st, ed = vlm.embed_text(torch.tensor(model.vision_tokens))
    per_frame = 16  # tiny vision encoder: 4 x 4 tokens per latent frame
    spans = [(0, 1 + per_frame), (2 + per_frame, 2 + per_frame + 1 + 3 * per_frame)]
    for (s, e), (start, end) in zip(spans, marks, strict=True):
        assert torch.equal(seen["embeds"][:, s], st.expand(2, -1))
        assert torch.equal(seen["embeds"][:, e], ed.expand(2, -1))
        project = model.groups["boundary_connector"]
        assert torch.allclose(start, project(seen["hidden"][:, s]))
        assert torch.allclose(end, project(seen["hidden"][:, e]))
    assert key_mask.shape[1] == seen["embeds"].shape[1]


def batch(model, task, t=9, b=2, drop_source=None, seed=0, vlm_frames=None):
    ids, mask = model.tokenize(["make it red", "add a hat"][:b])
    drop = {} if drop_source is None else {"source": torch.tensor(drop_source)}
    return TaskBatch(
        task=task,
        keys=[f"k{i}" for i in range(b)],
        pixels=pixels(b, t, seed),
        input_ids=ids,
        attention_mask=mask,
        source_pixels=pixels(b, t, seed + 1),
        drop=drop,
        vlm_frames=vlm_frames,
    )


def test_boundary_connector_is_learnable_and_gets_gradients_from_edits():
    torch.manual_seed(0)
    model = build_model("vino", "tiny")
    trainable = yaml.safe_load((RECIPES / "vino_7b.yaml").read_text())["stages"]
    for stage in trainable:  # trained wherever the connector is (Table 1: "connectors")
        assert "boundary_connector" in model.set_trainable(stage["trainable"])
    for task, t in (("v2v_edit", 9), ("i2i_edit", 1)):
        model.zero_grad()
        model(batch(model, task, t=t, vlm_frames=(0, 4, 8) if t > 1 else None))["loss"].backward()
        grads = [p.grad for p in model.groups["boundary_connector"].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), task
    model.zero_grad()
    t2v = batch(model, "t2v")
    t2v.source_pixels = None
    model(t2v)["loss"].backward()  # no reference: no boundary tokens
    assert all(p.grad is None for p in model.groups["boundary_connector"].parameters())


def test_a_dropped_reference_is_invisible_to_the_target(model):
    """Condition dropout of the source: its latents and markers are masked out of attention,
    so the loss no longer depends on it (and does when it is kept)."""

    def loss(drop, source_seed):
        b = batch(model, "v2v_edit", b=1, drop_source=[drop])
        b.source_pixels = pixels(1, 9, source_seed)
        torch.manual_seed(3)
        with torch.no_grad():
            return model(b)["loss"]

    assert torch.equal(loss(True, 10), loss(True, 11))
    assert not torch.allclose(loss(False, 10), loss(False, 11))


def test_multi_reference_flow_loss_trains(model):
    """Any number of references (an image and a video here), one dropped for one sample."""
    torch.manual_seed(0)
    keep = torch.tensor([True, False])
    refs = [
        Reference(pixels(2, 1, 5), torch.ones(2, dtype=torch.bool)),
        Reference(pixels(2, 9, 6), keep, vlm_frames=(0, 8)),
    ]
    model.zero_grad()
    loss = model.flow_loss(pixels(2, 9, 7), *text(model), refs)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.groups["boundary_connector"][0].weight.grad.abs().sum() > 0
    model.zero_grad()


# -- the VLM's video input ------------------------------------------------------------------


@pytest.mark.parametrize("frames,fps", [(33, 8.0), (81, 8.0), (9, 8.0), (121, 24.0), (17, 2.0)])
def test_vlm_frames_follow_qwen3_vl_sampling(frames, fps):
    """The index rule is Qwen3-VL's own (its video processor with the paper's 1 fps, at most
    8 frames), applied to the clip the loader decoded."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Qwen3VLVideoProcessor(fps=1, max_frames=8)
    meta = VideoMetadata(total_num_frames=frames, fps=fps)
    expected = processor.sample_frames(meta).tolist()
    assert list(vlm_frame_indices(frames, fps, 1.0, 8)) == expected
    assert len(expected) <= 8


def mp4_bytes(n: int, fps: int, w: int = 64, h: int = 64, base: int = 0) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(n):
            arr = np.full((h, w, 3), min(255, base + 3 * i), np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return out.getvalue()


@pytest.fixture(scope="module")
def edit_shards(tmp_path_factory) -> Path:
    """Four square video edits of different lengths and frame rates (10 to 70 frames at 10 to
    30 fps), one shard bucket."""
    root = tmp_path_factory.mktemp("vino-shards")
    writer = ShardWriter(str(root), prefix="v", max_samples=2)
    for i, (n, fps) in enumerate([(10, 10), (70, 30), (24, 24), (40, 12)]):
        row = {"key": f"ve{i}", "kind": "video_edit", "status": "accepted", "width": 64,
               "height": 64, "num_frames": 16, "fps": float(fps)}  # fmt: skip
        members = {"json": sample_json(row), "txt": f"recolor {i}".encode(),
                   "src.mp4": mp4_bytes(n, fps), "tgt.mp4": mp4_bytes(n, fps, base=80)}  # fmt: skip
        writer.write(bucket_name(64, 64, 16), f"ve{i}", members)
    writer.close()
    return root


def loader(model, root, **kw):
    return TaskLoader(
        "v2v_edit",
        sorted(str(p) for p in root.rglob("*.tar")),
        tokenize=model.tokenize,
        geometry=model.geometry,
        frame_area=64 * 64,
        token_budget=4096,
        num_frames=33,
        fps=8.0,
        decode_threads=1,
        **kw,
    )


def test_the_vlm_reads_the_configured_frames_of_every_clip(model, edit_shards):
    """Whatever a clip's own length and rate, the loader brings it to 33 frames at 8 fps and
    the VLM reads 1 fps of it: frames 0, 11, 21, 32 (int(33 / 8) = 4 >= Qwen3-VL's minimum)."""
    with loader(model, edit_shards, vlm_fps=1.0, vlm_max_frames=8) as lo:
        (shape,) = lo.shapes
        got = lo.next_batch(shape, 4)
    assert got.vlm_frames == (0, 11, 21, 32) and got.source_pixels.shape[1] == 33
    seen = {}
    hook = model.groups["vlm"].register_forward_hook(lambda m, a, o: seen.update(n=a[0].shape[1]))
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            loss = model(got)["loss"]
    finally:
        hook.remove()
    assert torch.isfinite(loss)
    text_len, queries = got.input_ids.shape[1], 8
    assert seen["n"] == 2 + 4 * 16 + text_len + queries  # markers + 4 frames of 4 x 4 tokens
    # a longer task clip hits the cap: 81 frames at 8 fps is 10 s -> 8 frames
    assert len(vlm_frame_indices(81, 8.0, 1.0, 8)) == 8


def test_vlm_frames_leave_the_loader_stream_and_state_unchanged(model, edit_shards):
    with loader(model, edit_shards) as plain, loader(model, edit_shards, vlm_fps=1.0) as vlm:
        (shape,) = plain.shapes
        a, b = plain.next_batch(shape, 3), vlm.next_batch(shape, 3)
        assert a.keys == b.keys and torch.equal(a.source_pixels, b.source_pixels)
        assert a.vlm_frames is None and b.vlm_frames == (0, 11, 21, 32)
        assert plain.state_dict() == vlm.state_dict()
    with pytest.raises(ValueError, match="vlm_fps needs the task's fps"):
        TaskLoader("v2v_edit", [], tokenize=model.tokenize, geometry=model.geometry,
                   frame_area=4096, token_budget=4096, num_frames=9, vlm_fps=1.0)  # fmt: skip


def test_recipe_checks_the_vlm_video_settings():
    data = yaml.safe_load((RECIPES / "vino_tiny.yaml").read_text())
    stage = data["stages"][2]
    stage["tasks"]["v2v_edit"] = {"weight": 1.0, "data": "curated", "num_frames": 9,
                                  "vlm_max_frames": 8}  # fmt: skip
    with pytest.raises(ValueError) as err:
        Recipe.model_validate(copy.deepcopy(data))
    assert "stages.2.tasks.v2v_edit.vlm_fps: required with vlm_max_frames" in str(err.value)
    stage["tasks"]["v2v_edit"].update(vlm_fps=1.0)
    with pytest.raises(ValueError) as err:
        Recipe.model_validate(copy.deepcopy(data))
    assert "stages.2.tasks.v2v_edit.fps: required with vlm_fps" in str(err.value)
    stage["tasks"]["v2v_edit"].update(fps=8.0)
    Recipe.model_validate(copy.deepcopy(data))
    stage["tasks"]["t2v"]["vlm_fps"] = 1.0
    with pytest.warns(UserWarning, match="only a video edit shows the VLM a video"):
        Recipe.model_validate(copy.deepcopy(data))


# -- through the real trainer ---------------------------------------------------------------


class Kept:
    def __init__(self):
        self.reported: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reported.append(metrics)

    def latest_checkpoint(self):
        from contextlib import nullcontext

        return nullcontext(None)


def test_a_vino_stage_step_with_video_edits_runs_through_the_trainer(edit_shards, tmp_path):
    """Stage 3 of vino_tiny on video edits with the VLM at 2 fps (at most 4 frames): one
    DeepSpeed step moves the boundary connector."""
    data = yaml.safe_load((RECIPES / "vino_tiny.yaml").read_text())
    data["data"]["curated"]["uri"] = str(edit_shards)
    stage = data["stages"][2]
    stage.update(steps=4, checkpoint_every=4, frame_area=4096, token_budget=768)
    stage["tasks"] = {"v2v_edit": {"weight": 1.0, "data": "curated", "num_frames": 9,
                                   "fps": 8.0, "vlm_fps": 2.0, "vlm_max_frames": 4}}  # fmt: skip
    recipe = Recipe.model_validate(data)
    spec = StageSpec(
        recipe=recipe.model_dump(mode="json"), stage_index=2, output=str(tmp_path), stop_after=1
    )
    with process_group():
        trainer = Trainer(spec, Kept())
        try:
            module = trainer.engine.module
            before = module.groups["boundary_connector"][0].weight.detach().clone()
            out = trainer.train_step()
            after = module.groups["boundary_connector"][0].weight.detach()
        finally:
            trainer.data.close()
            for lo in trainer.loaders.values():
                lo.close()
    assert out["task"] == "v2v_edit" and np.isfinite(out["loss"])
    # 9 frames at 8 fps read at 2 fps: int(2.25) = 2, raised to Qwen3-VL's minimum of 4
    assert trainer.loaders["v2v_edit"].vlm_frames == (0, 3, 5, 8)
    assert not torch.equal(before, after)


# -- the production MMDiT (HunyuanVideo through diffusers) ----------------------------------


@pytest.fixture(scope="module")
def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    from training.models.hf_diffusers import HunyuanMMDiT

    torch.manual_seed(0)
    net = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )  # fmt: skip
    return HunyuanMMDiT(net.eval())


def test_hunyuan_mmdit_without_references_is_diffusers_own_forward(hunyuan):
    """Our forward (stream + RoPE at the stream's positions) is diffusers' for the target alone,
    so the pretrained text-to-video model is unchanged in stages 1 and 2."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 4, 4, 6, generator=gen), torch.tensor([0.3, 0.8])
    context = torch.randn(2, 5, 16, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ours = hunyuan(x, t, context, mask)
        w = mask[..., None].float()
        pooled = hunyuan.pool((context * w).sum(1) / w.sum(1))
        theirs = hunyuan.model(
            hidden_states=x.transpose(1, 2),
            timestep=t * 1000,
            encoder_hidden_states=context,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            guidance=torch.full((2,), hunyuan.guidance_scale * 1000),
            return_dict=False,
        )[0].transpose(1, 2)
    assert ours.shape == x.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_hunyuan_mmdit_reads_references_through_their_boundary_tokens(hunyuan):
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 3, 4, 4, 6, generator=gen), torch.tensor([0.5])
    context, mask = torch.randn(1, 5, 16, generator=gen), torch.ones(1, 5, dtype=torch.long)
    start = torch.randn(1, hunyuan.dim, generator=gen, requires_grad=True)
    end = torch.randn(1, hunyuan.dim, generator=gen)
    ref = LatentRef(torch.randn(1, 2, 4, 4, 6, generator=gen), start, end, torch.tensor([True]))
    stream = hunyuan.stream(x, [ref])
    assert stream.boundaries == [0, 13] and stream.target == slice(14, 32)
    assert torch.equal(stream.tokens[:, 0], start) and torch.equal(stream.tokens[:, 13], end)
    out = hunyuan(x, t, context, mask, (ref,))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert start.grad is not None and start.grad.abs().sum() > 0
    # dropped: masked out of attention (it keeps its place on the timeline: one layout per
    # batch), so other latents and markers give the same output
    dropped = ref._replace(keep=torch.tensor([False]))
    other = LatentRef(torch.randn(1, 2, 4, 4, 6), 3 * start, -end, torch.tensor([False]))
    with torch.no_grad():
        a, b = (hunyuan(x, t, context, mask, (r,)) for r in (dropped, other))
        assert torch.equal(a, b) and not torch.allclose(a, out)


def test_a_vlm_tokenizer_without_vision_markers_is_refused(tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    from training.models.production import vision_token_ids

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    with pytest.raises(ValueError, match=r"has no <\|vision_start\|> / <\|vision_end\|> token"):
        vision_token_ids(tok, len(tok), tmp_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>"]})
    assert vision_token_ids(tok, len(tok), tmp_path) == (len(tok) - 2, len(tok) - 1)
