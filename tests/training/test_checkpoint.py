"""The checkpointer and checkpoint verification: where each registered state goes, what a
resume compares, manifests, damaged and incomplete checkpoints, older checkpoints.

Synthetic checkpoint directories (no Ray, no DeepSpeed engine): the files a checkpoint holds,
written the way ranks write them (each rank's share with its manifest last), then damaged.
The trainer's own resume is in ``test_trainer.py``; the end-to-end paths (a resumed run
skipping a damaged checkpoint, MLflow, the catalog) are in ``test_runner.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.config import dump_yaml, load_config
from training import checkpoint as ckpt
from training.ray_stage import checkpoint_failure, resume_point
from training.recipe import Recipe

MODEL = "deepspeed/state/mp_rank_00_model_states.pt"
RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


def tiny(*overrides: str) -> Recipe:
    return load_config(
        Recipe, RECIPES / "omni_video_tiny.yaml", ["data.curated.uri=/d", *overrides]
    )


def share(directory: Path, rank: int, world_size: int, step: int, manifest: bool = True) -> None:
    """What rank ``rank`` writes into a checkpoint (as ``Checkpointer.save`` lays it out)."""
    state = directory / "deepspeed" / "state"
    state.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "w": torch.arange(64.0) * rank},
               state / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # fmt: skip
    (directory / f"loaders-rank{rank}.json").write_text(json.dumps({"t2i": {"pos": step}}))
    if rank == 0:
        torch.save({"module": {"w": torch.ones(256) * step}}, state / "mp_rank_00_model_states.pt")
        (directory / "deepspeed" / "latest").write_text("state")
        trainer = {"step": step, "sampler": {}}
        if manifest:
            trainer.update(format=ckpt.FORMAT, world_size=world_size)
        (directory / "trainer.json").write_text(json.dumps(trainer))
        (directory / "recipe.yaml").write_text(dump_yaml(tiny()))
        save_file({"w": torch.zeros(8)}, directory / "ema.safetensors")


def checkpoint(directory: Path, step: int, world_size: int = 2, manifest: bool = True) -> Path:
    """A whole checkpoint: every rank's share copied into one directory, as Ray Train does."""
    for rank in range(world_size):
        own = directory.parent / f".rank{rank}-{directory.name}"
        share(own, rank, world_size, step, manifest)
        if manifest:
            ckpt.write_manifest(own, rank, world_size, step)
        for path in own.rglob("*"):
            if path.is_file():
                target = directory / path.relative_to(own)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return directory


class Plain:
    """A ``Stateful`` holding whatever it is given."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state) -> None:
        self.state = state


def checkpointer(rank: int, world_size: int, recipe: Recipe, states: dict) -> ckpt.Checkpointer:
    """Stage 0's checkpointer with ``states`` registered (``loaders`` per rank)."""
    c = ckpt.Checkpointer(rank, world_size, recipe, 0)
    for name, state in states.items():
        c.register(name, state, per_rank=name == "loaders")
    return c


def test_the_checkpointer_saves_and_loads_every_registered_state(tmp_path):
    recipe, merged = tiny(), tmp_path / "checkpoint_1"
    for rank in range(2):  # each rank into a directory of its own, then copied as Ray does
        states = {"sampler": Plain({"draw": [1, 2]}), "loaders": Plain({"t2i": {"pos": rank}}),
                  "ema": Plain({"w": torch.arange(4.0)})}  # fmt: skip
        own = checkpointer(rank, 2, recipe, states).save(tmp_path / f"rank{rank}", step=8)
        shutil.copytree(own, merged, dirs_exist_ok=True)
    assert ckpt.verify(merged) is None
    assert sorted(p.name for p in merged.iterdir()) == [
        "ema.safetensors", "loaders-rank0.json", "loaders-rank1.json", "manifest-rank0.json",
        "manifest-rank1.json", "recipe.yaml", "trainer.json"]  # fmt: skip
    assert json.loads((merged / "trainer.json").read_text()) == {
        "format": ckpt.FORMAT, "world_size": 2, "step": 8, "sampler": {"draw": [1, 2]}}  # fmt: skip
    assert ckpt.read_recipe(merged) == recipe

    fresh = {"sampler": Plain(), "loaders": Plain(), "ema": Plain()}
    assert checkpointer(1, 2, recipe, fresh).load(merged) == 8
    assert fresh["sampler"].state == {"draw": [1, 2]}
    assert fresh["loaders"].state == {"t2i": {"pos": 1}}  # rank 1's own
    assert torch.equal(fresh["ema"].state["w"], torch.arange(4.0))

    c = checkpointer(0, 2, recipe, {"sampler": Plain()})
    for name in ("sampler", "step"):
        with pytest.raises(ValueError, match=f"state '{name}' is registered twice or reserved"):
            c.register(name, Plain())
    c.register("mixer", Plain())
    with pytest.raises(ckpt.CheckpointError, match="holds no 'mixer' state"):
        c.load(merged)


