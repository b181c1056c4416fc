"""The training progress display: plain lines every N steps, rates and ETA from the workers'
records, what a failed and restarted worker group looks like, Ray's failures in words, and
whether DeepSpeed is about to compile its op; the driver's feed (a real Ray actor) surviving
errors and never replacing ``fit()``'s. (The driver receiving a real run's records:
``tests/training/test_runner.py``.)"""

from __future__ import annotations

import io
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from training.progress import (
    MAX_POLL_ERRORS,
    StageFeed,
    StageProgress,
    StepReporter,
    describe_failure,
    ninja_up_to_date,
    shm_op_build_dir,
)

LABEL = "stage 1 (align)"


class Lines:
    """A console that keeps what is printed (not a terminal: plain lines); ``wait_for`` waits
    until a line arrives (printed by the feed's thread)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._printed = threading.Condition()

    def print(self, text: str = "", **kwargs) -> None:
        with self._printed:
            self.lines.append(str(text))
            self._printed.notify_all()

    def wait_for(self, line: str, timeout: float = 60.0) -> None:
        with self._printed:
            assert self._printed.wait_for(lambda: line in self.lines, timeout), self.lines


def step(n: int, t: float, samples: int = 4, wait: float = 0.1, task: str = "t2i") -> dict:
    return {"kind": "step", "step": n, "t": t, "task": task, "bucket": "1x64x64",
            "loss": 1.0 / n, "samples": samples, "data_wait": wait}  # fmt: skip


def shown_steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.search(r": step (\d+)/", line))]


def test_plain_lines_every_n_steps_and_at_the_first_and_last():
    console = Lines()
    progress = StageProgress(console, LABEL, steps=12, every_steps=5)
    progress.start()
    progress.handle({"kind": "start", "t": 0.0, "step": 0, "steps": 12, "checkpoint": None})
    for n in range(1, 13):
        progress.handle(step(n, t=float(n)))
    progress.stop()
    assert shown_steps(console.lines) == [1, 5, 10, 12]
    assert console.lines[0].startswith(f"{LABEL}: step 1/12 (8%) | loss 1.0000 | task t2i")
    assert "| bucket 1x64x64" in console.lines[0]


def test_slow_steps_still_show_a_line_every_interval():
    """Worker clocks 40 s apart, a line every 50 steps or 60 s: one line per 2 steps."""
    console = Lines()
    progress = StageProgress(console, LABEL, steps=100, every_steps=50, interval_s=60)
    for n in range(1, 8):
        progress.handle(step(n, t=40.0 * n))
    assert shown_steps(console.lines) == [1, 3, 5, 7]


def test_a_stopped_run_shows_its_last_step_once_when_the_workers_end():
    console = Lines()
    progress = StageProgress(console, LABEL, steps=24, every_steps=10)
    for n in range(1, 7):  # stopped after 6 steps (stop_after)
        progress.handle(step(n, t=float(n)))
    assert progress.line().endswith(", ETA 18s")
    progress.handle({"kind": "end", "t": 6.5, "step": 6})
    assert shown_steps(console.lines) == [1, 6]  # at once, not when the driver stops
    assert "ETA" not in progress.line()  # nobody trains the steps left now
    progress.stop()
    assert shown_steps(console.lines) == [1, 6]


def test_a_display_stopped_without_an_end_shows_the_last_step():
    """Rank 0 killed: no ``end`` record; the driver's stop shows the last step it had."""
    console = Lines()
    progress = StageProgress(console, LABEL, steps=24, every_steps=10)
    for n in range(1, 4):
        progress.handle(step(n, t=float(n)))
    progress.stop()
    assert shown_steps(console.lines) == [1, 3]


def test_rates_and_eta_come_from_the_workers_clock():
    progress = StageProgress(Lines(), LABEL, steps=12, clock=lambda: 0.0)
    for n in range(1, 7):  # 2 s a step, 4 samples a step, data wait 10% then 30%
        progress.handle(step(n, t=2.0 * n, wait=0.1 if n <= 3 else 0.3))
    rate, wait, eta = progress.rates()
    assert rate == pytest.approx(2.0)  # 5 steps x 4 samples over 10 s
    assert wait == pytest.approx(0.2)
    assert eta == pytest.approx(12.0)  # 6 steps left at 2 s each
    assert progress.line().endswith("| 2.0 samples/s | data wait 20% | elapsed 0s, ETA 12s"), (
        progress.line()
    )


