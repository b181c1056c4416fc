"""The Ray boundary: steps (fusion), the worker plan on any cluster size, the worker itself."""

from __future__ import annotations

import os
from typing import ClassVar

import pyarrow.parquet as pq
import pytest

from core.config import load_config
from curation.adapter import (
    _MALLOC_TRIM,
    MODEL_CPU_SHARE,
    Pool,
    PoolPlan,
    Worker,
    plan_steps,
    plan_workers,
    trim_heap,
    worker_factory,
)
from curation.config import CurationConfig
from curation.pipeline import build_stages
from curation.sink import BlockSink
from curation.stages.base import Resources, Row, SampleError, Stage
from curation.weights import WORKER_BASE_MB, memory_estimate_mb


class CountingStage(Stage):
    """Counts its set-ups; ``bad`` is a sample error, ``crash`` a library error."""

    name: ClassVar[str] = "count"
    setups = 0

    def setup(self) -> None:
        type(self).setups += 1

    def process_row(self, row: Row) -> Row:
        if row["key"] == "bad":
            raise SampleError("decode_error", "cannot read it")
        if row["key"] == "crash":
            raise RuntimeError("the decoder choked")
        return {**row, "caption": "seen", "status": "rejected", "reasons": ["count: seen"]}


class Model(Stage):
    name: ClassVar[str] = "model"
    uses_model: ClassVar[bool] = True
    resources: ClassVar[Resources] = Resources(cpus=0.5, gpus=0.25)

    def process_row(self, row: Row) -> Row:
        return row


def test_cpu_stages_are_fused_and_each_model_stage_is_a_step():
    stages, _ = build_stages(load_config(CurationConfig, None, []))
    steps = plan_steps(stages)
    names = [s.name for s in steps]
    assert names == ["probe+split+frames+pairs+phash+motion", "ocr", "select+encode"]
    assert [s.uses_model for s in steps] == [False, True, False]
    assert [s.writes for s in steps] == [False, False, True]
    assert plan_steps([Model()])[-1].stages == ()  # the sink step exists even without stages


@pytest.mark.parametrize("cpus", [1.0, 2.0, 16.0, 64.0])
def test_workers_fit_the_cluster(cpus):
    stages, _ = build_stages(load_config(CurationConfig, None, []))
    models = [s for s in stages if s.uses_model]
    cpu, pools = plan_workers(models, cpus)
    taken = sum(p.size * p.cpus for p in pools.values())
    assert taken <= MODEL_CPU_SHARE * cpus + 0.05 * len(pools) + 1e-9
    assert cpu.size * cpu.cpus + taken <= cpus + 1e-9  # everything is schedulable at once
    assert cpu.size >= max(1, round(cpus - taken) - 1)  # and the CPUs are used
    assert all(p.gpus == 0 for p in pools.values())


class BigModel(Model):
    name: ClassVar[str] = "big"
    resources: ClassVar[Resources] = Resources(cpus=0.5, memory_mb=4000)


def test_cpu_model_stages_get_an_actor_per_cpu_as_far_as_their_memory_fits():
    _, pools = plan_workers([Model(), BigModel()], 2.0, cluster_memory_mb=20_000)
    assert pools["model"].size == 2 and pools["big"].size == 2
    # 16 CPUs: 16 actors of each would hold 64 GB; half of 20 GB holds 2 of each (4000 + 0 MB)
    _, pools = plan_workers([Model(), BigModel()], 16.0, cluster_memory_mb=20_000)
    assert pools["model"].size == 2 and pools["big"].size == 2
    _, pools = plan_workers([BigModel()], 16.0, cluster_memory_mb=1000)
    assert pools["big"].size == 1  # never none
    _, pools = plan_workers([BigModel()], 16.0)  # memory unknown: CPUs decide
    assert pools["big"].size == 16


