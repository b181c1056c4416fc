"""The one place that turns a Stage into a Ray Data operation (stages never import Ray).

Batches cross Ray as Arrow tables typed by ``WORKING_SCHEMA`` (the sample contract plus the
working columns), and stages see them as lists of row dicts. Model stages run in an actor pool
(``setup()`` once per actor); the others run as tasks. Fractional CPU requests keep a small
machine from deadlocking: on 2 CPUs an actor pool that holds whole CPUs starves the read tasks,
so the per-worker requests are scaled to fit the cluster (see ``plan_resources``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from catalog.schema import SAMPLE_SCHEMA
from curation.stages.base import Stage

WORKING_SCHEMA = pa.schema(
    list(SAMPLE_SCHEMA)
    + [
        pa.field("input_id", pa.string()),
        pa.field("partition", pa.int64()),
        pa.field("frames", pa.list_(pa.binary())),
        pa.field("frame_times", pa.list_(pa.float64())),
        pa.field("target_frames", pa.list_(pa.binary())),
        pa.field("edit_change", pa.float64()),
        pa.field("edit_aspect_diff", pa.float64()),
        pa.field("thumb", pa.binary()),
        pa.field("random_access", pa.bool_()),
        pa.field("clip_embedding", pa.list_(pa.binary())),
        pa.field("frames_decoder", pa.string()),
    ]
)
_TYPES = {f.name: f.type for f in WORKING_SCHEMA}


def rows_to_arrow(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> Arrow with known columns typed; unknown columns inferred (never dropped)."""
    names: list[str] = []
    for row in rows:
        for k in row:
            if k not in names:
                names.append(k)
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        typ = _TYPES.get(name)
        if name == "reasons":
            values = [list(v) if v is not None else [] for v in values]
        arr = pa.array(values, type=typ) if typ is not None else pa.array(values)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _run(stage: Stage, batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    return rows_to_arrow(stage.process_batch(rows)) if rows else batch


class StageActor:
    """Ray Data callable class: ``setup()`` once per actor, then one call per batch."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _run(self.stage, batch)


class StageTask:
    """Ray Data function for stages without a model; ``setup()`` (cheap for them) runs once
    per task, since each task gets its own copy of this object."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.ready = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self.ready:
            self.stage.setup()
            self.ready = True
        return _run(self.stage, batch)


@dataclass(frozen=True)
class StageResources:
    cpus: float
    gpus: float
    max_actors: int


def plan_resources(stages: list[Stage], cluster_cpus: float, cluster_gpus: float = 0.0) -> dict:
    """Per-stage requests that fit the cluster: actor pools may hold at most half the CPUs
    together, and while there are pools a task asks for at most the other half (else on a
    1-CPU cluster a 1-CPU task waits forever behind a 0.5-CPU actor)."""
    actors = [s for s in stages if s.uses_model]
    pinned = sum(s.resources.cpus for s in actors)
    scale = min(1.0, (cluster_cpus / 2) / pinned) if pinned else 1.0
    plan = {}
    for s in stages:
        cpus = s.resources.cpus * (scale if s.uses_model else 1.0)
        cpus = max(0.05, min(cpus, cluster_cpus / 2 if actors else cluster_cpus))
        gpus = s.resources.gpus if cluster_gpus else 0.0
        max_actors = max(1, int((cluster_cpus / 2) // cpus)) if s.uses_model else 0
        if gpus:
            max_actors = max(1, min(max_actors, int(cluster_gpus // gpus)))
        plan[s.name] = StageResources(round(cpus, 3), gpus, max_actors)
    return plan


def apply_stage(ds, stage: Stage, res: StageResources, retries: int = 3):
    """Append ``stage`` to the Ray dataset ``ds`` (tasks, or an actor pool for models)."""
    import ray.data

    common = dict(batch_size=stage.batch_size, batch_format="pyarrow", num_cpus=res.cpus)
    if res.gpus:
        common["num_gpus"] = res.gpus
    if stage.uses_model:
        return ds.map_batches(
            StageActor,
            fn_constructor_args=(stage,),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res.max_actors),
            max_restarts=retries,  # a killed actor is restarted ...
            max_task_retries=retries,  # ... and its batch is retried
            **common,
        )
    return ds.map_batches(StageTask(stage), max_retries=retries, **common)
