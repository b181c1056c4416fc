"""Integration: real Ray Train (2 workers, gloo), real DeepSpeed on CPU, real MLflow (SQLite)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import stage_trace
from safetensors.torch import load_file

from catalog.index import open_index
from catalog.records import Node
from catalog.store import Catalog
from core.config import load_config
from curation.sample_data import generate
from curation.sample_data.register import register_sample_corpus
from training.checkpoint import CheckpointError
from training.data.sources import resolve_data
from training.models.registry import build_model
from training.recipe import Recipe
from training.runner import pin_data, run_training
from training.tasks import TASK_GROUPS

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
DATA = ["data.curated.uri=catalog://sample-corpus@latest"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    """The generated corpus registered from its labels: shards for every task."""
    root = tmp_path_factory.mktemp("train-data")
    generate(root / "corpus", seed=0)
    cat = Catalog(f"sqlite:///{root / 'catalog.db'}")
    register_sample_corpus(root / "corpus", cat)
    return cat


def recipe(name: str, *overrides: str) -> Recipe:
    return load_config(Recipe, RECIPES / f"{name}.yaml", [*DATA, *overrides])


SHORT = ["stages.0.steps=12", "stages.0.checkpoint_every=4"]
HYBRID = [  # stage 1 as a hybrid stage over image and video tasks
    "stages.0.hybrid=true",
    "stages.0.trainable=[text_head, vision_head, adapter, dit]",
    "stages.0.tasks.i2i_edit={weight: 0.5, data: curated}",
    "stages.0.tasks.image_understanding={weight: 0.5, data: curated}",
    "stages.0.tasks.t2v={weight: 1.0, data: curated, num_frames: 9, fps: 12}",
    "stages.0.tasks.video_understanding={weight: 0.5, data: curated, num_frames: 9, fps: 12}",
]


def assert_ranks_agree(rank0: list[dict], rank1: list[dict]) -> None:
    """Same task (or group), bucket, composition and dropout; each rank its own samples."""
    assert len(rank0) == len(rank1)
    for r0, r1 in zip(rank0, rank1, strict=True):
        same = ("task", "bucket", "parts", "drop")
        assert [r0[k] for k in same] == [r1[k] for k in same], (r0, r1)
        assert not set(r0["keys"]) & set(r1["keys"])  # each rank reads its own part


def assert_hybrid(records: list[dict]) -> None:
    """Every batch holds tasks of the drawn group only, and some batches mix tasks."""
    for t in records:
        assert t["task"] in TASK_GROUPS and set(t["parts"]) <= set(TASK_GROUPS[t["task"]]), t
        assert sum(t["parts"].values()) == len(t["keys"])
    assert any(len(t["parts"]) > 1 for t in records)


@pytest.mark.parametrize("hybrid", [False, True], ids=["task", "hybrid"])
def test_ranks_agree_and_resume_is_exact(hybrid, catalog, tmp_path, ray_session):
    r = recipe("omni_video_tiny", *SHORT, *(HYBRID if hybrid else []))
    stopped = run_training(r, tmp_path / "a", stages=[0], workers=2, catalog=catalog,
                           stop_after=6, trace=True)  # fmt: skip
    assert stopped["stages"][0]["stopped_at"] == 6
    run_training(r, tmp_path / "a", stages=[0], workers=2, catalog=catalog, resume=True, trace=True)
    run_training(r, tmp_path / "b", stages=[0], workers=2, catalog=catalog, trace=True)

    resumed, clean = (
        stage_trace(tmp_path / "a", "align", 0),
        stage_trace(tmp_path / "b", "align", 0),
    )
    assert [t["step"] for t in resumed] == list(range(1, 13)) == [t["step"] for t in clean]
    for x, y in zip(resumed, clean, strict=True):
        same = ("task", "bucket", "keys", "parts", "drop")
        assert [x[k] for k in same] == [y[k] for k in same]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert_ranks_agree(clean, stage_trace(tmp_path / "b", "align", 1))
    assert_ranks_agree(resumed, stage_trace(tmp_path / "a", "align", 1))
    if hybrid:
        assert_hybrid(clean)
    a = load_file(tmp_path / "a" / "stages" / "1-align" / "final.safetensors")
    b = load_file(tmp_path / "b" / "stages" / "1-align" / "final.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_failed_stage_marks_the_parent_run_failed(catalog, tmp_path, ray_session):
    """Whatever a stage raises ends the MLflow parent run FAILED, not RUNNING forever (here the
    stage's folder cannot be made: a file stands where it goes)."""
    from mlflow.tracking import MlflowClient

    out, tracking = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "1-align").write_text("not a folder")
    with pytest.raises(FileExistsError):
        run_training(recipe("omni_video_tiny", *SHORT), out, stages=[0], workers=2,
                     catalog=catalog, tracking_uri=tracking)  # fmt: skip
    parent = json.loads((out / "run.json").read_text())["mlflow_parent"]
    assert MlflowClient(tracking).get_run(parent).info.status == "FAILED"