def test_a_model_workers_memory_is_estimated_from_its_weights(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.safetensors").write_bytes(b"0" * 3 * 2**20)
    (tmp_path / "model" / "b.bin").write_bytes(b"0" * 2 * 2**20)
    assert memory_estimate_mb(tmp_path / "model" / "a.safetensors") == WORKER_BASE_MB + 3
    assert memory_estimate_mb(tmp_path / "model") == WORKER_BASE_MB + 5
    assert memory_estimate_mb(tmp_path / "absent") == WORKER_BASE_MB


def test_the_default_model_stages_state_their_memory():
    stages, _ = build_stages(load_config(CurationConfig, None, []))
    models = [s for s in stages if s.uses_model]
    assert models and all(s.resources.memory_mb >= WORKER_BASE_MB for s in models)


def test_model_stages_get_the_gpus_when_there_are_some():
    cpu, pools = plan_workers([Model()], 16.0, cluster_gpus=2.0)
    assert pools["model"].gpus == 0.25 and pools["model"].size == 8
    _, no_gpu = plan_workers([Model()], 16.0, cluster_gpus=0.0)
    assert no_gpu["model"].gpus == 0


def _rows(*keys: str) -> list[Row]:
    return [
        {"key": k, "kind": "image", "source_uri": f"/data/{k}.png", "status": None, "reasons": []}
        for k in keys
    ]


def _index(root, written) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(root / written.index_part).to_pylist()}


def test_a_worker_sets_up_once_and_turns_bad_samples_into_error_rows(tmp_path):
    CountingStage.setups = 0
    steps = plan_steps([CountingStage()])
    worker = Worker(steps, BlockSink(str(tmp_path), "r", 10, 2**20))
    assert worker.ready()["device"] == "cpu" and CountingStage.setups == 1
    rows = _rows("ok", "bad", "crash", "done")
    rows[3].update(status="error", reasons=["probe: x"])  # final already: passed on untouched
    out, info = worker.run(steps[0].name, "b1", rows)
    out, info = worker.run(steps[0].name, "b2", rows)
    assert CountingStage.setups == 1  # not per call
    assert out == [] and info.written is not None  # the last step writes the block
    assert info.written.counts == {"rejected": 1, "error": 3}
    assert info.stages["count"][:2] == (4, 4) and "sink" in info.stages
    index = _index(tmp_path, info.written)
    assert index["ok"]["caption"] == "seen" and index["ok"]["reasons"] == ["count: seen"]
    assert index["bad"]["status"] == "error"
    assert index["bad"]["reasons"] == ["decode_error: cannot read it"]
    assert index["crash"]["status"] == "error"
    assert index["crash"]["reasons"] == ["count_failed: RuntimeError: the decoder choked"]
    assert index["done"]["caption"] is None and index["done"]["reasons"] == ["probe: x"]


def test_a_setup_error_is_raised_by_ready():
    class Broken(Stage):
        name: ClassVar[str] = "broken"

        def setup(self) -> None:
            raise ValueError("bad setting broken.x")

    worker = Worker(plan_steps([Broken()])[:1], None)
    with pytest.raises(ValueError, match="bad setting broken.x"):
        worker.ready()


def test_the_pool_sends_calls_to_the_least_busy_actor():
    made = iter(range(10))
    pool = Pool("p", lambda: next(made), 3)
    picks = [pool.pick() for _ in range(4)]
    assert sorted(picks[:3]) == [0, 1, 2] and picks[3] in (0, 1, 2)
    pool.release(picks[0])
    pool.release(picks[0])
    assert pool.pick() == picks[0]


def test_frames_are_dropped_after_the_last_stage_that_reads_them(tmp_path):
    stages, _ = build_stages(load_config(CurationConfig, None, []))
    steps = plan_steps(stages)
    assert [s.drops_frames for s in steps] == [False, True, False]  # after OCR, not to the sink
    assert plan_steps([CountingStage()])[0].drops_frames is False  # nothing reads frames

    class Reads(Stage):
        name: ClassVar[str] = "reads"
        reads_frames: ClassVar[bool] = True

        def process_row(self, row: Row) -> Row:
            assert row["frames"]
            return row

    steps = plan_steps([Reads(), Model(), CountingStage()])
    assert [s.drops_frames for s in steps] == [True, False, False]
    worker = Worker(steps[:1], None)
    row = {"key": "a", "kind": "image", "source_uri": "a", "status": None, "reasons": []}
    row.update(frames=[b"x"], frame_times=[0.0], clip_embedding={"key": "k"}, thumb=b"j")
    (out,), _ = worker.run(steps[0].name, "b", [row])
    assert not {"frames", "frame_times", "clip_embedding"} & set(out)
    assert out["thumb"] == b"j"  # the report's thumbnail goes on


