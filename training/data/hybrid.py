"""Hybrid batching (Omni-Video): one step's batch mixes tasks of one group that share a shape.

Groups: ``image`` (t2i, i2i_edit, image_understanding) and ``video`` (t2v, v2v_edit,
video_understanding); a batch never mixes groups. With ``hybrid: true`` on a stage a step is:

1. rank 0 draws (group, bucket) and broadcasts them as the usual int64 tensor of shape (2,)
   (``StepSampler`` over groups instead of tasks: ``group_weights`` / ``group_buckets``).
   P(group) is the sum of its tasks' mixture weights and P(bucket | group) the weight-averaged
   bucket distribution of its tasks, so a (group, bucket) draw is distributed exactly like
   drawing a task and then one of its buckets;
2. every rank composes the batch from ``HybridMixer``'s generator, which all ranks advance in
   lockstep (no collective): sample by sample a task is drawn among the group's tasks with data
   in that bucket, with probability proportional to ``weight * P(bucket | task)`` (the
   posterior of the task given the bucket, so the samples follow the stage mixture), until the
   stage's token budget is used or the batch holds the stage's ``batch_size`` samples (when
   set): a sample costs the bucket's latent tokens, twice for edits
   (source + target); a task whose next sample does not fit is left out of the rest of the draw.
   A batch holds at least one sample;
3. each task's part is that task loader's next batch of the bucket with the drawn size (so
   loader positions per task are checkpointed as without hybrid), condition dropout per part
   from the sampler's shared generator.

The mixer's generator is part of the checkpoint (``state_dict``), so resume stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from training.data.batch import MixedBatch
from training.data.buckets import BucketShape, tokens
from training.tasks import task_spec

__all__ = ["HybridMixer", "group_of"]


def group_of(task: str) -> str:
    return task_spec(task).group


class HybridMixer:
    """Composition of mixed batches for one rank (see the module docstring).

    ``loaders``: task -> TaskLoader (``bucket_weights()``, ``next_batch(shape, size)``);
    ``weights``: task -> mixture weight; ``seed``: the stage's sampler seed.
    """

    def __init__(
        self,
        loaders: Mapping[str, Any],
        weights: Mapping[str, float],
        seed: int,
        token_budget: int,
        spatial_factor: int,
        temporal_factor: int,
        max_batch: int | None = None,
    ):
        self.loaders = loaders
        self.token_budget = int(token_budget)
        self.max_batch = max_batch  # the stage's batch_size: samples per batch, all parts

        self.spatial_factor, self.temporal_factor = int(spatial_factor), int(temporal_factor)
        self.rng = np.random.default_rng([seed, 2])  # every rank, in lockstep
        total = sum(weights.values())
        self.weights = {t: weights[t] / total for t in sorted(weights)}
        # task -> bucket -> P(bucket | task), from the usable sample counts (same on every rank)
        self.bucket_p: dict[str, dict[BucketShape, float]] = {}
        for task in self.weights:
            counts = loaders[task].bucket_weights()
            n = sum(counts.values())
            if n <= 0:
                raise ValueError(f"task {task!r} has no training data in any bucket")
            self.bucket_p[task] = {b: c / n for b, c in counts.items()}

    def group_weights(self) -> dict[str, float]:
        """group -> summed task weights (the groups present in the stage)."""
        out: dict[str, float] = {}
        for task, w in self.weights.items():
            out[group_of(task)] = out.get(group_of(task), 0.0) + w
        return out

    def group_buckets(self) -> dict[str, list[tuple[BucketShape, float]]]:
        """group -> [(bucket, weight)]: the weight-averaged bucket distribution of its tasks."""
        out: dict[str, dict[BucketShape, float]] = {}
        for task, w in self.weights.items():
            mix = out.setdefault(group_of(task), {})
            for bucket, p in self.bucket_p[task].items():
                mix[bucket] = mix.get(bucket, 0.0) + w * p
        return {g: sorted(mix.items()) for g, mix in out.items()}

    def cost(self, task: str, shape: BucketShape) -> int:
        media = task_spec(task).num_media
        return tokens(shape, self.spatial_factor, self.temporal_factor) * media

    def compose(self, group: str, shape: BucketShape) -> dict[str, int]:
        """task -> samples for this step's batch (advances the shared generator)."""
        candidates = [t for t in self.weights if group_of(t) == group and shape in self.bucket_p[t]]
        if not candidates:
            raise ValueError(f"no task of group {group!r} has data in bucket {shape}")
        counts: dict[str, int] = {}
        used = used_samples = 0
        while candidates and (self.max_batch is None or used_samples < self.max_batch):
            p = np.array([self.weights[t] * self.bucket_p[t][shape] for t in candidates])
            task = candidates[int(self.rng.choice(len(candidates), p=p / p.sum()))]
            cost = self.cost(task, shape)
            if used + cost > self.token_budget and counts:
                candidates.remove(task)  # does not fit any more; the others may
                continue
            counts[task] = counts.get(task, 0) + 1
            used += cost
            used_samples += 1
        return {t: counts[t] for t in sorted(counts)}

    def next_batch(
        self, group: str, shape: BucketShape, drops: Callable[[int], dict[str, torch.Tensor]]
    ) -> MixedBatch:
        """The step's mixed batch; ``drops(n)``: the shared condition-dropout masks of a part."""
        parts = []
        for task, n in self.compose(group, shape).items():
            part = self.loaders[task].next_batch(shape, n)
            part.drop = drops(part.size)
            parts.append(part)
        return MixedBatch(group, parts)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
