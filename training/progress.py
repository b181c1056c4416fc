"""Progress of a training stage while Ray Train's ``fit()`` runs: what the workers report and
what the driver shows of it.

Rank 0 sends one record per step (step, loss, task, bucket, samples, data wait, its clock) to
a small Ray actor the driver starts for the stage (``StageFeed``); Ray Train's controller adds
what it decided when a worker failed (``ray_stage.FailureWatch``). A driver thread drains the
actor twice a second into ``StageProgress``. On a terminal: one live line (rich) with step /
steps, loss, task, bucket, samples/s, data wait, elapsed and ETA. Off a terminal (job logs,
CI): that line every ``every_steps`` steps (and at a stage's first and last step, and at least
every ``interval_s`` seconds of training). Notices (compiling DeepSpeed's op, a worker that died,
whether Ray Train retried it, the checkpoint the restarted workers resumed from) are printed as
they happen in both modes.

Records are plain dicts (they cross processes); ``kind`` says which: ``notice`` (text),
``start`` (step the workers start from, steps, checkpoint), ``step``, ``failure`` (Ray Train's
decision and each failed rank), ``end`` (rank 0 left the training loop: done, stopped on
purpose or failed; the line shows its last step and drops the ETA).

The display never fails the stage: the driver's thread survives a transient error (it gives up
after ``MAX_POLL_ERRORS`` in a row, saying so), and leaving ``StageFeed`` keeps ``fit()``'s
exception, stopping the display whatever else fails.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.fmt import clock

log = logging.getLogger(__name__)

PLAIN_EVERY_STEPS = 10
PLAIN_INTERVAL_S = 60.0  # off a terminal, slow steps still show a line this often
POLL_S = 0.5
MAX_POLL_ERRORS = 20  # errors in a row after which the driver's thread stops polling
WINDOW = 10  # steps the samples/s and data wait figures are averaged over


# -- the workers' side -------------------------------------------------------------------------


class StepReporter:
    """Rank 0's records to the stage's channel; a no-op on other ranks and without a channel
    (``Trainer`` outside ``train run``). Records are sent without waiting (Ray runs one caller's
    calls to an actor in order); ``flush`` waits until every record sent so far has arrived."""

    def __init__(self, channel: Any = None):
        self.channel = channel

    @classmethod
    def build(cls, address: dict[str, str] | None, rank: int) -> StepReporter:
        """``address``: ``StageFeed.address`` (``StageSpec.extra["progress"]``)."""
        if not address or rank != 0:
            return cls(None)
        import ray

        return cls(ray.get_actor(address["name"], namespace=address["namespace"]))

    def send(self, kind: str, **fields: Any) -> None:
        if self.channel is not None:
            self.channel.push.remote({"kind": kind, "t": time.time(), **fields})

    def flush(self) -> None:
        if self.channel is None:
            return
        import ray

        try:
            ray.get(self.channel.received.remote(), timeout=30)
        except Exception as e:  # the display only: training goes on (a gone driver is
            log.warning("progress display unreachable: %s", e)  # DriverWatch's to handle)

    @contextmanager
    def building_engine(self):
        """Around ``deepspeed.initialize``: says so before DeepSpeed compiles its shared-memory
        op (about 100 s on 2 CPUs, once per ``TORCH_EXTENSIONS_DIR``) and how long it took.
        Whether it will compile is read from DeepSpeed's internals (``shm_op_build_dir``): if
        they changed, there is no notice, and training goes on."""
        folder = None
        if self.channel is not None:
            try:
                folder = shm_op_build_dir()
            except Exception as e:  # a display nicety: never a reason to fail the stage
                log.debug("cannot tell whether DeepSpeed compiles its op: %r", e)
        if folder is None:
            yield
            return
        self.send(
            "notice",
            text=f"compiling DeepSpeed's shared-memory op once into {folder} "
            "(up to about 2 min on 2 CPUs; later runs reuse it)",
        )
        start = time.monotonic()
        yield
        self.send("notice", text=f"DeepSpeed's op compiled in {time.monotonic() - start:.0f} s")

    def start(self, step: int, steps: int, checkpoint: str | None) -> None:
        """The workers start at ``step`` (after ``checkpoint``, None: a fresh stage)."""
        self.send("start", step=step, steps=steps, checkpoint=checkpoint)

    def step(self, step: int, task: str, bucket: Any, metrics: dict[str, Any], samples: int):
        self.send(
            "step",
            step=step,
            task=task,
            bucket=str(bucket),
            loss=metrics["loss"],
            samples=samples,
            data_wait=metrics["data_wait_fraction"],
        )

    def close(self, step: int) -> None:
        self.send("end", step=step)
        self.flush()


def shm_op_build_dir() -> Path | None:
    """The folder DeepSpeed is about to compile its shared-memory op into, or None when it
    will not compile it here: no such op for this accelerator, the op is pre-installed or
    already loaded, or its build in ``TORCH_EXTENSIONS_DIR`` is up to date.

    Mirrors ``deepspeed.comm.torch.build_shm_op`` and ``OpBuilder.load``; "up to date" is
    what torch's JIT build will find: the built library is there and ninja has nothing to do
    (a changed source, as after a DeepSpeed upgrade, rebuilds)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if installed_ops.get(builder.NAME, False) or builder.NAME in OpBuilder._loaded_ops:
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    return None if ninja_up_to_date(folder, builder.NAME) else folder