def test_a_worker_whose_setup_failed_refuses_every_call():
    """After Ray restarts an actor, a set-up that fails again must not turn rows into errors."""

    class Broken(Stage):
        name: ClassVar[str] = "broken"

        def setup(self) -> None:
            raise ValueError("CUDA out of memory in setup")

        def process_row(self, row: Row) -> Row:
            return row

    steps = plan_steps([Broken()])[:1]
    worker = Worker(steps, None)
    with pytest.raises(ValueError, match="CUDA out of memory"):
        worker.run(steps[0].name, "b", [{"key": "a"}])


# --- on Ray: the actors worker_factory makes ------------------------------------------------


@pytest.fixture
def ray_stages(ray_session):
    """Ray, with tests/engine_stages.py pickled by value (workers cannot import tests/)."""
    import engine_stages

    ray_session.cloudpickle.register_pickle_by_value(engine_stages)
    yield ray_session
    ray_session.cloudpickle.unregister_pickle_by_value(engine_stages)


def test_ray_workers_set_up_once_per_actor_and_return_error_rows(ray_stages, tmp_path):
    """A model actor and a CPU actor, two blocks each: one set-up per actor process, a sample
    error inside an actor comes back as an error row (never re-processed downstream), the model
    step hands its rows on through the object store and the CPU step writes the block."""
    from engine_stages import SetupLogModelStage, SetupLogStage

    ray = ray_stages
    log = tmp_path / "setups"
    log.mkdir()
    steps = plan_steps([SetupLogModelStage(str(log)), SetupLogStage(str(log))])
    assert [s.uses_model for s in steps] == [True, False]
    sink = BlockSink(str(tmp_path / "out"), "r", 10, 2**20)
    model = worker_factory(steps[:1], None, PoolPlan(1, 0.25), "model", retries=0)()
    cpu = worker_factory(steps[1:], sink, PoolPlan(1, 0.25), "cpu", retries=0)()
    try:
        model_pid, cpu_pid = (r["pid"] for r in ray.get([model.ready.remote(), cpu.ready.remote()]))
        infos = []
        for block in ("b1", "b2"):
            rows = _rows(f"{block}-a", f"{block}-bad", f"{block}-c")
            rows_ref, model_info = model.run.options(num_returns=2).remote(
                steps[0].name, block, rows
            )
            _, cpu_info = cpu.run.options(num_returns=2).remote(steps[1].name, block, rows_ref)
            infos.append(ray.get([model_info, cpu_info]))
    finally:
        ray.kill(model, no_restart=True)
        ray.kill(cpu, no_restart=True)

    assert model_pid != cpu_pid and model_pid != os.getpid() != cpu_pid
    assert sorted(int(f.name.split("-")[0]) for f in log.iterdir()) == sorted([model_pid, cpu_pid])
    for block, (model_info, cpu_info) in zip(("b1", "b2"), infos, strict=True):
        assert model_info.written is None and model_info.stages["setuplog_model"][:2] == (3, 3)
        assert cpu_info.written.counts == {"rejected": 2, "error": 1}
        index = _index(tmp_path / "out", cpu_info.written)
        seen = f"setuplog_model@{model_pid};setuplog@{cpu_pid};"
        assert index[f"{block}-a"]["caption"] == index[f"{block}-c"]["caption"] == seen
        bad = index[f"{block}-bad"]
        assert bad["status"] == "error" and bad["caption"] is None
        assert bad["reasons"] == ["decode_error: cannot read it"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(_MALLOC_TRIM is None, reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_heap_pages_back():
    """Freed chunks in the middle of the heap stay in the process until ``trim_heap``: ~240 MB
    of 60 KB chunks (under glibc's mmap threshold, so on the heap), 7 of 8 freed."""
    chunks = [bytearray(60_000) for _ in range(4000)]
    for c in chunks:
        c[::4096] = b"\1" * len(c[::4096])  # touch every page
    kept = chunks[1::8]  # the heap's top stays in use: free() alone cannot shrink it
    del chunks
    before = _rss_mb()
    trim_heap()
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert len(kept) == 500
