"""Sink: one input partition -> its shards + its index part, written so a rerun can resume.

Layout under the output folder::

    shards/BUCKET/pNNNNN-MMMMMM.tar     accepted samples of partition NNNNN (WebDataset)
    index/part-pNNNNN.parquet           every row of partition NNNNN (sample contract)
    index/_shards/pNNNNN.json           the shards of partition NNNNN (sha256, bytes, count)
    _thumbs/KEY.jpg                     thumbnails of rejected / error samples (report)

A partition is finished when its index part exists: shards are renamed into place first, then
the shard manifest, then the index part (each via a temporary name + rename). A partition
that is redone (its worker or the driver died) first deletes whatever shards it left, so no
sample is ever written twice.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fsspec
import pyarrow as pa
from PIL import Image

from catalog.index import write_index_part
from catalog.schema import conform
from catalog.shards import ShardInfo, ShardWriter, bucket_name, sample_json
from curation.config import CurationConfig
from curation.encode import encode_clip
from curation.media import local_path
from curation.stages.base import mark_error

WORKING_ONLY = (
    "frames",
    "frame_times",
    "target_frames",
    "thumb",
    "input_id",
    "clip_embedding",
    "random_access",
    "frames_decoder",
)
IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def partition_name(pid: int) -> str:
    return f"p{pid:05d}"


def finished_partitions(output: str) -> set[int]:
    fs, root = fsspec.core.url_to_fs(output)
    found = set()
    for path in fs.glob(f"{root.rstrip('/')}/index/part-p*.parquet"):
        stem = path.rsplit("/", 1)[-1][len("part-p") : -len(".parquet")]
        if stem.isdigit():
            found.add(int(stem))
    return found


def read_shard_manifests(output: str) -> list[ShardInfo]:
    fs, root = fsspec.core.url_to_fs(output)
    shards = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/index/_shards/p*.json")):
        with fs.open(path, "rb") as f:
            shards += [ShardInfo(**s) for s in json.loads(f.read())]
    return shards


class PartitionWriter:
    """Ray Data ``map_groups`` callable: all rows of one partition in, a summary row out."""

    def __init__(self, output: str, cfg: CurationConfig, run_id: str | None = None):
        self.output = output.rstrip("/")
        self.cfg = cfg
        self.run_id = run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = sorted(batch.to_pylist(), key=lambda r: r["key"])
        pid = int(rows[0]["partition"])
        name = partition_name(pid)
        fs, root = fsspec.core.url_to_fs(self.output)
        self._remove_leftovers(fs, root, name)
        self._write_thumbs(fs, root, rows)
        writer = ShardWriter(
            self.output,
            prefix=name,
            max_samples=self.cfg.shards.max_samples,
            max_bytes=self.cfg.shards.max_bytes,
        )
        out_rows = []
        try:
            for row in rows:
                row = {k: v for k, v in row.items() if k not in WORKING_ONLY}
                row["run_id"] = self.run_id
                if row["status"] == "accepted":
                    row = self._write_sample(writer, row)
                out_rows.append(row)
            shards = writer.close()
        except BaseException:
            writer.abort()
            raise
        manifest = f"{root}/index/_shards/{name}.json"
        fs.makedirs(manifest.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(manifest + ".tmp", "wb") as f:
            f.write(json.dumps([s.to_dict() for s in shards], indent=1).encode())
        fs.mv(manifest + ".tmp", manifest)
        write_index_part(index_table(out_rows), f"{self.output}/index", f"part-{name}")
        return pa.table({"partition": [pid], "rows": [len(out_rows)], "shards": [len(shards)]})

    def _write_sample(self, writer: ShardWriter, row: dict[str, Any]) -> dict[str, Any]:
        try:
            members, num_frames = self._members(row)
        except Exception as e:  # an input that probed fine but will not re-encode
            return mark_error(row, "encode_error", f"{type(e).__name__}: {e}")
        row["bucket"] = bucket_name(row["width"], row["height"], num_frames)
        text = row.get("recaption") or row.get("instruction") or row.get("caption") or ""
        members = {"json": sample_json(row), "txt": text.encode("utf-8"), **members}
        row["shard"] = writer.write(row["bucket"], row["key"], members)
        return row

    def _members(self, row: dict[str, Any]) -> tuple[dict[str, bytes], int]:
        kind = row["kind"]
        if kind == "image":
            ext, data = image_bytes(row["source_uri"])
            return {ext: data}, 1
        if kind == "image_edit":
            (se, sd), (te, td) = image_bytes(row["source_uri"]), image_bytes(row["target_uri"])
            return {f"src.{se}": sd, f"tgt.{te}": td}, 1
        span = row.get("span")
        clip = (span["start"], span["end"]) if span else None
        kw = dict(max_side=self.cfg.shards.video_max_side, crf=self.cfg.shards.video_crf)
        src, n = encode_clip(
            row["source_uri"],
            clip,
            display_width=row["width"],
            display_height=row["height"],
            rotation=row.get("rotation") or 0,
            **kw,
        )
        if kind == "video":
            return {"mp4": src}, n
        tgt, _ = encode_clip(
            row["target_uri"],
            None,
            display_width=row["target_width"],
            display_height=row["target_height"],
            **kw,
        )
        return {"src.mp4": src, "tgt.mp4": tgt}, n

    @staticmethod
    def _remove_leftovers(fs, root: str, name: str) -> None:
        for pattern in (f"shards/*/{name}-*.tar", f"shards/*/.{name}-*.tar.tmp-*"):
            for path in fs.glob(f"{root}/{pattern}"):
                fs.rm(path)

    @staticmethod
    def _write_thumbs(fs, root: str, rows: list[dict[str, Any]]) -> None:
        thumbs = [(r["key"], r["thumb"]) for r in rows if r.get("thumb")]
        if thumbs:
            fs.makedirs(f"{root}/_thumbs", exist_ok=True)
        for key, data in thumbs:
            with fs.open(f"{root}/_thumbs/{key}.jpg", "wb") as f:
                f.write(data)


def image_bytes(uri: str) -> tuple[str, bytes]:
    """(extension, bytes): the original file for JPEG/PNG/WebP, else re-encoded as PNG."""
    with open(local_path(uri), "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        ext = IMAGE_EXT.get(im.format or "")
        if ext:
            return ext, data
        out = io.BytesIO()
        im.convert("RGBA" if "A" in im.getbands() else "RGB").save(out, format="PNG")
        return "png", out.getvalue()


def index_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Index rows: the contract columns, then extra score columns (``partition``,
    ``edit_change``...) typed as the working schema types them."""
    from curation.adapter import rows_to_arrow

    return conform(rows_to_arrow(rows))