def test_the_eta_restarts_with_the_workers():
    """After a restart the pace is measured again from the restarted workers' first step
    (their startup is not a step)."""
    progress = StageProgress(Lines(), LABEL, steps=20)
    for n in range(1, 11):
        progress.handle(step(n, t=float(n)))
    progress.handle({"kind": "start", "t": 500.0, "step": 8, "steps": 20,
                     "checkpoint": "checkpoint_a"})  # fmt: skip
    assert "workers ready at step 8/20" in progress.line()
    progress.handle(step(9, t=600.0))
    assert progress.rates()[2] is None  # one step does not tell
    progress.handle(step(10, t=603.0))
    assert progress.rates()[2] == pytest.approx(30.0)  # 10 steps left at 3 s


def test_a_failed_worker_retried_and_resumed_in_words():
    console = Lines()
    progress = StageProgress(console, LABEL, steps=16, every_steps=100)
    for n in range(1, 11):
        progress.handle(step(n, t=float(n)))
    progress.handle({"kind": "failure", "t": 11.0, "retry": True, "retryable": True,
                     "count": 1, "max_failures": 3,
                     "failures": {0: "died (pid 42, node 10.0.0.5): UNEXPECTED_SYSTEM_EXIT",
                                  1: "failed: RuntimeError: " + "x" * 200}})  # fmt: skip
    progress.handle({"kind": "start", "t": 20.0, "step": 8, "steps": 16,
                     "checkpoint": "checkpoint_2026"})  # fmt: skip
    notes = [line for line in console.lines if ": step " not in line]
    assert notes == [
        f"{LABEL}: training worker failure after step 10: rank 0 died (pid 42, node 10.0.0.5): "
        f"UNEXPECTED_SYSTEM_EXIT; rank 1 then failed: RuntimeError: {'x' * 98}...",
        f"{LABEL}: Ray Train restarts the workers from the last checkpoint "
        "(failure 1 of 3 allowed)",
        f"{LABEL}: workers restarted; resumed from checkpoint checkpoint_2026 (step 8), "
        "steps 9-10 run again",
    ]


def test_the_last_failure_says_the_stage_fails():
    console = Lines()
    progress = StageProgress(console, LABEL, steps=16)
    progress.handle({"kind": "failure", "t": 1.0, "retry": False, "retryable": True,
                     "count": 4, "max_failures": 3,
                     "failures": {1: "failed: NonFiniteError: non-finite loss"}})  # fmt: skip
    assert console.lines == [
        f"{LABEL}: training worker failure before its first step: rank 1 failed: "
        "NonFiniteError: non-finite loss",
        f"{LABEL}: Ray Train does not retry (3 failures allowed, all used): the stage fails",
    ]


def test_a_terminal_gets_one_live_line():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=200)
    progress = StageProgress(console, LABEL, steps=4, every_steps=1)
    assert progress.live_mode
    progress.start()
    for n in range(1, 5):
        progress.handle(step(n, t=float(n)))
        progress.tick()
    progress.stop()
    text = out.getvalue()
    assert f"━ {LABEL}: step 4/4 (100%) | loss 0.2500" in text  # the bar, then the line
    assert text.count(f"{LABEL}: step ") == 1  # redrawn in place, not printed per step


def test_ray_failures_in_one_line():
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import (
        UserExceptionWithTraceback,
        WorkerHealthCheckFailedError,
    )

    context = ActorDiedErrorContext(
        class_name="RayTrainWorker", actor_id=bytes(16), pid=4242, node_ip_address="10.0.0.5",
        error_message="The actor is dead because its worker process has died. Worker exit "
        "type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection "
        "error code 2. End of file. Some common causes include: (1) the process was killed by "
        "the OOM killer due to high memory usage, (2) ray stop --force was called",
    )  # fmt: skip
    died = WorkerHealthCheckFailedError("health check failed", ActorDiedError(context))
    assert describe_failure(died) == (
        "died (pid 4242, node 10.0.0.5): SYSTEM_ERROR, Worker unexpectedly exits with a "
        "connection error code 2. End of file (killed, e.g. by the kernel's OOM killer, or "
        "crashed)"
    )
    raised = UserExceptionWithTraceback(
        ValueError("bad\nbucket"),
        "Traceback (most recent call last):\n  ...\nValueError: bad\nbucket\n",
    )
    assert describe_failure(raised) == "failed: ValueError: bad bucket"


