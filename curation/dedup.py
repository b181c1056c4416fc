"""Near-duplicates in an index: which samples repeat another, which is kept.

Two signals, each optional: the perceptual hash (near-exact copies) and the CLIP embedding
(semantic copies, when the run stored ``embedding``).

**Hash.** The signal is ``phash`` / ``target_phash`` (``stages/phash.py``): a 64-bit pHash
per sampled frame. Two samples are near-duplicates when they are of the same kind, carry the
same numbers of hashes (an edit pair's source and target hashes) and the median Hamming
distance of their aligned hashes (the i-th frame of one against the i-th of the other) is at
most ``max_bits``. The default 10 of 64 comes from real photos and footage
(``tests/curation/test_phash.py``): re-encoded and resized copies differ by 0-4 bits, copies
cropped by 2 % a side by up to 8, different pictures by ~32.

Pairs are found on each sample's middle hash, which must be within ``max_bits`` too, by
multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space with
multi-index hashing", CVPR 2012): the 64 bits are cut into B bands; two hashes within
``max_bits`` bits have a band within ``max_bits // B`` bits of each other, so looking up every
band value within that radius finds every such pair; pairs found are then checked on all
their hashes. Each lookup also returns the samples whose band merely collides (n / 2^bits of
them), so ``layout`` picks 4 bands of 16 bits (few lookups: radius 2 at 10 bits is 137 a band)
or 2 bands of 32 (almost no collisions: what 10^7 samples need) by the expected work. Bench P6
(2 CPUs): 10^5 samples at 10 bits in ~4 s, 10^7 at 3 bits in ~75 s. Wide thresholds do not
scale: at 10 bits the collisions grow as n^2, and 64-bit hashes of 10^7 different pictures
hold ~5 * 10^5 chance pairs within 10 bits (probability 1e-8 a pair); use 3-5 bits there.

**Embedding.** Two samples of the same kind whose stored CLIP embeddings (``embedding``:
L2-normalised mean over the scored frames, ``stages/clip_head.py``) have a cosine similarity
of at least ``min_cosine`` are semantic duplicates. Pairs are searched as SemDeDup does
(Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication", 2023; NeMo Curator's semantic dedup): spherical k-means puts the embeddings
in clusters of about ``cluster_size``, and pairs are compared inside a cluster (one matrix
product a cluster), so the work grows as n * cluster_size, not n^2. SemDeDup compares each
embedding with its own cluster only and loses the close pairs that a cluster border splits;
here each embedding also visits its second-nearest cluster, which finds most of them, for
twice the comparisons: of 1,198 pairs at cosine >= 0.95 planted among 3,000 64-d embeddings
in 10 clusters (the generator of ``tests/curation/test_dedup.py``, 6 seeds, isotropic and
around topics), 1,193 found, 5 lost. Finding every pair would mean visiting each cluster
whose centroid is within 2 * sqrt(2 * (1 - cosine)) of the nearest one's similarity: at
0.95, nearly all.

Which copy is kept: samples are taken best first (highest ``aesthetic``, a missing score
counting lowest; then the longest ``duration``; then the most pixels, so a downscaled copy
loses to its original; then the smallest key); each one not already
marked is kept and marks its near-duplicates ``duplicate_of`` it. A duplicate is therefore
always within ``max_bits`` of the sample it names (no chains through a third one). Against
other versions: a sample near an accepted sample of an earlier version is a duplicate of that
sample (the earlier version keeps it), whatever the ranking says; of several, the closest, and
of equally close ones the first by the rule above.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BANDS = 4
BAND_BITS = 16
LAYOUTS = ((4, 16), (2, 32))  # (bands, bits a band) the pair search chooses from
KMEANS_SAMPLE = 50_000  # centroids are fitted on at most this many embeddings
KMEANS_ITERATIONS = 10
SIMILARITY_ROWS = 1024  # rows of a cluster's similarity matrix computed at once


class Duplicate(NamedTuple):
    """A duplicate's kept sample and the evidence: ``phash`` (median bits apart) or ``clip``
    (cosine similarity)."""

    kept: str
    signal: str
    value: float

    @property
    def evidence(self) -> str:
        """The index's ``duplicate_signal``: ``phash 2 bits`` or ``clip cosine 0.9731``."""
        if self.signal == "phash":
            return f"phash {self.value:g} bits"
        return f"clip cosine {self.value:.4f}"


