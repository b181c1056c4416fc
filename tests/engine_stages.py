"""Small real stages for engine tests: they tag rows, die on cue, or fail to set up.

Ray workers unpickle these by value (``ray.cloudpickle.register_pickle_by_value``), since the
tests folder is not importable in a worker. Faults are real: a stage that dies calls
``os._exit`` in the worker process, as a segfaulting decoder or the OOM killer would end it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, ClassVar

from curation.stages.base import MissingWeights, Resources, Row, SampleError, Stage


def input_rows(n: int, poison: set[int] = frozenset()) -> list[Row]:
    """``n`` input rows; those in ``poison`` carry 'poison' in their uri."""
    rows = []
    for i in range(n):
        name = f"poison-{i:03d}" if i in poison else f"in-{i:03d}"
        key = f"k{i:03d}"
        rows.append(
            {
                "key": key,
                "input_id": key,
                "source_uri": f"/data/{name}.png",
                # an input that never reached probe has no kind (kind=auto): as in a real run
                "kind": None if i in poison else "image",
                "status": None,
                "reasons": [],
            }
        )
    return rows


class TagStage(Stage):
    """CPU: records which stages saw the row, in order."""

    name: ClassVar[str] = "tag"

    def process_row(self, row: Row) -> Row:
        return {**row, "caption": (row.get("caption") or "") + "tag;"}


class ScoreStage(Stage):
    """A model stage (actor pool): a score, optionally dying once per marked input."""

    name: ClassVar[str] = "score"
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    uses_model: ClassVar[bool] = True

    def __init__(self, die_once_dir: str | None = None, die_on: str | None = None):
        self.die_once_dir = die_once_dir
        self.die_on = die_on

    def process_row(self, row: Row) -> Row:
        if self.die_on and self.die_on in row["source_uri"] and self.die_once_dir:
            marker = Path(self.die_once_dir) / f"died-{row['key']}"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the actor process dies in the middle of the call
        return {**row, "aesthetic": float(int(row["key"][1:]) % 10)}


class PoisonStage(Stage):
    """CPU: the worker process dies whenever a 'poison' input reaches it."""

    name: ClassVar[str] = "poison"

    def process_row(self, row: Row) -> Row:
        if "poison" in row["source_uri"]:
            os._exit(1)
        return row


class AcceptStage(Stage):
    """CPU: accepts every row with a one-member sample (what ``encode`` would give)."""

    name: ClassVar[str] = "accept"

    def process_row(self, row: Row) -> Row:
        return {
            **row,
            "status": "accepted",
            "width": 64,
            "height": 64,
            "num_frames": 1,
            "bucket": "a256_r1x1_f1",
            "media": {"png": row["key"].encode()},
        }


class NoWeightsStage(Stage):
    """A model stage whose set-up fails as a missing model does."""

    name: ClassVar[str] = "noweights"
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    uses_model: ClassVar[bool] = True

    def setup(self) -> None:
        raise MissingWeights("noweights: model not found at /nowhere/model.bin")

    def process_row(self, row: Row) -> Any:  # pragma: no cover - never reached
        return row


class BatchBugStage(Stage):
    """CPU: a bug that breaks the whole batch whenever a 'poison' input is in it (raised
    outside the per-row handling, as a library error in a batched call would be)."""

    name: ClassVar[str] = "batchbug"

    def process_batch(self, rows: list[Row]) -> list[Row]:
        if any("poison" in r["source_uri"] for r in rows):
            raise RuntimeError("batched decode failed")
        return rows


class SetupLogStage(Stage):
    """CPU: leaves a file ``<pid>-<uuid>`` in ``log_dir`` per set-up; tags each row with the
    pid that processed it; an input with 'bad' in its uri is a sample error."""

    name: ClassVar[str] = "setuplog"

    def __init__(self, log_dir: str):
        self.log_dir = log_dir

    def setup(self) -> None:
        (Path(self.log_dir) / f"{os.getpid()}-{uuid.uuid4().hex}").touch()

    def process_row(self, row: Row) -> Row:
        if "bad" in row["source_uri"]:
            raise SampleError("decode_error", "cannot read it")
        seen = (row.get("caption") or "") + f"{self.name}@{os.getpid()};"
        return {**row, "caption": seen, "status": "rejected", "reasons": [f"{self.name}: seen"]}


class SetupLogModelStage(SetupLogStage):
    """The same as a model stage (its own actor pool)."""

    name: ClassVar[str] = "setuplog_model"
    resources: ClassVar[Resources] = Resources(cpus=0.25)
    uses_model: ClassVar[bool] = True