@pytest.mark.parametrize("name", ["omni_video_tiny", "haplo_omni_tiny", "vino_tiny"])
def test_tiny_recipes_train_three_stages(name, catalog, tmp_path, ray_session):
    r = recipe(name)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_training(r, tmp_path / "run", workers=2, catalog=catalog, trace=True,
                           tracking_uri=tracking)  # fmt: skip
    assert [s["stage"] for s in summary["stages"]] == [s.name for s in r.stages]

    torch.manual_seed(r.seed)
    options = r.model.options()
    before = build_model(r.model.family, r.model.size, options=options).state_dict()
    model = build_model(r.model.family, r.model.size, options=options)
    for stage, done in zip(r.stages, summary["stages"], strict=True):
        # loss falls in every stage: the stage's objective (the task mixture) on fixed
        # held-out batches with fixed noise; single tasks may trade off against each other
        folder = Path(done["weights"]).parent
        start = json.loads((folder / "eval-start.json").read_text())
        end = json.loads((folder / "eval-end.json").read_text())
        assert set(start) == set(end) == {f"eval_loss/{t}" for t in stage.tasks}
        weights = {f"eval_loss/{t}": c.weight for t, c in stage.tasks.items()}

        def objective(losses: dict[str, float], w: dict[str, float] = weights) -> float:
            return sum(w[k] * v for k, v in losses.items()) / sum(w.values())

        assert objective(end) < objective(start), (stage.name, start, end)
        # frozen groups are bit-identical through the stage; trainable ones moved
        after = load_file(done["weights"])
        trainable = model.select_groups(stage.trainable)
        for key, value in after.items():
            group = key.split(".")[1]
            if group in trainable:
                continue
            assert torch.equal(value, before[key]), (stage.name, key)
        assert any(not torch.equal(after[k], before[k]) for k in after
                   if k.split(".")[1] in trainable), stage.name  # fmt: skip
        before = after

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    parent = client.get_run(summary["mlflow_parent"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["stages.0.optimizer.lr"] == str(r.stages[0].optimizer.lr)
    # the parent summarizes every stage (training.tracking.log_stage_summary)
    assert parent.data.metrics["stages_done"] == len(r.stages)
    for i, (stage, done) in enumerate(zip(r.stages, summary["stages"], strict=True)):
        final = parent.data.metrics[f"{i + 1}-{stage.name}/loss/final"]
        assert final == pytest.approx(done["final_loss"])
        assert parent.data.metrics[f"{i + 1}-{stage.name}/steps"] == stage.steps
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["catalog://sample-corpus@1"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    assert sorted(c.data.tags["omniforge.stage"] for c in children) == sorted(
        s.name for s in r.stages
    )
    for child in children:
        metrics = child.data.metrics
        for m in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_fraction"):
            assert m in metrics, (child.data.tags["omniforge.stage"], m)
        assert any(k.startswith("loss/") for k in metrics) and any(
            k.startswith("tasks/") for k in metrics
        )
        history = client.get_metric_history(child.info.run_id, "loss")
        assert len(history) == r.stages[0].steps
        assert [d.dataset.name for d in child.inputs.dataset_inputs] == [
            "catalog://sample-corpus@1"
        ]
        assert "recipe.yaml" in [a.path for a in client.list_artifacts(child.info.run_id)]
        grids = [a.path for a in client.list_artifacts(child.info.run_id, "inputs")]
        stage_name = child.data.tags["omniforge.stage"]
        tasks = next(s.tasks for s in r.stages if s.name == stage_name)
        assert {g.split("/")[-1].split("-")[0] for g in grids} == set(tasks), grids
        # stage-end samples of the text-to-image/video tasks (every tiny family generates)
        samples = [a.path for a in client.list_artifacts(child.info.run_id, "samples")]
        expected = {t for t in tasks if t in ("t2i", "t2v")}
        assert {p.split("/")[-1].split("-")[0] for p in samples} == expected, samples
        folder = next((tmp_path / "run" / "stages").glob(f"*-{stage_name}"))
        assert sorted(p.name for p in (folder / "samples").glob("*.png")) == sorted(
            p.split("/")[-1] for p in samples
        )

    for stage in r.stages:  # hybrid stages (omni_video: unified) mix tasks
        rank0, rank1 = (
            stage_trace(tmp_path / "run", stage.name, 0),
            stage_trace(tmp_path / "run", stage.name, 1),
        )
        assert_ranks_agree(rank0, rank1)
        if stage.hybrid:
            assert_hybrid(rank0)
    assert any(s.hybrid for s in r.stages) == (name == "omni_video_tiny")

    # the catalog links the data version -> stage runs -> checkpoints -> next stage
    version = catalog.get_version("sample-corpus", 1)
    _, down = catalog.lineage(Node("version", version.id))
    runs = {e.child.id for e in down if e.child.type == "run"}
    assert len(runs) >= len(r.stages)
    assert sum(e.relation == "init" for e in down) >= len(r.stages) - 1

    # the held-out split (training/data/holdout.py): no rank of any stage trained on a held-out
    # sample; each stage run records the split in the catalog and MLflow
    split = resolve_data(pin_data(r, catalog)[0].data["curated"], catalog).split
    index = open_index(version.index_uri).to_table(columns=["key", "kind"]).to_pylist()
    held = {row["key"] for row in index if split.held_out(row["key"], row["kind"])}
    assert held  # the corpus has enough images and videos for the min_samples floor
    for stage in r.stages:
        for rank in (0, 1):
            assert (
                not {k for t in stage_trace(tmp_path / "run", stage.name, rank) for k in t["keys"]}
                & held
            )
    records = [catalog.get_run(i).params["holdout"] for i in runs]
    assert all(rec == {"curated": split.record()} for rec in records), records
    for child in children:
        assert child.data.params["holdout.curated.fraction"] == "0.02"
        assert child.data.params["holdout.curated.held_out.image"] == str(
            split.record()["held_out"]["image"]
        )


class Lines:
    """A console that keeps what the runner prints."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str = "", **kwargs) -> None:
        self.lines.append(str(text))


def test_resume_skips_a_damaged_checkpoint_and_logs_each_step_once(catalog, tmp_path,
                                                                   ray_session):  # fmt: skip
    from mlflow.tracking import MlflowClient

    r = recipe("omni_video_tiny", *SHORT)  # 12 steps, a checkpoint every 4
    out, tracking = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_training(r, out, stages=[0], workers=2, catalog=catalog, stop_after=8, trace=True,
                 tracking_uri=tracking)  # fmt: skip
    (experiment,) = (out / "ray").iterdir()
    kept = sorted((c for c in experiment.glob("checkpoint_*") if c.is_dir()),
                  key=lambda c: json.loads((c / "trainer.json").read_text())["step"])  # fmt: skip
    assert [json.loads((c / "trainer.json").read_text())["step"] for c in kept] == [4, 8]
    model = kept[1] / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    with open(model, "r+b") as f:  # the newest checkpoint's model states, truncated
        f.truncate(size // 2)

    # every kept checkpoint damaged: one message naming each, before Ray Train starts
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "ray" / experiment.name / kept[0].name / "trainer.json").unlink()
    with pytest.raises(CheckpointError) as error:
        run_training(r, broken, stages=[0], workers=2, catalog=catalog, resume=True)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message  # the CLI's one line
    assert message.startswith("stage 1 (align): no usable checkpoint to resume from in ")
    assert f"skipped checkpoint {kept[1].name} (step 8): deepspeed/state/" in message
    assert f"skipped checkpoint {kept[0].name} (step 4): trainer.json is missing" in message
    state = json.loads((broken / "run.json").read_text())
    failed = catalog.get_run(state["stages"]["0"]["catalog_run"])
    assert failed.status == "failed" and failed.message == message

    console = Lines()
    run_training(r, out, stages=[0], workers=2, catalog=catalog, resume=True, trace=True,
                 tracking_uri=tracking, console=console)  # fmt: skip
    note = (
        f"skipped checkpoint {kept[1].name} (step 8): deepspeed/state/mp_rank_00_model_states.pt "
        f"is {size // 2} bytes, {size} when written; resuming from {kept[0].name} (step 4)"
    )
    assert f"stage 1 (align): {note}" in console.lines
    # the workers' progress: where they resumed, then a line every 10 steps and at the last
    assert f"stage 1 (align): resuming from checkpoint {kept[0].name} (step 4)" in console.lines
    assert shown_steps(console.lines, 12) == [5, 10, 12]
    records = stage_trace(out, "align", 0)
    assert [t["step"] for t in records] == list(range(1, 9)) + list(range(5, 13))
    for first, again in zip(records[4:8], records[8:12], strict=True):  # exact from step 4
        same = ("task", "bucket", "keys", "parts", "drop")
        assert [first[k] for k in same] == [again[k] for k in same]
        assert first["loss"] == pytest.approx(again["loss"], rel=1e-5, abs=1e-6)
    state = json.loads((out / "run.json").read_text())
    run = catalog.get_run(state["stages"]["0"]["catalog_run"])
    assert (run.status, run.message) == ("succeeded", note)

    # MLflow: every step once although steps 5-8 ran twice; task counts carry over the resume
    client = MlflowClient(tracking)
    run_id = state["stages"]["0"]["mlflow_run"]
    for key in ("loss", "lr", "grad_norm", "tasks/t2i"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, 13))
    assert [m.value for m in client.get_metric_history(run_id, "tasks/t2i")] == list(range(1, 13))
    assert client.get_run(run_id).data.tags["omniforge.resume"] == note


def shown_steps(lines: list[str], steps: int) -> list[int]:
    """The steps of the progress lines the driver printed."""
    pattern = re.compile(rf"stage 1 \(align\): step (\d+)/{steps} ")
    return [int(m.group(1)) for line in lines if (m := pattern.match(line))]


def held(folder: Path, world_size: int = 2, proc=None, log: Path | None = None) -> list[dict]:
    """Wait until every rank is held (``OMNIFORGE_TEST_HOLD``): the ranks' records."""
    deadline = time.monotonic() + 540  # a failure bound only: the hold is the event
    files = [folder / f"held-rank{r}.json" for r in range(world_size)]
    while not all(f.exists() for f in files):
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"the ranks were never held at the requested step ({folder})\n{tail}")
        time.sleep(0.05)
    return [json.loads(f.read_text()) for f in files]


def ended(procs: list[psutil.Process], bound_s: float = 300) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie has: nothing may reap an orphan); the ones
    still running after ``bound_s`` (a failure bound only)."""

    def running(proc: psutil.Process) -> bool:
        try:
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + bound_s
    while any(running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in procs if running(p)]


def test_killed_worker_restarts_from_the_last_checkpoint(catalog, tmp_path, ray_session,
                                                         monkeypatch):  # fmt: skip
    # every rank holds after step 10, once Ray Train has registered the step-8 checkpoint:
    # rank 0 is killed there, so the restart point is known (8) and steps are left (11-16)
    r = recipe("omni_video_tiny", "stages.0.steps=16", "stages.0.checkpoint_every=8")
    out, hold = tmp_path / "run", tmp_path / "hold"
    monkeypatch.setenv("OMNIFORGE_TEST_HOLD", f"10:{hold}")
    killed: list[dict] = []

    def killer() -> None:
        try:
            records = held(hold)
            psutil.Process(records[0]["pid"]).send_signal(signal.SIGKILL)
            killed.append(records[0])
        finally:  # whatever happened, the run goes on (and the assertions below tell)
            (hold / "release").touch()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    console = Lines()
    run_training(r, out, stages=[0], workers=2, catalog=catalog, trace=True, console=console,
                 progress_every=1)  # fmt: skip
    thread.join()
    assert killed, "no training worker was killed"
    assert len(killed[0]["registered"]) == 1, killed  # the step-8 checkpoint, registered
    records = stage_trace(out, "align", 0)
    steps = [t["step"] for t in records]
    # steps 9 and 10 ran twice: rank 0 died after 10 and the run restarted from checkpoint 8
    assert steps == list(range(1, 11)) + list(range(9, 17)), steps
    # the driver showed every step rank 0 took, what died, Ray Train's retry and where the
    # restarted workers resumed
    assert shown_steps(console.lines, 16) == steps, console.lines
    label = "stage 1 (align): "
    (failure,) = [line for line in console.lines if "training worker failure" in line]
    assert failure.startswith(f"{label}training worker failure after step 10: "), failure
    assert f"rank 0 died (pid {killed[0]['pid']}, node " in failure, failure
    assert (
        f"{label}Ray Train restarts the workers from the last checkpoint (failure 1 of 3 allowed)"
        in console.lines
    )
    checkpoint = killed[0]["registered"][0]
    assert (
        f"{label}workers restarted; resumed from checkpoint {checkpoint} (step 8), "
        "steps 9-10 run again" in console.lines
    ), console.lines
    for first, again in zip(records[8:10], records[10:12], strict=True):  # the same batches
        same = ("task", "bucket", "keys", "parts", "drop")
        assert [first[k] for k in same] == [again[k] for k in same]
        assert first["loss"] == pytest.approx(again["loss"], rel=1e-5, abs=1e-6)
    assert (out / "stages" / "1-align" / "final.safetensors").exists()


def test_workers_stop_when_the_driver_is_killed(catalog, tmp_path):
    """SIGKILL ``omniforge train run`` (the driver only) while its workers are held after a
    registered checkpoint, then let them go: they end, and write no checkpoint after it."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    cmd = [str(Path(sys.executable).with_name("omniforge")), "train", "run", "omni_video_tiny",
           "--output", str(out), "--stages", "1", "--workers", "2",
           "--catalog", str(catalog.url), *[f"--set={s}" for s in DATA],
           "--set=stages.0.steps=40", "--set=stages.0.checkpoint_every=4"]  # fmt: skip
    env = {**os.environ, "OMNIFORGE_TEST_HOLD": f"8:{hold}", "RAY_ADDRESS": "local"}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        records = held(hold, proc=driver, log=tmp_path / "driver.log")
        workers = [psutil.Process(r["pid"]) for r in records]
        experiment = next((out / "ray").iterdir())
        kept = sorted(p.name for p in experiment.glob("checkpoint_*") if p.is_dir())
        assert kept == sorted(records[0]["registered"]) and len(kept) == 2  # num_to_keep

        driver.send_signal(signal.SIGKILL)  # the driver only; its workers are held
        driver.wait()
        (hold / "release").touch()
        alive = ended(workers)
        assert not alive, f"workers {[p.pid for p in alive]} outlived the driver"
        after = sorted(p.name for p in experiment.glob("checkpoint_*") if p.is_dir())
        assert after == kept, "a worker wrote checkpoints after the driver was killed"
    finally:
        for proc in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the local Ray the driver started
        driver.wait()
