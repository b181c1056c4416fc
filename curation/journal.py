"""Journal: which blocks of a curation output are committed, and so which inputs are done.

A block is committed when its record ``_work/blocks/BLOCK.json`` exists: the driver writes it
(temporary name + rename) only after the block's segments and index part are in place
(``curation.sink``). The record lists the block's input ids, so the unit of resume is the
input: a rerun skips every input named by a record, whatever blocks the earlier run formed.
Files under ``_work`` that no record names (a block that was in flight when the run died, a
temporary file) are garbage: ``collect_garbage`` removes them before a run goes on, so nothing
is ever written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from core.storage import read_many
from curation.sink import BLOCK_INDEX, SEGMENTS, WORK, BlockWritten, write_atomic

logger = logging.getLogger(__name__)

BLOCKS = f"{WORK}/blocks"


def block_id(input_ids: Iterable[str]) -> str:
    """``b`` + 16 hex digits of the sha1 of the sorted input ids: the same inputs, the same id."""
    h = hashlib.sha1()
    for i in sorted(input_ids):
        h.update(i.encode())
        h.update(b"\0")
    return "b" + h.hexdigest()[:16]


@dataclass(frozen=True)
class BlockRecord:
    block: str
    inputs: list[str]
    written: BlockWritten
    stages: dict[str, list[float]] = field(default_factory=dict)  # name -> [in, out, seconds]

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "inputs": list(self.inputs),
            "written": self.written.to_dict(),
            "stages": self.stages,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockRecord:
        return cls(d["block"], list(d["inputs"]), BlockWritten.from_dict(d["written"]), d["stages"])


class Journal:
    def __init__(self, output: str):
        self.output = str(output).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.output)
        self.root = self.root.rstrip("/")
        self.unreadable: list[str] = []  # records that did not read back (see records)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def records(self) -> list[BlockRecord]:
        """Every committed block, sorted by block id. A record that does not read back (a
        machine that lost power under it) is not committed: it is named in ``unreadable``
        and ``collect_garbage`` removes it, so its inputs are done again."""
        out = []
        self.unreadable = []
        paths = sorted(self.fs.glob(self.path(f"{BLOCKS}/b*.json")))
        for p, data in zip(paths, read_many(self.fs, paths), strict=True):
            try:
                out.append(BlockRecord.from_dict(json.loads(data)))
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("block record %s does not read back (%s): redoing its inputs", p, e)
                self.unreadable.append(p)
        return out

    def commit(self, record: BlockRecord) -> None:
        final = self.path(f"{BLOCKS}/{record.block}.json")
        write_atomic(self.fs, final, json.dumps(record.to_dict(), indent=1).encode())

    @staticmethod
    def committed_inputs(records: Iterable[BlockRecord]) -> set[str]:
        return {i for r in records for i in r.inputs}

    def collect_garbage(self, records: Iterable[BlockRecord]) -> list[str]:
        """Remove block files no record names (and temporary files); returns what was removed."""
        keep = set()
        for r in records:
            keep.add(self.path(r.written.index_part))
            keep.update(self.path(s.path) for s in r.written.segments)
        removed = []
        for p in self.unreadable:
            self.fs.rm(p)
            removed.append(p)
        for folder in (SEGMENTS, BLOCK_INDEX, BLOCKS):
            if not self.fs.exists(self.path(folder)):
                continue
            for p in sorted(self.fs.find(self.path(folder))):
                name = p.rsplit("/", 1)[-1]
                record = folder == BLOCKS and name.startswith("b") and name.endswith(".json")
                if p in keep or (record and p not in removed):
                    continue
                self.fs.rm(p)
                removed.append(p)
        return removed
