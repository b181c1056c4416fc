"""P1 curation throughput: ``run_curation`` on the streaming engine vs a ``multiprocessing.Pool``
running the very same stage functions and sink, and cheap filters vs decode-only.

Inputs: the fixed clip set (``bench/clips.py``: 14 clips, ~56 s of video) and the same set
eight times under other names (112 clips; hard links, so the page cache is shared). Config:
the default profile with the demo's size floor (``select.min_short_side=128``, so the small
synthetic clips reach the shards); the block size is automatic; aesthetic and watermark are
skipped as in the default profile without weights, so the model stage is OCR (RapidOCR's
shipped model) in its actor pool.

- ours (full): ``curation.pipeline.run_curation`` end to end (list inputs, every stage on the
  engine, blocks written and committed as they finish, pack into shards, final index, catalog
  commit with every shard verified, report) on a local Ray of N CPUs. Each run starts its own
  workers (actors: imports + ``setup()``), which is in its time; starting Ray itself
  (``ray.init``) is measured once and reported on its own row.
- baseline (a): what a data engineer writes instead: ``multiprocessing.Pool(N)`` whose
  initializer builds the same stages (``build_stages``) and calls ``setup()``; one task per
  input runs the same ``process_batch`` functions in the same order and writes the input with
  the same sink (``BlockSink``); the parent then packs with the same code (``curation.pack``).
  No catalog, no report, no Ray. Its time includes starting and setting up the pool (spawn),
  as ours includes its workers.
- ours (cheap filters): probe + scene split + frame sampling + select through the engine
  (``curation.engine.run_blocks``) with the real sink, no model stage, no re-encoding.
- baseline (b), the limit for cheap filters: decode every frame of every input once to RGB
  (PyAV, one process per worker): scene detection has to look at every frame, so no pipeline
  that splits scenes can go faster.
- peak memory: the summed PSS of ours' process tree (driver, Ray, every worker) during the
  112-clip full runs, sampled every 0.25 s (only there: the sampler's own CPU would slow the
  cheap run it watched).

Throughput: input clips per second and input video-seconds per second. Ours runs in its own
subprocess per worker count (a fresh local Ray of N CPUs) with a deadline per run: a run past
it is reported as hung and that worker count's remaining runs are skipped. The 1-worker figure
(scaling) runs the 14-clip set only.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.clips import clip_set, totals
from bench.harness import Context, Row, log, ratio
from curation.stages.base import Stage

SETTINGS = ["select.min_short_side=128"]
CHEAP_STAGES = ("probe", "split", "frames", "select")
# P1-peer: the ops Data-Juicer runs too (resolution, aspect, scene split, motion): OCR off
PEER_EQUIVALENT = ["ocr.enabled=false", "select.max_ocr_area=null"]
COPIES = 8  # the large set: the clip set this many times
MEMORY_GOAL_MB = 2048


def config(extra: list[str] = ()):
    from catalog.config import load_config
    from curation.config import CurationConfig

    return load_config(CurationConfig, None, [*SETTINGS, *extra])


def large_set(inputs: Path, copies: int = COPIES) -> Path:
    """``copies`` hard-linked copies of the clip set under other names (made once)."""
    root = inputs.parent.parent / f"{inputs.parent.name}-x{copies}" / "inputs"
    if root.exists():
        return root
    tmp = root.with_name("inputs.tmp")
    for i in range(copies):
        for p in sorted(inputs.rglob("*")):
            if p.is_file():
                dst = tmp / f"copy{i}" / p.relative_to(inputs)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, dst)
    tmp.rename(root)
    return root


# -- ours -----------------------------------------------------------------------------------------


def start_ray(workers: int) -> float:
    import ray

    if ray.is_initialized():
        ray.shutdown()
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


# -- the Pool baseline ----------------------------------------------------------------------------

_STAGES: list = []


def _pool_init(cfg_data: dict) -> None:
    from curation.config import CurationConfig
    from curation.pipeline import build_stages

    stages, _ = build_stages(CurationConfig.model_validate(cfg_data))
    for s in stages:
        s.setup()
    _STAGES[:] = stages


def _pool_one(args: tuple) -> Any:
    from curation.journal import BlockRecord, block_id
    from curation.sink import BlockSink

    out, max_samples, max_bytes, row = args
    rows = [row]
    for stage in _STAGES:
        rows = stage.process_batch(rows)
    block = block_id([row["input_id"]])
    written = BlockSink(out, "pool", max_samples, max_bytes).write(block, rows)
    return BlockRecord(block, [row["input_id"]], written)


def pool_full(inputs: Path, out: Path, cfg, workers: int) -> int:
    """Start a Pool, run every input through the stages and the sink, pack; its full time."""
    from curation.pack import pack_one, plan_packs, write_final_index
    from curation.sources import list_inputs

    pool = make_pool(workers, cfg)
    try:
        rows = list_inputs(str(inputs), cfg.kind, staging=out / "_staging")
        shards = cfg.shards
        jobs = [(str(out), shards.max_samples, shards.max_bytes, r) for r in rows]
        records = sorted(pool.imap_unordered(_pool_one, jobs, chunksize=1), key=lambda r: r.block)
    finally:
        pool.terminate()
        pool.join()
    plans = plan_packs(records, shards.max_samples, shards.max_bytes)
    for plan in plans:
        pack_one(str(out), plan)
    mapping = {seg.path: plan.path for plan in plans for seg in plan.segments}
    return write_final_index(str(out), records, mapping)


def make_pool(workers: int, cfg):
    """A Pool whose workers have built and set up every stage (spawn: forking a process that
    has torch threads or Ray is unsafe)."""
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_pool_init, initargs=(cfg.model_dump(mode="json"),))
    pool.map(_noop, range(workers * 4), chunksize=1)  # wait until every worker is set up
    return pool


def _noop(_: Any) -> None:
    return None


def _decode_all(path: str) -> int:
    import av

    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def decode_only(paths: list[str], pool) -> int:
    return sum(pool.map(_decode_all, paths, chunksize=1))


# -- ours in a watched subprocess ----------------------------------------------------------------

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

    from bench.harness import WORK, TreeMemory

    small, _ = clip_set(WORK, quick)
    sets = {"small": small, "large": large_set(small, 2 if quick else COPIES)}
    result: dict[str, Any] = {"ray_init_s": start_ray(workers)}

    def save() -> None:
        out.write_text(json.dumps(result, default=str))

    for name, (which, runner, extra) in MODES[mode].items():
        tmp = Context().tmp(f"p1-ours-{mode}-w{workers}-{name}")
        fn = runner(sets[which], tmp, config(extra))
        runs: list[float] = []
        result[name] = {"runs_s": runs}
        # memory only where its goal is: sampling every process's smaps costs CPU the run
        # being timed then lacks (about a tenth of the cheap run on 2 CPUs)
        memory = TreeMemory(os.getpid()) if name == "ours_full_large" else None
        if memory is not None:
            memory.start()
        for i in range(warmup + repeats):
            box: dict[str, Any] = {}

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

    from bench.harness import _tree

    me = os.getpid()
    for pid in reversed(_tree(me)):
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
    cmd = [sys.executable, "-m", "bench.p1_curation", mode, str(workers), str(int(ctx.quick))]
    repeats = ctx.repeats if repeats is None else repeats
    cmd += [str(ctx.warmup), str(repeats), str(deadline), str(out)]
    runs = len(MODES[mode]) * (ctx.warmup + repeats)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(cmd, cwd=REPO, timeout=runs * deadline + 120, check=False)
    return json.loads(out.read_text()) if out.exists() else {}


# -- the case -----------------------------------------------------------------------------------


def run(ctx: Context) -> list[Row]:
    small, clips = clip_set(ctx.work, ctx.quick)
    large = large_set(small, 2 if ctx.quick else COPIES)
    copies = 2 if ctx.quick else COPIES
    size = totals(clips)
    ctx.details["clip_set"] = size
    log(f"clip set: {size}; large set: {copies} copies")
    cfg = config()
    n, secs = size["clips"], size["video_seconds"]
    rows: list[Row] = []
    figures: dict[str, Any] = {}

    def pool_timing(inputs: Path, workers: int, label: str, repeats: int):
        counter = {"n": 0}

        def pool_run() -> int:
            counter["n"] += 1
            out = ctx.tmp(f"p1-pool-{label}-w{workers}-{counter['n']}")
            return pool_full(inputs, out, cfg, workers)

        return ctx.time(pool_run, label=f"Pool {label}, {workers} worker(s)", repeats=repeats)

    # 2 workers: both sets, cheap filters
    t_small = pool_timing(small, 2, "14 clips", ctx.repeats)
    t_large = pool_timing(large, 2, f"{n * copies} clips", ctx.repeats)
    decode_pool = mp.get_context("spawn").Pool(2)
    try:
        paths = [c["path"] for c in clips]
        t_decode = ctx.time(lambda: decode_only(paths, decode_pool), label="decode-only, 2 w")
        big = [str(p) for p in sorted(large.rglob("*")) if p.is_file()]
        t_decode_large = ctx.time(lambda: decode_only(big, decode_pool), label="decode-only large")
    finally:
        decode_pool.terminate()
        decode_pool.join()
    deadline = min(600.0, max(60.0, 3 * t_large.median))
    ours = time_ours(ctx, 2, deadline)
    figures["2w"] = {
        "pool_small": t_small.to_dict(),
        "pool_large": t_large.to_dict(),
        "decode_only": t_decode.to_dict(),
        "decode_only_large": t_decode_large.to_dict(),
        **ours,
    }
    missing = {"error": "no result from the ours subprocess"}
    rows.append(
        _row(
            f"curation full, 2w, {n} clips: clips/s",
            ours.get("ours_full_small", missing),
            t_small.median,
            "multiprocessing.Pool, same stages + sink + pack (incl. its start)",
            ">= 0.8",
            n,
            secs,
        )
    )
    rows.append(
        _row(
            f"curation full, 2w, {n * copies} clips: clips/s",
            ours.get("ours_full_large", missing),
            t_large.median,
            "multiprocessing.Pool, same stages + sink + pack (incl. its start)",
            ">= 0.9",
            n * copies,
            secs * copies,
        )
    )
    peak = (ours.get("ours_full_large") or {}).get("peak_mb")
    rows.append(
        Row(
            "P1",
            f"peak memory, ours, 2w, {n * copies} clips",
            peak,
            "MB",
            goal=f"<= {MEMORY_GOAL_MB}",
            goal_on="value",
            note="summed PSS of the driver, Ray and every worker, sampled every 0.25 s",
            error=None if peak else "no memory figure from the ours subprocess",
        )
    )
    for which, base, n_copies in (("small", t_decode, 1), ("large", t_decode_large, copies)):
        rows.append(
            _row(
                f"cheap filters, 2w, {n * n_copies} clips: video-s/s",
                ours.get(f"ours_cheap_{which}", missing),
                base.median,
                "decode-only of every frame (PyAV, Pool)",
                ">= 0.8",
                secs * n_copies,
                secs * n_copies,
                unit="video-s/s",
                note=lambda t, b: "probe + split + frames + select on the engine, real sink",
            )
        )
    rows.append(
        Row(
            "P1",
            "Ray start-up (ray.init, local, 2 CPUs)",
            ours.get("ray_init_s"),
            "s",
            note="paid once per process; not in the figures above",
        )
    )
    ctx.save_partial(rows)

    # 1 worker: the scaling figure
    repeats = max(1, ctx.repeats - 1)
    t_small_1 = pool_timing(small, 1, "14 clips", repeats)
    ours_1 = time_ours(ctx, 1, min(600.0, max(60.0, 3 * t_small_1.median)), "p1-1w", repeats)
    figures["1w"] = {"pool_small": t_small_1.to_dict(), **ours_1}
    rows.append(
        _row(
            f"curation full, 1w, {n} clips: clips/s",
            ours_1.get("ours_full_small", missing),
            t_small_1.median,
            "multiprocessing.Pool, same stages + sink + pack (incl. its start)",
            None,
            n,
            secs,
        )
    )
    ctx.details["figures"] = figures

    def median(fig: dict, key: str) -> float | None:
        runs = (fig.get(key) or {}).get("runs_s") or []
        return statistics.median(runs) if runs else None

    scale = ratio(
        median(figures["1w"], "ours_full_small"), median(figures["2w"], "ours_full_small")
    )
    pool_scale = ratio(t_small_1.median, t_small.median)
    rows.append(
        Row(
            "P1",
            "scaling 1 -> 2 workers, 14 clips (speed-up)",
            scale,
            "x",
            "Pool's speed-up 1 -> 2",
            pool_scale,
            ratio(scale, pool_scale),
            note="2.0 would be linear; no goal",
        )
    )
    return rows


def _row(
    metric, ours: dict, base_s: float, base_name, goal, amount, secs, unit="clips/s", note=None
):
    runs = ours.get("runs_s") or []
    if ours.get("error") or not runs:
        return Row(
            "P1",
            metric,
            unit=unit,
            baseline=base_name,
            baseline_value=amount / base_s,
            goal=goal,
            error=ours.get("error") or "no timed run",
        )
    t = statistics.median(runs)
    if note is None:
        text = f"video-s/s ours {secs / t:.2f}, Pool {secs / base_s:.2f}; {amount} clips"
    else:
        text = note(t, base_s)
    return Row(
        "P1", metric, amount / t, unit, base_name, amount / base_s, base_s / t, goal, note=text
    )


if __name__ == "__main__":
    import sys

    mode, w, q, wu, rep, dl, path = sys.argv[1:8]
    ours_child(mode, int(w), bool(int(q)), int(wu), int(rep), float(dl), Path(path))
