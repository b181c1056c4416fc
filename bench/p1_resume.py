"""P1-resume: kill the driver when half the inputs are committed, rerun, and count what the
rerun does again.

Inputs and config: P1's large set (the 14-clip set eight times, 112 clips) and P1's settings,
``omniforge curate run`` as a user runs it (its own local Ray on the machine's CPUs), into a
fresh output folder. The driver is watched through its journal (``_work/blocks``: a recorded
event, not a clock): as soon as the committed inputs reach half, the driver is stopped
(SIGSTOP, so nothing more is committed) and its whole process tree killed (SIGKILL). Then the
same command runs again.

- inputs the rerun processes (from its ``summary.json``: ``run.inputs_this_run``) against the
  inputs that were not committed at the kill: equal means nothing committed was done twice;
  the work lost to the kill is the blocks that were in flight, which the rerun does again.
- the rerun's wall time (start-up, the other half, pack, commit, report) against the time
  the first run took to commit its first half.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.clips import COPIES, clip_set, large_set
from bench.harness import Context, Row, log, ratio
from bench.p1_ours import SETTINGS


def committed(out: Path) -> int:
    from curation.journal import Journal

    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return len(Journal.committed_inputs(Journal(str(out)).records()))
    return 0


def kill_tree(pid: int) -> None:
    import psutil

    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGSTOP)
    for p in proc.children(recursive=True) + [proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def run(ctx: Context) -> list[Row]:
    small, _ = clip_set(ctx.work, ctx.quick)
    inputs = large_set(small, 2 if ctx.quick else COPIES)
    total = sum(1 for p in inputs.rglob("*") if p.is_file())
    tmp = ctx.tmp("p1-resume")
    out = tmp / "out"
    cmd = [str(Path(sys.executable).with_name("omniforge")), "curate", "run"]
    cmd += ["--input", str(inputs), "--output", str(out)]
    cmd += ["--catalog", f"sqlite:///{tmp / 'catalog.db'}"]
    for s in SETTINGS:
        cmd += ["--set", s]
    log(f"  first run on {total} inputs, killed at half")
    start = time.perf_counter()
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp)
    while driver.poll() is None and committed(out) < total / 2:
        time.sleep(0.1)
    t_half = time.perf_counter() - start
    if driver.poll() is not None:
        err = driver.stderr.read().decode()[-500:] if driver.stderr else ""
        return [Row("P1-resume", "(case)", error=f"the first run ended before half: {err}")]
    kill_tree(driver.pid)
    driver.wait()
    done = committed(out)
    log(f"  killed after {t_half:.1f} s with {done} of {total} inputs committed; rerun")
    start = time.perf_counter()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=1800)
    t_rerun = time.perf_counter() - start
    if rerun.returncode != 0:
        return [Row("P1-resume", "(case)", error=f"rerun failed: {rerun.stderr[-500:]}")]
    summary = json.loads((out / "summary.json").read_text())
    processed = summary["run"]["inputs_this_run"]
    ctx.details.update(
        total=total, committed_at_kill=done, t_half_s=t_half, t_rerun_s=t_rerun, run=summary["run"]
    )
    return [
        Row(
            "P1-resume",
            "inputs the rerun processes (driver killed at half)",
            processed,
            "inputs",
            "inputs not committed at the kill",
            total - done,
            ratio(processed, total - done),
            "<= 1.0",
            note=f"{done} of {total} committed when killed; {summary['run'].get('blocks')} "
            "blocks in the rerun",
        ),
        Row(
            "P1-resume",
            "rerun wall time vs the first half",
            t_rerun,
            "s",
            "time to commit the first half",
            t_half,
            ratio(t_rerun, t_half),
            note="the rerun does the other half plus start-up, pack, catalog commit and report",
        ),
    ]
