"""Per-step choices shared by every rank: the task, its bucket, and condition dropout.

Rank 0 draws (task, bucket) from a seeded generator weighted by the stage mixture and the
buckets' sample counts, and broadcasts them as one int64 tensor of shape (2,) (same dtype and
shape on every rank, as collectives require). Under hybrid batching the drawn unit is a task
group instead of a task (``training/data/hybrid.py`` gives the group and bucket weights; the
broadcast is unchanged). Condition-dropout decisions come from a second
generator that every rank advances identically, so all ranks drop the same conditions without
a collective. Both generators are part of the checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class StepSampler:
    def __init__(
        self,
        tasks: dict[str, float],
        buckets: dict[str, list[tuple[Any, int]]],
        seed: int,
        dropout: float,
        modalities: tuple[str, ...] = ("text", "source"),
    ):
        """``tasks``: task (or group) -> mixture weight; ``buckets``: task (or group) ->
        [(bucket, samples or weight)]."""
        self.task_names = sorted(tasks)
        weights = np.array([tasks[t] for t in self.task_names], dtype=np.float64)
        self.task_p = weights / weights.sum()
        self.buckets = {t: [b for b, _ in sorted(buckets[t], key=lambda x: x[0])] for t in tasks}
        self.bucket_p = {}
        for t in self.task_names:
            counts = np.array([n for _, n in sorted(buckets[t], key=lambda x: x[0])], np.float64)
            if counts.sum() <= 0:
                raise ValueError(f"task {t!r} has no training data in any bucket")
            self.bucket_p[t] = counts / counts.sum()
        self.dropout = dropout
        self.modalities = modalities
        self.draw_rng = np.random.default_rng([seed, 0])  # rank 0 only uses it
        self.drop_rng = np.random.default_rng([seed, 1])  # every rank, in lockstep

    def next(self, device: torch.device | str = "cpu") -> tuple[str, Any]:
        """(task, bucket) for this step, identical on every rank."""
        choice = torch.zeros(2, dtype=torch.int64, device=device)
        if not dist.is_initialized() or dist.get_rank() == 0:
            t = int(self.draw_rng.choice(len(self.task_names), p=self.task_p))
            task = self.task_names[t]
            b = int(self.draw_rng.choice(len(self.buckets[task]), p=self.bucket_p[task]))
            choice[0], choice[1] = t, b
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(choice, src=0)
        task = self.task_names[int(choice[0])]
        return task, self.buckets[task][int(choice[1])]

    def drops(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Per-modality (B,) bool masks; the same on every rank (shared generator)."""
        return {
            m: torch.from_numpy(self.drop_rng.random(batch_size) < self.dropout)
            for m in self.modalities
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "draw": self.draw_rng.bit_generator.state,
            "drop": self.drop_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draw_rng.bit_generator.state = state["draw"]
        self.drop_rng.bit_generator.state = state["drop"]
