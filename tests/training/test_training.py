"""Integration: real Ray Train (2 workers, gloo), real DeepSpeed on CPU, real MLflow (SQLite)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from catalog.config import load_config
from catalog.records import Node
from catalog.store import Catalog
from curation.sample_data import generate
from curation.sample_data.register import register_sample_corpus
from training.models.registry import build_model
from training.recipe import TASK_GROUPS, Recipe
from training.runner import run_training
from training.trainer import NonFiniteError, Trainer

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


def trace(out: Path, stage: str, rank: int) -> list[dict]:
    path = next((out / "stages").glob(f"*-{stage}")) / f"trace-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


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

    resumed, clean = trace(tmp_path / "a", "align", 0), trace(tmp_path / "b", "align", 0)
    assert [t["step"] for t in resumed] == list(range(1, 13)) == [t["step"] for t in clean]
    for x, y in zip(resumed, clean, strict=True):
        same = ("task", "bucket", "keys", "parts", "drop")
        assert [x[k] for k in same] == [y[k] for k in same]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert_ranks_agree(clean, trace(tmp_path / "b", "align", 1))
    assert_ranks_agree(resumed, trace(tmp_path / "a", "align", 1))
    if hybrid:
        assert_hybrid(clean)
    a = load_file(tmp_path / "a" / "stages" / "1-align" / "final.safetensors")
    b = load_file(tmp_path / "b" / "stages" / "1-align" / "final.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name", ["omni_video_tiny", "haplo_omni_tiny", "vino_tiny"])
def test_tiny_recipes_train_three_stages(name, catalog, tmp_path, ray_session):
    r = recipe(name)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_training(r, tmp_path / "run", workers=2, catalog=catalog, trace=True,
                           tracking_uri=tracking)  # fmt: skip
    assert [s["stage"] for s in summary["stages"]] == [s.name for s in r.stages]

    torch.manual_seed(r.seed)
    before = build_model(r.model.family, r.model.size).state_dict()
    model = build_model(r.model.family, r.model.size)
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
            trace(tmp_path / "run", stage.name, 0),
            trace(tmp_path / "run", stage.name, 1),
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


def test_killed_worker_restarts_from_the_last_checkpoint(catalog, tmp_path, ray_session):
    r = recipe("omni_video_tiny", "stages.0.steps=40", "stages.0.checkpoint_every=8")
    out = tmp_path / "run"
    storage = out / "ray"
    killed: list[int] = []

    def killer() -> None:
        # Ray Train registers a reported checkpoint when its controller next polls the workers
        # (every ~2 s): kill a worker well after the first checkpoint reached storage.
        deadline, seen = time.monotonic() + 300, None
        while not killed and time.monotonic() < deadline:
            if seen is None and list(storage.glob("*/checkpoint_*/trainer.json")):
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen > 6:
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    title = " ".join(proc.info["cmdline"] or [])
                    if title.startswith("ray::") and "TrainWorker" in title:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        break
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    run_training(r, out, stages=[0], workers=2, catalog=catalog, trace=True)
    thread.join()
    assert killed, "no training worker was killed"
    steps = [t["step"] for t in trace(out, "align", 0)]
    assert steps[-1] == 40 and len(steps) > 40  # some steps ran twice after the restart
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] > 1 and (steps[restart] - 1) % 8 == 0  # right after a checkpoint
    clean = run_training(r, tmp_path / "clean", stages=[0], workers=2, catalog=catalog)
    a = load_file(out / "stages" / "1-align" / "final.safetensors")
    b = load_file(Path(clean["stages"][0]["weights"]))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the restart changed nothing


def test_non_finite_loss_stops_before_the_optimizer_step():
    trainer = Trainer.__new__(Trainer)  # only the finiteness check, no engine
    trainer.world_size, trainer.step, trainer.device = 1, 3, torch.device("cpu")
    trainer.stage = type("S", (), {"name": "align"})()
    with pytest.raises(NonFiniteError, match="non-finite loss on task t2i"):
        trainer._check_finite("loss", torch.tensor(float("nan")), "t2i", ["k1"])
    trainer._check_finite("loss", torch.tensor(1.0), "t2i", ["k1"])
