"""Helpers shared by tests (importable: ``tests`` is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

from catalog.schema import make_key, rows_to_table
from catalog.shards import ShardWriter, bucket_name, sample_json


def sample_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` contract rows with a known mix: every 5th errored, every 4th rejected, rest accepted."""
    rows = []
    for i in range(n):
        kind = "video" if i % 2 else "image"
        uri = f"/data/raw/{seed}/{i:04d}.{'mp4' if kind == 'video' else 'jpg'}"
        span = (0.0, 4.0) if kind == "video" else None
        width, height = (640, 360) if i % 3 else (512, 512)
        row = {
            "key": make_key(uri, span),
            "kind": kind,
            "source_uri": uri,
            "span": {"start": span[0], "end": span[1]} if span else None,
            "width": width,
            "height": height,
            "fps": 24.0 if kind == "video" else None,
            "num_frames": 96 if kind == "video" else 1,
            "duration": 4.0 if kind == "video" else 0.0,
            "aesthetic": 3.0 + (i % 7),
            "motion": 0.001 * (i % 5) if kind == "video" else None,
            "ocr_area": 0.01 * (i % 3),
            "status": "accepted",
            "reasons": [],
        }
        if i % 5 == 0:
            row.update(status="error", reasons=["decode_error"], width=None, height=None)
        elif i % 4 == 0:
            row.update(status="rejected", reasons=["low_aesthetic"])
        rows.append(row)
    return rows


def write_version_files(root: Path, rows: list[dict], max_samples: int = 4) -> list:
    """Write accepted rows into bucketed shards and all rows into ROOT/index; returns shards."""
    from catalog.index import write_index_part

    with ShardWriter(str(root), prefix="p0", max_samples=max_samples) as writer:
        for row in rows:
            if row["status"] != "accepted":
                continue
            row["bucket"] = bucket_name(row["width"], row["height"], row["num_frames"])
            ext = "mp4" if row["kind"] == "video" else "jpg"
            row["shard"] = writer.write(
                row["bucket"], row["key"], {"json": sample_json(row), ext: row["key"].encode()}
            )
    write_index_part(rows_to_table(rows), root / "index", "part-0")
    return writer.finished
