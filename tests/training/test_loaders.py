"""Task loaders over real WebDataset shards: buckets, rank split, decoding, exact resume."""

from __future__ import annotations

import copy
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from catalog.shards import ShardInfo, ShardWriter, bucket_name, sample_json
from training.data.buckets import BucketShape
from training.data.loaders import TaskLoader, build_task_loaders
from training.data.samples import SampleDecodeWarning
from training.data.sources import resolve_data
from training.models.base import Geometry
from training.recipe import DataConfig, StageConfig

GEOM = Geometry(spatial_factor=16, temporal_factor=4, max_text_len=16)
AREA = 64 * 64
WIDE = BucketShape(1, 48, 80)  # 16:9 at 64x64 area, sf 16
SQUARE = BucketShape(1, 64, 64)
TALL = BucketShape(1, 80, 48)
WIDE_VIDEO = BucketShape(9, 48, 80)  # 9 frames wanted, tf 4


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level stand-in for a model tokenizer (L = 16)."""
    ids = torch.zeros(len(texts), 16, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        b = list(t.encode())[:16]
        ids[i, : len(b)] = torch.tensor(b)
        mask[i, : len(b)] = 1
    return ids, mask


def untokenize(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [bytes(r[m.bool()].tolist()).decode() for r, m in zip(ids, mask, strict=True)]


def image_bytes(w: int, h: int, value: int, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (value, value, value)).save(out, format=fmt, quality=95)
    return out.getvalue()


def mp4_bytes(n: int, w: int = 96, h: int = 54, fps: int = 24, base: int = 0) -> bytes:
    """H.264 clip whose frame i is flat gray ``base + 10 * i``."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(n):
            arr = np.full((h, w, 3), min(255, base + 10 * i), np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return out.getvalue()


@dataclass
class Dataset:
    root: Path
    rows: list[dict]
    shards: list[ShardInfo]
    text: dict[str, str]
    value: dict[str, int]  # expected gray value of an image / first frame

    def keys(self, kind: str, prefix: str = "") -> set[str]:
        return {r["key"] for r in self.rows if r["kind"] == kind and r["key"].startswith(prefix)}


def _row(key, kind, w, h, n=1, fps=None, aesthetic=5.0, **kw):
    row = {
        "key": key,
        "kind": kind,
        "source_uri": f"/raw/{key}",
        "status": "accepted",
        "reasons": [],
        "width": w,
        "height": h,
        "num_frames": n,
        "fps": fps,
        "duration": n / fps if fps else 0.0,
        "aesthetic": aesthetic,
    }
    if kind.endswith("_edit"):
        row.update(target_uri=f"/raw/{key}-tgt", target_width=w, target_height=h)
        row["target_num_frames"] = n
    row.update(kw)
    return row


def build_dataset(root: Path) -> Dataset:
    """Buckets: 16:9 images (10, 4 shards), 1:1 images (5) mixed with image edits (2) in one
    shard, one 9:16 image, 16:9 videos (3 of 24 frames + 2 of 8 frames, two shard buckets),
    video edits (2, 16 frames)."""
    rows, text, value = [], {}, {}
    a = ShardWriter(str(root), prefix="a", max_samples=3)
    b = ShardWriter(str(root), prefix="b", max_samples=100)

    def put(writer, row, members, txt):
        row["bucket"] = bucket_name(row["width"], row["height"], row["num_frames"])
        members = {"json": sample_json(row), "txt": txt.encode(), **members}
        row["shard"] = writer.write(row["bucket"], row["key"], members)
        rows.append(row)
        text[row["key"]] = txt

    for i in range(10):
        key = f"wide{i:02d}"
        value[key] = 20 * i
        put(
            a,
            _row(key, "image", 160, 90, aesthetic=float(i)),
            {"jpg": image_bytes(160, 90, value[key])},
            f"wide picture {i}",
        )
    for i in range(5):
        key = f"sq{i}"
        value[key] = 30 + 40 * i
        put(
            b,
            _row(key, "image", 96, 96),
            {"png": image_bytes(96, 96, value[key], "PNG")},
            f"square {i}",
        )
        if i < 2:
            key = f"edit{i}"
            value[key] = 200
            members = {
                "src.jpg": image_bytes(96, 96, 50),
                "tgt.png": image_bytes(96, 96, 200, "PNG"),
            }
            put(b, _row(key, "image_edit", 96, 96), members, f"brighten {i}")
    value["tall0"] = 128
    put(b, _row("tall0", "image", 72, 128), {"webp": image_bytes(72, 128, 128, "WEBP")}, "tall")
    for i, n in enumerate((24, 24, 24, 8, 8)):
        key = f"vid{i}"
        value[key] = 0
        put(b, _row(key, "video", 96, 54, n=n, fps=24.0), {"mp4": mp4_bytes(n)}, f"clip {i}")
    for i in range(2):
        key = f"vedit{i}"
        members = {"src.mp4": mp4_bytes(16), "tgt.mp4": mp4_bytes(16, base=100)}
        put(b, _row(key, "video_edit", 96, 54, n=16, fps=24.0), members, f"recolor {i}")
    shards = a.close() + b.close()
    return Dataset(root, rows, shards, text, value)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Dataset:
    return build_dataset(tmp_path_factory.mktemp("shards"))


def make(ds_or_shards, task="t2i", rank=0, world_size=1, **kw) -> TaskLoader:
    shards = ds_or_shards.shards if isinstance(ds_or_shards, Dataset) else ds_or_shards
    args = dict(tokenize=tokenize, geometry=GEOM, frame_area=AREA, token_budget=60, seed=7)
    if task in ("t2v", "v2v_edit", "video_understanding"):
        args.update(num_frames=9, fps=12.0)
    args.update(kw)
    return TaskLoader(task, shards, rank=rank, world_size=world_size, **args)


def take_epoch(loader: TaskLoader, shape: BucketShape) -> list[str]:
    return loader.next_batch(shape, size=loader.samples_per_epoch(shape)).keys


# -- buckets and ranks ------------------------------------------------------------------------


def test_bucket_weights_identical_across_ranks_and_small_buckets_excluded(ds):
    single = make(ds)
    assert single.bucket_weights() == {WIDE: 10, SQUARE: 5, TALL: 1}
    for ws in (2, 3):
        weights = [make(ds, rank=r, world_size=ws).bucket_weights() for r in range(ws)]
        assert all(w == {WIDE: 10, SQUARE: 5} for w in weights)  # TALL: 1 sample < world
    two = make(ds, world_size=2)
    assert two.stream_mode(WIDE) == "split"  # 4 shards >= 2 ranks
    assert two.stream_mode(SQUARE) == "stride"  # 1 shard
    with pytest.raises(ValueError, match="fewer than world size"):
        two.next_batch(TALL)
    assert list(two.bucket_weights()) == sorted(two.bucket_weights())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_get_disjoint_samples_covering_the_bucket(ds, world_size):
    expected = {WIDE: ds.keys("image", "wide"), SQUARE: ds.keys("image", "sq")}
    for shape, keys in expected.items():
        per_rank = [
            take_epoch(make(ds, rank=r, world_size=world_size), shape) for r in range(world_size)
        ]
        flat = [k for keys_r in per_rank for k in keys_r]
        assert len(flat) == len(set(flat)), "a sample went to two ranks"
        assert set(flat) == keys
        assert all(per_rank), "every rank has data"


def test_video_ranks_split_shards_across_frame_classes(ds):
    # The 24- and 8-frame clips sit in two shard buckets (f33, f9) of one training bucket.
    loaders = [make(ds, "t2v", rank=r, world_size=2) for r in range(2)]
    assert loaders[0].bucket_weights() == loaders[1].bucket_weights() == {WIDE_VIDEO: 5}
    assert loaders[0].stream_mode(WIDE_VIDEO) == "split"
    seen = [take_epoch(lo, WIDE_VIDEO) for lo in loaders]
    assert sorted(seen[0] + seen[1]) == sorted(ds.keys("video"))
    assert not set(seen[0]) & set(seen[1])


def test_streams_repeat_with_a_deterministic_per_epoch_shard_order(ds):
    lo = make(ds, seed=3)
    epochs = [take_epoch(lo, WIDE) for _ in range(6)]
    assert all(sorted(e) == sorted(ds.keys("image", "wide")) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "shard order is reshuffled per epoch"
    again = make(ds, seed=3)
    assert [take_epoch(again, WIDE) for _ in range(6)] == epochs
    other = make(ds, seed=4)
    assert [take_epoch(other, WIDE) for _ in range(6)] != epochs


# -- batches ----------------------------------------------------------------------------------


def test_image_batch_shapes_values_and_text(ds):
    lo = make(ds, token_budget=60)  # WIDE: 3x5 = 15 tokens -> 4 per batch
    assert lo.batch_size(WIDE) == 4
    batch = lo.next_batch(WIDE)
    assert batch.task == "t2i" and batch.size == 4
    assert batch.pixels.shape == (4, 1, 3, 48, 80) and batch.pixels.dtype == torch.float32
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert batch.source_pixels is None
    for key, px in zip(batch.keys, batch.pixels, strict=True):
        assert abs((px.mean().item() + 1) * 127.5 - ds.value[key]) < 3
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.shape == (4, 16)
    assert untokenize(batch.input_ids, batch.attention_mask) == [
        ds.text[k][:16] for k in batch.keys
    ]


def test_video_batch_samples_at_task_fps_and_loops_short_clips(ds):
    lo = make(ds, "t2v", token_budget=90)  # 3 latent frames x 15 = 45 tokens -> 2 per batch
    assert lo.batch_size(WIDE_VIDEO) == 2
    batch = lo.next_batch(WIDE_VIDEO, size=5)
    assert batch.pixels.shape == (5, 9, 3, 48, 80)
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    frames = {}
    for key, clip in zip(batch.keys, batch.pixels, strict=True):
        frames[key] = [round((f.mean().item() + 1) * 127.5) for f in clip]
    stride = 2  # 24 fps source, 12 fps task
    for key, got in frames.items():
        n = 24 if key in ("vid0", "vid1", "vid2") else 8
        want = [10 * ((k * stride) % n) for k in range(9)]  # gray 10*i, looped when short
        assert np.allclose(got, want, atol=4), (key, got, want)


def test_image_edit_batches_carry_the_source(ds):
    lo = make(ds, "i2i_edit")
    assert lo.bucket_weights() == {SQUARE: 2}
    assert lo.batch_size(SQUARE) == 1  # 16 tokens x 2 media > 60 / 2
    batch = lo.next_batch(SQUARE, size=2)
    assert set(batch.keys) == ds.keys("image_edit")
    assert batch.source_pixels.shape == batch.pixels.shape == (2, 1, 3, 64, 64)
    assert abs((batch.source_pixels.mean().item() + 1) * 127.5 - 50) < 3
    assert abs((batch.pixels.mean().item() + 1) * 127.5 - 200) < 3
    assert untokenize(batch.input_ids, batch.attention_mask)[0].startswith("brighten")


def test_video_edit_batches_carry_the_source(ds):
    lo = make(ds, "v2v_edit")
    batch = lo.next_batch(WIDE_VIDEO, size=2)
    assert set(batch.keys) == ds.keys("video_edit")
    assert batch.source_pixels.shape == batch.pixels.shape == (2, 9, 3, 48, 80)
    src = [(f.mean().item() + 1) * 127.5 for f in batch.source_pixels[0]]
    tgt = [(f.mean().item() + 1) * 127.5 for f in batch.pixels[0]]
    index = [(2 * k) % 16 for k in range(9)]  # 16-frame clips: the 9th frame loops to 0
    assert np.allclose(src, [10 * i for i in index], atol=4)
    assert np.allclose(tgt, [100 + 10 * i for i in index], atol=4)


def test_kind_filter_per_task(ds):
    images = ds.keys("image")
    for task in ("t2i", "image_understanding"):
        lo = make(ds, task)
        got = set(take_epoch(lo, WIDE) + take_epoch(lo, SQUARE) + take_epoch(lo, TALL))
        assert got == images
    assert make(ds, "video_understanding").bucket_weights() == {WIDE_VIDEO: 5}
    assert make(ds, "v2v_edit").bucket_weights() == {WIDE_VIDEO: 2}
    understanding = make(ds, "video_understanding").next_batch(WIDE_VIDEO, size=5)
    assert set(understanding.keys) == ds.keys("video")
    assert understanding.source_pixels is None


def test_key_filter(ds):
    allowed = {"wide01", "wide02", "wide07", "sq3", "edit1", "vid4"}
    lo = make(ds, keys=allowed)
    assert lo.bucket_weights() == {WIDE: 3, SQUARE: 1}
    assert set(take_epoch(lo, WIDE)) == {"wide01", "wide02", "wide07"}
    assert take_epoch(lo, SQUARE) == ["sq3"]
    assert make(ds, "i2i_edit", keys=allowed).bucket_weights() == {SQUARE: 1}


def test_exif_orientation_and_alpha(tmp_path):
    from training.data.decode import decode_image

    im = Image.new("RGB", (80, 40), (0, 0, 0))
    im.paste((255, 255, 255), (40, 0, 80, 40))  # right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: right half -> bottom half
    out = io.BytesIO()
    im.save(out, format="JPEG", exif=exif, quality=95)
    arr = decode_image(out.getvalue(), BucketShape(1, 80, 48))
    assert arr.shape == (80, 48, 3)
    assert arr[:30].mean() < 20 and arr[50:].mean() > 235
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent -> white
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    assert decode_image(out.getvalue(), BucketShape(1, 16, 16)).min() == 255


def test_shards_given_as_tuples_or_plain_uris(ds):
    as_tuples = [(s.uri, s.bucket) for s in ds.shards]
    as_uris = [s.uri for s in ds.shards]
    ref = make(ds).bucket_weights()
    assert make(as_tuples).bucket_weights() == ref
    assert make(as_uris).bucket_weights() == ref  # bucket = parent folder
    records = make(ds.shards, counts="records").bucket_weights()
    assert records[WIDE] == 10  # pure image shards: the record counts are exact


# -- exact resume -----------------------------------------------------------------------------


def _run(lo: TaskLoader, shapes: list[BucketShape]) -> list:
    out = []
    for shape in shapes:
        b = lo.next_batch(shape)
        out.append((b.keys, b.pixels, b.input_ids, b.source_pixels))
    return out


@pytest.mark.parametrize(
    "task, world_size, rank", [("t2i", 2, 1), ("t2i", 3, 0), ("i2i_edit", 2, 0), ("t2v", 2, 1)]
)
def test_exact_resume(ds, task, world_size, rank):
    a = make(ds, task, rank=rank, world_size=world_size, token_budget=45)
    weights = a.bucket_weights()
    rng = random.Random(0)
    shapes = rng.choices(list(weights), weights=list(weights.values()), k=14)
    n = 5
    _run(a, shapes[:n])
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON round trip
    frozen = copy.deepcopy(state)
    rest = _run(a, shapes[n:])
    b = make(ds, task, rank=rank, world_size=world_size, token_budget=45)
    b.load_state_dict(state)
    assert state == frozen
    resumed = _run(b, shapes[n:])
    assert [r[0] for r in resumed] == [r[0] for r in rest]
    for (_, px, ids, src), (_, px2, ids2, src2) in zip(rest, resumed, strict=True):
        assert torch.equal(px, px2) and torch.equal(ids, ids2)
        assert (src is None and src2 is None) or torch.equal(src, src2)
    assert b.state_dict() == a.state_dict()
    # The run covered more than one epoch of some stream.
    assert max(s["epoch"] for s in a.state_dict()["streams"].values()) >= 1


def test_resume_refuses_other_rank_world_or_data(ds):
    state = make(ds, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        make(ds, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        make(ds, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="data"):
        make(ds, world_size=2, keys={"wide01", "wide02", "sq1", "sq2"}).load_state_dict(state)


# -- corrupt samples --------------------------------------------------------------------------


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    good = mp4_bytes(12)
    with ShardWriter(str(tmp_path), prefix="c") as w:
        for i in range(4):
            data = image_bytes(64, 64, 100) if i != 1 else b"\xff\xd8 not a jpeg"
            row = _row(f"im{i}", "image", 64, 64)
            w.write(bucket_name(64, 64), row["key"], {"json": sample_json(row), "jpg": data})
        for i in range(3):
            data = good if i != 2 else good[: len(good) // 3]
            row = _row(f"v{i}", "video", 96, 54, n=12, fps=24.0)
            w.write(bucket_name(96, 54, 12), row["key"], {"json": sample_json(row), "mp4": data})
    shards = w.finished
    # A truncated copy of the image shard: the readable prefix is used, the rest is reported.
    image_shard = next(s for s in shards if s.bucket == bucket_name(64, 64))
    blob = Path(image_shard.uri).read_bytes()
    cut = tmp_path / "cut" / image_shard.bucket / "c-000000.tar"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(blob[: blob.index(b"im2.jpg") + 700])  # inside im2's jpg data
    with pytest.warns(SampleDecodeWarning) as caught:
        tl = make([str(cut)], decode_threads=1)
        assert tl.bucket_weights() == {SQUARE: 2}  # im2 is cut short: dropped
        batch = tl.next_batch(SQUARE, size=2)
    messages = " | ".join(str(w.message) for w in caught)
    assert "c-000000.tar is unreadable after 2 samples" in messages
    assert "skipping sample im1 of shard" in messages
    assert batch.keys == ["im0", "im0"] and tl.skipped == 1

    lo = make(shards)
    with pytest.warns(SampleDecodeWarning, match=r"im1 of shard .*\.tar"):
        batch = lo.next_batch(SQUARE, size=3)
    assert batch.keys == ["im0", "im2", "im3"] and lo.skipped == 1
    vl = make(shards, "t2v")
    with pytest.warns(SampleDecodeWarning, match="v2"):
        batch = vl.next_batch(WIDE_VIDEO, size=3)
    assert batch.keys == ["v0", "v1", "v0"] and vl.skipped == 1
    assert vl.state_dict()["skipped"] == 1


# -- building a stage's loaders ---------------------------------------------------------------


def _stage(tasks: dict) -> StageConfig:
    return StageConfig(
        name="s1",
        trainable=["*"],
        optimizer={"lr": 1e-4},
        frame_area=AREA,
        token_budget=60,
        tasks=tasks,
        steps=10,
        checkpoint_every=10,
    )


def test_build_task_loaders_through_a_catalog(ds, cat):
    from catalog.index import write_index_part
    from catalog.schema import rows_to_table

    root = ds.root
    write_index_part(rows_to_table([dict(r) for r in ds.rows]), root / "index", "part-0")
    v = cat.begin_version("mixed", root_uri=str(root), config_hash="h")
    cat.add_shards(v.id, ds.shards)
    cat.commit_version(v.id, str(root / "index"))

    stage = _stage(
        {
            "t2i": {"weight": 1, "data": "good"},
            "i2i_edit": {"weight": 1, "data": "all"},
            "t2v": {"weight": 1, "data": "all", "num_frames": 9, "fps": 12},
        }
    )
    data = {  # every sample trains (the held-out split: tests/training/test_heldout.py)
        "good": DataConfig(uri="catalog://mixed@1", filter="aesthetic >= 6", holdout=None),
        "all": DataConfig(uri="catalog://mixed@latest", holdout=None),
    }
    loaders = [build_task_loaders(stage, data, cat, r, 2, 0, GEOM, tokenize) for r in range(2)]
    assert set(loaders[0]) == {"t2i", "i2i_edit", "t2v"}
    t2i = [lo["t2i"] for lo in loaders]
    # aesthetic >= 6: wide06..wide09 (the square and tall images have 5).
    assert t2i[0].bucket_weights() == t2i[1].bucket_weights() == {WIDE: 4}
    keys = take_epoch(t2i[0], WIDE) + take_epoch(t2i[1], WIDE)
    assert sorted(keys) == ["wide06", "wide07", "wide08", "wide09"]
    assert loaders[0]["i2i_edit"].bucket_weights() == {SQUARE: 2}
    assert loaders[1]["t2v"].bucket_weights() == {WIDE_VIDEO: 5}

    src = resolve_data(data["all"], cat)
    assert src.uri == "catalog://mixed@1" and src.keys is None
    assert sum(src.counts_for("t2i").values()) == 16
    # Resolved once (the driver), handed to the ranks: no catalog needed there.
    sources = {"all": src, "good": resolve_data(data["good"], cat)}
    again = build_task_loaders(stage, data, None, 1, 2, 0, GEOM, tokenize, sources=sources)
    assert {t: lo.bucket_weights() for t, lo in again.items()} == {
        t: lo.bucket_weights() for t, lo in loaders[1].items()
    }


def test_build_task_loaders_from_paths_and_globs(ds):
    stage = _stage({"t2i": {"weight": 1, "data": "glob"}, "i2i_edit": {"weight": 2, "data": "dir"}})
    data = {  # every sample trains (the held-out split: tests/training/test_heldout.py)
        "glob": DataConfig(uri=str(ds.root / "shards" / "*" / "*.tar"), holdout=None),
        "dir": DataConfig(uri=str(ds.root), holdout=None),
    }
    loaders = build_task_loaders(stage, data, None, 0, 1, 0, GEOM, tokenize)
    assert loaders["t2i"].bucket_weights() == {WIDE: 10, SQUARE: 5, TALL: 1}
    assert loaders["i2i_edit"].bucket_weights() == {SQUARE: 2}
    with pytest.raises(FileNotFoundError):
        resolve_data(DataConfig(uri=str(ds.root / "nothing" / "*.tar")))
