"""P5 catalog selection: score thresholds on a 10M-row sample index, pushed down, vs pandas.

Index: 10 million synthetic rows in the sample contract (videos and images, statuses, scores,
buckets, shards; the other contract columns null), written as ten Parquet parts with
``catalog.index.write_index_part`` (validated, zstd, 64k-row groups: what curation writes),
generated with numpy once and cached under ``bench/work/``.

- ours: ``catalog.index.query_index`` with a filter string (parsed into a pyarrow
  expression, predicate and projection pushed into the scan): the accepted videos above the
  aesthetic / motion thresholds and below the text-area limit, returning the columns
  ``Catalog.resolve`` reads (key, shard, bucket).
- baseline: what a user does without pushdown: ``pandas.read_parquet`` of the whole index,
  then the same boolean mask and columns.
Ours gets a warm-up run; pandas does not (~40 s a run on 2 CPUs): the files were just written
or read, and reading them cold costs about a second of those 40.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.harness import Context, Row, log, ratio

FILTER = (
    "status == 'accepted' and kind == 'video' and aesthetic >= 5.5 "
    "and 0.01 <= motion <= 1.0 and ocr_area <= 0.02"
)
COLUMNS = ["key", "shard", "bucket"]
PART_ROWS = 1_000_000


def _hex_keys(rng: np.random.Generator, n: int):
    """n random 40-character hex strings (sha1-like keys) as an Arrow string array."""
    import pyarrow as pa

    raw = rng.integers(0, 256, size=(n, 20), dtype=np.uint8)
    table = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    chars = np.empty((n, 40), dtype=np.uint8)
    chars[:, 0::2] = table[raw >> 4]
    chars[:, 1::2] = table[raw & 15]
    offsets = np.arange(0, 40 * (n + 1), 40, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def _choice(codes: np.ndarray, names: list[str]):
    """Strings from integer codes (vectorised: a dictionary array cast to plain strings)."""
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), names).cast(pa.string())


def _join(*parts):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(*parts, "")


def _part(rng: np.random.Generator, n: int, start: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    is_video = rng.random(n) < 0.6
    status = rng.choice(3, size=n, p=[0.7, 0.25, 0.05])  # accepted, rejected, error
    accepted = status == 0
    sizes = np.array([[1920, 1080], [1280, 720], [1080, 1920], [640, 480], [1024, 1024]])
    wh = sizes[rng.integers(0, len(sizes), n)]
    dur = np.where(is_video, rng.uniform(2, 60, n), 0.0)
    ids = np.arange(start, start + n)
    id_str = pc.cast(pa.array(ids), pa.string())
    buckets = ["a1024_r16x9_f33", "a768_r16x9_f65", "a1024_r9x16_f33", "a512_r4x3_f1"]
    bucket = _choice(rng.integers(0, len(buckets), n), buckets)
    batch = pc.cast(pa.array(ids // 10_000), pa.string())
    ext = _choice(is_video.astype(np.int8), [".jpg", ".mp4"])
    shard = _join("shards/", bucket, "/p", pc.cast(pa.array(ids // 1000), pa.string()), ".tar")
    not_accepted = ~accepted
    reasons = _choice(
        (status[not_accepted] == 2).astype(np.int8), ["low_aesthetic", "decode_error"]
    )
    cols = {
        "key": _hex_keys(rng, n),
        "kind": _choice(is_video.astype(np.int8), ["image", "video"]),
        "source_uri": _join("s3://raw-corpus/batch-", batch, "/item-", id_str, ext),
        "span": pa.StructArray.from_arrays(
            [pa.array(np.zeros(n)), pa.array(dur)],
            names=["start", "end"],
            mask=pa.array(~is_video),
        ),
        "width": pa.array(wh[:, 0], pa.int32()),
        "height": pa.array(wh[:, 1], pa.int32()),
        "fps": pa.array(np.where(is_video, 24.0, np.nan), pa.float32(), from_pandas=True),
        "num_frames": pa.array(np.where(is_video, np.round(dur * 24) + 1, 1), pa.int32()),
        "duration": pa.array(dur, pa.float32()),
        "caption": _join("a caption for item ", id_str),
        "aesthetic": pa.array(rng.normal(5.5, 1.0, n).clip(0, 10), pa.float32()),
        "watermark": pa.array(rng.beta(1, 8, n), pa.float32()),
        "motion": pa.array(
            np.where(is_video, rng.lognormal(-3.5, 1.2, n), np.nan), pa.float32(), from_pandas=True
        ),
        "ocr_area": pa.array(rng.beta(0.5, 30, n), pa.float32()),
        "status": _choice(status, ["accepted", "rejected", "error"]),
        "reasons": pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(not_accepted)]).astype(np.int32)), reasons
        ),
        "bucket": pc.if_else(pa.array(accepted), bucket, pa.scalar(None, pa.string())),
        "shard": pc.if_else(pa.array(accepted), shard, pa.scalar(None, pa.string())),
    }
    return pa.table(cols)


def make_index(work: Path, rows: int) -> Path:
    from catalog.index import write_index_part

    root = work / f"p5-index-{rows // 1_000_000}M"
    done = root / "_complete"
    if done.exists():
        return root / "index"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    log(f"  generating a {rows:,}-row index under {root} (once)")
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, rows, PART_ROWS)):
        n = min(PART_ROWS, rows - start)
        write_index_part(_part(rng, n, start), root / "index", f"part-p{i:05d}")
        log(f"    part {i + 1}: {start + n:,} rows")
    done.write_text("ok")
    return root / "index"


def ours(index: Path) -> int:
    from catalog.index import query_index

    return query_index(index, FILTER, COLUMNS).num_rows


def pandas_scan(index: Path) -> int:
    import pandas as pd

    df = pd.read_parquet(index)
    mask = (
        (df["status"] == "accepted")
        & (df["kind"] == "video")
        & (df["aesthetic"] >= 5.5)
        & (df["motion"] >= 0.01)
        & (df["motion"] <= 1.0)
        & (df["ocr_area"] <= 0.02)
    )
    return len(df.loc[mask, COLUMNS])


def run(ctx: Context) -> list[Row]:
    rows = 1_000_000 if ctx.quick else 10_000_000
    index = make_index(ctx.work, rows)
    size_mb = sum(p.stat().st_size for p in index.glob("*.parquet")) / 1e6
    t_ours = ctx.time(lambda: ours(index), label="query_index (pushdown)")
    # no warm-up run for pandas (~40 s each on 10M rows): ours' runs already read the files
    # into the page cache, and `make bench` has 20 minutes
    t_pd = ctx.time(lambda: pandas_scan(index), label="pandas full scan", warmup=0)
    if t_ours.extra[-1] != t_pd.extra[-1]:
        raise AssertionError(f"selections differ: ours {t_ours.extra[-1]}, pandas {t_pd.extra[-1]}")
    ctx.details["figures"] = {
        "rows": rows,
        "index_mb": round(size_mb, 1),
        "selected": t_ours.extra[-1],
        "ours": t_ours.to_dict(),
        "pandas": t_pd.to_dict(),
    }
    return [
        Row(
            "P5",
            f"select by thresholds, {rows / 1e6:g}M rows",
            t_ours.median,
            "s",
            "pandas read_parquet + mask",
            t_pd.median,
            ratio(t_pd.median, t_ours.median),
            "<= 2",
            goal_on="value",
            note=f"{t_ours.extra[-1]:,} rows selected; index {size_mb:.0f} MB Parquet; "
            "ratio = pandas time / ours",
        )
    ]
