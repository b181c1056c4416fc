"""P6 near-duplicate search: the pHash signal of ``curate dedup`` on a 10M-row index scale.

Index: synthetic hash columns in the sample contract, made in memory with numpy (seed 0):
40 % images (one 64-bit pHash) and 60 % video clips (eight, one per sampled frame), random
hashes, and 1 % of the rows planted as copies of another row of their kind with 0-3 bits of
each hash flipped (what re-encoding and resizing do to a real picture: 0-4 bits,
``tests/curation/test_phash.py``).

- ours: ``curation.dedup.hash_pairs``, the pair search ``curate dedup`` runs over the
  ``kind`` / ``phash`` columns: the candidates of each (kind, hash count) group by multi-index
  hashing on the middle frame's hash, then the median aligned distance over all frames. Every
  planted pair must be found (checked).
- baseline: exact duplicates only, what one line of pyarrow gives: ``group_by`` on (kind,
  middle hash) and count. Its rows/s is the speed of a join over the same columns.

Two sizes: 10M rows at 3 bits (near-exact: the multi-index layout is 2 bands of 32 bits,
33 lookups a band, and random collisions are negligible), and 100k rows at the default 10 bits
(4 bands of 16 bits, 137 lookups a band; collisions grow as n^2, so 10 bits on 10M rows would
take hours on 2 CPUs, and 64-bit hashes are not specific enough there anyway: two random
hashes lie within 10 bits with probability 1e-8: ~5e5 chance pairs among 10M single hashes).
The 10M search runs once, without warm-up (~1.5 min on 2 CPUs); reading the columns from the
index and the rewrite of the version are not in the figure.
"""

from __future__ import annotations

import time

import numpy as np

from bench.harness import Context, Row, log, ratio

FRAMES = 8
PLANTED = 0.01


def make_columns(n: int, seed: int = 0):
    """(table, planted pairs as a set of (i, j)): kind and phash columns of ``n`` rows."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    video = rng.random(n) < 0.6
    widths = np.where(video, FRAMES, 1)
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    values = rng.integers(0, 2**63, int(offsets[-1]), dtype=np.uint64) << np.uint64(1)
    order = rng.permutation(n)
    copies, rest = order[: int(n * PLANTED)], order[int(n * PLANTED) :]
    planted = set()
    for kind in (False, True):  # a copy's original: a row of its kind that is no copy
        targets = copies[video[copies] == kind]
        pool = rest[video[rest] == kind]
        sources = pool[rng.integers(len(pool), size=len(targets))]
        width = FRAMES if kind else 1
        at_target = (offsets[targets][:, None] + np.arange(width)).ravel()
        at_source = (offsets[sources][:, None] + np.arange(width)).ravel()
        flips = np.zeros(len(at_target), dtype=np.uint64)  # 0-3 bits of each hash
        k = rng.integers(0, 4, len(at_target))
        for nth in range(3):
            bit = np.uint64(1) << rng.integers(0, 64, len(at_target)).astype(np.uint64)
            flips |= np.where(k > nth, bit, np.uint64(0))
        values[at_target] = values[at_source] ^ flips
        low, high = np.minimum(sources, targets), np.maximum(sources, targets)
        planted |= set(zip(low.tolist(), high.tolist(), strict=True))
    kinds = pa.DictionaryArray.from_arrays(pa.array(video.astype(np.int32)), ["image", "video"])
    phash = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint64()))
    table = pa.table({"kind": kinds.cast(pa.string()), "phash": phash.cast(pa.list_(pa.uint64()))})
    return table, planted


def exact(table) -> int:
    """Rows whose (kind, middle hash) another row shares (the baseline)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table.column("phash")).to_numpy()
    phash = table.column("phash").combine_chunks()
    offsets = phash.offsets.to_numpy()[:-1]
    middle = phash.values.to_numpy()[offsets + lengths // 2]
    keyed = pa.table({"kind": table.column("kind"), "middle": middle})
    counts = keyed.group_by(["kind", "middle"]).aggregate([("middle", "count")])
    return int(
        pc.sum(pc.if_else(pc.greater(counts["middle_count"], 1), counts["middle_count"], 0)).as_py()
        or 0
    )


def measure(ctx: Context, n: int, max_bits: int, runs: int, warmup: int) -> tuple[Row, dict]:
    from curation.dedup import hash_pairs, layout

    t0 = time.perf_counter()
    table, planted = make_columns(n)
    log(f"  {n:,} rows made in {time.perf_counter() - t0:.1f} s; {len(planted):,} planted pairs")
    t_ours = ctx.time(
        lambda: hash_pairs(table, max_bits)[0],
        label=f"hash_pairs {n:,} rows, {max_bits} bits",
        repeats=runs,
        warmup=warmup,
    )
    pairs = t_ours.extra[-1]
    t_ours.extra = [len(p) for p in t_ours.extra]  # the figures keep the counts
    missing = planted - {tuple(p) for p in pairs.tolist()}
    if missing:
        raise AssertionError(f"{len(missing)} of {len(planted)} planted pairs not found")
    t_base = ctx.time(lambda: exact(table), label=f"exact group_by {n:,} rows", repeats=runs,
                      warmup=warmup)  # fmt: skip
    bands, bits = layout(int(0.6 * n), max_bits)  # the clips' group, the larger one
    row = Row(
        "P6",
        f"near-duplicate search (pHash), {n / 1e6:g}M rows, {max_bits} bits: rows/s",
        n / t_ours.median,
        "rows/s",
        "exact duplicates: pyarrow group_by on the middle hash",
        n / t_base.median,
        ratio(t_base.median, t_ours.median),
        None,
        note=f"{t_ours.extra[-1]:,} pairs found ({len(planted):,} planted, all found); "
        f"{t_ours.median:.1f} s; layout {bands} bands of {bits} bits",
    )
    figures = {"rows": n, "max_bits": max_bits, "pairs": t_ours.extra[-1]}
    figures.update(planted=len(planted), ours=t_ours.to_dict(), exact=t_base.to_dict())
    return row, figures


def run(ctx: Context) -> list[Row]:
    big = 1_000_000 if ctx.quick else 10_000_000
    rows = []
    row, ctx.details["default_bits"] = measure(ctx, 100_000, 10, ctx.repeats, ctx.warmup)
    rows.append(row)
    ctx.save_partial(rows)
    row, ctx.details["near_exact"] = measure(ctx, big, 3, 1, 0)
    rows.append(row)
    return rows
