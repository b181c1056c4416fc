"""What a training step consumes: one task's batch, all samples of one bucket shape, or under
hybrid batching a ``MixedBatch`` of several tasks' parts that share that shape.

Pixel tensors are float32 in [-1, 1], layout (B, T, C, H, W); images have T == 1. Text is
tokenised by the model family's tokenizer (the loader calls ``family.tokenize``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TaskBatch:
    task: str  # a name of training.tasks.TASKS
    keys: list[str]  # sample keys, for exact-resume checks and logging
    pixels: torch.Tensor  # (B, T, C, H, W): the generation target, or the understood medium
    input_ids: torch.Tensor  # (B, L) int64: caption / instruction / answer text
    attention_mask: torch.Tensor  # (B, L) int64 1 = token, 0 = padding
    source_pixels: torch.Tensor | None = None  # (B, T, C, H, W): edit source medium
    # Condition dropout decided once per step from the shared generator, same on every rank:
    # modality name ("text", "source") -> (B,) bool, True = drop this condition for the sample.
    drop: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # the untokenised text (prompts for samples)
    # Frames (indices into T) a VLM reads of a video condition, the same for every sample of
    # the task (its vlm_fps / vlm_max_frames, ``vlm_frame_indices``); None: the model's default.
    vlm_frames: tuple[int, ...] | None = None
    # (B, L) int64, 1 = a token the text loss reads: understanding batches with a conversation
    # (the assistant's turns only); None = every token (attention_mask)
    loss_mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def parts(self) -> list[TaskBatch]:
        return [self]

    def to(self, device: torch.device | str) -> TaskBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return TaskBatch(
            task=self.task,
            keys=self.keys,
            pixels=move(self.pixels),
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            source_pixels=move(self.source_pixels),
            drop={k: move(v) for k, v in self.drop.items()},
            texts=self.texts,
            vlm_frames=self.vlm_frames,
            loss_mask=move(self.loss_mask),
        )


@dataclass
class MixedBatch:
    """Hybrid batching: one step's samples of several tasks of one group (image or video),
    every part of the same bucket shape. The model's loss is the sample-weighted mean of the
    parts' losses: one backward, one optimizer step."""

    group: str  # "image" | "video"
    parts: list[TaskBatch]  # non-empty parts, in task order

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def keys(self) -> list[str]:
        return [k for p in self.parts for k in p.keys]

    @property
    def drop(self) -> dict[str, torch.Tensor]:
        """Per-modality (B,) masks of all parts, concatenated in part order."""
        names = sorted(set.intersection(*(set(p.drop) for p in self.parts)))
        return {m: torch.cat([p.drop[m] for p in self.parts]) for m in names}

    def to(self, device: torch.device | str) -> MixedBatch:
        return MixedBatch(self.group, [p.to(device) for p in self.parts])


# Qwen3-VL's default ``min_frames`` (``Qwen3VLVideoProcessor``): VINO keeps Qwen3-VL's default
# video preprocessing but for the rate and the cap (vino.txt:475).
VLM_MIN_FRAMES = 4


def vlm_frame_indices(
    num_frames: int, fps: float, vlm_fps: float, max_frames: int | None = None
) -> tuple[int, ...]:
    """Which of a clip's ``num_frames`` frames (sampled at ``fps``) a VLM reads at ``vlm_fps``,
    at most ``max_frames``: Qwen3-VL's rule (``Qwen3VLVideoProcessor.sample_frames``),
    ``n = min(max(int(num_frames / fps * vlm_fps), 4), max_frames, num_frames)`` frames spread
    evenly from the first to the last. It depends only on the task's settings, never on a
    clip's own length or rate (the loader already brought every clip to ``num_frames`` at
    ``fps``)."""
    n = max(int(num_frames / fps * vlm_fps), VLM_MIN_FRAMES)
    n = min(n, max_frames or num_frames, num_frames)
    return tuple(int(i) for i in np.linspace(0, num_frames - 1, n).round())
