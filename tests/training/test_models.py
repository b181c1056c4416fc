"""Model families: tiny sizes train on CPU; production sizes load local checkpoints or refuse."""

import core.compat  # noqa: F401  (before transformers / diffusers)

# isort: split
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny_backbones

from core.weights import MissingWeights
from training.data.batch import MixedBatch, TaskBatch
from training.models.blocks import attention_mask
from training.models.flow import euler_sample, flow_pair, sample_timesteps, shift_timesteps
from training.models.registry import FAMILIES, build_model, register
from training.models.text import ByteTokenizer
from training.models.tiny import TinyCausalVAE
from training.tasks import EDIT_TASKS, TASKS, UNDERSTANDING_TASKS

FAMS = ("omni_video", "haplo_omni", "vino")
GROUPS = {
    "omni_video": {"mllm", "text_head", "vision_head", "adapter", "dit", "vae", "vision_encoder"},
    "haplo_omni": {
        "pre_decoder",
        "base_decoder",
        "post_decoder",
        "pre_connector",
        "post_connector",
        "vae",
    },
    "vino": {
        "vlm",
        "learnable_queries",
        "connector",
        "mmdit",
        "boundary_connector",
        "vae",
        "vision_encoder",
    },
}
SUBSET = {  # a stage's trainable globs
    "omni_video": ["vision_head", "adapter", "text_head"],
    "haplo_omni": ["pre_connector", "post_*"],
    "vino": ["learnable_queries", "connector"],
}
VIDEO = ("t2v", "v2v_edit", "video_understanding")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread is steadier on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(model, task, b=2, seed=0, drop_text=None, drop_source=None, h=16, w=24):
    geo, gen = model.geometry, torch.Generator().manual_seed(seed)
    frames = 1 + 2 * geo.temporal_factor if task in VIDEO else 1
    scale = geo.spatial_factor // 8  # tiny: 16x24 pixels; production tiny checkpoints: 32x48
    shape = (b, frames, 3, h * scale, w * scale)
    ids, mask = model.tokenize(["a red cat sits on a blue mat", "waves at dusk"][:b])
    drop = {}
    if drop_text is not None:
        drop["text"] = torch.tensor(drop_text)
    if drop_source is not None:
        drop["source"] = torch.tensor(drop_source)
    return TaskBatch(
        task=task,
        keys=[f"k{i}" for i in range(b)],
        pixels=torch.rand(shape, generator=gen) * 2 - 1,
        input_ids=ids,
        attention_mask=mask,
        source_pixels=torch.rand(shape, generator=gen) * 2 - 1 if task in EDIT_TASKS else None,
        drop=drop,
    )


def seeded_loss(model, batch, seed=0):
    torch.manual_seed(seed)  # the same timesteps and noise
    return model(batch)


@pytest.mark.parametrize("family", FAMS)
def test_tiny_builds_small_with_its_groups(family):
    model = build_model(family, "tiny", timestep_shift=3.0)
    assert model.family == family
    assert set(model.groups) == GROUPS[family]
    total = sum(model.group_parameter_counts().values())
    assert 100_000 < total < 2_500_000, total
    assert model.timestep_shift == 3.0
    assert set(model.supported_tasks()) <= set(TASKS)
    for name in model.frozen_groups:
        assert not any(p.requires_grad for p in model.groups[name].parameters())


@pytest.mark.parametrize("family", FAMS)
def test_every_task_gives_a_finite_scalar_loss(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny")
    for task in model.supported_tasks():
        out = model(make_batch(model, task, drop_text=[False, True], drop_source=[True, False]))
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]), (task, out)
        parts = {k: v for k, v in out.items() if k.startswith("loss/")}
        assert parts and all(not v.requires_grad for v in parts.values())
        assert torch.allclose(out["loss"].detach(), sum(parts.values()))
        expected = {"loss/text"} if task in UNDERSTANDING_TASKS else {"loss/flow"}
        assert expected <= set(parts), (task, parts)


def test_omni_video_heads_stage_has_no_flow_loss_through_the_frozen_adapter():
    """Stage 1 (omni-video.txt:141) trains the heads on the vision and text losses only: with
    the adapter and DiT frozen no flow loss back-propagates through the adapter."""
    torch.manual_seed(0)
    model = build_model("omni_video", "tiny")
    model.set_trainable(["text_head", "vision_head"])
    out = model(make_batch(model, "t2v"))
    assert set(out) == {"loss", "loss/vision"}
    out["loss"].backward()
    assert all(p.grad is not None for p in model.groups["vision_head"].parameters())
    model.set_trainable(["vision_head", "adapter"])
    assert set(model(make_batch(model, "t2v"))) == {"loss", "loss/flow", "loss/vision"}


