"""Bucket streams: one training bucket's deterministic sample stream for one rank.

A ``TaskLoader`` groups its shards by training bucket (``buckets.py``) and keeps one stream per
bucket (``plan_stream``):

* the bucket's shards are sorted by uri (shards with no usable sample for the task dropped);
* **shard split** when the bucket has at least ``world_size`` such shards: shard ``i`` of the
  sorted list belongs to rank ``i % world_size``, and each rank reads only its shards;
* **sample striding** otherwise: every rank reads all shards of the bucket in the same order
  and keeps usable sample ``j`` (counted from the start of the epoch) when
  ``j % world_size == rank`` (only the small ``KEY.json`` member of other ranks' samples is
  read);
* a bucket with fewer usable samples than ``world_size`` gets **no stream** (``plan_stream``
  returns None), so every stream has data on every rank;
* streams repeat forever in epochs; each epoch visits the rank's shards in an order shuffled
  by a generator seeded with (seed, epoch, task, bucket) (the same on every rank); samples
  inside a shard keep their written order.

Usable = the sample's kind is the task's, when ``keys`` is given (a catalog filter) its key
is allowed, and it is on the selection's side of the held-out split (``holdout.py``): a
training stream skips held-out keys, an evaluation stream reads only them.

The cursor (``position()``: epoch, shard position in the epoch's order,
samples of that shard consumed, usable samples seen, samples taken, and a fingerprint of the
stream's shards) is all a resumed stream needs to continue exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catalog.shards import ShardReader
from training.data.buckets import BucketShape
from training.data.holdout import KindCut
from training.data.samples import RawSample, meta_and_kind, open_shard, read_sample
from training.tasks import TASKS

__all__ = ["Selection", "Stream", "StreamShard", "plan_stream"]


@dataclass(frozen=True)
class StreamShard:
    uri: str
    bucket: str
    usable: int  # samples of this shard the selection takes (all ranks together)


@dataclass(frozen=True)
class Selection:
    """What one task loader on one rank takes from its shards."""

    task: str
    kind: str  # the sample kind the task reads
    keys: frozenset[str] | None  # allowed sample keys (a catalog filter), None = all
    rank: int
    world_size: int
    seed: int
    cut: KindCut | None = None  # the kind's held-out rule, None = no split
    part: str = "train"  # "train": held-out keys skipped; "eval": only held-out keys

    def key_allowed(self, key: str) -> bool:
        """The filter and the split, from the key alone (before the JSON member is read)."""
        if self.keys is not None and key not in self.keys:
            return False
        return self.cut is None or self.cut.held_out(key) == (self.part == "eval")

    def usable(self, key: str, kind: str | None) -> bool:
        return kind == self.kind and self.key_allowed(key)


@dataclass
class Stream:
    """One training bucket's sample stream for this rank, with an explicit cursor."""

    shape: BucketShape
    shards: list[StreamShard]  # the bucket's usable shards, sorted by uri (all ranks)
    sel: Selection
    mode: str  # "split" | "stride"
    mine: list[int]  # indices into ``shards`` this rank reads
    per_epoch: int  # samples this rank takes per epoch
    fingerprint: str
    epoch: int = 0
    shard: int = 0  # position in the epoch's order
    offset: int = 0  # sample groups of that shard consumed
    j: int = 0  # usable samples seen in this epoch (stride assignment)
    taken: int = 0  # samples this rank took in this epoch
    _order: tuple[int, list[int]] | None = field(default=None, repr=False)
    _reader: ShardReader | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(s.usable for s in self.shards)

    def position(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "offset": self.offset,
            "j": self.j,
            "taken": self.taken,
            "data": self.fingerprint,
        }

    def restore(self, pos: Mapping[str, Any]) -> None:
        """Move the cursor to ``pos`` (a ``position()``; {} = the start)."""
        self.close()
        self._order = None
        self.epoch = int(pos.get("epoch", 0))
        self.shard = int(pos.get("shard", 0))
        self.offset = int(pos.get("offset", 0))
        self.j = int(pos.get("j", 0))
        self.taken = int(pos.get("taken", 0))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def next_sample(self) -> RawSample:
        """Advance the cursor to the next sample this rank takes; read its members."""
        sel = self.sel
        while True:
            order = self._epoch_order()
            if self.shard >= len(order):
                if self.taken == 0:
                    raise RuntimeError(
                        f"{sel.task}: bucket {self.shape} gave rank {sel.rank} no sample in "
                        "a whole epoch (shard contents disagree with the counts)"
                    )
                self.close()
                self.epoch += 1
                self.shard = self.offset = self.j = self.taken = 0
                continue
            shard = self.shards[order[self.shard]]
            reader = self._reader
            if reader is None or reader.uri != shard.uri or reader.ordinal != self.offset:
                self.close()
                reader = self._reader = open_shard(shard.uri)
                reader.skip(self.offset)
            group = reader.next()
            if group is None:
                self.close()
                self.shard += 1
                self.offset = 0
                continue
            self.offset += 1
            key, members = group
            if not sel.key_allowed(key):
                continue
            meta, kind = meta_and_kind(reader, members)
            if not sel.usable(key, kind):
                continue
            j = self.j
            self.j += 1
            if self.mode == "stride" and j % sel.world_size != sel.rank:
                continue
            self.taken += 1
            return read_sample(reader, key, meta, members)

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            s, sel = self.shape, self.sel
            task_id = TASKS.index(sel.task)
            seed = [sel.seed % 2**63, self.epoch, task_id, s.frames, s.height, s.width]
            perm = np.random.default_rng(seed).permutation(len(self.mine))
            self._order = (self.epoch, [self.mine[i] for i in perm])
        return self._order[1]


def plan_stream(shape: BucketShape, shards: list[StreamShard], sel: Selection) -> Stream | None:
    """The bucket's stream for ``sel``'s rank (``shards`` sorted by uri), or None when the
    bucket has fewer usable samples than ``world_size`` (no rank may draw it)."""
    ws, r = sel.world_size, sel.rank
    total = sum(s.usable for s in shards)
    if len(shards) >= ws:
        mode, mine = "split", [i for i in range(len(shards)) if i % ws == r]
        per_epoch = sum(shards[i].usable for i in mine)
    elif total >= ws:
        mode, mine = "stride", list(range(len(shards)))
        per_epoch = len(range(r, total, ws))
    else:
        return None
    h = hashlib.sha1(f"{mode}|{ws}".encode())
    for s in shards:
        h.update(f"|{s.uri}:{s.usable}".encode())
    return Stream(shape, shards, sel, mode, mine, per_epoch, h.hexdigest()[:16])
