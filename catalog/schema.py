"""The sample contract: one Arrow schema shared by curation, the catalog and training.

One row per sample. Curation writes every input as a row (accepted, rejected or error, with
reasons), the catalog stores the rows as the Parquet sample index of a dataset version, and
training reads the accepted rows' shards. Columns that a stage has not computed are null.

Edit samples (``image_edit`` / ``video_edit``) carry a source medium (``source_uri`` and the
probe columns) and a target medium of the same kind (``target_*`` columns).

Extra columns are allowed (a new scorer adds its score column); ``validate_table`` checks the
contract columns and leaves extra ones alone unless ``allow_extra=False``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

KINDS = ("image", "video", "image_edit", "video_edit")
STATUSES = ("accepted", "rejected", "error")
VIDEO_KINDS = ("video", "video_edit")
EDIT_KINDS = ("image_edit", "video_edit")

SPAN_TYPE = pa.struct([pa.field("start", pa.float64()), pa.field("end", pa.float64())])
BOUNDARIES_TYPE = pa.struct([pa.field("start", pa.string()), pa.field("end", pa.string())])
TURNS_TYPE = pa.list_(pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())]))


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


SAMPLE_SCHEMA = pa.schema(
    [
        _f("key", pa.string(), "stable id: sha1 of source uri (+ target uri) + clip span", False),
        _f("kind", pa.string(), "image | video | image_edit | video_edit", False),
        _f("source_uri", pa.string(), "where the (source) medium came from", False),
        _f("span", SPAN_TYPE, "clip start/end in seconds of the source video; null for images"),
        _f("parent_key", pa.string(), "key of the whole input a clip was cut from"),
        _f(
            "boundaries",
            BOUNDARIES_TYPE,
            "how a clip's start/end were found: video | cut | dissolve | fade | stride",
        ),
        # probe
        _f("container", pa.string(), "container format as probed (mp4, matroska, png, ...)"),
        _f("codec", pa.string(), "video/image codec as probed"),
        _f("width", pa.int32(), "display width in pixels (after rotation and pixel aspect)"),
        _f("height", pa.int32(), "display height in pixels (after rotation and pixel aspect)"),
        _f("rotation", pa.int16(), "rotation metadata in degrees (0, 90, 180, 270)"),
        _f("sample_aspect_ratio", pa.float32(), "pixel aspect ratio (1.0 = square pixels)"),
        _f("has_audio", pa.bool_(), "an audio stream is present"),
        _f("fps", pa.float32(), "average frames per second"),
        _f("num_frames", pa.int32(), "frames in the sample (1 for images)"),
        _f("duration", pa.float32(), "seconds (0 for images)"),
        # text
        _f("caption", pa.string(), "caption supplied with the input"),
        _f("recaption", pa.string(), "caption written by the recaption stage"),
        _f("instruction", pa.string(), "edit instruction (edit kinds only)"),
        # conversation corpora (LLaVA-style QA; curation/sources/conversations.py)
        _f("conversation", TURNS_TYPE, "turns {from: human | gpt, value} about the medium"),
        _f("num_turns", pa.int32(), "turns in the conversation (human + gpt)"),
        _f("record_uri", pa.string(), "the conversation's record: FILE#INDEX (0-based)"),
        # edit target medium
        _f("target_uri", pa.string(), "target medium of an edit pair"),
        _f("target_width", pa.int32(), "target display width"),
        _f("target_height", pa.int32(), "target display height"),
        _f("target_num_frames", pa.int32(), "target frames (1 for images)"),
        # scores (scorers add, select thresholds)
        _f("aesthetic", pa.float32(), "LAION aesthetic score, 1-10 (min over frames for video)"),
        _f("watermark", pa.float32(), "watermark probability, 0-1"),
        _f(
            "watermark_static",
            pa.float32(),
            "static-overlay share (densest quarter window) while the rest moves",
        ),
        _f("motion", pa.float32(), "mean optical-flow magnitude / frame diagonal, per second"),
        _f("motion_min", pa.float32(), "min over frame pairs of the per-pair motion (per second)"),
        _f("motion_max", pa.float32(), "max over frame pairs of the per-pair motion (per second)"),
        _f(
            "ocr_area",
            pa.float32(),
            "area of the union of text boxes / frame area (max over frames)",
        ),
        _f("ocr_boxes", pa.int32(), "number of text boxes (max over frames)"),
        # duplicate signals (curation/stages/phash.py, stages/clip_head.py; curation/dedup.py)
        _f("phash", pa.list_(pa.uint64()), "64-bit pHash of each sampled frame, in order"),
        _f("target_phash", pa.list_(pa.uint64()), "pHash of each target frame (edit pairs)"),
        _f(
            "embedding",
            pa.list_(pa.float16()),
            "L2-normalised mean CLIP embedding of the scored frames (dedup.embedding)",
        ),
        _f(
            "duplicate_of",
            pa.string(),
            "key of the kept sample this one repeats (curate dedup; dedup.inline)",
        ),
        _f("duplicate_signal", pa.string(), "what found the repeat: phash N bits | clip cosine C"),
        # outcome
        _f("status", pa.string(), "accepted | rejected | error", False),
        _f("reasons", pa.list_(pa.string()), "every reason for rejected / error", False),
        _f("bucket", pa.string(), "shard bucket (area class x aspect x frames)"),
        _f("shard", pa.string(), "shard file (relative to the version root) holding the sample"),
        _f("run_id", pa.string(), "catalog run that produced the row"),
    ]
)

COLUMNS: tuple[str, ...] = tuple(SAMPLE_SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(f.name for f in SAMPLE_SCHEMA if not f.nullable)
SCORE_COLUMNS = (
    "aesthetic",
    "watermark",
    "watermark_static",
    "motion",
    "motion_min",
    "motion_max",
    "ocr_area",
    "ocr_boxes",
)
# Closed ranges a valid value must lie in (None = open end).
VALUE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "width": (1, None),
    "height": (1, None),
    "target_width": (1, None),
    "target_height": (1, None),
    "num_frames": (1, None),
    "num_turns": (1, None),
    "target_num_frames": (1, None),
    "fps": (0, None),
    "duration": (0, None),
    "sample_aspect_ratio": (0, None),
    "aesthetic": (0, 10),
    "watermark": (0, 1),
    "watermark_static": (0, 1),
    "motion": (0, None),
    "motion_min": (0, None),
    "motion_max": (0, None),
    "ocr_area": (0, 1),
    "ocr_boxes": (0, None),
}
ROTATIONS = (0, 90, 180, 270)


class SchemaError(ValueError):
    """A table does not satisfy the sample contract; ``problems`` lists every violation."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"table does not match the sample contract:\n  - {shown}{more}")


