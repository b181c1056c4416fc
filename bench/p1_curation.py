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
  commit with every shard verified, report) on a local Ray of N CPUs. Each run is what one
  ``omniforge curate run`` does: it starts a local Ray (``ray.init``: timed apart, reported
  on its own row), then its workers (actors: imports + ``setup()``), which are in its time.
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
  that splits scenes can go faster. Its time includes starting its pool (spawn; the workers
  import PyAV and NumPy), as the other figures include their workers' start; the same decode
  on an already started pool is in the row's note, and so is that decode converting to RGB
  on one swscale thread (``to_ndarray`` uses swscale's default, a thread per CPU, which costs
  more than it saves while the other worker keeps the other CPU busy; ours converts on one
  thread, ``curation.media.SWS_THREADS``).
- peak memory: the summed PSS of ours' process tree (driver, Ray, every worker) during the
  112-clip full pipeline's warm-up run, sampled every 0.25 s (the sampler's own CPU would slow
  a timed run; without a warm-up, during the timed runs).

Throughput: input clips per second and input video-seconds per second. Ours runs in its own
subprocess per worker count (a fresh local Ray of N CPUs per run) with a deadline per run: a
run past it is reported as hung and that worker count's remaining runs are skipped. The
1-worker figure (scaling) runs the 14-clip set only.

This module is the case (its rows and goals); ours and its watched subprocess are
``bench.p1_ours``, the Pool and decode-only baselines ``bench.p1_pool``, the clip sets
``bench.clips``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.clips import COPIES, clip_set, large_set, totals
from bench.harness import Context, Row, log, ratio
from bench.p1_ours import config, time_ours
from bench.p1_pool import decode_only, decode_pool, pool_full

MEMORY_GOAL_MB = 2048


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
    paths = [c["path"] for c in clips]
    big = [str(p) for p in sorted(large.rglob("*")) if p.is_file()]
    t_decode = ctx.time(lambda: decode_only(paths, 2), label="decode-only, 2 w")
    t_decode_large = ctx.time(lambda: decode_only(big, 2), label="decode-only large")
    warm = decode_pool(2)  # the same decode on a started pool: how much the start weighs
    try:
        t_warm = ctx.time(lambda: decode_only(paths, 2, warm), label="decode-only, warm pool")
        t_warm_large = ctx.time(lambda: decode_only(big, 2, warm), label="decode-only, warm, large")
        t_one = ctx.time(lambda: decode_only(paths, 2, warm, 1), label="decode-only, warm, 1 thr")
        t_one_large = ctx.time(
            lambda: decode_only(big, 2, warm, 1), label="decode-only, warm, 1 thr, large"
        )
    finally:
        warm.terminate()
        warm.join()
    deadline = min(600.0, max(60.0, 3 * t_large.median))
    ours = time_ours(ctx, 2, deadline)
    figures["2w"] = {
        "pool_small": t_small.to_dict(),
        "pool_large": t_large.to_dict(),
        "decode_only": t_decode.to_dict(),
        "decode_only_large": t_decode_large.to_dict(),
        "decode_only_warm": t_warm.to_dict(),
        "decode_only_warm_large": t_warm_large.to_dict(),
        "decode_only_warm_one_thread": t_one.to_dict(),
        "decode_only_warm_one_thread_large": t_one_large.to_dict(),
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
            note="summed PSS of the driver, Ray and every worker, sampled every 0.25 s in the "
            "untimed warm-up run",
            error=None if peak else "no memory figure from the ours subprocess",
        )
    )
    cheap = (
        ("small", t_decode, t_warm, t_one, 1),
        ("large", t_decode_large, t_warm_large, t_one_large, copies),
    )
    for which, base, warm_base, one_base, n_copies in cheap:
        rows.append(
            _row(
                f"cheap filters, 2w, {n * n_copies} clips: video-s/s",
                ours.get(f"ours_cheap_{which}", missing),
                base.median,
                "decode-only of every frame (PyAV, Pool, incl. its start)",
                ">= 0.8",
                secs * n_copies,
                secs * n_copies,
                unit="video-s/s",
                note=lambda t, b, w=warm_base.median, o=one_base.median: (
                    "probe + split + frames + select on the engine, real sink; "
                    f"vs decode-only on a started pool ({w:.2f} s): {w / t:.2f}x; "
                    f"the same converting on one swscale thread, as ours does ({o:.2f} s): "
                    f"{o / t:.2f}x"
                ),
            )
        )
    rows.append(
        Row(
            "P1",
            "Ray start-up (ray.init, local, 2 CPUs)",
            statistics.median(ours.get("ray_init_s") or [float("nan")]),
            "s",
            note="median over every run; each run starts its own (as `curate run` does), "
            "not in the figures above",
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
