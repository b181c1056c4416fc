"""One training stage on one rank: build in dependency order, then a step that reads top to bottom.

Runs inside a Ray Train worker (or in-process with ``num_workers=0``). Every rank builds the
same model (same seed), takes the trainable groups of the stage, builds its task loaders over
its part of the data (``sampler.StepData``: the step's draw and its batch, read one step
ahead), wraps the model in a DeepSpeed engine, registers everything a resume restores with
one ``checkpoint.Checkpointer`` and restores the latest checkpoint if there is one. Each
step: take the batch read in the background during the previous step (its task and bucket
came from rank 0), start reading the next one, forward, check the loss is finite, backward,
check the gradient norm is finite, optimizer step (clipping in DeepSpeed), EMA, log,
checkpoint. With ``grad_accumulation`` > 1 a step takes that many micro-batches (each its own
draw of task and bucket), each forward and backward (DeepSpeed divides each loss by the
count), and the gradient-norm check and optimizer step follow the last. The optimizer's param
groups and their lr per step come from ``training.optim`` (``optimizer.groups``). Rank 0
reports each step to the driver's display (``training/progress.py``). A non-finite loss or
gradient norm on any rank stops every rank before the optimizer step, so it is never applied.
With ``hybrid`` batching the broadcast names a task group and the batch mixes that group's
tasks (``training/data/hybrid.py``). At stage end rank
0 writes the final weights and, for a family that can generate, samples from fixed prompts
(``training/artifacts.py``: held-out loss, input grids and samples).

Under Ray Train every worker runs a ``DriverWatch``: when the driver process that started the
run is gone (SIGKILL, a crash) the worker exits instead of training on, and it checks once
more before writing each checkpoint. A test-only hold (``OMNIFORGE_TEST_HOLD``, off unless set;
``Trainer.hold``) stops every rank at a given step until a file appears, so fault tests act on
recorded events instead of timing.

Why over 400 lines: the file also holds what a Ray Train worker needs around the trainer,
``DriverWatch`` and the stage's process group (about 120 lines that ``runner.py`` imports).
They belong with the run lifecycle in ``runner.py``, which is reorganised on its own; the
trainer's state and step data already live in ``checkpoint.py`` and ``sampler.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean as mean
from typing import Any

import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training.artifacts import StageArtifacts
from training.data.batch import TaskBatch
from training.ema import EMA
from training.optim import DEFAULT, lr_at, param_groups, set_lrs
from training.progress import StepReporter
from training.recipe import Recipe, StageConfig
from training.sampler import StepData

log = logging.getLogger(__name__)

HOLD_ENV = "OMNIFORGE_TEST_HOLD"


class NonFiniteError(RuntimeError):
    pass


class DriverWatch:
    """Ends this worker process when the driver that started the run is gone.

    ``driver`` is the driver's identity (``ray_stage.driver_identity``: pid, its start time, host,
    boot time, Ray node). It is watched only from the driver's own node (same Ray node, host and
    boot); a start time that differs means the pid was reused. A zombie counts as gone. A
    daemon thread checks every ``interval`` seconds, and ``check()`` is called before every
    checkpoint, so no checkpoint is written once the driver is gone. Workers on other nodes
    rely on Ray, which ends a dead driver's actors on a cluster.
    """

    def __init__(self, driver: dict[str, Any] | None, interval: float = 0.5):
        self.pid: int | None = None
        self.interval = interval
        if driver and driver.get("pid") != os.getpid() and self._same_machine(driver):
            self.pid, self.create_time = int(driver["pid"]), float(driver["create_time"])

    @staticmethod
    def _same_machine(driver: dict[str, Any]) -> bool:
        import psutil
        import ray

        try:
            node = ray.get_runtime_context().get_node_id()
        except Exception:  # not in a Ray worker
            return False
        return (
            node == driver.get("node_id")
            and socket.gethostname() == driver.get("host")
            and abs(psutil.boot_time() - float(driver.get("boot_time", 0))) < 2
        )

    def driver_alive(self) -> bool:
        import psutil

        if self.pid is None:
            return True
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return False  # the pid now names another process
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:  # cannot tell (permissions): keep going
            return True

    def check(self) -> None:
        if not self.driver_alive():
            message = (
                f"omniforge: the driver process {self.pid} is gone; stopping training worker "
                f"{os.getpid()} (no further steps or checkpoints)"
            )
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            os._exit(1)

    def start(self) -> DriverWatch:
        if self.pid is not None:

            def watch() -> None:
                while True:
                    self.check()
                    time.sleep(self.interval)

            threading.Thread(target=watch, name="driver-watch", daemon=True).start()
        return self


@dataclass
class StageSpec:
    """Everything a worker needs for one stage (plain data: it crosses to Ray workers)."""

    recipe: dict[str, Any]  # Recipe.model_dump(mode="json")
    stage_index: int
    output: str  # stage folder: final weights, exported artifacts
    init_weights: str | None = None  # previous stage's final weights (safetensors)
    catalog_url: str | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # the stage's (nested) MLflow run
    stop_after: int | None = None  # testing/ops: stop cleanly after this many steps
    extra: dict[str, Any] = field(default_factory=dict)


def step_seed(seed: int, stage: int, step: int, rank: int) -> int:
    """Per-step RNG seed (noise, timesteps): a pure function of the step, so resume is exact."""
    digest = hashlib.sha256(f"{seed}:{stage}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size). Ray Train sets up torch.distributed for >= 1 worker; in-process runs
    get a one-rank gloo group so DeepSpeed has one too (``process_group`` also tears it down)."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def process_group():
    """The process group of one stage. Under Ray Train workers it exists already (Ray Train
    owns it). In-process (``num_workers=0``) the stage gets a one-rank gloo group, destroyed at
    the end through ``deepspeed.comm`` so that DeepSpeed also drops its cached world group and
    the next in-process stage starts clean (Ray's local mode would destroy it behind
    DeepSpeed's back, and leaves the variables it then reads to re-initialise)."""
    if dist.is_initialized():
        yield
        return
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    ensure_process_group()
    try:
        yield
    finally:
        import deepspeed.comm as ds_dist

        if ds_dist.is_initialized():
            ds_dist.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def weights_dtype(recipe: Recipe, on_gpu: bool) -> torch.dtype:
    """The dtype production backbones load in: bf16 on GPU unless ``precision: fp32`` (as the
    DeepSpeed bf16 engine runs them; a 7B never passes through fp32 host memory), fp32 on CPU.
    Tiny sizes always build in fp32."""
    return torch.bfloat16 if on_gpu and recipe.precision in ("auto", "bf16") else torch.float32


def deepspeed_config(recipe: Recipe, stage: StageConfig, on_gpu: bool) -> dict[str, Any]:
    """ZeRO-1/2 config from the recipe. CPU: fp32 + torch AdamW; GPU: bf16 (unless fp32).

    The optimizer's values are the stage's; the param groups passed to ``deepspeed.initialize``
    (``training.optim.param_groups``) carry each group's own. ``engine.backward`` divides each
    micro-batch's loss by ``gradient_accumulation_steps`` and ``engine.step`` steps the
    optimizer after the last micro-batch of a step only."""
    bf16 = on_gpu and recipe.precision in ("auto", "bf16")
    opt = stage.optimizer
    return {
        "train_micro_batch_size_per_gpu": 1,  # batches are pre-formed per bucket
        "gradient_accumulation_steps": stage.grad_accumulation,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": {"stage": stage.zero_stage},
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class TaskCounts(Counter):
    """Steps that trained each task (a hybrid step counts for each task it mixes): the
    ``tasks/*`` metrics, carried across a resume."""

    def state_dict(self) -> dict[str, int]:
        return dict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.clear()
        self.update(state)


def grad_norm(engine) -> torch.Tensor:
    """L2 norm of this step's gradients over every rank, after ``backward`` and before
    ``step`` (inf or nan when a gradient is not finite; the same value on every rank).

    Under ZeRO-1/2 each rank holds its share of the reduced gradients inside DeepSpeed's
    optimizer, and ``scaled_global_norm`` is the norm its ``step`` clips with (one all-reduce
    of a scalar; no loss scale: fp16 is not used). Without ZeRO every rank holds the reduced
    gradients."""
    from deepspeed.utils import safe_get_full_grad

    if engine.zero_optimization_stage() in (1, 2):
        return engine.optimizer.scaled_global_norm().float()
    grads = [safe_get_full_grad(p) for p in engine.module.parameters() if p.requires_grad]
    norms = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


FINAL = "final.safetensors"  # a stage's final weights, in its folder: the stage is complete


def stage_files(output: str, rank: int) -> Path:
    """Where a rank writes the stage's files: the stage folder itself, or for a folder in
    object storage a local stand-in of the rank's own (``OMNIFORGE_HOME/training/KEY/rankR``),
    copied there by ``Trainer.publish``."""
    from core.storage import is_remote, local_cache, location

    if not is_remote(output):
        return Path(output)
    folder = local_cache(location(output, "stage output"), "training") / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def clear_stand_in(folder: Path, fresh: bool) -> None:
    """A local stand-in keeps nothing an earlier try of the stage left that could be published
    as this one's: never final weights, and nothing at all when the stage starts fresh."""
    import shutil

    for path in list(folder.iterdir()):
        if fresh or path.name.startswith("final"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


class Trainer(StageArtifacts):
    def __init__(self, spec: StageSpec, context: Any):
        """``context``: ``report(metrics, checkpoint_dir)`` and ``latest_checkpoint()``."""
        import deepspeed

        from core.tracking import MetricLogger
        from training.data.loaders import build_task_loaders
        from training.models.registry import build_model

        self.spec, self.context = spec, context
        self.watch = DriverWatch(spec.extra.get("driver")).start()
        self.recipe = Recipe.model_validate(spec.recipe)
        self.stage = self.recipe.stages[spec.stage_index]
        self.rank, self.world_size = ensure_process_group()
        self.progress = StepReporter.build(spec.extra.get("progress"), self.rank)
        self.out_dir = stage_files(spec.output, self.rank)
        self.device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
        torch.manual_seed(self.recipe.seed)  # identical initial weights on every rank
        m = self.recipe.model
        self.model = build_model(
            m.family,
            m.size,
            m.pretrained,
            self.stage.timestep_shift,
            dtype=weights_dtype(self.recipe, self.device.type == "cuda"),
            options=m.options(),
        )
        if self.stage.distill:  # frozen teachers, checked and loaded before anything trains
            from training.models.distill import load_distiller

            self.model.set_distillation(
                load_distiller(
                    self.stage.distill,
                    f"stage {self.stage.name!r} distill",
                    self.model.geometry.temporal_factor,
                )
            )
        if spec.init_weights:  # a local path or an object-store URI
            ckpt.load_weights(self.model, spec.init_weights)
        self.trainable = self.model.set_trainable(self.stage.trainable)
        self.model.set_gradient_checkpointing(self.stage.gradient_checkpointing)
        catalog = None
        if spec.catalog_url:
            from catalog.store import Catalog

            catalog = Catalog(spec.catalog_url)
        self.catalog = catalog
        self.loaders = build_task_loaders(
            self.stage,
            self.recipe.data,
            catalog,
            self.rank,
            self.world_size,
            self.recipe.seed,
            self.model.geometry,
            self.model.tokenize,
        )
        seed = self.recipe.seed * 1009 + spec.stage_index
        self.data = StepData(self.stage, self.loaders, seed, self.model.geometry)
        self.param_groups = param_groups(self.model, self.stage)
        with self.progress.building_engine():  # says so when DeepSpeed compiles its op first
            self.engine, _, _, _ = deepspeed.initialize(
                model=self.model.to(self.device),
                model_parameters=[group.torch() for group in self.param_groups],
                config=deepspeed_config(self.recipe, self.stage, self.device.type == "cuda"),
            )
        self.engine.checkpoint_engine = ckpt.safe_checkpoint_engine()
        self.ema = EMA(self.model, self.stage.ema.decay) if self.stage.ema else None
        self.step = 0
        self.task_counts = TaskCounts()
        # everything a resume restores, registered once (the data states as of the last batch
        # taken: the next one is read ahead)
        self.checkpointer = ckpt.Checkpointer(
            self.rank, self.world_size, self.recipe, spec.stage_index
        )
        self.checkpointer.register("model", self.engine)  # weights + ZeRO optimizer partitions
        self.checkpointer.register("task_counts", self.task_counts)
        self.checkpointer.register("sampler", self.data.sampler_state)
        if self.data.mixer_state is not None:
            self.checkpointer.register("mixer", self.data.mixer_state)
        self.checkpointer.register("loaders", self.data.loader_state, per_rank=True)
        if self.ema is not None:
            self.checkpointer.register("ema", self.ema)
        with self.context.latest_checkpoint() as directory:
            if directory is not None:
                self.step = self.checkpointer.load(Path(directory))
        if self.out_dir != Path(spec.output):  # a local stand-in: nothing of an earlier try
            clear_stand_in(self.out_dir, fresh=self.step == 0)
        # logs only steps MLflow does not hold yet: a resumed stage repeats none
        self.tracker = MetricLogger(spec.tracking_uri, spec.mlflow_run_id, enabled=self.rank == 0)
        note = getattr(context, "resume_note", "")
        if note:
            self.tracker.set_tag("omniforge.resume", note)
        self._held_out: dict[str, TaskBatch] | None = None
        self.stop_at = self.stage.steps

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        self.stop_at = self.stage.steps
        if self.spec.stop_after is not None:
            self.stop_at = min(self.stop_at, self.step + self.spec.stop_after)
        self.progress.start(
            self.step, self.stage.steps, getattr(self.context, "resumed_from", None)
        )
        if self.step == 0:
            self.evaluate("start")
        try:
            while self.step < self.stop_at:
                last = self.train_step()
                done = self.step == self.stage.steps
                if done:
                    last.update(self.evaluate("end"))
                every = self.step % self.stage.checkpoint_every == 0
                if every or done or self.step == self.stop_at:
                    self.save_checkpoint(last)
                self.hold()
        finally:
            self.data.close()
            self.progress.close(self.step)
        if self.step == self.stage.steps and self.rank == 0:
            self.export_final()
            self.log_samples()
        self.publish()
        self.tracker.close()
        return last

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accumulation`` micro-batches (each its own draw of
        task and bucket); the gradient-norm check and the optimizer step follow the last."""
        t0 = time.perf_counter()
        micro = self.stage.grad_accumulation
        lrs = set_lrs(self.engine.optimizer, self.param_groups, self.stage, self.step)
        losses: list[tuple[str, float]] = []
        parts: dict[str, list[float]] = {}
        tasks, keys, samples, t_data = [], [], 0, 0.0
        for i in range(micro):
            last = i == micro - 1
            t_read = time.perf_counter()
            # read while the previous micro-batch computed; the next read starts now
            read_next = not last or self.step + 1 < self.stop_at
            task, bucket, batch = self.data.take(self.device, read_next=read_next)
            t_data += time.perf_counter() - t_read
            if i == 0:  # noise and timesteps: a pure function of the step (micro-batches in turn)
                seed = step_seed(self.recipe.seed, self.spec.stage_index, self.step, self.rank)
                torch.manual_seed(seed)
            out = self.engine(batch.to(self.device))
            loss = out["loss"]
            self._check_finite("loss", loss.detach(), task, batch.keys)
            self.engine.backward(loss)  # divided by grad_accumulation
            if last:
                norm = grad_norm(self.engine)
                self._check_finite("gradient norm", norm, task, batch.keys, agreed=True)
            self.engine.step()  # after the last micro-batch: clip to grad_clip, optimizer step
            losses.append((task, float(loss.detach())))
            for k, v in out.items():
                if k.startswith("loss/"):
                    parts.setdefault(k, []).append(float(v))
            self.task_counts.update(part.task for part in batch.parts)
            tasks.append(task)
            keys += batch.keys
            samples += batch.size
            self._trace(task, bucket, batch, losses[-1][1], i)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

        elapsed = time.perf_counter() - t0
        task = ",".join(dict.fromkeys(tasks))
        metrics = {
            "loss": sum(v for _, v in losses) / micro,  # what the step's gradient is of
            **{f"loss/{t}": mean(v for u, v in losses if u == t) for t in dict.fromkeys(tasks)},
            "lr": lr_at(self.stage, self.step - 1),
            **{f"lr/{name}": lr for name, lr in lrs.items() if name != DEFAULT},
            "grad_norm": float(norm),
            "samples_per_s": samples * self.world_size / elapsed,
            "data_wait_fraction": t_data / elapsed,
            **{f"tasks/{t}": n for t, n in self.task_counts.items()},
            **{k: mean(v) for k, v in parts.items()},
        }
        self.tracker.log(metrics, self.step)
        self.progress.step(self.step, task, bucket, metrics, samples * self.world_size)
        return {**metrics, "step": self.step, "task": task, "keys": keys}

    def _trace(self, task: str, bucket: Any, batch: Any, loss: float, micro: int) -> None:
        """What every rank did at every micro-batch (tests, audits), when asked for."""
        if not self.spec.extra.get("trace"):
            return
        record = {
            "step": self.step + 1,
            "micro": micro,
            "task": task,
            "bucket": str(bucket),
            "keys": batch.keys,
            "parts": {part.task: part.size for part in batch.parts},
            "loss": loss,
            "drop": {k: v.tolist() for k, v in batch.drop.items()},
        }
        with open(self.out_dir / f"trace-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _check_finite(
        self, what: str, value: torch.Tensor, task: str, keys: list[str], agreed: bool = False
    ) -> None:
        """Every rank agrees before the optimizer step: one rank's NaN stops them all.
        ``agreed``: ``value`` is already the same on every rank (the global gradient norm), so
        no all-reduce is needed."""
        # on the step's device: NCCL reduces only CUDA tensors
        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self.device)
        if dist.is_initialized() and self.world_size > 1 and not agreed:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteError(
                f"stage {self.stage.name!r} step {self.step}: non-finite {what} on task {task} "
                f"(samples {keys[:3]}); stopping before the optimizer step"
            )

    # -- checkpoints and export ----------------------------------------------------------------

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        self.watch.check()  # never a checkpoint after the driver is gone
        with tempfile.TemporaryDirectory(prefix="omniforge-ckpt-") as tmp:
            self.checkpointer.save(Path(tmp), self.step)
            report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.context.report({**report, "step": self.step}, tmp)

    def hold(self) -> None:
        """Test hook, off unless ``OMNIFORGE_TEST_HOLD=STEP:DIR`` was set for the driver.

        After step STEP (and its checkpoint, if it takes one) every rank stops; rank 0 first
        waits until Ray Train has registered every checkpoint it reported. Each rank then
        writes ``DIR/held-rank{R}.json`` (step, pid, Ray node, world size; rank 0 also the
        registered checkpoint directories) and waits until ``DIR/release`` exists. Once
        released, a run (or a restarted worker) does not hold again."""
        hold = self.spec.extra.get("hold")
        if not hold or self.step != hold["step"]:
            return
        folder = Path(hold["dir"])
        if (folder / "release").exists():
            return
        record: dict[str, Any] = {
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "node_id": node_id(),
        }
        if self.rank == 0 and hasattr(self.context, "registered_checkpoints"):
            record["registered"] = [
                Path(c.path).name for c in self.context.registered_checkpoints()
            ]
        self.progress.flush()  # a held run has shown every step it took
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".held-rank{self.rank}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(folder / f"held-rank{self.rank}.json")
        while not (folder / "release").exists():
            self.watch.check()
            time.sleep(0.05)

    def export_final(self) -> None:
        out = self.out_dir
        weights = self.model.state_dict()
        ckpt.save_weights(weights, out / FINAL)
        if self.ema is not None:  # the trainable groups' averages in place of their weights
            ckpt.save_weights({**weights, **self.ema.state_dict()}, out / "final_ema.safetensors")

    def publish(self) -> None:
        """For a stage folder in object storage: copy what this rank wrote into its local
        stand-in there (its trace; rank 0: evaluations, grids, final weights), the final weights
        last, since the driver takes ``final.safetensors`` as the stage's end. A rank moved to
        another node by a restart publishes only what it wrote there."""
        if self.out_dir == Path(self.spec.output):
            return
        from core.storage import put_file

        files = [p for p in self.out_dir.rglob("*") if p.is_file()]
        files.sort(key=lambda p: (p.name == FINAL, p.name.startswith("final"), str(p)))
        for path in files:
            put_file(path, f"{self.spec.output}/{path.relative_to(self.out_dir).as_posix()}")
