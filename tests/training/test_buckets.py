"""Training buckets: shapes from the stage area, aspect kept, model multiples, token batches."""

from __future__ import annotations

import math

import pytest

from catalog.shards import ASPECT_CLASSES, bucket_name
from training.data.buckets import (
    BucketShape,
    aspect_of_shard_bucket,
    batch_size_for,
    bucket_for,
    crop_fraction,
    frame_class_of_shard_bucket,
    frames_for,
    shape_for_shard_bucket,
    tokens,
)

ASPECTS = [(w, h) for w, h in ASPECT_CLASSES] + [(1920, 1080), (1000, 999), (37, 91), (5, 1)]


def _cost(h: int, w: int, aspect: float, area: float) -> float:
    return abs(math.log((w / h) / aspect)) + abs(math.log(w * h / area))


def test_bucket_shape_is_hashable_orderable_and_parses():
    a, b = BucketShape(1, 64, 64), BucketShape(9, 48, 80)
    assert len({a, b, BucketShape(1, 64, 64)}) == 2
    assert sorted([b, a]) == [a, b]
    assert str(b) == "9x48x80" and BucketShape.parse("9x48x80") == b
    with pytest.raises(AttributeError):
        a.frames = 3  # frozen
    with pytest.raises(ValueError):
        BucketShape.parse("48x80")


@pytest.mark.parametrize("sf", [8, 16, 32])
@pytest.mark.parametrize("area", [64 * 64, 256 * 256, 512 * 512, 1024 * 1024, 320 * 180])
def test_bucket_sides_multiples_area_and_aspect(sf, area):
    for w, h in ASPECTS:
        shape = bucket_for(w, h, 1, area, sf, 4)
        assert shape.height % sf == 0 and shape.width % sf == 0
        assert shape.height >= sf and shape.width >= sf
        aspect = w / h
        hu, wu = shape.height // sf, shape.width // sf
        h_ideal, w_ideal = math.sqrt(area / aspect) / sf, math.sqrt(area * aspect) / sf
        if h_ideal < 1 or w_ideal < 1:
            continue  # clamped to one factor: nothing to keep
        # The documented rule: never worse than rounding each side to the nearest multiple.
        naive = _cost(max(1, round(h_ideal)), max(1, round(w_ideal)), aspect, area / sf**2)
        got = _cost(hu, wu, aspect, area / sf**2)
        assert got <= naive + 1e-12
        # ... which bounds both errors by about half a unit on each side.
        bound = 1 / h_ideal + 1 / w_ideal + 1e-9
        assert abs(math.log(shape.aspect / aspect)) <= bound
        assert abs(math.log(shape.width * shape.height / area)) <= bound


def test_bucket_examples():
    assert bucket_for(1920, 1080, 33, 512 * 512, 16, 4) == BucketShape(33, 384, 688)
    assert bucket_for(512, 512, 1, 512 * 512, 16, 4) == BucketShape(1, 512, 512)
    assert bucket_for(1080, 1920, 1, 512 * 512, 16, 4) == BucketShape(1, 688, 384)
    # Large areas are close to exact.
    s = bucket_for(16, 9, 1, 1024 * 1024, 16, 4)
    assert abs(s.width * s.height / 1024**2 - 1) < 0.01 and abs(s.aspect / (16 / 9) - 1) < 0.01
    # Tiny areas: at least one factor per side.
    assert bucket_for(3, 1, 1, 10, 16, 4) == BucketShape(1, 16, 16)
    assert bucket_for(100, 1, 1, 64 * 64, 16, 4).height == 16


@pytest.mark.parametrize(
    "wanted, tf, frames",
    [
        (None, 4, 1),
        (1, 4, 1),
        (2, 4, 1),
        (5, 4, 5),
        (8, 4, 5),
        (9, 4, 9),
        (33, 4, 33),
        (40, 4, 37),
        (17, 8, 17),
        (16, 8, 9),
        (10, 1, 10),
    ],
)
def test_frames_rule(wanted, tf, frames):
    assert frames_for(wanted, tf) == frames
    assert (frames - 1) % tf == 0 and frames <= max(1, wanted or 1)
    assert bucket_for(4, 3, wanted, 256 * 256, 16, tf).frames == frames


def test_aspect_of_shard_bucket_matches_catalog_buckets():
    for w, h in ASPECT_CLASSES:
        name = bucket_name(w * 100, h * 100, 40)
        assert aspect_of_shard_bucket(name) == pytest.approx(w / h)
    assert aspect_of_shard_bucket("a512_r16x9_f33") == pytest.approx(16 / 9)
    for bad in ("a512_f33", "r0x9", "misc", ""):
        with pytest.raises(ValueError, match="shard bucket"):
            aspect_of_shard_bucket(bad)


def test_frame_class_of_shard_bucket():
    assert frame_class_of_shard_bucket(bucket_name(640, 360)) == 1
    assert frame_class_of_shard_bucket(bucket_name(640, 360, 40)) == 65
    assert frame_class_of_shard_bucket("a512_r16x9") is None
    assert frame_class_of_shard_bucket("misc") is None


def test_shard_buckets_of_any_area_class_share_a_training_bucket():
    a = shape_for_shard_bucket("a256_r16x9_f9", 33, 512 * 512, 16, 4)
    b = shape_for_shard_bucket("a1024_r16x9_f65", 33, 512 * 512, 16, 4)
    assert a == b == BucketShape(33, 384, 688)
    assert shape_for_shard_bucket("a512_r1x1_f1", None, 256 * 256, 16, 4) == BucketShape(
        1, 256, 256
    )


def test_tokens_and_batch_size():
    img = BucketShape(1, 256, 256)
    vid = BucketShape(33, 256, 256)
    assert tokens(img, 16, 4) == 256
    assert tokens(vid, 16, 4) == 9 * 256
    assert tokens(BucketShape(9, 48, 80), 16, 4) == 3 * 3 * 5
    assert batch_size_for(img, 4096, 16, 4) == 16
    assert batch_size_for(img, 4096, 16, 4, media_per_sample=2) == 8
    assert batch_size_for(vid, 4096, 16, 4) == 1  # 2304 tokens
    assert batch_size_for(vid, 1000, 16, 4) == 1  # at least one sample
    assert batch_size_for(vid, 2 * 2304 + 5, 16, 4) == 2


def test_crop_fraction():
    assert crop_fraction(1920, 1080, BucketShape(1, 384, 688)) < 0.01
    assert crop_fraction(400, 300, BucketShape(1, 256, 256)) == pytest.approx(0.25)
    assert crop_fraction(300, 400, BucketShape(1, 256, 256)) == pytest.approx(0.25)
    assert crop_fraction(512, 512, BucketShape(1, 512, 512)) == 0.0
    assert 0.0 <= crop_fraction(1, 1000, BucketShape(1, 64, 64)) < 1.0
