"""Near-duplicates in an index by perceptual hash: which samples repeat another, which is kept.

The signal is ``phash`` / ``target_phash`` (``stages/phash.py``): a 64-bit pHash per sampled
frame. Two samples are near-duplicates when they are of the same kind, carry the same number
of hashes (an edit pair's source and target hashes together) and the median Hamming distance
of their aligned hashes (the i-th frame of one against the i-th of the other) is at most
``max_bits``. The default 10 of 64 comes from real photos and footage (``tests/curation/
test_phash.py``): re-encoded and resized copies differ by 0-4 bits, copies cropped by 2 % a
side by up to 8, different pictures by ~32.

Pairs are found on each sample's middle hash, which must be within ``max_bits`` too, by
multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space with
multi-index hashing", CVPR 2012): the 64 bits are cut into 4 bands of 16; two hashes within
``max_bits`` bits have a band within ``max_bits // 4`` bits of each other, so looking up every
band value within that radius finds every such pair (radius 2: 137 lookups a band); pairs
found are then checked on all their hashes. Each lookup also returns the samples whose band
merely collides (about n / 65,536 of them), so the work grows as n^2 * lookups / 65,536: on
one core ~1 s for 10^4 samples and ~17 s for 10^5 at 10 bits, ~3 s for 10^5 at 7 bits
(radius 1, 17 lookups a band), ~7 s for 10^6 at 3 bits (exact band matches).

Which copy is kept: samples are taken best first (highest ``aesthetic``, a missing score
counting lowest; then the longest ``duration``; then the most pixels, so a downscaled copy
loses to its original; then the smallest key); each one not already
marked is kept and marks its near-duplicates ``duplicate_of`` it. A duplicate is therefore
always within ``max_bits`` of the sample it names (no chains through a third one). Against
other versions: a sample near an accepted sample of an earlier version is a duplicate of that
sample (the earlier version keeps it), whatever the ranking says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BANDS = 4
BAND_BITS = 16


def _hashes(row: dict[str, Any]) -> np.ndarray | None:
    own = row.get("phash") or []
    target = row.get("target_phash") or []
    if not own:
        return None
    return np.asarray([*own, *target], dtype=np.uint64)


def _band_masks(radius: int) -> np.ndarray:
    """Every 16-bit value with at most ``radius`` bits set."""
    values = np.arange(1 << BAND_BITS, dtype=np.uint32)
    return values[np.bitwise_count(values) <= radius].astype(np.int64)


def near_pairs(middle: np.ndarray, max_bits: int) -> np.ndarray:
    """Every (i, j) index pair, i < j, whose hashes differ in at most ``max_bits`` bits
    (complete: each such pair shares a band within ``max_bits // BANDS`` bits, and every band
    value within that radius is looked up)."""
    n = len(middle)
    found = [np.empty((0, 2), dtype=np.int64)]
    if n < 2:
        return found[0]
    masks = _band_masks(max_bits // BANDS)
    for band in range(BANDS):
        values = ((middle >> np.uint64(BAND_BITS * band)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        for mask in masks:
            wanted = values ^ mask
            lo = np.searchsorted(ordered, wanted, "left")
            counts = np.searchsorted(ordered, wanted, "right") - lo
            total = int(counts.sum())
            if not total:
                continue
            i = np.repeat(np.arange(n), counts)
            j = order[np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)]
            keep = (i < j) & (np.bitwise_count(middle[i] ^ middle[j]) <= max_bits)
            found.append(np.stack([i[keep], j[keep]], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Median Hamming distance of aligned hashes (same length)."""
    return float(np.median(np.bitwise_count(a ^ b)))


def _rank(row: dict[str, Any]) -> tuple:
    """Best first: highest aesthetic (missing: lowest), longest, most pixels, smallest key."""
    aesthetic = row.get("aesthetic")
    return (
        -(aesthetic if aesthetic is not None else -np.inf),
        -(row.get("duration") or 0.0),
        -((row.get("width") or 0) * (row.get("height") or 0)),
        row["key"],
    )


def find_duplicates(
    rows: Sequence[dict[str, Any]],
    max_bits: int,
    against: Sequence[dict[str, Any]] = (),
) -> dict[str, tuple[str, float]]:
    """``{key: (kept key, distance)}`` for every row of ``rows`` that repeats another row of
    ``rows`` or a row of ``against`` (rows without hashes take no part)."""
    pool: list[tuple[dict[str, Any], np.ndarray, bool]] = []  # (row, hashes, from against)
    for row, earlier in [(r, False) for r in rows] + [(r, True) for r in against]:
        hashes = _hashes(row)
        if hashes is not None:
            pool.append((row, hashes, earlier))
    groups: dict[tuple[str, int], list[int]] = {}
    for index, (row, hashes, _) in enumerate(pool):
        groups.setdefault((row.get("kind"), len(hashes)), []).append(index)
    near: dict[int, list[tuple[int, float]]] = {}
    for members in groups.values():
        middle = np.asarray([pool[m][1][len(pool[m][1]) // 2] for m in members], dtype=np.uint64)
        for i, j in near_pairs(middle, max_bits):
            a, b = members[int(i)], members[int(j)]
            if pool[a][2] and pool[b][2]:
                continue  # two earlier samples: not this run's business
            d = distance(pool[a][1], pool[b][1])
            if d <= max_bits:
                near.setdefault(a, []).append((b, d))
                near.setdefault(b, []).append((a, d))
    marks: dict[str, tuple[str, float]] = {}
    # a repeat of an earlier version's sample names that sample
    for a, partners in near.items():
        row, _, earlier = pool[a]
        if earlier:
            continue
        previous = [(d, pool[b][0]["key"]) for b, d in partners if pool[b][2]]
        if previous:
            d, key = min(previous)
            marks[row["key"]] = (key, d)
    # the rest, best first: each one not yet marked is kept and marks its near-duplicates
    ranked = sorted(
        (i for i, (row, _, earlier) in enumerate(pool) if not earlier and row["key"] not in marks),
        key=lambda i: _rank(pool[i][0]),
    )
    for a in ranked:
        key = pool[a][0]["key"]
        if key in marks:
            continue
        for b, d in sorted(near.get(a, []), key=lambda p: (p[1], pool[p[0]][0]["key"])):
            other = pool[b][0]["key"]
            if not pool[b][2] and other not in marks:
                marks[other] = (key, d)
    return marks