def test_a_resume_compares_the_settings_an_exact_resume_depends_on(tmp_path):
    for path in sorted(RECIPES.glob("*.yaml")):  # every recipe reads back as itself
        recipe = load_config(Recipe, path)
        (tmp_path / "recipe.yaml").write_text(dump_yaml(recipe))
        saved = ckpt.read_recipe(tmp_path)
        assert all(not ckpt.resume_mismatch(saved, recipe, i) for i in range(len(recipe.stages)))

    saved = tiny()
    other = tiny("seed=3", "stages.0.optimizer.lr=0.002", "stages.0.ema={decay: 0.99}",
                 "stages.0.tasks.t2v={weight: 1.0, data: curated, num_frames: 9}",
                 "data.curated.uri=/elsewhere",
                 # none of these changes what stage 0 computes
                 "stages.0.checkpoint_every=4", "stages.0.gradient_checkpointing=true",
                 "workers=4", "stages.1.steps=99")  # fmt: skip
    assert ckpt.resume_mismatch(saved, other, 0) == [
        "seed: 0 in the checkpoint, 3 now",
        "stages.0.optimizer.lr: 0.001 in the checkpoint, 0.002 now",
        "stages.0.ema: None in the checkpoint, {'decay': 0.99} now",
        "stages.0.tasks.t2v: (absent) in the checkpoint, "
        "{'weight': 1.0, 'data': 'curated', 'num_frames': 9, 'fps': None, 'vlm_fps': None, "
        "'vlm_max_frames': None} now",
        "data.curated.uri: '/d' in the checkpoint, '/elsewhere' now",
    ]
    assert "stages.1.steps: 24 in the checkpoint, 99 now" in ckpt.resume_mismatch(saved, other, 1)

    written = checkpoint(tmp_path / "checkpoint_2", step=4)  # by 2 ranks, with tiny()
    states = {"sampler": Plain(), "loaders": Plain()}
    with pytest.raises(ckpt.CheckpointError) as error:
        checkpointer(0, 1, tiny("seed=3"), states).load(written)
    assert str(error.value) == (
        "cannot resume stage 'align' from checkpoint checkpoint_2 (step 4): it was written "
        "with other settings: seed: 0 in the checkpoint, 3 now; world size: 2 in the "
        "checkpoint, 1 now; resume with the settings the stage started with"
    )
    assert states["sampler"].state is None  # nothing loaded
    (written / "recipe.yaml").write_text("name: x\nstages: 3\n")
    with pytest.raises(ckpt.CheckpointError, match="recipe.yaml does not read back as a recipe"):
        checkpointer(0, 2, tiny(), states).load(written)


