"""Near-duplicate search (``curation/dedup.py``): pHash pairs complete against brute force,
clustered embedding pairs against brute force, the documented keep rule, no chains, and
repeats of an earlier version."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup import check_signals, find_duplicates, near_pairs, similar_pairs


def flip(value: int, bits: list[int]) -> int:
    for b in bits:
        value ^= 1 << b
    return value


def test_the_pair_search_finds_exactly_what_brute_force_finds():
    rng = np.random.default_rng(7)
    n = 2000
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1)
    for _ in range(150):  # planted pairs at 0-12 bits
        i, j = rng.integers(n, size=2)
        bits = rng.choice(64, size=int(rng.integers(0, 13)), replace=False).tolist()
        hashes[j] = np.uint64(flip(int(hashes[i]), bits))
    for max_bits in (3, 7, 10):
        found = {tuple(map(int, p)) for p in near_pairs(hashes, max_bits)}
        d = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(np.triu(d <= max_bits, 1))
        truth = {(int(i), int(j)) for i, j in zip(rows, cols, strict=True)}
        assert truth and found == truth, max_bits


def row(key: str, hashes: list[int], kind: str = "image", **extra) -> dict:
    return {"key": key, "kind": kind, "phash": hashes, **extra}


BASE = 0x0123_4567_89AB_CDEF


def test_the_best_copy_is_kept_and_names_every_other():
    rows = [
        row("a-small", [flip(BASE, [1, 2])], width=256, height=256),
        row("b-large", [BASE], width=512, height=512),
        row("c-pretty", [flip(BASE, [60])], aesthetic=6.0, width=128, height=128),
        row("other", [flip(BASE, list(range(0, 64, 3)))]),
    ]
    marks = find_duplicates(rows, max_bits=10)
    assert {k: v[0] for k, v in marks.items()} == {"a-small": "c-pretty", "b-large": "c-pretty"}
    del rows[2]  # without the scored copy: more pixels wins over key order
    assert {k: v[0] for k, v in find_duplicates(rows, 10).items()} == {"a-small": "b-large"}


def test_no_chain_through_a_third_sample_and_kinds_and_lengths_apart():
    a, b, c = BASE, flip(BASE, list(range(8))), flip(BASE, list(range(16)))  # a~b, b~c, a!~c
    rows = [row("1", [a], aesthetic=9.0), row("2", [b], aesthetic=8.0), row("3", [c])]
    assert {k: v[0] for k, v in find_duplicates(rows, 10).items()} == {"2": "1"}  # 3 stays
    mixed = [row("i", [a]), row("v", [a] * 8, kind="video"), row("v4", [a] * 4, kind="video")]
    assert find_duplicates(mixed, 10) == {}
    assert find_duplicates([row("x", [a]), row("y", None)], 10) == {}


def test_clips_compare_every_aligned_frame_and_edit_pairs_their_target_too():
    frames = [flip(BASE, [i]) for i in range(8)]
    moved = frames[:5] + [flip(f, list(range(20, 40))) for f in frames[5:]]  # 3 of 8 differ
    clips = [row("c1", frames, kind="video"), row("c2", moved, kind="video")]
    assert find_duplicates(clips, 10)["c2"][0] == "c1"  # the median frame distance is small
    other_target = [flip(BASE, list(range(30)))]
    pairs = [
        row("p1", [BASE], kind="image_edit", target_phash=[BASE]),
        row("p2", [BASE], kind="image_edit", target_phash=other_target),
    ]
    assert find_duplicates(pairs, 10) == {}  # same source, another edit


def test_a_repeat_of_an_earlier_version_names_the_earlier_sample():
    earlier = [row("old", [BASE], status="accepted")]
    rows = [row("new", [flip(BASE, [3])], aesthetic=9.0), row("fresh", [~BASE & (2**64 - 1)])]
    marks = find_duplicates(rows, 10, against=earlier)
    assert marks == {"new": ("old", "phash", 1.0)}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_the_clustered_embedding_search_finds_nearly_every_close_pair():
    """Semantic pairs are compared within k-means clusters (curation/dedup.py): on embeddings
    around topics with planted near-copies, the clusters lose few of the close pairs."""
    rng = np.random.default_rng(3)
    n, dim = 3000, 64
    topics = unit(rng.normal(size=(30, dim)))  # embeddings gather around topics, as CLIP's do
    emb = unit(topics[rng.integers(30, size=n)] + rng.normal(scale=0.15, size=(n, dim)))
    for _ in range(100):  # planted copies: small noise, cosine ~0.96-0.99
        i, j = rng.integers(n, size=2)
        emb[j] = unit(emb[i] + rng.normal(scale=rng.uniform(0.02, 0.035), size=dim))
    emb = emb.astype(np.float32)
    found, cosines = similar_pairs(emb, 0.95, cluster_size=300)  # 10 clusters
    sims = emb @ emb.T
    rows, cols = np.nonzero(np.triu(sims >= 0.95, 1))
    truth = {(int(i), int(j)) for i, j in zip(rows, cols, strict=True)}
    pairs = {tuple(map(int, p)) for p in found}
    assert len(truth) > 80 and pairs <= truth  # every pair found is a true one
    assert len(pairs) >= 0.97 * len(truth)  # border pairs: 1 of 97 lost here
    assert np.allclose(cosines, sims[found[:, 0], found[:, 1]], atol=1e-5)


def test_embeddings_find_semantic_copies_and_each_signal_can_be_turned_off():
    rng = np.random.default_rng(5)
    a, b = unit(rng.normal(size=32)), unit(rng.normal(size=32))
    close = unit(a + 0.05 * unit(rng.normal(size=32)))
    far_hash = flip(BASE, list(range(0, 64, 2)))  # 32 bits apart: no hash signal
    rows = [
        row("a", [BASE], embedding=a.tolist(), aesthetic=5.0),
        row("a2", [far_hash], embedding=close.tolist(), aesthetic=4.0),
        row("b", [flip(BASE, [5])], embedding=b.tolist()),  # the hash repeats a's
        row("none", None),
    ]
    marks = find_duplicates(rows, max_bits=10, min_cosine=0.95)
    assert marks["a2"].kept == "a" and marks["a2"].signal == "clip"
    assert marks["a2"].value >= 0.95
    assert marks["b"] == ("a", "phash", 1.0)
    assert set(find_duplicates(rows, None, min_cosine=0.95)) == {"a2"}
    assert set(find_duplicates(rows, 10, min_cosine=None)) == {"b"}
    assert find_duplicates(rows, None, min_cosine=None) == {}


def test_an_index_without_signals_is_refused_in_words():
    old = [{"key": "a", "kind": "image", "phash": None}]
    with pytest.raises(ValueError, match="v1: no accepted sample has phash or embedding"):
        check_signals(old, 10, 0.95, "v1")
    with pytest.raises(ValueError, match="both null"):
        check_signals([row("a", [BASE])], None, None, "v1")
    check_signals([row("a", [BASE])], 10, 0.95, "v1")  # hashes: fine
    check_signals([], 10, None, "v1")  # nothing accepted: nothing to do, no error
