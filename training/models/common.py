"""The family base: what omni_video, haplo_omni and vino share (``FamilyModel``).

Batch checks against tasks and geometry, trainable-group rules with frozen groups, losses'
bookkeeping and text-to-image / video sampling. The backbones behind it are described in
``base`` (interfaces), ``tiny`` (tiny sizes) and ``production`` (pretrained sizes).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from training.data.batch import TaskBatch
from training.data.buckets import BucketShape
from training.models.base import UnifiedModel
from training.models.checkpointing import set_gradient_checkpointing
from training.models.flow import euler_sample, sample_timesteps
from training.models.geometry import latent_frames
from training.tasks import EDIT_TASKS, IMAGE_TASKS, TASKS, TEXT_TO_MEDIA_TASKS


class FamilyModel(UnifiedModel):
    """What the three families share: tokenizer, trainable-group rules, batch checks, losses.

    Attributes a trainer may set between stages: ``timestep_shift`` (flow-matching shift),
    ``timestep_sampling`` ("logit_normal" | "uniform"); ``set_gradient_checkpointing(bool)``.
    """

    frozen_groups: tuple[str, ...] = ()  # never trainable, whatever the stage globs say
    timestep_shift: float = 1.0
    timestep_sampling: str = "logit_normal"

    @property
    def tokenize(self):
        """The family's tokenizer: ``tokenize(texts)`` -> (ids, mask); ``tokenize.chat(items)``
        -> (ids, mask, loss_mask) for conversations (``training.models.text``)."""
        return self.tokenizer

    def supported_tasks(self) -> tuple[str, ...]:
        return TASKS

    def set_trainable(self, patterns: list[str]) -> list[str]:
        """Like the base, but frozen groups (VAE, vision encoder) are never made trainable: a
        pattern matching only frozen groups is an error, one that also matches others skips
        them."""
        for pattern in patterns:
            hits = self.select_groups([pattern])  # errors on a pattern matching nothing
            if all(h in self.frozen_groups for h in hits):
                raise ValueError(
                    f"module group {hits[0]!r} of {self.family} is frozen (a fixed pretrained "
                    f"component); trainable groups: {', '.join(self.trainable_groups())}"
                )
        chosen = [g for g in self.select_groups(patterns) if g not in self.frozen_groups]
        for name, group in self.groups.items():
            group.requires_grad_(name in chosen)
        return chosen

    def trainable_groups(self) -> list[str]:
        return [n for n in self.groups if n not in self.frozen_groups]

    def group_parameter_counts(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in g.parameters()) for n, g in self.groups.items()}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward (non-reentrant), see ``checkpointing``."""
        set_gradient_checkpointing(self, enabled)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the parameters (float32, or bf16 under DeepSpeed)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def prepare(self, batch: TaskBatch) -> TaskBatch:
        """Check the batch against the task and geometry; media cast to the compute dtype."""
        self.check_batch(batch)
        src = batch.source_pixels
        return replace(
            batch,
            pixels=batch.pixels.to(self.dtype),
            source_pixels=None if src is None else src.to(self.dtype),
        )

    def check_batch(self, batch: TaskBatch) -> None:
        g = self.geometry
        if batch.task not in self.supported_tasks():
            raise ValueError(
                f"task {batch.task!r} is not supported by {self.family}; "
                f"supported: {', '.join(self.supported_tasks())}"
            )
        media = [("pixels", batch.pixels)]
        if batch.task in EDIT_TASKS:
            if batch.source_pixels is None:
                raise ValueError(f"task {batch.task} needs source_pixels (the edit source)")
            if batch.source_pixels.shape != batch.pixels.shape:
                raise ValueError(
                    f"edit source {tuple(batch.source_pixels.shape)} and target "
                    f"{tuple(batch.pixels.shape)} must have the same shape (B, T, C, H, W)"
                )
            media.append(("source_pixels", batch.source_pixels))
        for name, px in media:
            if px.dim() != 5:
                raise ValueError(f"{name} must be (B, T, C, H, W), got {tuple(px.shape)}")
            t, h, w = px.shape[1], px.shape[3], px.shape[4]
            if h % g.spatial_factor or w % g.spatial_factor:
                raise ValueError(f"{name} {h}x{w}: sides must be multiples of {g.spatial_factor}")
            if batch.task in IMAGE_TASKS and t != 1:
                raise ValueError(f"{name}: image task {batch.task} needs T == 1, got {t}")
            latent_frames(t, g.temporal_factor)

    def can_generate(self) -> bool:
        """Whether ``sample`` works: the family has a text-to-image / text-to-video path."""
        return hasattr(self, "_text_velocity") and any(
            t in self.supported_tasks() for t in TEXT_TO_MEDIA_TASKS
        )

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        shape: BucketShape | tuple[int, int, int],
        steps: int = 20,
        generator: torch.Generator | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Text-to-image / video samples: pixels (B, T, C, H, W) in [-1, 1], B = len(prompts),
        (T, H, W) = ``shape`` (a BucketShape or (frames, height, width)).

        Flow-matching Euler sampling (``euler_sample``) on the training timestep shift;
        ``guidance`` != 1 is classifier-free guidance against the null condition that condition
        dropout trains (dropped text). The only randomness is the initial noise, drawn on the
        CPU from ``generator``: a fixed seed gives the same samples. Runs in eval mode."""
        if not self.can_generate():
            raise NotImplementedError(f"{self.family} has no text-to-image/video path")
        if isinstance(shape, tuple):
            shape = BucketShape(*shape)
        geo, vae = self.geometry, self.groups["vae"]
        if shape.height % geo.spatial_factor or shape.width % geo.spatial_factor:
            raise ValueError(f"{shape}: sides must be multiples of {geo.spatial_factor}")
        device, dtype = next(self.parameters()).device, self.dtype
        latent_shape = (
            len(prompts),
            latent_frames(shape.frames, geo.temporal_factor),
            vae.latent_channels,
            shape.height // vae.spatial_factor,
            shape.width // vae.spatial_factor,
        )
        noise = torch.randn(latent_shape, generator=generator).to(device, dtype)
        was_training = self.training
        self.eval()
        try:
            ids, mask = self.tokenize(list(prompts))
            velocity = self._text_velocity(ids.to(device), mask.to(device))
            latents = euler_sample(velocity, noise, steps, self.timestep_shift, guidance)
            return vae.decode(latents).float().clamp(-1, 1)
        finally:
            self.train(was_training)

    def _drop(self, batch: TaskBatch, name: str) -> torch.Tensor:
        """(B,) bool: True where the condition `name` is dropped for the sample."""
        flags = batch.drop.get(name)
        if flags is None:
            return torch.zeros(batch.size, dtype=torch.bool, device=batch.pixels.device)
        return flags.to(device=batch.pixels.device, dtype=torch.bool)

    def _sample_t(self, n: int, device) -> torch.Tensor:
        return sample_timesteps(n, self.timestep_shift, self.timestep_sampling, device)

    @staticmethod
    def _result(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"loss": sum(parts.values())}
        out.update({f"loss/{k}": v.detach() for k, v in parts.items()})
        return out
