"""P1 curation throughput: run_curation on Ray Data vs a multiprocessing.Pool, and cheap filters
vs decode-only, with 1 and 2 workers.

Inputs: the fixed clip set (``bench/clips.py``). Config: the default profile with the demo's
size floor (``select.min_short_side=128``, so the small synthetic clips reach the sink) and
``partition_size=8`` (the demo uses 16; 8 gives the 14 clips two partitions); aesthetic and
watermark are skipped as in the default profile without weights, so the model stages are
motion and OCR (RapidOCR's shipped model).

- ours (full): ``curation.pipeline.run_curation`` end to end (list inputs, every stage on Ray
  Data, shards + index, catalog commit, report) on a local Ray of N CPUs, warm (the warm-up run
  starts Ray).
- baseline (a): what a user writes instead: ``multiprocessing.Pool(N)`` whose initializer
  builds the same stages (``build_stages``) and calls ``setup()``; one task per input runs the
  same ``process_batch`` functions in the same order, then one task per partition runs the
  same sink (``PartitionWriter``: re-encode, shards, index part). No catalog, no report.
  The pool is started (spawn) and set up before timing, as Ray's workers are warm for ours.
- ours (cheap filters): probe + scene split + frame sampling + select (resolution, aspect,
  duration) through the pipeline's own Ray Data path (``curation.pipeline._run_ray``), with a
  writer that only counts rows (no sink).
- baseline (b), the limit for cheap filters: decode every frame of every input once to RGB
  (PyAV, one process per worker): scene detection has to look at every frame, so no pipeline
  that splits scenes can go faster.

Throughput: input clips per second and input video-seconds per second.

Ours runs in its own subprocess per worker count (a fresh local Ray of N CPUs) with a deadline
per run of max(45 s, 3x the Pool's time): a run past it is reported as hung, and that worker
count's remaining runs are skipped. The 1-worker figures (scaling) get one timed run less than
the 2-worker ones, and ours (cheap) follows ours (full) on the same warm Ray without a second
warm-up: both keep ``make bench`` inside its 20 minutes on 2 CPUs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

from bench.clips import clip_set, totals
from bench.harness import Context, Row, log, ratio

SETTINGS = ["select.min_short_side=128", "partition_size=8"]
CHEAP = ["motion.enabled=false", "ocr.enabled=false", "select.min_motion=null"]
CHEAP += ["select.max_motion=null", "select.max_ocr_area=null"]
# P1-peer: the ops Data-Juicer runs too (resolution, aspect, scene split, motion): OCR off
PEER_EQUIVALENT = ["ocr.enabled=false", "select.max_ocr_area=null"]


def config(extra: list[str] = ()):
    from catalog.config import load_config
    from curation.config import CurationConfig

    return load_config(CurationConfig, None, [*SETTINGS, *extra])


# -- ours -----------------------------------------------------------------------------------------


def start_ray(workers: int) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False
    )


class Ours:
    """run_curation into a fresh output folder each run (a rerun would resume, not work)."""

    def __init__(self, inputs: Path, tmp: Path, cfg):
        from catalog.store import Catalog

        self.inputs, self.tmp, self.cfg = inputs, tmp, cfg
        tmp.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(f"sqlite:///{tmp / 'catalog.db'}")
        self.n = 0
        self.last: Any = None

    def __call__(self) -> dict[str, Any]:
        from curation.pipeline import run_curation

        self.n += 1
        res = run_curation(
            str(self.inputs), self.tmp / f"out-{self.n}", self.cfg, catalog=self.catalog
        )
        return {"counts": res.summary.get("counts"), "rows": res.version.num_samples}


class _CountingWriter:
    """Stands in for the sink: one summary row per partition, nothing written."""

    def __call__(self, batch):
        import pyarrow as pa

        return pa.table({"partition": [batch.column("partition")[0].as_py()], "rows": [len(batch)]})


def ours_cheap(inputs: Path, cfg) -> int:
    from curation.pipeline import _run_ray, build_stages
    from curation.sources import list_inputs

    stages, _ = build_stages(cfg)
    rows = list_inputs(str(inputs), cfg.kind)
    for i, row in enumerate(rows):
        row["partition"] = i // cfg.partition_size
    _run_ray(rows, stages, _CountingWriter(), None)
    return len(rows)


# -- baselines ----------------------------------------------------------------------------------

_STAGES: list = []


def _pool_init(cfg_data: dict) -> None:
    from curation.config import CurationConfig
    from curation.pipeline import build_stages

    stages, _ = build_stages(CurationConfig.model_validate(cfg_data))
    for s in stages:
        s.setup()
    _STAGES[:] = stages


def _pool_one(row: dict) -> list[dict]:
    rows = [row]
    for stage in _STAGES:
        rows = stage.process_batch(rows)
    drop = ("frames", "target_frames", "frame_times")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _pool_write(args: tuple) -> int:
    from curation.adapter import rows_to_arrow
    from curation.config import CurationConfig
    from curation.sink import PartitionWriter

    out, cfg_data, rows = args
    writer = PartitionWriter(out, CurationConfig.model_validate(cfg_data), "pool")
    writer(rows_to_arrow(rows))
    return len(rows)


def pool_full(inputs: Path, out: Path, cfg, pool) -> int:
    from curation.sources import list_inputs

    rows = list_inputs(str(inputs), cfg.kind, staging=out / "_staging")
    for i, row in enumerate(rows):
        row["partition"] = i // cfg.partition_size
    parts: dict[int, list[dict]] = {}
    for result in pool.imap_unordered(_pool_one, rows, chunksize=1):
        for r in result:
            parts.setdefault(r["partition"], []).append(r)
    data = cfg.model_dump(mode="json")
    jobs = [(str(out), data, part) for _, part in sorted(parts.items())]
    return sum(pool.map(_pool_write, jobs, chunksize=1))


def make_pool(workers: int, cfg):
    """A warm pool (stages built and set up in every worker), like Ray's warm workers: the
    timed runs measure the work, not process start-up. spawn: forking a process that runs Ray
    or has torch threads is unsafe."""
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


# what the ours subprocess times, per mode: name -> extra settings
MODES = {
    "p1": {"ours_full": [], "ours_cheap": CHEAP},
    "peer": {"ours_equivalent": PEER_EQUIVALENT},
}


def ours_child(
    mode: str, workers: int, quick: bool, warmup: int, repeats: int, deadline: float, out: Path
):
    """Time ours (each config of ``MODES[mode]``) on a fresh local Ray of ``workers`` CPUs;
    results go to ``out`` after every run. A run that passes ``deadline`` seconds is recorded
    as hung and the process exits, killing the Ray processes it started."""
    import json
    import threading
    import time

    from bench.harness import WORK

    inputs, _ = clip_set(WORK, quick)
    tmp = Context().tmp(f"p1-ours-{mode}-w{workers}")
    start_ray(workers)
    result: dict[str, Any] = {}

    def save() -> None:
        out.write_text(json.dumps(result))

    for name, extra in MODES[mode].items():
        if name == "ours_cheap":
            cheap_cfg = config(extra)
            fn = lambda cfg=cheap_cfg: ours_cheap(inputs, cfg)  # noqa: E731
        else:
            fn = Ours(inputs, tmp / name, config(extra))
        runs: list[float] = []
        result[name] = {"runs_s": runs}
        # ours_cheap follows ours_full on the same (warm) Ray: no second warm-up
        first = 0 if name == "ours_cheap" and "ours_full" in result else warmup
        for i in range(warmup - first, warmup + repeats):
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
                    f"run {i + 1} did not finish in {deadline:.0f} s on a {workers}-CPU Ray "
                    "(hung; see the P1 notes in bench/README.md)"
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
    save()


def _exit_with_tree() -> None:
    """Exit now, killing what this process started (Ray's raylet, GCS and agents): a hung
    Ray Data job cannot be cancelled, and Ray's agents outlive a driver that just exits."""
    import os
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
    inputs, clips = clip_set(ctx.work, ctx.quick)
    size = totals(clips)
    ctx.details["clip_set"] = size
    log(f"clip set: {size}")
    paths = [c["path"] for c in clips]
    full_cfg = config()
    n, secs = size["clips"], size["video_seconds"]
    rows: list[Row] = []
    figures: dict[int, Any] = {}
    for workers in (2, 1):
        tmp = ctx.tmp(f"p1-w{workers}")
        # 1 worker (the scaling figure) gets one timed run less: the 20-minute budget
        repeats = ctx.repeats if workers == 2 else max(1, ctx.repeats - 1)
        pool = make_pool(workers, full_cfg)
        try:
            counter = {"n": 0}

            def pool_run(pool=pool, tmp=tmp, counter=counter) -> int:
                counter["n"] += 1
                return pool_full(inputs, tmp / f"pool-{counter['n']}", full_cfg, pool)

            t_pool = ctx.time(pool_run, label=f"Pool full, {workers} worker(s)", repeats=repeats)
            t_decode = ctx.time(
                lambda pool=pool: decode_only(paths, pool),
                label=f"decode-only, {workers} worker(s)",
                repeats=repeats,
            )
        finally:
            pool.terminate()
            pool.join()
        deadline = min(300.0, max(45.0, 3 * t_pool.median))
        ours = time_ours(ctx, workers, deadline, repeats=repeats)
        fig = {"pool_full": t_pool.to_dict(), "decode_only": t_decode.to_dict(), **ours}
        figures[workers] = fig
        w = f"{workers}w"
        rows.append(
            _row(
                f"curation full, {w}: clips/s",
                ours.get("ours_full", {"error": _missing(ours)}),
                t_pool.median,
                "multiprocessing.Pool, same stage functions",
                ">= 1.0",
                n,
                "clips/s",
                lambda t, b: (
                    f"video-s/s ours {secs / t:.2f}, Pool {secs / b:.2f}; {n} clips, "
                    f"{secs:.0f} s of video"
                ),
            )
        )
        rows.append(
            _row(
                f"cheap filters, {w}: video-s/s",
                ours.get("ours_cheap", {"error": _missing(ours)}),
                t_decode.median,
                "decode-only of every frame (PyAV, Pool)",
                ">= 0.8",
                secs,
                "video-s/s",
                lambda t, b: "probe + split + frames + select on Ray Data, no sink",
            )
        )
        ctx.save_partial(rows)
    ctx.details["figures"] = figures

    def median(w: int, key: str) -> float | None:
        runs = (figures[w].get(key) or {}).get("runs_s") or []
        return statistics.median(runs) if runs else None

    scale = ratio(median(1, "ours_full"), median(2, "ours_full"))
    pool_scale = ratio(median(1, "pool_full"), median(2, "pool_full"))
    rows.append(
        Row(
            "P1",
            "scaling 1 -> 2 workers (speed-up)",
            scale,
            "x",
            "Pool's speed-up 1 -> 2",
            pool_scale,
            ratio(scale, pool_scale),
            note="2.0 would be linear; no goal",
        )
    )
    return rows


def _missing(ours: dict) -> str:
    if "hung" in str((ours.get("ours_full") or {}).get("error")):
        return "not run: the full run hung first on this Ray"
    return "no result from the ours subprocess"


def _row(metric, ours: dict, base_s: float, base_name, goal, amount, unit, note) -> Row:
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
    return Row(
        "P1",
        metric,
        amount / t,
        unit,
        base_name,
        amount / base_s,
        base_s and t and base_s / t,
        goal,
        note=note(t, base_s),
    )


if __name__ == "__main__":
    import sys

    mode, w, q, wu, rep, dl, path = sys.argv[1:8]
    ours_child(mode, int(w), bool(int(q)), int(wu), int(rep), float(dl), Path(path))