def test_omni_video_generation_regresses_vision_tokens():
    """``loss/vision`` is the vision head's tokens regressed (MSE, or cosine) to the frozen
    vision encoder's features of the target pixels, pooled to the head's slots, times
    ``vision_weight``: zero when the head outputs exactly those features."""
    model = build_model("omni_video", "tiny")
    batch = make_batch(model, "t2v")
    head, encoder = model.groups["vision_head"], model.groups["vision_encoder"]
    seen, forced = [], []

    def vision_head_hook(module, args, output):
        seen.append(output.detach())
        return forced[0] if forced else None

    def losses():
        seen.clear()
        torch.manual_seed(0)  # the same timesteps and noise on every call
        return model(batch)

    def pooled(x, n):  # (B, N, D) -> (B, n, D): means of consecutive runs of tokens
        return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)

    with torch.no_grad():
        features = encoder.encode(model.prepare(batch).pixels).flatten(1, 2)  # (B, T'N, De)
    handle = head.register_forward_hook(vision_head_hook)
    try:
        out = losses()
        assert set(out) == {"loss", "loss/flow", "loss/vision"}
        (tokens,) = seen
        target = pooled(features, tokens.shape[1])
        assert out["loss/vision"] > 0
        assert torch.allclose(out["loss/vision"], F.mse_loss(tokens, target))

        model.vision_loss = "cosine"
        cosine = 1 - F.cosine_similarity(tokens, target, -1).mean()
        assert torch.allclose(losses()["loss/vision"], cosine)
        model.vision_loss, model.vision_weight = "mse", 2.5
        scaled = losses()
        assert torch.allclose(scaled["loss/vision"], 2.5 * out["loss/vision"])
        assert torch.allclose(scaled["loss/flow"], out["loss/flow"])

        forced.append(target)  # the head answers the target's own features
        assert losses()["loss/vision"] == 0
        forced[0] = target.flip(0)  # ... another sample's features are off the target
        assert losses()["loss/vision"] > 0
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMS)
def test_backward_reaches_only_trainable_groups(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny")
    chosen = model.set_trainable(SUBSET[family])
    for task in model.supported_tasks():
        model(make_batch(model, task, drop_text=[False, True], drop_source=[False, True]))[
            "loss"
        ].backward()
    for name, group in model.groups.items():
        grads = [p.grad for p in group.parameters()]
        if name in chosen:
            assert all(p.requires_grad for p in group.parameters())
            assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None for g in grads), name


@pytest.mark.parametrize("family", FAMS)
def test_frozen_groups_are_never_trainable(family):
    model = build_model(family, "tiny")
    chosen = model.set_trainable(["*"])
    assert set(chosen) == GROUPS[family] - set(model.frozen_groups)
    assert not any(p.requires_grad for p in model.groups["vae"].parameters())
    with pytest.raises(ValueError, match="'vae' of .* is frozen"):
        model.set_trainable(["vae"])
    model.train()
    assert not model.groups["vae"].training