def test_a_complete_checkpoint_verifies(tmp_path):
    good = checkpoint(tmp_path / "checkpoint_a", step=8)
    assert ckpt.verify(good) is None
    manifest = json.loads((good / "manifest-rank0.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 8
    assert MODEL in manifest["files"] and "trainer.json" in manifest["files"]
    assert ckpt.describe(good) == "checkpoint_a (step 8)"


def test_damaged_and_incomplete_checkpoints_say_why(tmp_path):
    def damaged(name: str, harm) -> str | None:
        c = checkpoint(tmp_path / name, step=8)
        harm(c)
        return ckpt.verify(c)

    size = (checkpoint(tmp_path / "probe", step=8) / MODEL).stat().st_size

    def truncate(c: Path) -> None:
        data = (c / MODEL).read_bytes()
        (c / MODEL).write_bytes(data[: len(data) // 2])

    def flip(c: Path) -> None:
        data = bytearray((c / MODEL).read_bytes())
        data[-20] ^= 0xFF
        (c / MODEL).write_bytes(bytes(data))

    assert damaged("truncated", truncate) == f"{MODEL} is {size // 2} bytes, {size} when written"
    assert damaged("flipped", flip) == f"{MODEL} does not match its checksum"
    assert damaged("no-file", lambda c: (c / "loaders-rank1.json").unlink()) == (
        "loaders-rank1.json is missing"
    )
    assert damaged("no-rank1", lambda c: (c / "manifest-rank1.json").unlink()) == (
        "incomplete: manifest-rank1.json is missing (written by fewer than 2 ranks)"
    )
    assert damaged("no-rank0", lambda c: (c / "manifest-rank0.json").unlink()) == (
        "incomplete: manifest-rank0.json is missing"
    )
    assert damaged("bad-manifest", lambda c: (c / "manifest-rank1.json").write_text("{")) == (
        "incomplete: manifest-rank1.json is unreadable (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1))"
    )
    assert ckpt.verify(tmp_path / "nowhere") == "the directory is missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ckpt.verify(empty) == "incomplete: trainer.json and manifest-rank0.json are missing"


def test_checkpoints_from_before_manifests_are_accepted_if_they_load(tmp_path):
    old = checkpoint(tmp_path / "old", step=4, manifest=False)
    assert not list(old.glob("manifest-rank*.json"))
    assert ckpt.verify(old) is None
    assert ckpt.describe(old) == "old (step 4)"
    states = {"task_counts": Plain(), "sampler": Plain(), "loaders": Plain(), "ema": Plain()}
    assert checkpointer(1, 2, tiny(), states).load(old) == 4
    assert states["task_counts"].state == {}  # not counted before manifests
    assert states["loaders"].state == {"t2i": {"pos": 4}}

    broken = checkpoint(tmp_path / "old-truncated", step=4, manifest=False)
    data = (broken / MODEL).read_bytes()
    (broken / MODEL).write_bytes(data[:100])
    assert ckpt.verify(broken).startswith(f"{MODEL} does not load (")
    partial = checkpoint(tmp_path / "old-partial", step=4, manifest=False)
    (partial / "loaders-rank1.json").unlink()
    assert ckpt.verify(partial) == "loaders-rank1.json does not load (FileNotFoundError)"


def test_choose_takes_the_newest_valid_checkpoint_and_names_the_skipped(tmp_path):
    older = checkpoint(tmp_path / "checkpoint_1", step=4)
    newer = checkpoint(tmp_path / "checkpoint_2", step=8)
    (newer / MODEL).write_bytes(b"")
    chosen, skipped = ckpt.choose([newer, older])
    assert chosen == older
    assert ckpt.skip_note(chosen, skipped) == (
        f"skipped checkpoint checkpoint_2 (step 8): {MODEL} is 0 bytes, "
        f"{(older / MODEL).stat().st_size} when written; resuming from checkpoint_1 (step 4)"
    )
    assert ckpt.choose([newer]) == (None, [(newer, skipped[0][1])])


def snapshot(experiment: Path, names: list[str]) -> None:
    """Ray Train's run state: the kept checkpoints in registration order, the last the latest."""
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    (experiment / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"checkpoint_results": results, "latest_checkpoint_result": results[-1]})
    )


def test_the_driver_checks_checkpoints_in_a_bucket_from_their_listing(tmp_path, s3_bucket):
    """Ray Train's storage in S3: the driver reads the run state and each rank's manifest and
    compares sizes with the listing, without downloading a checkpoint."""
    import fsspec

    built = tmp_path / "built"
    built.mkdir()
    for name, step in (("checkpoint_1", 4), ("checkpoint_2", 8)):
        checkpoint(built / name, step=step)
    snapshot(built, ["checkpoint_1", "checkpoint_2"])
    experiment = f"{s3_bucket}/run/ray/run-1-align"
    fs, root = fsspec.core.url_to_fs(experiment)
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_manager_snapshot.json"):
        fs.put(str(built / name), f"{root}/{name}", recursive=True)
    label = "stage 1 (align)"
    assert resume_point(experiment, label) == (f"{experiment}/checkpoint_2", "")

    fs.pipe_file(f"{root}/checkpoint_2/{MODEL}", b"x")  # cut short
    chosen, note = resume_point(experiment, label)
    assert chosen == f"{experiment}/checkpoint_1"
    size = (built / "checkpoint_2" / MODEL).stat().st_size
    assert note == (
        f"skipped checkpoint checkpoint_2 (step 8): {MODEL} is 1 bytes, {size} when written; "
        "resuming from checkpoint_1 (step 4)"
    )

    fs.rm(f"{root}/checkpoint_2", recursive=True)  # deleted: a marker keeps its name
    chosen, note = resume_point(experiment, label)
    assert chosen == f"{experiment}/checkpoint_1" and fs.exists(f"{root}/checkpoint_2/deleted")
    assert note.startswith("skipped checkpoint checkpoint_2: the directory is missing; ")

    fs.rm(f"{root}/checkpoint_1/manifest-rank1.json")
    with pytest.raises(ckpt.CheckpointError, match="manifest-rank1.json is missing"):
        resume_point(experiment, label)


def test_the_driver_reports_the_resume_point_before_the_stage_starts(tmp_path):
    experiment = tmp_path / "ray" / "run-1-align"
    experiment.mkdir(parents=True)
    assert resume_point(experiment, "stage 1 (align)") is None  # nothing kept: a fresh start
    older = checkpoint(experiment / "checkpoint_1", step=4)
    checkpoint(experiment / "checkpoint_2", step=8)
    snapshot(experiment, ["checkpoint_1", "checkpoint_2"])
    assert resume_point(experiment, "stage 1 (align)") == (experiment / "checkpoint_2", "")

    (experiment / "checkpoint_2" / MODEL).write_bytes(b"x")
    chosen, note = resume_point(experiment, "stage 1 (align)")
    assert chosen == older and note.startswith("skipped checkpoint checkpoint_2 (step 8): ")
    assert note.endswith("; resuming from checkpoint_1 (step 4)")

    # a kept checkpoint that was deleted is skipped too (recreated empty: Ray Train's run
    # state must find every directory it names)
    __import__("shutil").rmtree(experiment / "checkpoint_2")
    chosen, note = resume_point(experiment, "stage 1 (align)")
    assert chosen == older and (experiment / "checkpoint_2").is_dir()
    assert note.startswith("skipped checkpoint checkpoint_2: incomplete: trainer.json and ")

    (older / "trainer.json").unlink()
    with pytest.raises(ckpt.CheckpointError) as error:
        resume_point(experiment, "stage 1 (align)")
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)  # the CLI's one line
    assert message.startswith(
        f"stage 1 (align): no usable checkpoint to resume from in {experiment}: skipped "
        "checkpoint checkpoint_2: incomplete"
    )
    assert message.endswith(f"; remove {experiment} to start the stage over")

    (experiment / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_res')
    with pytest.raises(ckpt.CheckpointError, match="Ray Train's run state .* is unreadable"):
        resume_point(experiment, "stage 1 (align)")


def test_a_worker_that_finds_no_usable_checkpoint_fails_the_stage_with_its_message():
    from ray.train import WorkerGroupError

    cause = ckpt.CheckpointError("no usable checkpoint to resume from in X: ...")
    error = WorkerGroupError("rank 0 failed", {0: cause, 1: RuntimeError("gloo: peer gone")})
    assert checkpoint_failure(error) is cause
    assert checkpoint_failure(WorkerGroupError("x", {0: RuntimeError("oom")})) is None
    assert checkpoint_failure(RuntimeError("not from Ray Train")) is None