def _band_masks(radius: int, bits: int = BAND_BITS) -> np.ndarray:
    """Every ``bits``-bit value with at most ``radius`` bits set."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in c) for c in itertools.combinations(range(bits), r)]
    return np.asarray(masks, dtype=np.int64)


def layout(n: int, max_bits: int) -> tuple[int, int]:
    """The (bands, bits) layout with the least expected work for ``n`` hashes: a band of
    ``bits`` bits is looked up at every value within ``max_bits // bands`` bits (``probes``),
    and each lookup also returns the ~n / 2^bits hashes whose band merely collides."""

    def cost(bands: int, bits: int) -> float:
        probes = sum(math.comb(bits, r) for r in range(max_bits // bands + 1))
        return bands * probes * (1 + n / 2**bits)

    return min(LAYOUTS, key=lambda lb: cost(*lb))


def near_pairs(middle: np.ndarray, max_bits: int) -> np.ndarray:
    """Every (i, j) index pair, i < j, whose hashes differ in at most ``max_bits`` bits
    (complete: each such pair shares a band within ``max_bits // bands`` bits, and every band
    value within that radius is looked up; the layout is ``layout``'s)."""
    n = len(middle)
    found = [np.empty((0, 2), dtype=np.int64)]
    if n < 2:
        return found[0]
    bands, bits = layout(n, max_bits)
    masks = _band_masks(max_bits // bands, bits)
    for band in range(bands):
        values = ((middle >> np.uint64(bits * band)) & np.uint64(2**bits - 1)).astype(np.int64)
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        for mask in masks:
            # look up every row's band ^ mask, in sorted order (searchsorted is ~20x faster
            # with sorted needles on millions of rows)
            wanted = ordered ^ mask
            by_wanted = np.argsort(wanted, kind="stable")
            needles = wanted[by_wanted]
            lo = np.searchsorted(ordered, needles, "left")
            counts = np.searchsorted(ordered, needles, "right") - lo
            total = int(counts.sum())
            if not total:
                continue
            i = np.repeat(order[by_wanted], counts)
            j = order[np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)]
            keep = (i < j) & (np.bitwise_count(middle[i] ^ middle[j]) <= max_bits)
            found.append(np.stack([i[keep], j[keep]], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def _embedding(row: dict[str, Any]) -> np.ndarray | None:
    values = row.get("embedding")
    if values is None or len(values) == 0:
        return None
    return np.asarray(values, dtype=np.float32)


def kmeans(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` unit centroids of unit vectors (spherical k-means, Lloyd iterations from ``k``
    distinct random points, fitted on a sample of at most ``KMEANS_SAMPLE``)."""
    rng = np.random.default_rng(seed)
    if len(points) > KMEANS_SAMPLE:
        points = points[rng.choice(len(points), KMEANS_SAMPLE, replace=False)]
    centroids = points[rng.choice(len(points), k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        labels = nearest(points, centroids)[:, 0]
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        filled = norms[:, 0] > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / norms[filled]
    return centroids


def nearest(points: np.ndarray, centroids: np.ndarray, k: int = 1) -> np.ndarray:
    """Indices of each point's ``k`` most similar centroids, most similar first: (n, k)."""
    out = np.empty((len(points), k), dtype=np.int64)
    step = SIMILARITY_ROWS * 16
    for at in range(0, len(points), step):
        sims = points[at : at + step] @ centroids.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else None
        if top is None:
            top = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[at : at + step] = np.take_along_axis(top, order, axis=1)[:, :k]
    return out


def similar_pairs(
    embeddings: np.ndarray, min_cosine: float, cluster_size: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs, cosines)``: index pairs (i, j), i < j, of unit embeddings whose cosine
    similarity is at least ``min_cosine``, compared within k-means clusters: each embedding
    lives in its nearest cluster and visits its second nearest, so a close pair split by a
    cluster border is still compared where one of the two lives."""
    n = len(embeddings)
    pairs, cosines = [np.empty((0, 2), dtype=np.int64)], [np.empty(0, dtype=np.float32)]
    k = min(n, max(1, math.ceil(n / cluster_size)))
    if k <= 1:
        home, visit = np.zeros(n, dtype=np.int64), np.full(n, -1)
    else:
        top = nearest(embeddings, kmeans(embeddings, k), 2)
        home, visit = top[:, 0], top[:, 1]
    for cluster in range(k):
        members = np.flatnonzero(home == cluster)
        if not len(members):
            continue
        others = np.concatenate([members, np.flatnonzero(visit == cluster)])
        against = embeddings[others]
        for at in range(0, len(members), SIMILARITY_ROWS):
            rows = members[at : at + SIMILARITY_ROWS]
            sims = embeddings[rows] @ against.T
            i, j = np.nonzero(sims >= min_cosine)
            a, b = rows[i], others[j]
            keep = a != b
            pairs.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1))
            cosines.append(sims[i, j][keep].astype(np.float32))
    found, cos = np.concatenate(pairs), np.concatenate(cosines)
    found, first = np.unique(found, axis=0, return_index=True)
    return found, cos[first]


def _list_matrix(column: pa.ChunkedArray | pa.Array, rows: np.ndarray, width: int) -> np.ndarray:
    """Rows ``rows`` of a list<uint64> column whose lists all have ``width`` values, as a
    (len(rows), width) matrix."""
    if width == 0:
        return np.empty((len(rows), 0), dtype=np.uint64)
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
    return values[offsets[rows][:, None] + np.arange(width)]


def hash_pairs(table: pa.Table, max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs, distances)``: every row pair (i, j), i < j, of ``table`` (columns ``kind``,
    ``phash``, optional ``target_phash``) of the same kind and hash counts whose median
    aligned Hamming distance is at most ``max_bits`` (candidates from the middle hash,
    ``near_pairs``). Columnar: 10M rows stay numpy arrays."""
    n = table.num_rows
    pairs, distances = [np.empty((0, 2), dtype=np.int64)], [np.empty(0)]
    if n < 2:
        return pairs[0], distances[0]
    own = table.column("phash")
    target = table.column("target_phash") if "target_phash" in table.column_names else None
    own_len = pc.fill_null(pc.list_value_length(own), 0).to_numpy()
    target_len = (
        np.zeros(n, dtype=own_len.dtype)
        if target is None
        else pc.fill_null(pc.list_value_length(target), 0).to_numpy()
    )
    kinds = pc.dictionary_encode(pc.fill_null(table.column("kind"), "")).combine_chunks()
    codes = kinds.indices.to_numpy()
    groups = np.stack([codes, own_len, target_len], axis=1)[own_len > 0]
    rows_with = np.flatnonzero(own_len > 0)
    for code, width, extra in np.unique(groups, axis=0):
        rows = rows_with[(groups == (code, width, extra)).all(axis=1)]
        if len(rows) < 2:
            continue
        hashes = _list_matrix(own, rows, int(width))
        if extra:
            hashes = np.hstack([hashes, _list_matrix(target, rows, int(extra))])
        found = near_pairs(hashes[:, int(width + extra) // 2].copy(), max_bits)
        if not len(found):
            continue
        d = np.median(np.bitwise_count(hashes[found[:, 0]] ^ hashes[found[:, 1]]), axis=1)
        keep = d <= max_bits
        pairs.append(rows[found[keep]])
        distances.append(d[keep])
    return np.concatenate(pairs), np.concatenate(distances)


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


def check_signals(
    rows: Sequence[dict[str, Any]], max_bits: int | None, min_cosine: float | None, where: str
) -> None:
    """ValueError, in words, when nothing in ``rows`` can be compared: both signals off, or
    no row carries the signals that are on (an index curated before they existed, or with
    ``dedup.hash: false`` and no CLIP scorer)."""
    if max_bits is None and min_cosine is None:
        raise ValueError("dedup.max_bits and dedup.cosine are both null: nothing to compare")
    hashed = max_bits is not None and any(r.get("phash") for r in rows)
    embedded = min_cosine is not None and any(r.get("embedding") for r in rows)
    if rows and not hashed and not embedded:
        wanted = " or ".join(
            name
            for name, on in (("phash", max_bits is not None), ("embedding", min_cosine is not None))
            if on
        )
        raise ValueError(
            f"{where}: no accepted sample has {wanted} in the index (curated before duplicate "
            "signals were recorded, or with dedup.hash false and no CLIP scorer): curate the "
            "inputs again to dedup them"
        )


def find_duplicates(
    rows: Sequence[dict[str, Any]],
    max_bits: int | None,
    against: Sequence[dict[str, Any]] = (),
    min_cosine: float | None = None,
    cluster_size: int = 2000,
) -> dict[str, Duplicate]:
    """``{key: Duplicate}`` for every row of ``rows`` that repeats another row of ``rows`` or
    a row of ``against``: by hash within ``max_bits``, or by embedding at ``min_cosine`` or
    more (``None`` turns a signal off; rows without the signal take no part in it)."""
    pool = [(r, False) for r in rows] + [(r, True) for r in against]  # (row, from against)
    near: dict[int, list[tuple[int, tuple[int, float], str, float]]] = {}

    def link(a: int, b: int, signal: str, value: float) -> None:
        if pool[a][1] and pool[b][1]:
            return  # two earlier samples: not this run's business
        # evidence order: hash pairs first, closest first
        order = (0, value) if signal == "phash" else (1, -value)
        near.setdefault(a, []).append((b, order, signal, value))
        near.setdefault(b, []).append((a, order, signal, value))

    if max_bits is not None:
        columns = {
            "kind": pa.array([row.get("kind") for row, _ in pool], pa.string()),
            "phash": pa.array([row.get("phash") for row, _ in pool], pa.list_(pa.uint64())),
            "target_phash": pa.array(
                [row.get("target_phash") for row, _ in pool], pa.list_(pa.uint64())
            ),
        }
        found, distances = hash_pairs(pa.table(columns), max_bits)
        for (a, b), d in zip(found.tolist(), distances.tolist(), strict=True):
            link(a, b, "phash", d)
    if min_cosine is not None:
        embedded: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
        for index, (row, _) in enumerate(pool):
            emb = _embedding(row)
            if emb is not None:
                embedded.setdefault((row.get("kind"), len(emb)), []).append((index, emb))
        for members in embedded.values():
            points = np.stack([e for _, e in members])
            points /= np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
            found, cosines = similar_pairs(points, min_cosine, cluster_size)
            for (i, j), cosine in zip(found, cosines, strict=True):
                link(members[int(i)][0], members[int(j)][0], "clip", round(float(cosine), 4))

    marks: dict[str, Duplicate] = {}
    # a repeat of an earlier version's sample names that sample
    for a, partners in near.items():
        row, earlier = pool[a]
        if earlier:
            continue
        previous = [(order, _rank(pool[b][0]), s, v) for b, order, s, v in partners if pool[b][1]]
        if previous:  # the closest; among equally close ones, the best by the keep rule
            _, rank, signal, value = min(previous)
            marks[row["key"]] = Duplicate(rank[-1], signal, value)
    # the rest, best first: each one not yet marked is kept and marks its near-duplicates
    ranked = sorted(
        (i for i, (row, earlier) in enumerate(pool) if not earlier and row["key"] not in marks),
        key=lambda i: _rank(pool[i][0]),
    )
    for a in ranked:
        key = pool[a][0]["key"]
        if key in marks:
            continue
        for b, _, signal, value in sorted(near.get(a, []), key=lambda p: p[1]):
            other = pool[b][0]["key"]
            if not pool[b][1] and other not in marks:
                marks[other] = Duplicate(key, signal, value)
    return marks


class HashRegistry:
    """The accepted samples of one ``curate run`` by hash, as blocks finish (``curate run``'s
    inline dedup, ``stages/dedup_inline.py``; one Ray actor a run). ``claim`` takes a block's
    accepted samples: each one within ``max_bits`` of a sample claimed before is named its
    duplicate (the closest, then the smallest key), the others are claimed. First come, first
    kept: which of two copies stays depends on which block finished first; ``curate dedup``
    applies the keep rule over the whole version."""

    def __init__(self, max_bits: int):
        self.max_bits = max_bits
        self.masks = [int(m) for m in _band_masks(max_bits // BANDS)]
        self.tables: dict[tuple[str, int, int], dict[int, list[int]]] = {}
        self.entries: list[tuple[str, np.ndarray]] = []
        self.keys: set[str] = set()

    def claim(self, items: Sequence[tuple[str, str, Sequence[int]]]) -> dict[str, Duplicate]:
        """``items``: (key, kind, hashes: the frame hashes, then the target's). Returns the
        duplicates among them; a key claimed before (a block run again) is its own sample."""
        marks: dict[str, Duplicate] = {}
        for key, kind, values in items:
            if key in self.keys:
                continue
            hashes = np.asarray(values, dtype=np.uint64)
            best = self._closest(kind, hashes)
            if best is not None:
                marks[key] = Duplicate(best[1], "phash", best[0])
            else:
                self._add(key, kind, hashes)
        return marks

    def __len__(self) -> int:
        return len(self.entries)

    def _bands(self, value: int) -> list[int]:
        return [(value >> (BAND_BITS * b)) & 0xFFFF for b in range(BANDS)]

    def _closest(self, kind: str, hashes: np.ndarray) -> tuple[float, str] | None:
        middle = int(hashes[len(hashes) // 2])
        seen: set[int] = set()
        best: tuple[float, str] | None = None
        for band, value in enumerate(self._bands(middle)):
            table = self.tables.get((kind, len(hashes), band))
            if not table:
                continue
            for mask in self.masks:
                for entry in table.get(value ^ mask, ()):
                    if entry in seen:
                        continue
                    seen.add(entry)
                    other_key, other = self.entries[entry]
                    if (middle ^ int(other[len(other) // 2])).bit_count() > self.max_bits:
                        continue
                    d = distance(hashes, other)
                    if d <= self.max_bits and (best is None or (d, other_key) < best):
                        best = (d, other_key)
        return best

    def _add(self, key: str, kind: str, hashes: np.ndarray) -> None:
        entry = len(self.entries)
        self.entries.append((key, hashes))
        self.keys.add(key)
        for band, value in enumerate(self._bands(int(hashes[len(hashes) // 2]))):
            self.tables.setdefault((kind, len(hashes), band), {}).setdefault(value, []).append(
                entry
            )
