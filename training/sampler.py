"""Per-step choices shared by every rank: the task, its bucket, and condition dropout.

Rank 0 draws (task, bucket) from a seeded generator weighted by the stage mixture and the
buckets' sample counts, and broadcasts them as one int64 tensor of shape (2,) (same dtype and
shape on every rank, as collectives require). Under hybrid batching the drawn unit is a task
group instead of a task (``training/data/hybrid.py`` gives the group and bucket weights; the
broadcast is unchanged). Condition-dropout decisions come from a second
generator that every rank advances identically, so all ranks drop the same conditions without
a collective. Both generators are part of the checkpoint.

``StepData`` is the step's data on one rank: the draw, and the read of the drawn batch one step
ahead on a background thread, with the state a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training.data.batch import MixedBatch, TaskBatch
from training.data.buckets import BucketShape
from training.data.hybrid import HybridMixer


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


class Snapshot:
    """A ``Stateful`` saved as it was at the last ``take()``, not as it is at save time."""

    def __init__(self, obj: Any):
        self.obj = obj
        self.take()

    def take(self) -> None:
        self.state = self.obj.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(state)
        self.take()


class StatefulDict:
    """Several ``Stateful`` objects saved as one: name -> state (the task loaders)."""

    def __init__(self, objects: Mapping[str, Any]):
        self.objects = objects

    def state_dict(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.objects.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.objects):
            raise ValueError(f"state of {sorted(state)}, expected {sorted(self.objects)}")
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])


class StepData:
    """The batches of a stage on one rank, read one step ahead.

    ``take`` returns this step's (task or group, bucket, batch), whose batch was read on the
    prefetch thread while the previous step computed, then draws the next step's choice and
    starts reading its batch. The draw is a broadcast, so it stays on the calling thread
    (every rank calls collectives in the same order); the read (loader positions, condition
    dropout, hybrid mix) runs on the prefetch thread. The sampler, mixer and loader states are
    taken between the two (``Snapshot``): the state right after this step's batch, what a
    checkpoint after this step stores, so resuming from it draws and reads exactly what an
    uninterrupted run does next.
    """

    def __init__(self, stage: Any, loaders: Mapping[str, Any], seed: int, geometry: Any):
        """``stage``: a ``StageConfig``; ``loaders``: task -> TaskLoader of this rank."""
        weights = {t: c.weight for t, c in stage.tasks.items()}
        self.loaders = loaders
        self.mixer: HybridMixer | None = None
        if stage.hybrid:  # rank 0 draws a task group; the batch mixes its tasks
            self.mixer = HybridMixer(
                loaders,
                weights,
                seed,
                stage.token_budget,
                geometry.spatial_factor,
                geometry.temporal_factor,
                stage.batch_size,
            )
            units, buckets = self.mixer.group_weights(), self.mixer.group_buckets()
        else:
            units = weights
            buckets = {t: list(lo.bucket_weights().items()) for t, lo in loaders.items()}
        self.sampler = StepSampler(units, buckets, seed=seed, dropout=stage.condition_dropout)
        self.sampler_state = Snapshot(self.sampler)
        self.mixer_state = Snapshot(self.mixer) if self.mixer is not None else None
        self.loader_state = Snapshot(StatefulDict(loaders))
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: tuple[str, BucketShape, Future] | None = None

    def take(
        self, device: torch.device, read_next: bool
    ) -> tuple[str, BucketShape, TaskBatch | MixedBatch]:
        """This step's (choice, bucket, batch); ``read_next``: another step follows."""
        if self._pending is None:
            self._pending = self._draw_and_read(device)
        choice, bucket, future = self._pending
        batch = future.result()
        for state in (self.sampler_state, self.mixer_state, self.loader_state):
            if state is not None:  # no mixer without hybrid batching
                state.take()
        self._pending = self._draw_and_read(device) if read_next else None
        return choice, bucket, batch

    def _draw_and_read(self, device: torch.device) -> tuple[str, BucketShape, Future]:
        choice, bucket = self.sampler.next(device)  # same on every rank; hybrid: a group
        return choice, bucket, self._prefetch.submit(self.read, choice, bucket)

    def read(self, choice: str, bucket: BucketShape) -> TaskBatch | MixedBatch:
        """The step's batch: ``choice`` is a task, or under hybrid batching a task group."""
        if self.mixer is not None:
            return self.mixer.next_batch(choice, bucket, self.sampler.drops)
        batch = self.loaders[choice].next_batch(bucket)
        batch.drop = self.sampler.drops(batch.size)
        return batch

    def close(self) -> None:
        self._prefetch.shutdown(wait=True, cancel_futures=True)
