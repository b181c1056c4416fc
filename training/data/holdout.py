"""The held-out split: samples that evaluation reads and training never does.

A sample is held out when a salted hash of its key falls below its kind's cutoff::

    holdout_hash(salt, key) = first 8 bytes of blake2b(salt + NUL + key), big-endian, / 2**64
    held out  <=>  holdout_hash(salt, key) < cutoff[kind]

The hash depends on the key and the salt alone, so the split is the same on every run, machine
and rank, whatever the worker count, shard layout or reading order. A recipe data entry sets
the rule (``HoldoutConfig``: ``fraction``, ``salt``, ``min_samples``); ``plan_split`` turns it
into cutoffs per sample kind over the entry's samples:

- the cutoff starts at ``fraction`` (about that share of every kind is held out);
- it is raised so that at least ``min(min_samples, n // FLOOR_DIVISOR)`` of a kind's ``n``
  samples are held out (the ones with the smallest hashes): enough samples for an evaluation
  batch on a large dataset, never more than a tenth of a small one. A kind with fewer than
  ``FLOOR_DIVISOR`` samples gets no floor, only the fraction (often none held out: its
  evaluation then reads training samples, and says so).

The floor is computed over the data entry's accepted samples before any catalog filter, so two
entries reading the same dataset version with different filters hold out the same keys (a key
held out by one is never trained by the other). ``Split.record()`` is what the catalog's stage
run and MLflow record: the rule, the cutoff per kind, and train / held-out counts per kind.
``holdout: null`` or ``fraction: 0`` disables the split: evaluation reads training samples.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from core.config import StrictModel

__all__ = [
    "DEFAULT_SALT",
    "FLOOR_DIVISOR",
    "HoldoutConfig",
    "KindCut",
    "Split",
    "holdout_hash",
    "plan_split",
]

DEFAULT_SALT = "omniforge-holdout-v1"
FLOOR_DIVISOR = 10  # the min_samples floor takes at most n // 10 of a kind's n samples
SCALE = 2**64  # hashes are 64-bit integers; a cutoff c in [0, 1] is int(c * SCALE)


class HoldoutConfig(StrictModel):
    """A data entry's held-out split (see ``training.data.holdout``)."""

    fraction: float = Field(0.02, ge=0, lt=1, description="share of each sample kind held out")
    salt: str = Field(DEFAULT_SALT, min_length=1, description="hash salt: another salt, other keys")
    min_samples: int = Field(
        8, ge=0, description="held out at least, per kind, up to a tenth of the kind's samples"
    )

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


def holdout_hash(salt: str, key: str) -> int:
    """The key's 64-bit split hash (stable: no process seed, no platform dependence)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class KindCut:
    """One kind's rule on one rank: what a loader needs to tell held-out keys (picklable)."""

    salt: str
    cutoff: int  # held out when holdout_hash(salt, key) < cutoff

    def held_out(self, key: str) -> bool:
        return holdout_hash(self.salt, key) < self.cutoff

    @property
    def ident(self) -> str:
        """Names the rule in loader state: a resumed loader must split the same way."""
        return f"{self.salt}<{self.cutoff:x}"


@dataclass
class Split:
    """A data entry's split: cutoffs per kind, and what they leave per kind."""

    config: HoldoutConfig
    cutoffs: dict[str, int]  # kind -> cutoff (integer, out of SCALE)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (train, held)

    def cut(self, kind: str) -> KindCut:
        return KindCut(self.config.salt, self.cutoffs.get(kind, _fraction_cutoff(self.config)))

    def held_out(self, key: str, kind: str | None) -> bool:
        return kind is not None and self.cut(kind).held_out(key)

    def record(self) -> dict[str, Any]:
        """The rule and its outcome, as the catalog's stage run and MLflow record it."""
        return {
            "fraction": self.config.fraction,
            "salt": self.config.salt,
            "min_samples": self.config.min_samples,
            "cutoff": {k: round(c / SCALE, 6) for k, c in sorted(self.cutoffs.items())},
            "train": {k: n[0] for k, n in sorted(self.counts.items())},
            "held_out": {k: n[1] for k, n in sorted(self.counts.items())},
        }


def _fraction_cutoff(config: HoldoutConfig) -> int:
    return int(config.fraction * SCALE)


def plan_split(config: HoldoutConfig, samples: Iterable[tuple[str, str | None]]) -> Split:
    """The split of ``samples`` ((key, kind) pairs, each key once, any order) under ``config``:
    per kind, the fraction's cutoff raised to hold out the floor's smallest hashes."""
    hashes: dict[str, list[int]] = {}
    for key, kind in samples:
        if kind is not None:
            hashes.setdefault(kind, []).append(holdout_hash(config.salt, key))
    base = _fraction_cutoff(config)
    cutoffs, counts = {}, {}
    for kind, values in sorted(hashes.items()):
        values.sort()
        floor = min(config.min_samples, len(values) // FLOOR_DIVISOR)
        cutoff = max(base, values[floor - 1] + 1) if floor else base
        held = sum(1 for v in values if v < cutoff)
        cutoffs[kind] = cutoff
        counts[kind] = (len(values) - held, held)
    return Split(config, cutoffs, counts)


def held_counts(split: Split | None, rows: Iterable[tuple[str, str | None]]) -> Counter:
    """Samples per kind of ``rows`` ((key, kind)) that ``split`` holds out (none without one)."""
    counts: Counter = Counter()
    if split is not None:
        for key, kind in rows:
            if split.held_out(key, kind):
                counts[kind] += 1
    return counts


def describe(records: Mapping[str, Mapping[str, Any] | None]) -> str:
    """One line per data entry: its rule and held-out counts (``None``: no split)."""
    lines = []
    for name, rec in sorted(records.items()):
        if rec is None:
            lines.append(f"{name}: no held-out split (evaluation reads training samples)")
            continue
        held = ", ".join(
            f"{kind} {rec['held_out'][kind]} of {rec['held_out'][kind] + rec['train'][kind]}"
            for kind in rec["held_out"]
        )
        lines.append(
            f"{name}: fraction {rec['fraction']:g}, min_samples {rec['min_samples']}, "
            f"salt {rec['salt']!r}: held out {held or 'nothing'}"
        )
    return "\n".join(lines)