@pytest.mark.parametrize("family", FAMS)
def test_a_few_adam_steps_overfit_one_batch(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny")
    tasks = ["t2i"] + [t for t in UNDERSTANDING_TASKS[:1] if t in model.supported_tasks()]
    for task in tasks:
        batch = make_batch(model, task)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        for _ in range(30):
            loss = seeded_loss(model, batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.3 * losses[0], (task, losses[0], losses[-1])


@pytest.mark.parametrize("family", FAMS)
def test_condition_dropout_changes_the_output(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny")
    base = seeded_loss(model, make_batch(model, "t2i", drop_text=[False, False]))["loss"]
    dropped = seeded_loss(model, make_batch(model, "t2i", drop_text=[True, False]))["loss"]
    assert not torch.allclose(base, dropped)
    again = seeded_loss(model, make_batch(model, "t2i", drop_text=[False, False]))["loss"]
    assert torch.equal(base, again)  # deterministic under the same seed
    src = seeded_loss(model, make_batch(model, "i2i_edit", drop_source=[False, False]))["loss"]
    no_src = seeded_loss(model, make_batch(model, "i2i_edit", drop_source=[False, True]))["loss"]
    assert not torch.allclose(src, no_src)


@pytest.mark.parametrize("family", FAMS)
def test_gradient_checkpointing_gives_the_same_loss_and_grads(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny")
    task = "v2v_edit"

    def run():
        model.zero_grad()
        loss = seeded_loss(model, make_batch(model, task, drop_text=[False, True]))["loss"]
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss_off, grads_off = run()
    model.set_gradient_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss_on, grads_on = run()
    assert torch.allclose(loss_off, loss_on, atol=1e-6)
    assert grads_off.keys() == grads_on.keys()
    for name in grads_off:
        assert torch.allclose(grads_off[name], grads_on[name], atol=1e-5, rtol=1e-4), name


def test_byte_tokenizer_pads_truncates_and_is_deterministic():
    tok = ByteTokenizer(8)
    ids, mask = tok(["ab", "a much longer caption", "é", ""])
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (4, 8)
    assert ids[0].tolist() == [tok.BOS, 97, 98, tok.EOS] + [tok.PAD] * 4
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1].tolist() == [tok.BOS, *b"a much", tok.EOS] and mask[1].all()
    assert ids[2].tolist()[:4] == [tok.BOS, 0xC3, 0xA9, tok.EOS]
    assert ids[3].tolist()[:2] == [tok.BOS, tok.EOS]
    again = tok(["ab", "a much longer caption", "é", ""])
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    short, _ = tok(["ab", "c"])
    assert short.shape == (2, 4)  # padded to the longest, not to max_len
    assert tok(["\ud800 broken"])[0].shape[1] <= 8  # a lone surrogate is not an error


@pytest.mark.parametrize("family", FAMS)
def test_model_tokenize_respects_max_text_len(family):
    model = build_model(family, "tiny")
    ids, mask = model.tokenize(["x" * 500, "y"])
    assert ids.shape == (2, model.geometry.max_text_len) and mask[1].sum() == 3


def test_select_groups_errors_name_the_groups():
    model = build_model("vino", "tiny")
    assert model.select_groups(["conn*", "vlm"]) == ["connector", "vlm"]
    with pytest.raises(ValueError, match="'dit' matches no module group of vino; groups: vlm, "):
        model.set_trainable(["dit"])


def test_registry_errors():
    assert set(FAMILIES) == set(FAMS)
    with pytest.raises(
        ValueError, match="unknown model family 'bagel'; allowed: omni_video, haplo_omni, vino"
    ):
        build_model("bagel", "tiny")
    with pytest.raises(ValueError, match="unknown size '70b' for vino; allowed: tiny, 7b"):
        build_model("vino", "70b")
    with pytest.raises(ValueError, match="'vino' is already registered"):
        register("vino", FAMILIES["vino"], ("tiny",))
    with pytest.raises(
        ValueError, match="unknown model.pretrained keys \\['mlm'\\]; allowed: mllm"
    ):
        build_model("omni_video", "7b", {"mlm": "/x"})


def test_batch_geometry_is_checked():
    model = build_model("omni_video", "tiny")
    bad = make_batch(model, "t2v")
    bad.pixels = bad.pixels[:, :4]
    with pytest.raises(ValueError, match="frame count 4 is not 1 \\+ k \\* 4"):
        model(bad)
    edit = make_batch(model, "i2i_edit")
    edit.source_pixels = None
    with pytest.raises(ValueError, match="needs source_pixels"):
        model(edit)
    with pytest.raises(ValueError, match="task 'image_understanding' is not supported by vino"):
        vino = build_model("vino", "tiny")
        vino(make_batch(vino, "image_understanding"))
    odd = make_batch(model, "t2i", h=12)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(odd)


def test_tiny_vae_is_frozen_deterministic_and_causal():
    vae, other = TinyCausalVAE(), TinyCausalVAE()
    assert all(torch.equal(a, b) for a, b in zip(vae.parameters(), other.parameters(), strict=True))
    video = torch.rand(2, 9, 3, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 3, 8, 2, 3) and not z.requires_grad
    assert torch.allclose(vae.encode(vae.decode(z)), z, atol=1e-5)  # decode is the pseudo-inverse
    changed = video.clone()
    changed[:, 5:] = 0  # later frames do not change earlier latent frames
    assert torch.equal(vae.encode(changed)[:, :2], z[:, :2])
    with pytest.raises(ValueError, match="frame count 8"):
        vae.encode(video[:, :8])


def test_flow_matching_utilities():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    assert torch.allclose(shift_timesteps(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    torch.manual_seed(0)
    plain, shifted = sample_timesteps(4000), sample_timesteps(4000, shift=3.0)
    assert plain.min() > 0 and plain.max() < 1 and shifted.mean() > plain.mean() + 0.1
    assert sample_timesteps(100, kind="uniform").min() > 0
    x0 = torch.randn(3, 2, 4, 2, 2)
    xt, v = flow_pair(x0, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2] - x0[2], v[2], atol=1e-6)
    mask = attention_mask(torch.tensor([[1, 1, 0]]), torch.tensor([0, 0, 1]))[0, 0]
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]


def test_production_size_refuses_missing_weights(tmp_path, offline, monkeypatch):
    roots = tmp_path / "models"
    monkeypatch.setenv("OMNIFORGE_MODELS", str(roots))
    with pytest.raises(MissingWeights) as err:
        build_model("omni_video", "7b", {"mllm": str(tmp_path / "nope")})
    msg = str(err.value)
    assert f"mllm directory {tmp_path / 'nope'} does not exist" in msg
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir" in msg
    # every problem at once; an unset entry names where it was looked up
    expected = roots / "siglip2-so400m-patch14-384"
    assert f"vision_encoder directory {expected} does not exist" in msg
    assert "model.pretrained.vision_encoder is not set" in msg
    assert "model.pretrained.vae (or model.pretrained.dit) is not set" in msg
    empty = tmp_path / "empty"
    (empty / "transformer").mkdir(parents=True)
    (empty / "transformer" / "config.json").write_text("{}")
    with pytest.raises(MissingWeights, match="post_decoder: no weights .* in .*transformer"):
        build_model("haplo_omni", "7b", {"post_decoder": str(empty)})
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    )
    with pytest.raises(MissingWeights, match="lists missing weight files .*incomplete download"):
        build_model("vino", "7b", {"vlm": str(sharded)})
    with pytest.raises(MissingWeights, match="vino size '7b': vlm directory .* does not exist"):
        build_model("vino", "7b")
    with pytest.raises(ValueError, match=r"unknown model.pretrained keys \['dti'\]"):
        build_model("omni_video", "7b", {"dti": str(empty)})
    assert issubclass(MissingWeights, FileNotFoundError)


def test_unset_pretrained_entries_are_found_under_the_model_roots(tmp_path, monkeypatch):
    """The shared local-weights policy (core.weights): an explicit entry wins, else
    <root>/<repo name>; a diffusers repo folder stands for its transformer/ or vae/ folder."""
    from training.models.production import WAN, locate_all

    def fake_checkpoint(folder):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        return folder

    roots = tmp_path / "models"
    monkeypatch.setenv("OMNIFORGE_MODELS", str(roots))
    wan = roots / "Wan2.1-T2V-1.3B-Diffusers"
    dit, vae = fake_checkpoint(wan / "transformer"), fake_checkpoint(wan / "vae")
    mine = fake_checkpoint(tmp_path / "my-vae")
    specs = [("dit", WAN, "transformer", None), ("vae", WAN, "vae", "dit")]
    assert locate_all({}, "test", specs) == {"dit": dit, "vae": vae}
    assert locate_all({"vae": str(mine)}, "test", specs) == {"dit": dit, "vae": mine}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return save_tiny_backbones(tmp_path_factory.mktemp("checkpoints"))


@pytest.mark.parametrize("family", FAMS)
def test_production_size_loads_local_checkpoints(family, tiny_checkpoints, offline):
    pretrained = {k: str(v) for k, v in tiny_checkpoints[family].items()}
    model = build_model(family, "7b", pretrained, timestep_shift=5.0)
    assert model.geometry.spatial_factor == 16 and model.geometry.temporal_factor == 4
    ids, mask = model.tokenize(["hello world", "hi"])
    assert ids[0, mask[0].sum() - 1] == model.tokenizer.eos  # the backbone's own tokenizer
    model.set_trainable(["*"])
    assert not any(p.requires_grad for p in model.groups["vae"].parameters())
    tasks = ["t2v", "i2i_edit"] + [
        t for t in UNDERSTANDING_TASKS[:1] if t in model.supported_tasks()
    ]
    for task in tasks:
        torch.manual_seed(0)
        out = model(make_batch(model, task, drop_text=[False, True], drop_source=[True, False]))
        assert torch.isfinite(out["loss"]), (task, out)
        out["loss"].backward()
    assert all(p.grad is None for p in model.groups["vae"].parameters())
    batch = make_batch(model, "v2v_edit", drop_text=[False, True])
    plain = seeded_loss(model, batch)["loss"]
    model.set_gradient_checkpointing(True)  # transformers / diffusers checkpointing too
    assert torch.allclose(seeded_loss(model, batch)["loss"], plain, atol=1e-5)
    model.set_gradient_checkpointing(False)
    for module in model.modules():  # a trainer that only flips the flags works as well
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
    loss = seeded_loss(model, batch)["loss"]
    loss.backward()
    assert torch.allclose(loss, plain, atol=1e-5)
    counts = model.group_parameter_counts()
    assert all(n > 0 for n in counts.values()), counts
    # stage-end sampling through the diffusers VAE's decoder
    gen = torch.Generator().manual_seed(0)
    pixels = model.sample(["a cat"], (5, 32, 48), steps=2, generator=gen, guidance=2.0)
    assert pixels.shape == (1, 5, 3, 32, 48) and pixels.abs().max() <= 1
    assert torch.isfinite(pixels).all()
    if family == "omni_video":  # the LLM's tied head is copied into its own group
        assert (
            model.groups["text_head"].weight.data_ptr()
            != model.groups["mllm"].embed.weight.data_ptr()
        )
        extra = model.groups["dit"].model.patch_embedding.weight[:, 4:]
        assert extra.shape[1] == 4 and math.isclose(extra.abs().sum().item(), 0.0, abs_tol=1e-3)
    if family in ("omni_video", "vino"):  # the VLM's own tower reads pixels, no fresh projector
        lm = model.groups["mllm" if family == "omni_video" else "vlm"]
        tower = lm.vision if family == "omni_video" else model.groups["vision_encoder"]
        assert lm.projector is None and type(tower).__name__ == "VLMVision"
        assert not any(p.requires_grad for p in tower.parameters())  # after set_trainable(*)
        feats = tower.encode(torch.rand(2, 5, 3, 40, 56) * 2 - 1)  # 5 frames -> 2 latent frames
        assert feats.shape == (2, 2, 64, lm.dim) and torch.isfinite(feats).all()


# -- hybrid batching: one loss over a mixed batch ---------------------------------------------


@pytest.mark.parametrize("family", FAMS)
def test_mixed_batch_loss_is_the_sample_weighted_mean_of_its_parts(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny")
    tasks = [t for t in ("t2i", "i2i_edit", "image_understanding") if t in model.supported_tasks()]
    parts = [make_batch(model, t, b=1 + i % 2, seed=i) for i, t in enumerate(tasks)]
    torch.manual_seed(5)  # the parts consume the RNG in order, as inside the mixed forward
    separate = [model(p) for p in parts]
    torch.manual_seed(5)
    out = model(MixedBatch("image", parts))
    expected = sum(p.size * r["loss"] for p, r in zip(parts, separate, strict=True))
    assert torch.allclose(out["loss"], expected / sum(p.size for p in parts))
    for p, r in zip(parts, separate, strict=True):
        assert torch.allclose(out[f"loss/{p.task}"], r["loss"])
    assert "loss/flow" in out
    out["loss"].backward()  # one backward through every part
    assert any(p.grad is not None for p in model.groups[SUBSET[family][0]].parameters())


def test_a_few_adam_steps_lower_the_loss_of_a_mixed_batch():
    torch.manual_seed(0)
    model = build_model("omni_video", "tiny")
    batch = MixedBatch("image", [make_batch(model, "t2i"), make_batch(model, "i2i_edit", b=1)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = seeded_loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -- sampling at stage end ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMS)
def test_sampling_is_deterministic_for_a_seed_with_the_right_shape_and_range(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny", timestep_shift=3.0)
    assert model.can_generate()
    model.train()
    prompts = ["a red cat", "waves at dusk", "a tall tower"]

    def sample(seed, shape=(9, 16, 24), guidance=3.0):
        gen = torch.Generator().manual_seed(seed)
        return model.sample(prompts, shape, steps=4, generator=gen, guidance=guidance)

    a, b = sample(1), sample(1)
    assert a.shape == (3, 9, 3, 16, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0
    assert not torch.equal(a, sample(2))  # the seed picks the noise
    assert not torch.allclose(a, sample(1, guidance=1.0))  # guidance uses the null condition
    assert sample(1, shape=(1, 24, 16)).shape == (3, 1, 3, 24, 16)
    assert model.training  # back in training mode
    with pytest.raises(ValueError, match="multiples of 8"):
        sample(1, shape=(1, 20, 16))


def test_euler_sampler_follows_the_shifted_time_grid():
    """With the exact velocity of a straight path the Euler sampler lands on the data."""
    x0 = torch.randn(2, 1, 4, 2, 2)
    noise = torch.randn_like(x0)
    seen = []

    def velocity(x, t, uncond):
        seen.append(float(t[0]))
        return noise - x0

    out = euler_sample(velocity, noise, steps=5, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-5)
    grid = shift_timesteps(torch.linspace(1, 0, 6), 3.0)[:-1]
    assert seen == pytest.approx(grid.tolist())
