"""What every curation stage is: a small class with declared resources that works on batches.

A stage is built from its config section (cheap, picklable ``__init__``), loads its model once
per worker in ``setup()``, and transforms a batch of rows in ``process_batch()``. Rows are
plain dicts: sample-contract columns plus working columns (``frames``, ``media``, ...).

A bad sample is data, not an exception: ``process_row`` raising ``SampleError`` (or anything
else) marks that row ``status="error"`` with a reason naming the stage, and the batch goes on.
Rows whose status is already final pass through every stage untouched: rows in error, and
rows the input listing rejected without reading them (``rejected`` with a reason in
``LISTING_REASONS``, e.g. a hidden file). This holds for stages that override
``process_batch`` too (``Stage.__init_subclass__`` wraps it). Scorers add columns and never
drop rows.
Stages do not import Ray; ``curation.adapter`` runs them in Ray actors (``setup()`` once per
actor, which sets ``device`` first: ``cuda`` when Ray gave the actor a GPU).
"""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from core.weights import LocalWeights, MissingWeights, require_all

Row = dict[str, Any]

# Reasons the input listing (curation/sources/listing.py) rejects an input for without reading it:
# such a row is final, nothing downstream probes, scores or re-selects it.
LISTING_REASONS = frozenset({"skipped_hidden", "text_only", "not_referenced"})


def reason_tag(reason: str) -> str:
    """``"too_short: 1.2 < 2"`` -> ``"too_short"``."""
    return reason.split(":", 1)[0].strip()


def is_final(row: Row) -> bool:
    """True for rows no stage may touch: in error, or rejected by the input listing."""
    status = row.get("status")
    if status == "error":
        return True
    return status == "rejected" and any(
        reason_tag(r) in LISTING_REASONS for r in row.get("reasons") or []
    )


class SampleError(Exception):
    """A problem with one sample (corrupt file, unsupported codec...): recorded, not raised.

    ``reason`` is a short machine-friendly tag (``decode_error``, ``empty_file``...); the
    message adds detail for humans.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Resources:
    """Per-worker resources. Fractional CPUs keep actor pools from starving read tasks."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0


class Stage:
    name: ClassVar[str] = "stage"
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 8
    uses_model: ClassVar[bool] = False  # True: run in an actor pool (setup() once per actor)
    device: str = "cpu"  # set by the worker before setup(): "cuda" when it holds a GPU
    # True for the stages that read the sampled frames: after the last of them the frames are
    # dropped (curation.adapter), so they do not travel to the sink's step
    reads_frames: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``process_batch`` only ever sees rows that are not final."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("process_batch")
        if own is not None and not getattr(own, "_skips_final", False):
            cls.process_batch = _skipping_final(own)

    def setup(self) -> None:
        """Load models / engines once per worker."""

    def required_files(self) -> list[LocalWeights]:
        """Weights that must be on disk before the pipeline starts (checked on the driver)."""
        return []

    def process_row(self, row: Row) -> Row | list[Row]:
        raise NotImplementedError

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out: list[Row] = []
        for row in rows:
            if is_final(row):
                out.append(row)
                continue
            try:
                result = self.process_row(row)
            except SampleError as e:
                out.append(mark_error(row, e.reason, e.detail))
                continue
            except Exception as e:  # a library choking on one sample must not stop the job
                out.append(mark_error(row, f"{self.name}_failed", f"{type(e).__name__}: {e}"))
                continue
            out.extend(result if isinstance(result, list) else [result])
        return out

    def describe(self) -> str:
        """One line for the printed plan."""
        r = self.resources
        gpu = f", {r.gpus:g} GPU" if r.gpus else ""
        pool = "actor pool" if self.uses_model else "tasks"
        return f"{self.name} ({pool}, {r.cpus:g} CPU{gpu}, batch {self.batch_size})"


def _skipping_final(process_batch: Callable[[Stage, list[Row]], list[Row]]):
    """``process_batch`` called on the rows that are not final; final rows come back unchanged
    in their places (after the others when the stage returned more or fewer rows)."""

    @functools.wraps(process_batch)
    def wrapper(self: Stage, rows: list[Row]) -> list[Row]:
        final = [is_final(r) for r in rows]
        if not any(final):
            return process_batch(self, rows)
        work = [r for r, f in zip(rows, final, strict=True) if not f]
        done = process_batch(self, work) if work else []
        if len(done) != len(work):
            return done + [r for r, f in zip(rows, final, strict=True) if f]
        it = iter(done)
        return [r if f else next(it) for r, f in zip(rows, final, strict=True)]

    wrapper._skips_final = True  # type: ignore[attr-defined]
    return wrapper


def claimed_kind(row: Row) -> str:
    """The kind a row's file name suggests (used only for rows whose content never probed:
    the sample contract needs a kind on every row)."""
    mime, _ = mimetypes.guess_type(str(row.get("source_uri") or ""))
    base = "video" if mime and mime.startswith("video/") else "image"
    return f"{base}_edit" if row.get("target_uri") else base


def mark_error(row: Row, reason: str, detail: str = "") -> Row:
    """Set ``status=error`` and append the reason (``reason: detail``)."""
    row = dict(row)
    row["status"] = "error"
    reasons = list(row.get("reasons") or [])
    reasons.append(f"{reason}: {detail}" if detail else reason)
    row["reasons"] = reasons
    return row


def check_required(stages: Iterable[Stage]) -> None:
    """Raise MissingWeights listing every missing file (with how to get it) before any work."""
    require_all(replace(f, what=f"{s.name}: {f.what}") for s in stages for f in s.required_files())


__all__ = ["LocalWeights", "MissingWeights", "Resources", "Row", "SampleError", "Stage"]