def deepspeed_on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


cpu_deepspeed = pytest.mark.skipif(
    not deepspeed_on_cpu(),
    reason="DeepSpeed's shared-memory op (ShareMemCommBuilder) exists for its CPU accelerator "
    "only; on this machine DeepSpeed uses another, so it compiles no such op",
)


def fresh_process(monkeypatch) -> None:
    """As in a fresh worker process: no op loaded yet (an earlier test of this pytest process
    may have built a DeepSpeed engine, which loads the op and makes the check say "no build")."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})


@cpu_deepspeed
def test_deepspeed_compiles_its_op_into_an_empty_extensions_dir(tmp_path, monkeypatch):
    fresh_process(monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert shm_op_build_dir() == tmp_path / "ext" / "deepspeed_shm_comm"


@cpu_deepspeed
def test_the_op_check_failing_does_not_fail_the_engine_build(tmp_path, monkeypatch, ray_session):
    """A TORCH_EXTENSIONS_DIR that is a file: torch's build folder cannot be made, so the check
    (DeepSpeed's and torch's internals) raises; the engine build goes on without a notice."""
    fresh_process(monkeypatch)
    blocker = tmp_path / "ext"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker))
    with pytest.raises(OSError):
        shm_op_build_dir()
    console, built = Lines(), []
    with StageFeed(StageProgress(console, LABEL, steps=1)) as feed:
        reporter = StepReporter.build(feed.address, rank=0)
        with reporter.building_engine():
            built.append(True)
        reporter.flush()
    assert built == [True] and console.lines == []


def test_the_feed_keeps_polling_after_a_record_it_cannot_show(ray_session, caplog):
    console = Lines()
    with StageFeed(StageProgress(console, LABEL, steps=4), poll_s=0.01) as feed:
        reporter = StepReporter.build(feed.address, rank=0)
        reporter.send("notice")  # no text: the display raises on it
        reporter.send("notice", text="shown all the same")  # drained with it or after it
        console.wait_for(f"{LABEL}: shown all the same")
        reporter.send("notice", text="the thread polls on")
        console.wait_for(f"{LABEL}: the thread polls on")
        assert feed._thread is not None and feed._thread.is_alive()
    warned = [r.getMessage() for r in caplog.records if r.name == "training.progress"]
    assert warned == ["training progress display: KeyError('text'); polling on"]


def test_a_gone_feed_gives_up_and_leaves_fits_error_and_the_terminal_alone(ray_session, caplog):
    """The actor gone (Ray going down): the thread gives up after ``MAX_POLL_ERRORS`` in a
    row, the last poll on exit fails too, and yet ``fit()``'s error is the one raised and the
    live line is stopped."""
    import ray
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    display = StageProgress(console, LABEL, steps=4)
    with (
        pytest.raises(RuntimeError, match="the stage's own error"),
        StageFeed(display, poll_s=0.01) as feed,
    ):
        assert display._live is not None and display._live.is_started
        ray.kill(feed._actor)
        assert feed._thread is not None
        feed._thread.join(timeout=120)
        assert not feed._thread.is_alive()
        raise RuntimeError("the stage's own error")
    assert display._live is None  # stopped: the terminal is the user's again
    warned = [r.getMessage() for r in caplog.records if r.name == "training.progress"]
    assert warned[0].startswith("training progress display: ")
    assert warned[1].startswith(
        f"training progress display gave up after {MAX_POLL_ERRORS} errors in a row: "
    )
    assert warned[2].startswith("training progress display, its last records: ")
    assert len(warned) == 3


def test_a_build_is_up_to_date_when_ninja_has_nothing_to_do(tmp_path):
    """What torch's JIT build will find, with real ninja on a one-rule build."""
    (tmp_path / "op.cpp").write_text("int x;\n")
    (tmp_path / "build.ninja").write_text(
        "rule cp\n  command = cp $in $out\nbuild op.so: cp op.cpp\n"
    )
    assert not ninja_up_to_date(tmp_path, "op")  # never built
    subprocess.run(["ninja", "-C", str(tmp_path)], check=True, capture_output=True)
    assert ninja_up_to_date(tmp_path, "op")
    stat = (tmp_path / "op.so").stat()
    os.utime(tmp_path / "op.cpp", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not ninja_up_to_date(tmp_path, "op")  # a changed source rebuilds
    assert not ninja_up_to_date(Path(tmp_path / "missing"), "op")
