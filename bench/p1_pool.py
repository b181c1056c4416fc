"""P1's baselines: what a data engineer writes instead of ours. (a) ``multiprocessing.Pool(N)``
whose workers build and set up the same stages and run the same ``process_batch`` functions,
sink and pack (``pool_full``); (b) a decode of every frame of every input (``decode_only``),
the limit for cheap filters. What is measured and why: ``bench.p1_curation``.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from pathlib import Path
from typing import Any

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


def _decode_all(path: str, threads: int | None = None) -> int:
    """Decode every frame to RGB: PyAV's ``to_ndarray`` (swscale on its default threads, one
    per CPU: what a script writes), or on ``threads`` swscale threads as our stages convert."""
    import av
    from av.video.reformatter import VideoReformatter

    n = 0
    reformatter = VideoReformatter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if threads is None:
                frame.to_ndarray(format="rgb24")
            else:
                reformatter.reformat(frame, format="rgb24", threads=threads).to_ndarray()
            n += 1
    return n


def _decode_init() -> None:
    import av  # noqa: F401 - what a decode script imports, once per worker
    import numpy  # noqa: F401


def decode_pool(workers: int):
    return mp.get_context("spawn").Pool(workers, initializer=_decode_init)


def decode_only(paths: list[str], workers: int, pool=None, threads: int | None = None) -> int:
    """Decode every frame of ``paths`` to RGB on a Pool: a new one (its start counted, as the
    full baseline's and ours' are), or ``pool`` when given (already started: the warm limit);
    ``threads``: see ``_decode_all``."""
    fn = functools.partial(_decode_all, threads=threads)
    if pool is not None:
        return sum(pool.map(fn, paths, chunksize=1))
    pool = decode_pool(workers)
    try:
        return sum(pool.map(fn, paths, chunksize=1))
    finally:
        pool.terminate()
        pool.join()