def ninja_up_to_date(folder: Path, name: str) -> bool:
    """``folder/name.so`` exists and ``ninja -n`` there has no work to do."""
    if not (folder / f"{name}.so").exists() or not (folder / "build.ninja").exists():
        return False
    try:
        done = subprocess.run(
            ["ninja", "-n", "-C", str(folder)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False  # torch will need ninja too and say so; announce the build
    return done.returncode == 0 and "no work to do" in done.stdout


# -- Ray Train's failures, in words ------------------------------------------------------------

_FIELD = re.compile(r"^\s*(pid|ip): (\S+)\s*$", re.M)
_EXIT = re.compile(r"Worker exit type: (\S+)\s+Worker exit detail: (.*)", re.S)
# Ray's list of possible causes when a worker process vanished without a word (SIGKILL)
_GUESSES = re.compile(r"\.?\s*(Some common causes include|There are some potential root causes)")


def describe_failure(error: BaseException) -> str:
    """One line for one rank's failure in a ``WorkerGroupError``: a worker process that died
    (pid, node, Ray's exit type and detail) or the exception the training code raised."""
    from ray.exceptions import RayActorError

    inner = getattr(error, "health_check_failure", None) or getattr(error, "_base_exc", None)
    inner = inner or error
    if isinstance(inner, RayActorError):
        text = getattr(inner, "error_msg", "") or str(inner)
        fields = dict(_FIELD.findall(text))
        names = {"pid": "pid", "ip": "node"}
        where = ", ".join(f"{names[k]} {fields[k]}" for k in names if k in fields)
        exit_ = _EXIT.search(text)
        if exit_:
            detail, guesses = exit_.group(2), _GUESSES.search(exit_.group(2))
            if guesses:
                detail = detail[: guesses.start()]
            why = f"{exit_.group(1)}, {' '.join(detail.split())[:300]}"
            if guesses:  # Ray cannot tell which
                why += " (killed, e.g. by the kernel's OOM killer, or crashed)"
        else:
            why = " ".join(text.split())[:300]
        if getattr(inner, "preempted", False):
            why = "its node was preempted; " + why
        return f"died{f' ({where})' if where else ''}: {why}"
    return f"failed: {type(inner).__name__}: {' '.join(str(inner).split())[:300]}"


# -- the driver's side -------------------------------------------------------------------------


class _Channel:
    """The stage's mailbox (a Ray actor): workers and the controller push, the driver drains."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.count = 0

    def push(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.count += 1

    def drain(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out

    def received(self) -> int:
        return self.count


class StageProgress:
    """The display of one stage, fed with records (``handle``) and ticked by the feed."""

    def __init__(
        self,
        console: Any,
        label: str,
        steps: int,
        every_steps: int = PLAIN_EVERY_STEPS,
        interval_s: float = PLAIN_INTERVAL_S,
        live: bool | None = None,
        clock=time.monotonic,
    ):
        if every_steps < 1:
            raise ValueError(f"--progress-every must be at least 1, got {every_steps}")
        self.console, self.label, self.steps = console, label, steps
        self.every_steps, self.interval_s = every_steps, interval_s
        self.clock = clock
        self.start_t = clock()
        self.last: dict[str, Any] | None = None  # latest step record
        self.start_step: int | None = None  # where the workers (re)started
        self.attempt_first: dict[str, Any] | None = None  # first step record of this attempt
        self.window: deque[dict[str, Any]] = deque(maxlen=WINDOW)
        self.ended = False  # rank 0 left the training loop (an "end" record), until a restart
        self.failed_at: int | None = None  # last step before a failure, until the restart
        self.printed: tuple[int, float] | None = None  # (step, worker time) of the last line
        tty = bool(console is not None and getattr(console, "is_terminal", False))
        self.live_mode = tty if live is None else live
        self._live: Any = None

    # -- events --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.console is not None and self.live_mode:
            from rich.live import Live

            self._live = Live(self._render(), console=self.console, refresh_per_second=2)
            self._live.start()

    def handle(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "notice":
            self.say(record["text"])
        elif kind == "start":
            self._started(record)
        elif kind == "step":
            self._stepped(record)
        elif kind == "failure":
            self._failed(record)
        elif kind == "end":
            self._ended()

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"{self.label}: {text}", highlight=False)

    def tick(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            try:
                live.update(self._render())
            finally:  # the terminal gets its cursor back whatever the last render did
                live.stop()
        elif self.last is not None and self.printed and not self._last_printed():
            self._print_line()

    # -- state ---------------------------------------------------------------------------------

    def _started(self, record: dict[str, Any]) -> None:
        step, checkpoint = record["step"], record.get("checkpoint")
        self.attempt_first, self.printed, self.start_step = None, None, step
        self.ended = False
        self.window.clear()
        if self.failed_at is not None:  # Ray Train restarted the workers
            if checkpoint is None:
                self.say("workers restarted from the start of the stage (no checkpoint yet)")
            else:
                again = f", steps {step + 1}-{self.failed_at} run again"
                self.say(
                    f"workers restarted; resumed from checkpoint {checkpoint} (step {step})"
                    + (again if self.failed_at > step else "")
                )
            self.failed_at = None
        elif checkpoint is not None:
            self.say(f"resuming from checkpoint {checkpoint} (step {step})")

    def _stepped(self, record: dict[str, Any]) -> None:
        if self.attempt_first is None:
            self.attempt_first = record
        self.last = record
        self.window.append(record)
        if not self.live_mode and self._line_due(record):
            self._print_line()

    def _ended(self) -> None:
        """Rank 0 left the loop: no ETA from here (a run stopped by ``stop_after`` has steps
        left that nobody trains now), and off a terminal its last step is shown at once, not
        when the driver stops the display."""
        self.ended = True
        if not self.live_mode and self.last is not None and not self._last_printed():
            self._print_line()

    def _last_printed(self) -> bool:
        return (
            self.printed is not None
            and self.last is not None
            and (self.printed[0] == self.last["step"])
        )

    def _failed(self, record: dict[str, Any]) -> None:
        self.failed_at = self.last["step"] if self.last else 0
        at = f" after step {self.failed_at}" if self.last else " before its first step"
        failures = record["failures"]
        died = [rank for rank, text in failures.items() if text.startswith("died")]
        parts = []
        for rank, text in failures.items():
            if rank == "controller":
                parts.append(f"Ray Train's controller {text}")
            elif died and rank not in died:  # most likely lost its peer: the short of it
                parts.append(f"rank {rank} then {text[:120]}" + ("..." if len(text) > 120 else ""))
            else:
                parts.append(f"rank {rank} {text}")
        ranks = "; ".join(parts)
        self.say(f"training worker failure{at}: {ranks}")
        limit = record["max_failures"]
        if record["retry"]:
            self.say(
                f"Ray Train restarts the workers from the last checkpoint "
                f"(failure {record['count']} of {limit} allowed)"
            )
        else:
            self.say(
                "Ray Train does not retry "
                + (f"({limit} failures allowed, all used)" if record.get("retryable") else "")
                + ": the stage fails"
            )

    def _line_due(self, record: dict[str, Any]) -> bool:
        step = record["step"]
        if self.printed is None or step == self.steps or step % self.every_steps == 0:
            return True
        return record["t"] - self.printed[1] >= self.interval_s

    def _print_line(self) -> None:
        assert self.last is not None
        self.printed = (self.last["step"], self.last["t"])
        if self.console is not None:
            self.console.print(self.line(), highlight=False)

    # -- rendering -----------------------------------------------------------------------------

    def rates(self) -> tuple[float | None, float | None, float | None]:
        """(samples per second and data wait fraction over the last ``WINDOW`` steps, seconds
        left at this attempt's pace; None where one step does not tell)."""
        rate = wait = eta = None
        w = list(self.window)
        if len(w) >= 2 and w[-1]["t"] > w[0]["t"]:
            rate = sum(r["samples"] for r in w[1:]) / (w[-1]["t"] - w[0]["t"])
        if w:
            wait = sum(r["data_wait"] for r in w) / len(w)
        first, last = self.attempt_first, self.last
        if first and last and last["step"] > first["step"] and last["t"] > first["t"]:
            per_step = (last["t"] - first["t"]) / (last["step"] - first["step"])
            eta = max(0, self.steps - last["step"]) * per_step
        return rate, wait, eta

    def line(self) -> str:
        elapsed = f"elapsed {clock(self.clock() - self.start_t)}"
        r = self.last
        if r is None and self.start_step is None:
            return f"{self.label}: starting the workers | {elapsed}"
        if r is None or self.start_step is not None and self.attempt_first is None:
            return f"{self.label}: workers ready at step {self.start_step}/{self.steps} | {elapsed}"
        rate, wait, eta = self.rates()
        pct = 100.0 * r["step"] / self.steps if self.steps else 100.0
        return (
            f"{self.label}: step {r['step']}/{self.steps} ({pct:.0f}%)"
            f" | loss {r['loss']:.4f} | task {r['task']} | bucket {r['bucket']}"
            + (f" | {rate:.1f} samples/s" if rate is not None else "")
            + (f" | data wait {100 * wait:.0f}%" if wait is not None else "")
            + f" | {elapsed}"
            + (f", ETA {clock(eta)}" if eta is not None and self._eta_due(r) else "")
        )

    def _eta_due(self, record: dict[str, Any]) -> bool:
        return not self.ended and record["step"] < self.steps

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        done = self.last["step"] if self.last else 0
        row = Table.grid(padding=(0, 1))  # one line: the bar, then the figures (wrapped)
        row.add_column(width=30, no_wrap=True)
        row.add_column()
        row.add_row(ProgressBar(total=max(self.steps, 1), completed=done), Text(self.line()))
        return row


class StageFeed:
    """The channel of one stage and the driver thread that drains it into ``display``.

    ``with StageFeed(display) as feed:`` starts a named Ray actor (no CPU) on the driver's
    node (a worker node may be lost mid-stage; the driver's cannot be without the driver),
    whose ``address`` goes to the workers (``StageSpec.extra["progress"]``) and to Ray
    Train's controller; on exit the thread stops, the last records are shown, the actor is
    killed and the display stops (also when ``fit()`` raised: a failure's records come first,
    and ``fit()``'s error is the one that propagates, whatever the display's own teardown runs
    into)."""

    def __init__(self, display: StageProgress, poll_s: float = POLL_S):
        self.display, self.poll_s = display, poll_s
        self.address: dict[str, str] = {}
        self._actor: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> StageFeed:
        import ray

        name = f"omniforge-progress-{uuid.uuid4().hex[:12]}"
        namespace = ray.get_runtime_context().namespace
        options: dict[str, Any] = {"name": name, "namespace": namespace}
        # The channel lives where the driver does, so that losing a worker node does not take
        # the display (and the restart it would report) with it: the driver's node, pinned
        # (a soft pin is not kept: on a cluster whose head offers no CPUs, Ray placed it on a
        # worker node), or the head for a Ray Client driver, which is on no node.
        if ray.util.client.ray.is_connected():
            options["resources"] = {"node:__internal_head__": 0.001}
        else:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        self._actor = ray.remote(num_cpus=0)(_Channel).options(**options).remote()
        ray.get(self._actor.received.remote())  # started before any worker looks it up
        self.address = {"name": name, "namespace": namespace}
        self.display.start()
        self._thread = threading.Thread(target=self._run, name="train-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        """Polls until ``__exit__``. An error (a slow or restarting actor, a record the display
        cannot show) is logged once per run of errors and polling goes on; after
        ``MAX_POLL_ERRORS`` in a row (Ray going away under us: the stage's own error tells)
        the thread gives up and says so."""
        errors = 0
        while not self._stop.wait(self.poll_s):
            try:
                self.pump()
            except Exception as e:
                errors += 1
                if errors == 1:
                    log.warning("training progress display: %r; polling on", e)
                if errors >= MAX_POLL_ERRORS:
                    log.warning(
                        "training progress display gave up after %d errors in a row: %r",
                        errors,
                        e,
                    )
                    return
            else:
                errors = 0

    def pump(self) -> None:
        """Shows the records sent since the last call. A record the display cannot show does
        not hold back the ones after it (they are drained already): the first such error is
        raised once all are handled."""
        import ray

        error: Exception | None = None
        with self._lock:
            for record in ray.get(self._actor.drain.remote(), timeout=30):
                try:
                    self.display.handle(record)
                except Exception as e:
                    error = error or e
            self.display.tick()
        if error is not None:
            raise error

    def __exit__(self, *exc: Any) -> None:
        """Each step of the teardown on its own: an error here is logged, never raised (it
        would replace ``fit()``'s exception, which the runner reads), and the display always
        stops (rich's live line would otherwise stay on the terminal)."""
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.pump()  # the records sent since the last poll (a failure's come last)
        except Exception as e:
            log.warning("training progress display, its last records: %r", e)
        try:
            ray.kill(self._actor)
        except Exception as e:
            log.warning("training progress display: its actor could not be ended: %r", e)
        try:
            self.display.stop()
        except Exception as e:  # its live line is stopped all the same (StageProgress.stop)
            log.warning("training progress display: its last line failed: %r", e)
