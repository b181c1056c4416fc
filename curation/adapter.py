"""The one place that turns stages into Ray actors (stages never import Ray).

The stage list is cut into **steps**: each run of consecutive stages without a model is fused
into one step (one call, rows stay Python dicts, frames stay numpy arrays), and each model stage
is a step of its own. The last step is always a fused CPU step that also writes the block
(``curation.sink``). Two kinds of long-lived workers run them, so set-up (imports, models,
decoders) is paid once per run, not per block or per stage:

- CPU workers: one actor per CPU of the cluster (less what the model actors take), each holding
  every CPU step;
- model workers: an actor pool per model stage (``setup()`` loads the model once per actor),
  asking Ray for GPUs when the cluster has them.

A step call returns two objects: the rows for the next step (never fetched by the driver; the
next actor reads them from the object store, numpy buffers zero-copy) and a small ``StepInfo``
the driver waits on. Fractional CPU requests keep every worker schedulable on a small machine
(``plan_workers``); they are Ray's bookkeeping, not a limit on the processes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from curation.sink import BlockSink, BlockWritten
from curation.stages.base import Row, Stage

# What the frames stage adds and only the scorers read (dropped after the last of them).
FRAME_COLUMNS = ("frames", "target_frames", "frame_times", "clip_embedding")
# Model actors on a CPU-only cluster: one per this many CPUs (at least one per model stage).
# One per CPU: a model stage whose rows are costly (PP-OCR on a slow CPU) then has as many
# processes as the CPU stages, and an idle actor costs only its memory. With one actor per 4
# CPUs, P1 (2 CPUs, 14 clips) ran 21.4 s against 17.7 s with one per CPU.
CPUS_PER_MODEL_ACTOR = 1
# ... and at most as many as their ``memory_mb`` estimates fit in this share of the cluster's
# memory (the model stages together).
MODEL_MEMORY_SHARE = 0.5
# Model actors together take at most this share of the cluster's CPUs in Ray's bookkeeping.
MODEL_CPU_SHARE = 0.25
# Ray restarts a dead actor and re-runs its in-flight call this many times before the driver
# sees the failure (then the driver retries the block, see ``curation.engine``).
ACTOR_RETRIES = 3


@dataclass(frozen=True)
class Step:
    """Stages run by one worker call: fused CPU stages (``uses_model`` False) or one model."""

    name: str
    stages: tuple[Stage, ...]
    uses_model: bool
    writes: bool = False  # the last step also writes the block
    drops_frames: bool = False  # the last step that reads the frames: it drops them

    def describe(self) -> str:
        if self.uses_model:
            return self.stages[0].describe()
        names = " + ".join(s.name for s in self.stages) or "-"
        return f"{names} (fused, CPU workers)" + (" -> sink" if self.writes else "")


def plan_steps(stages: Sequence[Stage]) -> list[Step]:
    """Consecutive CPU stages fused into one step; a step per model stage; the last CPU step
    (possibly holding no stage) writes the block. The step holding the last stage that reads
    the frames drops them, so the largest column never travels further than it is used."""
    steps: list[Step] = []
    group: list[Stage] = []
    for stage in stages:
        if stage.uses_model:
            if group:
                steps.append(Step("+".join(s.name for s in group), tuple(group), False))
                group = []
            steps.append(Step(stage.name, (stage,), True))
        else:
            group.append(stage)
    steps.append(Step("+".join(s.name for s in group) or "sink", tuple(group), False, True))
    last = max(
        (i for i, st in enumerate(steps) if any(s.reads_frames for s in st.stages)), default=None
    )
    if last is not None:
        steps[last] = replace(steps[last], drops_frames=True)
    return steps


@dataclass
class StepInfo:
    """What the driver learns of one step of one block (small: never the rows themselves)."""

    block: str
    step: str
    rows: int
    stages: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # in, out, seconds
    written: BlockWritten | None = None


class Worker:
    """A Ray actor holding built stages: ``setup()`` once when it starts, one call per step.

    ``device`` is ``cuda`` when Ray gave the actor a GPU, else ``cpu``; stages read it in
    ``setup()``. The CPU workers also hold the block sink.
    """

    def __init__(self, steps: list[Step], sink: BlockSink | None = None, threads: int = 1):
        start = time.monotonic()
        _limit_threads(threads)
        self.steps = {s.name: s for s in steps}
        self.sink = sink
        self.device = "cpu"
        self.setup_error: BaseException | None = None
        try:
            import ray

            if ray.is_initialized() and ray.get_gpu_ids():
                self.device = "cuda"
            for step in steps:
                for stage in step.stages:
                    stage.device = self.device
                    stage.setup()
        except Exception as e:  # kept for ready(): the driver reports it as the cause
            self.setup_error = e
        self.setup_s = time.monotonic() - start

    def ready(self) -> dict[str, Any]:
        """Raises the set-up error, if any (a missing model, a bad setting)."""
        if self.setup_error is not None:
            raise self.setup_error
        return {"pid": os.getpid(), "setup_s": self.setup_s, "device": self.device}

    def run(self, step_name: str, block: str, rows: list[Row]) -> tuple[list[Row], StepInfo]:
        if self.setup_error is not None:  # also after Ray restarted this actor
            raise self.setup_error
        step = self.steps[step_name]
        info = StepInfo(block, step_name, 0)
        for stage in step.stages:
            start = time.monotonic()
            n_in = len(rows)
            rows = stage.process_batch(rows) if rows else rows
            info.stages[stage.name] = (n_in, len(rows), time.monotonic() - start)
        info.rows = len(rows)
        if step.drops_frames:
            rows = [{k: v for k, v in r.items() if k not in FRAME_COLUMNS} for r in rows]
        if step.writes:
            assert self.sink is not None, "the writing step runs on a CPU worker"
            start = time.monotonic()
            info.written = self.sink.write(block, rows)
            info.stages["sink"] = (len(rows), len(rows), time.monotonic() - start)
            rows = []
        trim_heap()
        return rows, info


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    A block's frames, decoder and model buffers are freed after each call, but glibc keeps the
    pages: an OCR process fed frames of several sizes grew from 156 to 286 MB (PSS) in 70
    frames and stayed there (145 MB trimmed after each frame). Trimmed once per step call, P1's
    peak (2 CPUs, 112 clips: driver, Ray, 2 CPU workers, 2 OCR actors) fell from 2064 to
    1800 MB, mostly in the CPU workers (290 -> 200 MB each). The cost is the next call's page
    faults: the cheap filters (decode-heavy, no model) ran 6.36 s against 6.19 s untrimmed
    (medians of 3, interleaved); the full pipeline's ratio to the Pool did not move (0.98x).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _limit_threads(n: int) -> None:
    """One process per CPU does the parallel work: libraries' own thread pools would only
    oversubscribe the cores (OpenCV, and FFmpeg / onnxruntime read these at their start)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass


