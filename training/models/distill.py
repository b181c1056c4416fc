"""HaploOmni's warmup feature distillation (haplo-omni.txt:162, teachers haplo-omni.txt:271).

The paper distils CLIP-ViT-L into the pre-decoder and CogVideoX-2B into the post-decoder during
the multimodal warmup, "to preserve visual knowledge". A stage names its teachers per group
(``StageConfig.distill``); ``load_distiller`` finds them by the local-weights policy (a path,
``hf-hub:ORG/NAME``, or the repository's name under the model roots; missing weights raise
``MissingWeights`` naming the path and the download command, before anything trains), loads
them frozen in eval mode, and the model's warmup loss adds ``weight * loss`` per group, logged
as ``loss/distill_<group>``.

The loss. The paper names a distillation loss but gives no formula. Student and teacher widths
differ (any compatible checkpoint may sit in a group), so the features are compared by their
token-to-token structure: both token sets are pooled to a common grid, each token is L2
normalised, and the loss is the mean squared difference of the two (N x N) cosine-similarity
matrices (relational feature distillation). It needs no projection head, so the model's
parameters and checkpoints are the same with or without distillation.

- pre_decoder <- CLIPVisionModel: the student's visual tokens (the pre-decoder ViT's output,
  per latent frame) against CLIP's patch tokens of the same frames (resized to CLIP's input
  size, CLIP-normalised, grouped by the VAE's temporal factor like the student's).
- post_decoder <- CogVideoXTransformer3DModel: the student's last block's video tokens against
  the teacher's last block's video tokens on the same noisy latents. What differs from the
  paper, and why: the teacher reads this model's VAE latents, not CogVideoX's own (the two
  VAEs share the shape, 16 channels at 8x spatial / 4x temporal compression, but not the
  latent space; running CogVideoX's VAE too would give the two decoders different inputs);
  the timestep is the flow time mapped to 1000 t (CogVideoX trains a DDPM schedule); the
  teacher's text input is the null (all-zero) T5 sequence, since its T5-XXL encoder is not part
  of this model. The teacher's latent channel count must equal the student's.
- The warmup trains each decoder on its own (``HaploOmni._warmup_loss``): the pre-decoder by
  distillation alone, the post-decoder by distillation plus unconditional flow matching (the
  null context, as the teacher reads the null prompt). Nothing passes the connectors, which
  start from random weights and train only from the alignment stage on. No separate identity
  loss: in this model the pre-decoder's text path is the embedding table, and the
  post-decoder reads text only through cross-attention, so text passes both unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.weights import require_all
from training.models.geometry import group_frames

CLIP = "openai/clip-vit-large-patch14"
COGVIDEOX = "THUDM/CogVideoX-2b"
# group -> (teacher class, repository named in errors, diffusers subfolder)
TEACHERS: dict[str, tuple[str, str, str | None]] = {
    "pre_decoder": ("CLIPVisionModel", CLIP, None),
    "post_decoder": ("CogVideoXTransformer3DModel", COGVIDEOX, "transformer"),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the cosine-similarity matrices of (B, N, Ds) and (B, N, Dt) token sets."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s @ s.transpose(1, 2), t @ t.transpose(1, 2))


def _pool(tokens: torch.Tensor, grid: tuple[int, ...], to: tuple[int, ...]) -> torch.Tensor:
    """(B, prod(grid), D) tokens on ``grid`` (h, w) or (f, h, w) -> (B, prod(to), D)."""
    x = tokens.transpose(1, 2).unflatten(2, grid).float()  # (B, D, *grid)
    pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
    return pool(x, to).flatten(2).transpose(1, 2)


def _grid(n: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of n tokens over a height x width frame (aspect kept)."""
    h = max(1, round((n * height / width) ** 0.5))
    if n % h:
        raise ValueError(f"{n} visual tokens do not form a grid for a {height}x{width} frame")
    return h, n // h


