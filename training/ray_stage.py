"""A stage inside Ray Train: the ``TorchTrainer`` run of one stage, its per-worker loop, what
the driver tells the workers about itself, which checkpoint a resumed stage starts from
(``resume_point``; a damaged one is skipped for the one before it, see ``training.runner``),
and what Ray Train's controller decided when a worker failed (``FailureWatch``, shown by
``training.progress``).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from training import checkpoint as ckpt
from training.progress import describe_failure
from training.trainer import HOLD_ENV, StageSpec, Trainer, process_group

log = logging.getLogger(__name__)


class RayTrainContext:
    """What a Trainer needs from Ray Train: report metrics + checkpoint, the checkpoint to
    resume from, and (for the test hold) which checkpoints Ray Train has registered."""

    def __init__(self) -> None:
        self.resume_note = ""  # which checkpoints were skipped and why (empty: none)
        self.resumed_from: str | None = None  # the checkpoint's folder name (None: fresh)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def registered_checkpoints(self, timeout_s: float | None = None) -> list:
        """Ray Train's kept checkpoints, oldest first, once it has registered every checkpoint
        this worker reported (it registers a report when its controller next polls)."""
        import ray.train

        mode = ray.train.CheckpointConsistencyMode.COMMITTED
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=mode, timeout_s=timeout_s
        )
        return [r.checkpoint for r in reported]

    @contextmanager
    def latest_checkpoint(self):
        """The newest valid checkpoint Ray Train kept (None: start the stage fresh).

        Rank 0 verifies the candidates, newest first, and broadcasts its choice, so every rank
        loads the same one; a damaged one is skipped with a warning in the worker log. None
        usable: ``CheckpointError``."""
        import ray.train
        import torch
        import torch.distributed as dist

        latest = ray.train.get_checkpoint()
        if latest is None:
            yield None
            return
        candidates = [latest] + [
            c for c in reversed(self.registered_checkpoints(timeout_s=60)) if c.path != latest.path
        ]
        rank = dist.get_rank() if dist.is_initialized() else 0
        choice: list[Any] = [None, ""]
        if rank == 0:
            skipped: list[tuple[Path, str]] = []
            for index, candidate in enumerate(candidates):
                with candidate.as_directory() as directory:
                    chosen, skips = ckpt.choose([Path(directory)])
                skipped += [(Path(candidate.path), why) for _, why in skips]
                if chosen is not None:
                    choice = [index, ckpt.skip_note(Path(candidate.path), skipped)]
                    break
            else:
                choice = [None, ckpt.skip_note(None, skipped)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = None
            if torch.cuda.is_available():  # NCCL moves objects through the rank's GPU
                device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            dist.broadcast_object_list(choice, src=0, device=device)
        index, note = choice
        if index is None:
            experiment = Path(latest.path).parent
            raise ckpt.CheckpointError(
                f"no usable checkpoint to resume from in {experiment}: {note}; "
                f"remove {experiment} to start the stage over"
            )
        self.resumed_from = Path(candidates[index].path).name
        if index > 0:
            self.resume_note = note
            if rank == 0:
                log.warning("resume: %s", note)
        with candidates[index].as_directory() as directory:
            yield directory


def stage_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    with process_group():
        Trainer(StageSpec(**config), RayTrainContext()).train()


def failure_watch_class():
    """``FailureWatch``, built on first use: Ray Train's ``ControllerCallback`` (a developer
    API of Ray Train v2) is imported only where a stage runs."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class FailureWatch(ControllerCallback):
        """Runs in Ray Train's controller: when the worker group failed, sends the stage's
        progress channel each failed rank in words and what Ray Train decided (restart the
        workers, or give up), as the controller moves to its next state."""

        def __init__(self, address: dict[str, str], max_failures: int):
            self.address, self.max_failures, self.count = address, max_failures, 0

        def after_controller_state_update(self, previous_state, current_state) -> None:
            # an exception here would fail the run (Ray Train turns it into a ControllerError)
            try:
                self._report(current_state)
            except Exception as e:  # the display only; Ray Train's own handling goes on
                log.warning("could not send the failure to the progress display: %s", e)

        def _report(self, current_state) -> None:
            from ray.train.v2._internal.execution.controller.state import (
                ReschedulingState,
                RestartingState,
                ShuttingDownState,
            )

            if isinstance(current_state, (RestartingState, ReschedulingState)):
                retry, error = True, current_state.training_failed_error
            elif isinstance(current_state, ShuttingDownState):
                error = getattr(current_state.next_state, "training_failed_error", None)
                retry = False
            else:
                return
            if error is None:  # shutting down after success
                return
            failures = getattr(error, "worker_failures", None)
            if failures is not None:
                self.count += 1
                described = {rank: describe_failure(e) for rank, e in sorted(failures.items())}
            else:  # the controller's own error
                cause = getattr(error, "controller_failure", error)
                described = {"controller": describe_failure(cause)}
            record = {
                "kind": "failure",
                "retry": retry,
                "retryable": failures is not None,
                "count": self.count,
                "max_failures": self.max_failures,
                "failures": described,
            }
            import ray

            # waited for: the driver must see it before fit() returns or raises
            channel = ray.get_actor(self.address["name"], namespace=self.address["namespace"])
            ray.get(channel.push.remote(record), timeout=30)

    return FailureWatch


