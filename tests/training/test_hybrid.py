"""Hybrid batching over real shards: one group and one shape per batch, the same composition on
every rank, the token budget over the whole batch, exact resume."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import av
import numpy as np
import pytest
import torch
from PIL import Image

from catalog.shards import ShardWriter, bucket_name, sample_json
from training.data.batch import MixedBatch
from training.data.buckets import tokens
from training.data.hybrid import HybridMixer, group_of
from training.data.loaders import TaskLoader
from training.models.base import Geometry
from training.recipe import StageConfig
from training.sampler import StepData
from training.tasks import EDIT_TASKS, TASK_GROUPS

GEOM = Geometry(spatial_factor=16, temporal_factor=4, max_text_len=16)
AREA, BUDGET = 64 * 64, 60  # 16 tokens per image: up to 3 images, or 1 image + 1 edit
WEIGHTS = {
    "t2i": 1.0,
    "i2i_edit": 0.5,
    "image_understanding": 0.5,
    "t2v": 1.0,
    "video_understanding": 0.5,
}
STAGE = StageConfig(
    name="mixed",
    trainable=["dit"],
    optimizer={"lr": 1e-3},
    frame_area=AREA,
    token_budget=BUDGET,
    condition_dropout=0.3,
    hybrid=True,
    tasks={
        t: {"weight": w, "data": "d", "num_frames": 9 if group_of(t) == "video" else None}
        for t, w in WEIGHTS.items()
    },
    steps=1,
    checkpoint_every=1,
)


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(texts), 16, dtype=torch.int64)
    for i, t in enumerate(texts):
        b = list(t.encode())[:16]
        ids[i, : len(b)] = torch.tensor(b)
    return ids, (ids > 0).long()


def png(w: int, h: int, value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (value,) * 3).save(out, format="PNG")
    return out.getvalue()


def mp4(n: int, w: int = 96, h: int = 54) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.full((h, w, 3), 10 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list:
    """16:9 and 1:1 images, 1:1 image edits, 16:9 videos (9 frames), in small shards."""
    writer = ShardWriter(str(tmp_path_factory.mktemp("hybrid")), prefix="h", max_samples=3)
    clip = mp4(9)

    def put(key, kind, w, h, members, n=1):
        row = {"key": key, "kind": kind, "status": "accepted", "width": w, "height": h,
               "num_frames": n, "fps": 24.0 if n > 1 else None}  # fmt: skip
        bucket = bucket_name(w, h, n)
        writer.write(bucket, key, {"json": sample_json(row), "txt": key.encode(), **members})

    for i in range(8):
        put(f"wide{i}", "image", 160, 90, {"png": png(160, 90, 20 * i)})
        put(f"sq{i}", "image", 96, 96, {"png": png(96, 96, 20 * i)})
    for i in range(6):
        put(
            f"edit{i}", "image_edit", 96, 96, {"src.png": png(96, 96, 9), "tgt.png": png(96, 96, i)}
        )
    for i in range(6):
        put(f"vid{i}", "video", 96, 54, {"mp4": clip}, n=9)
    return writer.close()


class Rank:
    """One rank's loaders and ``StepData`` (mixer, sampler, read-ahead) as the trainer builds
    them under hybrid batching."""

    def __init__(self, shards, rank: int = 0, world_size: int = 1, seed: int = 3):
        self.loaders = {
            task: TaskLoader(
                task,
                shards,
                tokenize=tokenize,
                geometry=GEOM,
                frame_area=AREA,
                token_budget=BUDGET,
                rank=rank,
                world_size=world_size,
                seed=seed,
                num_frames=9 if group_of(task) == "video" else None,
                fps=24.0,
                decode_threads=1,
            )  # fmt: skip
            for task in WEIGHTS
        }
        self.data = StepData(STAGE, self.loaders, seed, GEOM)
        self.mixer = self.data.mixer

    def step(self) -> MixedBatch:
        return self.data.take(torch.device("cpu"), read_next=True)[2]

    def saved(self) -> dict:
        """The states a checkpoint registers (as of the last step; the next batch is being
        read already)."""
        data = self.data
        return {"sampler": data.sampler_state, "mixer": data.mixer_state,
                "loaders": data.loader_state}  # fmt: skip

    def state(self) -> dict:
        state = {name: saved.state_dict() for name, saved in self.saved().items()}
        return json.loads(json.dumps(state))  # must survive the checkpoint's JSON

    def load(self, state: dict) -> None:
        for name, saved in self.saved().items():
            saved.load_state_dict(state[name])


def summary(batch: MixedBatch) -> tuple:
    """What every rank must agree on: group, shape, composition, condition dropout."""
    shape = tuple(batch.parts[0].pixels.shape[1:])
    parts = [(p.task, p.size) for p in batch.parts]
    return batch.group, shape, parts, {k: v.tolist() for k, v in batch.drop.items()}


def test_group_weights_and_bucket_mixture(shards):
    mixer = Rank(shards).mixer
    assert mixer.group_weights() == pytest.approx({"image": 2 / 3.5, "video": 1.5 / 3.5})
    image = dict(mixer.group_buckets()["image"])
    # t2i / image_understanding: 8 wide + 8 square images; i2i_edit: square only
    square = next(b for b in image if b.height == b.width)
    assert image[square] == pytest.approx((1.0 * 0.5 + 0.5 * 1.0 + 0.5 * 0.5) / 3.5)
    assert sum(image.values()) + sum(w for _, w in mixer.group_buckets()["video"]) == (
        pytest.approx(1.0)
    )


def test_batches_mix_tasks_of_one_group_and_one_shape_within_the_budget(shards):
    r = Rank(shards)
    mixed, groups, per_task = 0, Counter(), Counter()
    for _ in range(40):
        batch = r.step()
        groups[batch.group] += 1
        tasks = [p.task for p in batch.parts]
        assert tasks == sorted(set(tasks)) and all(p.size > 0 for p in batch.parts)
        assert set(tasks) <= set(TASK_GROUPS[batch.group])  # never mixes groups
        shapes = {tuple(p.pixels.shape[1:]) for p in batch.parts}
        assert len(shapes) == 1, shapes  # one bucket shape
        f, _, h, w = shapes.pop()
        per_sample = (1 + (f - 1) // 4) * (h // 16) * (w // 16)
        cost = sum(p.size * per_sample * (2 if p.task in EDIT_TASKS else 1) for p in batch.parts)
        assert cost <= BUDGET or batch.size == 1
        assert all(len(v) == batch.size for v in batch.drop.values())
        for p in batch.parts:
            if p.task in EDIT_TASKS:
                assert p.source_pixels is not None and p.source_pixels.shape == p.pixels.shape
            per_task[p.task] += p.size
        mixed += len(tasks) > 1
    assert set(groups) == {"image", "video"}
    assert mixed >= 10  # most batches do mix
    assert set(per_task) == set(WEIGHTS)


def test_the_budget_counts_every_sample_of_the_mixed_batch(shards):
    mixer = Rank(shards).mixer
    shape = next(b for b, _ in mixer.group_buckets()["image"] if b.height == b.width)
    per_image = tokens(shape, 16, 4)
    for _ in range(30):
        counts = mixer.compose("image", shape)
        cost = sum(n * mixer.cost(t, shape) for t, n in counts.items())
        assert cost <= BUDGET and BUDGET - cost < per_image  # nothing else would fit


def test_a_batch_size_caps_the_mixed_batch_below_the_budget(shards):
    """With ``batch_size`` 2 a batch holds 2 samples where the budget would pack 3 images."""
    loaders = Rank(shards).loaders
    capped = HybridMixer(loaders, WEIGHTS, 3, BUDGET, 16, 4, max_batch=2)
    shape = next(b for b, _ in capped.group_buckets()["image"] if b.height == b.width)
    sizes = Counter(sum(capped.compose("image", shape).values()) for _ in range(30))
    assert set(sizes) == {2}
    uncapped = HybridMixer(loaders, WEIGHTS, 3, BUDGET, 16, 4)
    assert max(sum(uncapped.compose("image", shape).values()) for _ in range(30)) == 3


def test_every_rank_composes_the_same_batch_from_its_own_samples(shards):
    ranks = [Rank(shards, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        b0, b1 = (r.step() for r in ranks)
        assert summary(b0) == summary(b1)
        assert not set(b0.keys) & set(b1.keys)


def test_resume_is_exact(shards):
    a = Rank(shards)
    for _ in range(5):
        a.step()
    state = a.state()
    rest = [a.step() for _ in range(8)]
    b = Rank(shards)
    b.load(state)
    resumed = [b.step() for _ in range(8)]
    assert [summary(x) for x in resumed] == [summary(x) for x in rest]
    assert [x.keys for x in resumed] == [x.keys for x in rest]
    for x, y in zip(resumed, rest, strict=True):
        assert all(torch.equal(p.pixels, q.pixels) for p, q in zip(x.parts, y.parts, strict=True))


def test_a_stage_with_hybrid_but_nothing_to_mix_warns():
    from core.config import ConfigWarning

    stage = {"name": "s", "trainable": ["dit"], "optimizer": {"lr": 1e-3}, "frame_area": 4096,
             "token_budget": 64, "steps": 2, "checkpoint_every": 1, "hybrid": True,
             "tasks": {"t2i": {"weight": 1, "data": "d"},
                       "t2v": {"weight": 1, "data": "d", "num_frames": 9}}}  # fmt: skip
    with pytest.warns(ConfigWarning, match="hybrid"):
        StageConfig.model_validate(stage)
    stage["tasks"]["image_understanding"] = {"weight": 1, "data": "d"}
    with warnings.catch_warnings():  # t2i + image_understanding can mix: no warning
        warnings.simplefilter("error", ConfigWarning)
        assert StageConfig.model_validate(stage).hybrid


def test_mixed_batch_concatenates_its_parts():
    from training.data.batch import TaskBatch

    def part(task, n):
        return TaskBatch(task, [f"{task}{i}" for i in range(n)], torch.zeros(n, 1, 3, 16, 16),
                         torch.zeros(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long),
                         drop={"text": torch.tensor([True] * n)})  # fmt: skip

    batch = MixedBatch("image", [part("image_understanding", 1), part("t2i", 2)])
    assert batch.size == 3 and batch.keys == ["image_understanding0", "t2i0", "t2i1"]
    assert batch.drop["text"].tolist() == [True] * 3
    assert batch.to("cpu").parts[1].task == "t2i"