@dataclass(frozen=True)
class PoolPlan:
    size: int
    cpus: float
    gpus: float = 0.0


def plan_workers(
    model_stages: Sequence[Stage],
    cluster_cpus: float,
    cluster_gpus: float = 0.0,
    cluster_memory_mb: float = 0.0,
) -> tuple[PoolPlan, dict[str, PoolPlan]]:
    """(CPU workers, model pools by stage name) that fit the cluster together.

    Model stages that declare GPUs get them when the cluster has any (the GPUs are shared out
    between such stages); the others run on CPU, one actor per ``CPUS_PER_MODEL_ACTOR`` CPUs,
    fewer where their ``memory_mb`` estimates would take more than ``MODEL_MEMORY_SHARE`` of
    ``cluster_memory_mb`` (when known), their CPU requests scaled so that all model actors take
    at most ``MODEL_CPU_SHARE`` of the CPUs. The CPU workers share the rest: one per remaining
    CPU (rounded), at most 1 CPU each.
    """
    gpu_stages = [s for s in model_stages if cluster_gpus and s.resources.gpus]
    cpu_stages = [s for s in model_stages if s not in gpu_stages]
    sizes: dict[str, int] = {}
    for s in gpu_stages:
        sizes[s.name] = max(1, int(cluster_gpus / len(gpu_stages) // s.resources.gpus))
    per_cpu_stage = max(1, int(cluster_cpus // CPUS_PER_MODEL_ACTOR))
    memory_mb = sum(s.resources.memory_mb for s in cpu_stages)  # one actor of each
    fits = MODEL_MEMORY_SHARE * cluster_memory_mb / memory_mb if memory_mb else 0
    for s in cpu_stages:
        sizes[s.name] = max(1, min(per_cpu_stage, int(fits))) if fits else per_cpu_stage
    wanted = sum(s.resources.cpus * sizes[s.name] for s in model_stages)
    scale = min(1.0, MODEL_CPU_SHARE * cluster_cpus / wanted) if wanted else 1.0
    models: dict[str, PoolPlan] = {}
    for s in model_stages:
        cpus = round(max(0.05, s.resources.cpus * scale), 3)
        models[s.name] = PoolPlan(sizes[s.name], cpus, s.resources.gpus if s in gpu_stages else 0)
    taken = sum(p.size * p.cpus for p in models.values())
    free = max(cluster_cpus - taken, 0.1)
    size = max(1, int(free + 0.5))
    return PoolPlan(size, round(min(1.0, free / size), 3)), models


class Pool:
    """Actors of one kind; calls go to the actor with the fewest calls in flight."""

    def __init__(self, name: str, make: Callable[[], Any], size: int):
        self.name = name
        self.make = make
        self.actors = [make() for _ in range(size)]
        self.load = {id(a): 0 for a in self.actors}

    def pick(self) -> Any:
        actor = min(self.actors, key=lambda a: self.load[id(a)])
        self.load[id(actor)] += 1
        return actor

    def release(self, actor: Any) -> None:
        if id(actor) in self.load:
            self.load[id(actor)] -= 1

    def replace(self, actor: Any) -> None:
        """A dead actor (Ray gave up restarting it) is replaced by a new one."""
        if id(actor) not in self.load:
            return
        import ray

        self.actors.remove(actor)
        del self.load[id(actor)]
        ray.kill(actor, no_restart=True)
        new = self.make()
        self.actors.append(new)
        self.load[id(new)] = 0

    def ready(self) -> list[Any]:
        """A ``ready()`` call on every actor (raises the actor's set-up error when read)."""
        return [a.ready.remote() for a in self.actors]

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.load.clear()


class CpuWorker(Worker):
    """Runs the fused CPU steps and writes blocks (its own class: its own process title)."""


class ModelWorker(Worker):
    """Runs one model step."""


def worker_factory(
    steps: list[Step],
    sink: BlockSink | None,
    plan: PoolPlan,
    name: str,
    retries: int = ACTOR_RETRIES,
):
    """A function making one Ray actor for ``steps`` with ``plan``'s resources."""
    import ray

    remote = ray.remote(CpuWorker if sink is not None else ModelWorker)
    options: dict[str, Any] = dict(
        num_cpus=plan.cpus, max_restarts=retries, max_task_retries=retries
    )
    if plan.gpus:
        options["num_gpus"] = plan.gpus
    threads = max(1, int(plan.cpus))

    def make():
        return remote.options(**options).remote(steps, sink, threads)

    make.__name__ = f"make_{name}"
    return make