# Ray's placement strategies for a stage's workers: PACK (Ray's default: as few nodes as
# possible, fast collectives), SPREAD (across nodes where it can: one node's loss takes fewer
# workers), and the STRICT_ forms that fail rather than bend.
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def run_stage(
    spec: StageSpec,
    workers: int,
    run_name: str,
    storage: str,
    use_gpu: bool,
    max_failures: int = 3,
    progress: dict[str, str] | None = None,
    placement: str = "PACK",
):
    """``progress``: a ``StageFeed.address`` that rank 0 and the controller report to;
    ``placement``: how Ray places the workers on the cluster's nodes (``PLACEMENTS``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    callbacks = []
    if progress is not None:
        spec = replace(spec, extra={**spec.extra, "progress": progress})
        callbacks.append(failure_watch_class()(progress, max_failures))
    trainer = TorchTrainer(
        stage_loop,
        train_loop_config=asdict(spec),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, placement_strategy=placement
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def driver_identity() -> dict[str, Any] | None:
    """This process as the workers' ``DriverWatch`` recognises it (None under Ray Client,
    where the driver runs on another machine than the node Ray reports)."""
    import socket

    import psutil
    import ray

    if ray.util.client.ray.is_connected():
        return None
    return {
        "pid": os.getpid(),
        "create_time": psutil.Process().create_time(),
        "host": socket.gethostname(),
        "boot_time": psutil.boot_time(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def hold_request() -> dict[str, Any] | None:
    """``OMNIFORGE_TEST_HOLD=STEP:DIR`` (tests only; see ``trainer.Trainer.hold``)."""
    value = os.environ.get(HOLD_ENV)
    if not value:
        return None
    step, sep, folder = value.partition(":")
    if not sep or not step.isdigit() or not folder:
        raise ValueError(f"{HOLD_ENV}={value!r}: expected STEP:DIR")
    return {"step": int(step), "dir": folder}


def resume_point(experiment: Path | str, stage_label: str) -> tuple[Path | str | None, str] | None:
    """What a resumed stage will start from: (newest valid checkpoint Ray Train kept, note on
    the ones skipped), or None when Ray Train kept nothing (a fresh start).

    Reads Ray Train's run state (``checkpoint_manager_snapshot.json``: the kept checkpoints in
    the order they were registered) and verifies them newest first, as the workers will (in
    object storage ``experiment`` is a URI, and the driver checks the manifests and sizes
    without reading the checkpoints back). A kept directory that was deleted is recreated
    empty (Ray Train refuses to restore a run state naming a missing one) and skipped like
    any damaged checkpoint. None usable: ``CheckpointError``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(experiment))
    snapshot = f"{root}/checkpoint_manager_snapshot.json"
    if not fs.exists(snapshot):
        return None
    try:
        state = json.loads(fs.cat_file(snapshot))
        names = [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
        latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(
            f"{stage_label}: Ray Train's run state {experiment}/checkpoint_manager_snapshot.json "
            f"is unreadable ({e}); remove {experiment} to start the stage over"
        ) from e
    order = [latest] if latest else []
    order += [n for n in reversed(names) if n != latest]
    if not order:
        return None
    if isinstance(experiment, Path):
        candidates: list[Any] = [experiment / name for name in order]
    else:
        candidates = [f"{experiment}/{name}" for name in order]
    for name in order:
        if not fs.exists(f"{root}/{name}"):  # an object store has no empty folder: a marker
            fs.makedirs(f"{root}/{name}", exist_ok=True)
            if not isinstance(experiment, Path):
                fs.pipe_file(f"{root}/{name}/{ckpt.DELETED}", b"")
    chosen, skipped = ckpt.choose(candidates)
    note = ckpt.skip_note(chosen, skipped) if skipped else ""
    if chosen is None:
        raise ckpt.CheckpointError(
            f"{stage_label}: no usable checkpoint to resume from in {experiment}: {note}; "
            f"remove {experiment} to start the stage over"
        )
    return chosen, note


def checkpoint_failure(error: BaseException) -> ckpt.CheckpointError | None:
    """The ``CheckpointError`` a worker failed with inside Ray Train's error, if that is why
    (Ray Train hands the driver each rank's own exception)."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, ckpt.CheckpointError):
            return failure
    return None
