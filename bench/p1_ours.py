"""P1's "ours" side: ``run_curation`` (full) and the cheap filters on the engine, timed in a
subprocess (``python -m bench.p1_ours``) with a deadline per run: a run past it is recorded as
hung and the subprocess exits with its tree. Every run (warm-up and timed) gets a fresh local
Ray of N CPUs, as each ``omniforge curate run`` does: its start (``ray.init``) is timed on its
own, the run's time starts when Ray is up and includes starting the run's workers.
P1-peer times its equivalent run here too. What is measured and why: ``bench.p1_curation``.

``SETTINGS`` / ``config`` are P1's config (also P1-resume's); the Pool baseline
(``bench.p1_pool``) runs the same config object.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from bench.clips import COPIES, clip_set, large_set
from bench.harness import Context, log
from curation.stages.base import Stage

SETTINGS = ["select.min_short_side=128"]
CHEAP_STAGES = ("probe", "split", "frames", "select")
# P1-peer: the ops Data-Juicer runs too (resolution, aspect, scene split, motion): OCR off
PEER_EQUIVALENT = ["ocr.enabled=false", "select.max_ocr_area=null"]


def config(extra: list[str] = ()):
    from core.config import load_config
    from curation.config import CurationConfig

    return load_config(CurationConfig, None, [*SETTINGS, *extra])


def start_ray(workers: int) -> float:
    import ray

    start = time.perf_counter()
    ray.init(
        num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    return time.perf_counter() - start


class Ours:
    """run_curation into a fresh output folder each run (a rerun would resume, not work)."""

    def __init__(self, inputs: Path, tmp: Path, cfg):
        from catalog.store import Catalog

        self.inputs, self.tmp, self.cfg = inputs, tmp, cfg
        tmp.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(f"sqlite:///{tmp / 'catalog.db'}")
        self.n = 0

    def __call__(self) -> dict[str, Any]:
        from curation.pipeline import run_curation

        self.n += 1
        res = run_curation(
            str(self.inputs), self.tmp / f"out-{self.n}", self.cfg, catalog=self.catalog
        )
        return {"counts": res.summary.get("run"), "rows": res.version.num_samples}


class Unwritten(Stage):
    """The cheap run writes no samples (no re-encoding): accepted rows are recorded as
    rejected ``bench_cheap`` so that the sink writes the index only."""

    name = "unwritten"

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("status") != "accepted":
            return row
        return {**row, "status": "rejected", "reasons": ["bench_cheap: not written"]}


class OursCheap:
    """Probe + split + frames + select on the engine with the real sink, no models."""

    def __init__(self, inputs: Path, tmp: Path, cfg):
        self.inputs, self.tmp, self.cfg = inputs, tmp, cfg
        self.n = 0

    def __call__(self) -> int:
        from curation.engine import run_blocks
        from curation.journal import Journal
        from curation.pipeline import build_stages
        from curation.sink import BlockSink
        from curation.sources import list_inputs

        self.n += 1
        out = self.tmp / f"cheap-{self.n}"
        stages = [s for s in build_stages(self.cfg)[0] if s.name in CHEAP_STAGES]
        stages.append(Unwritten())
        rows = list_inputs(str(self.inputs), self.cfg.kind)
        sink = BlockSink(str(out), "cheap", self.cfg.shards.max_samples, self.cfg.shards.max_bytes)
        run_blocks(rows, stages, sink, Journal(str(out)))
        return len(rows)


# -- in a watched subprocess ------------------------------------------------------------------

# what the ours subprocess times, per mode: figure -> (clip set, runner, extra settings)
MODES = {
    "p1": {
        "ours_full_small": ("small", Ours, []),
        "ours_full_large": ("large", Ours, []),
        "ours_cheap_small": ("small", OursCheap, []),
        "ours_cheap_large": ("large", OursCheap, []),
    },
    "p1-1w": {"ours_full_small": ("small", Ours, [])},
    "peer": {"ours_equivalent": ("small", Ours, PEER_EQUIVALENT)},
}


def ours_child(
    mode: str, workers: int, quick: bool, warmup: int, repeats: int, deadline: float, out: Path
):
    """Time ours (each figure of ``MODES[mode]``) on a fresh local Ray of ``workers`` CPUs;
    results go to ``out`` after every run. A run that passes ``deadline`` seconds is recorded
    as hung and the process exits, killing the Ray processes it started."""
    import json
    import threading

    import ray

    from bench.harness import WORK
    from bench.memory import TreeMemory

    small, _ = clip_set(WORK, quick)
    sets = {"small": small, "large": large_set(small, 2 if quick else COPIES)}
    inits: list[float] = []
    result: dict[str, Any] = {"ray_init_s": inits}

    def save() -> None:
        out.write_text(json.dumps(result, default=str))

    for name, (which, runner, extra) in MODES[mode].items():
        tmp = Context().tmp(f"p1-ours-{mode}-w{workers}-{name}")
        fn = runner(sets[which], tmp, config(extra))
        runs: list[float] = []
        result[name] = {"runs_s": runs}
        # memory only where its goal is, and during the warm-up run (untimed) when there is
        # one: sampling every process's smaps takes CPU from the run it watches (about a tenth
        # of a run on 2 CPUs)
        memory = TreeMemory(os.getpid()) if name == "ours_full_large" else None
        if memory is not None:
            memory.start()
        for i in range(warmup + repeats):
            if memory is not None and warmup and i == warmup:
                result[name]["peak_mb"] = memory.stop()
                memory = None
            box: dict[str, Any] = {}
            inits.append(start_ray(workers))

            def target(fn=fn, box=box) -> None:
                try:
                    box["out"] = fn()
                except BaseException as e:  # noqa: BLE001 - reported in the result
                    box["error"] = f"{type(e).__name__}: {e}"

            t0 = time.perf_counter()
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            thread.join(deadline)
            elapsed = time.perf_counter() - t0
            if thread.is_alive():
                result[name]["error"] = (
                    f"run {i + 1} did not finish in {deadline:.0f} s on a {workers}-CPU Ray (hung)"
                )
                save()
                _exit_with_tree()
            ray.shutdown()
            if "error" in box:
                result[name]["error"] = box["error"]
                break
            log(f"  {name}, {workers} worker(s) {'warm-up' if i < warmup else 'run'}: "
                f"{elapsed:.2f} s")  # fmt: skip
            if i >= warmup:
                runs.append(elapsed)
                result[name]["out"] = box.get("out")
            save()
        if memory is not None:
            result[name]["peak_mb"] = memory.stop()
    save()


def _exit_with_tree() -> None:
    """Exit now, killing what this process started (Ray's raylet, GCS and agents)."""
    import signal

    from bench.memory import process_tree

    me = os.getpid()
    for pid in reversed(process_tree(me)):
        if pid != me:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    os._exit(0)


def time_ours(
    ctx: Context, workers: int, deadline: float, mode: str = "p1", repeats: int | None = None
) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    from bench.harness import REPO

    out = ctx.tmp(f"p1-ours-result-{mode}-w{workers}") / "result.json"
    cmd = [sys.executable, "-m", "bench.p1_ours", mode, str(workers), str(int(ctx.quick))]
    repeats = ctx.repeats if repeats is None else repeats
    cmd += [str(ctx.warmup), str(repeats), str(deadline), str(out)]
    runs = len(MODES[mode]) * (ctx.warmup + repeats)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(cmd, cwd=REPO, timeout=runs * deadline + 120, check=False)
    return json.loads(out.read_text()) if out.exists() else {}


if __name__ == "__main__":
    import sys

    mode, w, q, wu, rep, dl, path = sys.argv[1:8]
    ours_child(mode, int(w), bool(int(q)), int(wu), int(rep), float(dl), Path(path))