class Distiller:
    """The frozen teachers of one stage and the losses against them (not an ``nn.Module``:
    the teachers stay outside the model's parameters, state dict and optimizer)."""

    def __init__(self, teachers: dict[str, nn.Module], weights: dict[str, float], tf: int):
        self.teachers, self.weights, self.temporal_factor = teachers, weights, tf
        self.groups = tuple(teachers)
        for teacher in teachers.values():
            teacher.requires_grad_(False)
            teacher.eval()

    def _teacher(self, group: str, like: torch.Tensor) -> nn.Module:
        """The teacher on the student's device and compute dtype (moved on first use)."""
        teacher = self.teachers[group]
        p = next(teacher.parameters())
        if p.device != like.device or p.dtype != like.dtype:
            teacher.to(like.device, like.dtype)
        return teacher

    def pre_decoder(
        self, pixels: torch.Tensor, feats: torch.Tensor, vit: nn.Module
    ) -> dict[str, torch.Tensor]:
        """pixels (B, T, C, H, W) in [-1, 1]; feats: the student ``vit``'s (B, T', N, Dv): a
        pretrained encoder's square ``grid`` x ``grid`` pool, or patches over the frame."""
        teacher = self._teacher("pre_decoder", feats)
        b, t, _, height, width = pixels.shape
        size = teacher.config.image_size
        with torch.no_grad():
            x = F.interpolate(pixels.flatten(0, 1).float(), (size, size), mode="bilinear")
            mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
            std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
            x = (((x + 1) / 2 - mean) / std).to(feats.dtype)
            out = teacher(pixel_values=x).last_hidden_state[:, 1:]  # (B*T, g*g, Dt), no CLS
            side = size // teacher.config.patch_size
            side_s = getattr(vit, "grid", None)
            grid = (side_s, side_s) if side_s else _grid(feats.shape[2], height, width)
            target = _pool(out, (side, side), grid).unflatten(0, (b, t))  # (B, T, N, Dt)
            target = group_frames(target, self.temporal_factor).flatten(0, 1)
        loss = relational_loss(feats.flatten(0, 1), target)
        return {"distill_pre_decoder": self.weights["pre_decoder"] * loss}

    @contextmanager
    def capture_post(self, post: nn.Module) -> Iterator:
        """Within the block, record the output of the post-decoder's last transformer block;
        yields a function returning (tokens (B, N, D), patch)."""
        blocks = post.blocks if hasattr(post, "blocks") else post.model.blocks
        seen: list[torch.Tensor] = []

        def hook(_module, _args, output):
            seen.append(output[0] if isinstance(output, tuple) else output)

        handle = blocks[-1].register_forward_hook(hook)
        try:
            yield lambda: (seen[-1], post.patch)
        finally:
            handle.remove()

    def post_decoder(self, xt: torch.Tensor, t: torch.Tensor, student) -> dict[str, torch.Tensor]:
        """xt (B, T', C, h, w) noisy latents at flow times t (B,); ``student``: (tokens, patch)
        from ``capture_post``."""
        tokens, patch = student
        teacher = self._teacher("post_decoder", tokens)
        cfg = teacher.config
        b, f, c, h, w = xt.shape
        if cfg.in_channels != c:
            raise ValueError(
                f"distillation teacher for post_decoder reads {cfg.in_channels} latent channels; "
                f"this model's VAE has {c}"
            )
        seen: list[torch.Tensor] = []
        hook = teacher.transformer_blocks[-1].register_forward_hook(
            lambda _m, _a, out: seen.append(out[0])
        )
        try:
            with torch.no_grad():
                null_text = xt.new_zeros(b, cfg.max_text_seq_length, cfg.text_embed_dim)
                teacher(
                    hidden_states=xt.to(tokens.dtype),
                    encoder_hidden_states=null_text.to(tokens.dtype),
                    timestep=(t * 999).round().long(),
                    return_dict=False,
                )
        finally:
            hook.remove()
        target = seen[-1]  # (B, F'' * h/p * w/p, Dt), video tokens only
        pt = cfg.patch_size
        t_grid = (target.shape[1] // ((h // pt) * (w // pt)), h // pt, w // pt)
        s_grid = (tokens.shape[1] // ((h // patch) * (w // patch)), h // patch, w // patch)
        common = tuple(min(a, z) for a, z in zip(s_grid, t_grid, strict=True))
        with torch.no_grad():
            target = _pool(target, t_grid, common)
        loss = relational_loss(_pool(tokens, s_grid, common), target)
        return {"distill_post_decoder": self.weights["post_decoder"] * loss}


def teacher_weights(group: str, teacher: str | None, where: str):
    """The ``LocalWeights`` of ``group``'s teacher (see ``production.pretrained_weights``)."""
    from training.models.production import pretrained_weights

    _, repo, subfolder = TEACHERS[group]
    spec = {group: teacher} if teacher else {}
    return pretrained_weights(spec, where, group, repo, subfolder)


def check_teachers(recipe, stages: list[int] | None = None) -> None:
    """``MissingWeights`` naming every teacher of the chosen stages (0-based; default all) that
    is not on disk: the driver's check before any worker starts. Loads nothing."""
    require_all(
        teacher_weights(group, cfg.teacher, f"stage {stage.name!r} distill teacher")
        for i, stage in enumerate(recipe.stages)
        if stages is None or i in stages
        for group, cfg in stage.distill.items()
    )


def load_distiller(
    distill: dict, where: str, temporal_factor: int, dtype: torch.dtype = torch.float32
) -> Distiller:
    """Check every teacher's weights (one ``MissingWeights`` naming each problem), then load
    them. ``distill``: group -> an object with ``teacher`` (path, ``hf-hub:``, or None for the
    model roots) and ``weight``."""
    unknown = sorted(set(distill) - set(TEACHERS))
    if unknown:
        raise ValueError(f"{where}: no teacher for {unknown}; allowed: {', '.join(TEACHERS)}")
    weights = [teacher_weights(g, cfg.teacher, f"{where} teacher") for g, cfg in distill.items()]
    roots = dict(zip(distill, require_all(weights), strict=True))
    teachers = {g: _load(TEACHERS[g][0], roots[g], dtype) for g in distill}
    return Distiller(teachers, {g: cfg.weight for g, cfg in distill.items()}, temporal_factor)


def _load(cls_name: str, root: Path, dtype: torch.dtype) -> nn.Module:
    if cls_name == "CLIPVisionModel":
        import core.compat  # noqa: F401

        # isort: split
        from transformers import CLIPVisionModel

        return CLIPVisionModel.from_pretrained(root, local_files_only=True, dtype=dtype).eval()
    from training.models.hf_diffusers import load_diffusers

    return load_diffusers(cls_name, root, dtype).eval()
