"""The Ray boundary: steps (fusion), the worker plan on any cluster size, the worker itself."""

from __future__ import annotations

from typing import ClassVar

import pytest

from core.config import load_config
from curation.adapter import MODEL_CPU_SHARE, Pool, Worker, plan_steps, plan_workers
from curation.config import CurationConfig
from curation.pipeline import build_stages
from curation.sink import BlockSink
from curation.stages.base import Resources, Row, SampleError, Stage


class CountingStage(Stage):
    name: ClassVar[str] = "count"
    setups = 0

    def setup(self) -> None:
        type(self).setups += 1

    def process_row(self, row: Row) -> Row:
        if row["key"] == "bad":
            raise SampleError("decode_error", "cannot read it")
        return {**row, "caption": "seen"}


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
    assert names == ["probe+split+frames+pairs+motion", "ocr", "select+encode"]
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


def test_model_stages_get_the_gpus_when_there_are_some():
    cpu, pools = plan_workers([Model()], 16.0, cluster_gpus=2.0)
    assert pools["model"].gpus == 0.25 and pools["model"].size == 8
    _, no_gpu = plan_workers([Model()], 16.0, cluster_gpus=0.0)
    assert no_gpu["model"].gpus == 0


def test_a_worker_sets_up_once_and_turns_bad_samples_into_error_rows(tmp_path):
    CountingStage.setups = 0
    steps = plan_steps([CountingStage()])
    worker = Worker(steps, BlockSink(str(tmp_path), "r", 10, 2**20))
    assert worker.ready()["device"] == "cpu" and CountingStage.setups == 1
    rows = [
        {"key": "ok", "kind": "image", "source_uri": "ok", "status": "rejected", "reasons": ["x"]}
    ]
    rows.append({"key": "bad", "kind": "image", "source_uri": "bad", "status": None})
    out, info = worker.run(steps[0].name, "b1", rows)
    out, info = worker.run(steps[0].name, "b2", rows)
    assert CountingStage.setups == 1  # not per call
    assert out == [] and info.written is not None  # the last step writes the block
    assert info.written.counts == {"rejected": 1, "error": 1}
    assert info.stages["count"][:2] == (2, 2) and "sink" in info.stages


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