def make_key(
    source_uri: str,
    span: tuple[float, float] | None = None,
    target_uri: str | None = None,
    record: str | None = None,
) -> str:
    """Stable sample key: sha1 of the source uri, the target uri (edits), the record of a
    conversation corpus (``FILE#INDEX``: two records may ask about one medium) and the clip
    span.

    Span ends are rounded to milliseconds so that float noise cannot change a key.
    """
    parts = [source_uri]
    if target_uri is not None:
        parts.append(f"target={target_uri}")
    if record is not None:
        parts.append(f"record={record}")
    if span is not None:
        parts.append(f"span={span[0]:.3f}-{span[1]:.3f}")
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()


def empty_table() -> pa.Table:
    return SAMPLE_SCHEMA.empty_table()


def rows_to_table(rows: Iterable[Mapping[str, Any]], allow_extra: bool = True) -> pa.Table:
    """Build a contract table from dict rows; missing contract columns become null.

    Extra keys become extra columns (type inferred) when ``allow_extra``; otherwise an error.
    """
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    if extra and not allow_extra:
        raise SchemaError(
            [f"unknown column {c!r} (contract columns: {', '.join(COLUMNS)})" for c in extra]
        )
    arrays = []
    fields = []
    for field in SAMPLE_SCHEMA:
        values = [r.get(field.name) for r in rows]
        if field.name == "reasons":
            values = [list(v) if v is not None else [] for v in values]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise SchemaError(
                [f"column {field.name!r}: cannot convert to {field.type}: {e}"]
            ) from e
        fields.append(field)
    for name in extra:
        arrays.append(pa.array([r.get(name) for r in rows]))
        fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def conform(table: pa.Table) -> pa.Table:
    """Cast a table to the contract: add missing nullable columns as nulls, order contract
    columns first, cast safely (int64 -> int32 etc.), keep extra columns after them.

    Raises SchemaError when a required column is missing or a cast would lose information.
    """
    problems = []
    arrays, fields = [], []
    for field in SAMPLE_SCHEMA:
        if field.name not in table.column_names:
            if not field.nullable:
                problems.append(f"required column {field.name!r} is missing")
                continue
            arrays.append(pa.nulls(table.num_rows, field.type))
        else:
            col = table.column(field.name)
            if col.type != field.type:
                try:
                    col = col.cast(field.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    problems.append(
                        f"column {field.name!r}: {col.type} does not cast to {field.type}: {e}"
                    )
                    continue
            arrays.append(col)
        fields.append(field)
    if problems:
        raise SchemaError(problems)
    for name in table.column_names:
        if name not in SAMPLE_SCHEMA.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def validate_table(table: pa.Table, allow_extra: bool = True) -> list[str]:
    """Every way ``table`` breaks the sample contract, as readable strings (empty = valid).

    Checks column presence and types, non-null required columns, enum values (kind, status),
    unique keys, status/reason consistency, value ranges, span order, rotation values, and that
    edit rows carry a target while non-edit rows do not.
    """
    problems: list[str] = []
    names = set(table.column_names)
    for field in SAMPLE_SCHEMA:
        if field.name not in names:
            if not field.nullable:
                problems.append(f"required column {field.name!r} is missing")
            continue
        actual = table.schema.field(field.name).type
        if actual != field.type:
            problems.append(f"column {field.name!r} has type {actual}, expected {field.type}")
    if not allow_extra:
        for name in sorted(names - set(COLUMNS)):
            problems.append(f"unknown column {name!r}")
    if problems:
        return problems  # value checks below assume the right types

    def rows_where(mask: pa.ChunkedArray | pa.Array, limit: int = 5) -> str:
        keys = table.filter(mask).column("key").to_pylist()[:limit]
        return ", ".join(repr(k) for k in keys)

    for name in REQUIRED_COLUMNS:
        nulls = table.column(name).null_count
        if nulls:
            problems.append(f"column {name!r} has {nulls} null value(s)")
    for name, allowed in (("kind", KINDS), ("status", STATUSES)):
        col = table.column(name)
        bad = pc.and_(pc.is_valid(col), pc.invert(pc.is_in(col, value_set=pa.array(allowed))))
        if pc.any(bad).as_py():
            values = sorted(set(table.filter(bad).column(name).to_pylist()) - {None})
            problems.append(f"column {name!r} has values {values}; allowed: {', '.join(allowed)}")
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != len(keys) - keys.null_count:
        counts = pc.value_counts(keys)
        dup = [c["values"].as_py() for c in counts if c["counts"].as_py() > 1][:5]
        problems.append(f"duplicate keys: {dup}")

    num_reasons = pc.fill_null(pc.list_value_length(table.column("reasons")), 0)
    not_accepted = pc.fill_null(pc.not_equal(table.column("status"), "accepted"), False)
    missing = pc.and_(not_accepted, pc.equal(num_reasons, 0))
    if pc.any(missing).as_py():
        problems.append(f"rejected/error rows without a reason: {rows_where(missing)}")
    accepted_with = pc.and_(pc.invert(not_accepted), pc.greater(num_reasons, 0))
    if pc.any(accepted_with).as_py():
        problems.append(f"accepted rows with reasons: {rows_where(accepted_with)}")

    for name, (lo, hi) in VALUE_RANGES.items():
        col = table.column(name)
        if col.null_count == len(col):
            continue
        checks = [pc.is_nan(col)] if pa.types.is_floating(col.type) else []
        if lo is not None:
            checks.append(pc.less(col, lo))
        if hi is not None:
            checks.append(pc.greater(col, hi))
        bad = pc.fill_null(functools.reduce(pc.or_, checks), False)
        if pc.any(bad).as_py():
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            problems.append(
                f"column {name!r} out of range {rng} (or NaN) in rows {rows_where(bad)}"
            )

    rot = table.column("rotation")
    bad = pc.and_(
        pc.is_valid(rot), pc.invert(pc.is_in(rot, value_set=pa.array(ROTATIONS, pa.int16())))
    )
    if pc.any(bad).as_py():
        problems.append(f"column 'rotation' must be one of {ROTATIONS}; rows {rows_where(bad)}")

    span = table.column("span")
    start, end = pc.struct_field(span, "start"), pc.struct_field(span, "end")
    bad = pc.fill_null(pc.or_(pc.less(start, 0), pc.greater_equal(start, end)), False)
    if pc.any(bad).as_py():
        problems.append(f"span must satisfy 0 <= start < end; rows {rows_where(bad)}")

    is_edit = pc.is_in(table.column("kind"), value_set=pa.array(EDIT_KINDS))
    has_target = pc.is_valid(table.column("target_uri"))
    bad = pc.fill_null(pc.and_(is_edit, pc.invert(has_target)), False)
    if pc.any(bad).as_py():
        problems.append(f"edit rows without target_uri: {rows_where(bad)}")
    bad = pc.fill_null(pc.and_(pc.invert(is_edit), has_target), False)
    if pc.any(bad).as_py():
        problems.append(f"non-edit rows with a target_uri: {rows_where(bad)}")
    return problems


def assert_valid(table: pa.Table, allow_extra: bool = True) -> pa.Table:
    """Return ``table`` if it satisfies the contract, else raise SchemaError listing why."""
    problems = validate_table(table, allow_extra=allow_extra)
    if problems:
        raise SchemaError(problems)
    return table


def count_by_status(table: pa.Table) -> dict[str, int]:
    """Rows per status, every status present (zeros included)."""
    counts = {s: 0 for s in STATUSES}
    for item in pc.value_counts(table.column("status")):
        value = item["values"].as_py()
        counts[value] = counts.get(value, 0) + item["counts"].as_py()
    return counts
