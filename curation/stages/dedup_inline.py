"""dedup: near-exact duplicates within one ``curate run``, decided as the blocks go.

With ``dedup.inline`` the run rejects a sample whose pHash (``stages/phash.py``) is within
``dedup.inline_max_bits`` of an accepted sample an earlier block claimed, with the reason
``duplicate_of: KEY``, right after ``select`` and before anything is encoded. The claims live
in one Ray actor of the run (``curation.dedup.HashRegistry``), created by the driver and
seeded from the committed blocks on a resume, so no step waits for all inputs (no barrier
before the sink) and a resumed run decides like an uninterrupted one for every committed
sample. Which of two copies stays depends on which block finished first; ``curate dedup``
decides over the whole version with the keep rule (higher aesthetic, longer, larger, key).
"""

from __future__ import annotations

from typing import ClassVar

from .base import Resources, Row, Stage


class InlineDedupStage(Stage):
    """Rejects the accepted rows of a block that repeat a sample claimed before."""

    name: ClassVar[str] = "dedup"
    resources: ClassVar[Resources] = Resources(cpus=1)
    batch_size: ClassVar[int] = 64
    uses_model: ClassVar[bool] = False

    def __init__(self, max_bits: int):
        self.max_bits = max_bits
        self.registry = ""  # the run's HashRegistry actor, named by the driver before the run
        self._handle = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def setup(self) -> None:
        import ray

        if not self.registry:
            raise RuntimeError("dedup.inline: the run's hash registry was not started")
        self._handle = ray.get_actor(self.registry)

    def process_row(self, row: Row) -> Row:
        return self.process_batch([row])[0]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        import ray

        items = [
            (r["key"], r["kind"], [*(r.get("phash") or []), *(r.get("target_phash") or [])])
            for r in rows
            if r.get("status") == "accepted" and r.get("phash")
        ]
        if not items:
            return rows
        if self._handle is None:
            self.setup()
        marks = ray.get(self._handle.claim.remote(items))
        out = []
        for row in rows:
            mark = marks.get(row["key"])
            if mark is not None:
                row = {
                    **row,
                    "status": "rejected",
                    "reasons": [*(row.get("reasons") or []), f"duplicate_of: {mark.kept}"],
                    "duplicate_of": mark.kept,
                    "duplicate_signal": mark.evidence,
                }
            out.append(row)
        return out
