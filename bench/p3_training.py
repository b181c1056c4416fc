"""P3 training orchestration overhead: our step vs a bare DeepSpeed loop on the same batches.

Ours: ``training.trainer.Trainer`` built in-process (one rank, gloo, the way a Ray Train worker
builds it) for stage 2 of ``omni_video_tiny`` (t2i + t2v, tiny model, ZeRO-1) on the P2 shards,
with MLflow tracking to a SQLite store; each step is ``Trainer.train_step()``: the task and
bucket draw (a broadcast on more than one rank), the task loader's batch (shard read +
decode), condition dropout, lr, forward, backward, finite check, DeepSpeed step, EMA when
configured, buffered MLflow logging.

Bare: the same tiny model (same seed, same trainable groups), its own DeepSpeed engine with
the same config, and the very batches our loop drew (recorded, already decoded): forward,
backward, step; nothing else.

Steps run in blocks (ours then bare on the same batches), so both see the same machine
load; a figure is the median over blocks of the mean step time. Data wait is the trainer's
own ``data_wait_fraction`` (time in sampler + loader / step time), weighted by step time.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any

from bench.harness import REPO, Context, Row, log, ratio

STAGE_INDEX = 1  # "generate": t2i + t2v


class LocalContext:
    """What Trainer needs from Ray Train, in-process: nothing to report, no checkpoint."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        return None

    @contextmanager
    def latest_checkpoint(self):
        yield None


def build(ctx: Context):
    from bench.p2_shards import make_shards
    from core.config import load_config
    from training import tracking
    from training.recipe import Recipe
    from training.trainer import StageSpec, Trainer

    root, _ = make_shards(ctx.work, ctx.quick)
    recipe = load_config(
        Recipe,
        REPO / "training" / "recipes" / "omni_video_tiny.yaml",
        [f"data.curated.uri={root / 'shards'}", f"stages.{STAGE_INDEX}.steps=100000"],
    )
    tmp = ctx.tmp("p3")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    parent = tracking.start_parent(uri, recipe)
    stage_run = tracking.start_stage(uri, parent, recipe, STAGE_INDEX, [])
    spec = StageSpec(
        recipe=recipe.model_dump(mode="json"),
        stage_index=STAGE_INDEX,
        output=str(tmp),
        tracking_uri=uri,
        mlflow_run_id=stage_run,
    )
    trainer = Trainer(spec, LocalContext())
    return recipe, trainer


def bare_engine(recipe):
    import deepspeed
    import torch

    from training.models.registry import build_model
    from training.trainer import deepspeed_config

    stage = recipe.stages[STAGE_INDEX]
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model.family, recipe.model.size, None, stage.timestep_shift)
    model.set_trainable(stage.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=deepspeed_config(recipe, stage, False)
    )
    return engine


def record_batches(trainer) -> list:
    """Keep every batch the step feeds the engine (decoded, dropout decided)."""
    recorded: list = []
    if hasattr(trainer, "next_batch"):  # the step's own batch source (hybrid batching aware)
        original = trainer.next_batch

        def step_batch(*args, **kwargs):
            batch = original(*args, **kwargs)
            recorded.append(batch)
            return batch

        trainer.next_batch = step_batch
        return recorded
    for loader in trainer.loaders.values():
        loader_batch = loader.next_batch

        def next_batch(shape, size=None, original=loader_batch):
            batch = original(shape, size)
            recorded.append(batch)  # the trainer sets batch.drop on this same object
            return batch

        loader.next_batch = next_batch
    return recorded


def run(ctx: Context) -> list[Row]:
    block = 8 if ctx.quick else 24
    warm_steps = 4 if ctx.quick else 8
    recipe, trainer = build(ctx)
    engine = bare_engine(recipe)
    recorded = record_batches(trainer)

    def ours_block(n: int) -> tuple[list[float], list[float]]:
        steps, waits = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            m = trainer.train_step()
            elapsed = time.perf_counter() - t0
            steps.append(elapsed)
            # the trainer's own measure: data time / its step time (before MLflow logging)
            inner = len(m["keys"]) / m["samples_per_s"]
            waits.append(m["data_wait_fraction"] * inner)
        return steps, waits

    def bare_block(batches: list) -> list[float]:
        steps = []
        for batch in batches:
            t0 = time.perf_counter()
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            steps.append(time.perf_counter() - t0)
        return steps

    ours_block(warm_steps)
    bare_block(recorded[-warm_steps:])
    ours_means, bare_means, wait_fracs, compute_means = [], [], [], []
    for r in range(ctx.repeats):
        recorded.clear()
        steps, waits = ours_block(block)
        bare = bare_block(list(recorded))
        ours_means.append(statistics.fmean(steps))
        bare_means.append(statistics.fmean(bare))
        wait_fracs.append(sum(waits) / sum(steps))
        compute_means.append((sum(steps) - sum(waits)) / len(steps))
        log(
            f"  block {r + 1}/{ctx.repeats}: ours {ours_means[-1] * 1e3:.1f} ms/step, bare "
            f"{bare_means[-1] * 1e3:.1f} ms/step, data wait {wait_fracs[-1]:.1%}"
        )
    trainer.tracker.close()
    for loader in trainer.loaders.values():
        loader.close()
    ours, bare = statistics.median(ours_means), statistics.median(bare_means)
    compute, wait = statistics.median(compute_means), statistics.median(wait_fracs)
    ctx.details["figures"] = {
        "block_steps": block,
        "ours_ms": [x * 1e3 for x in ours_means],
        "bare_ms": [x * 1e3 for x in bare_means],
        "ours_without_data_ms": [x * 1e3 for x in compute_means],
        "data_wait_fraction": wait_fracs,
    }
    note = f"{block} steps per block, {ctx.repeats} block(s); tiny omni_video, stage 2, 1 rank"
    return [
        Row(
            "P3",
            "step time, ours (incl. data) vs bare",
            ours * 1e3,
            "ms",
            "bare DeepSpeed loop, same batches",
            bare * 1e3,
            ratio(ours, bare),
            "<= 1.02",
            note=note,
        ),
        Row(
            "P3",
            "step time without data wait vs bare",
            compute * 1e3,
            "ms",
            "bare DeepSpeed loop, same batches",
            bare * 1e3,
            ratio(compute, bare),
            "<= 1.02",
            note="loop machinery only: sampler, dropout, lr, finite check, EMA, MLflow",
        ),
        Row(
            "P3",
            "data-wait fraction of our step",
            wait,
            "%",
            goal="<= 0.05",
            goal_on="value",
            note="the next batch is read on a prefetch thread while the step computes",
        ),
    ]
