"""One checkpointer for all resumable state of a stage (torchtitan's pattern).

The trainer registers every object whose state must survive a resume once, under a name
(``Checkpointer.register``: the DeepSpeed engine, the sampler, the hybrid mixer, each rank's
loaders, the task counts, the EMA); ``save`` and ``load`` go through that one object. (The
data states are registered as ``sampler.Snapshot``s: the batch after a step is read while it
computes, so what a checkpoint stores is their state as of the step's own batch.) Where a
state is written follows from what it is::

    deepspeed/                 the engine: trainable weights + ZeRO optimizer partitions per rank
    trainer.json               step, format, world size, and every state of plain values that
                               is the same on every rank (sampler, mixer, task counts; rank 0)
    {name}.safetensors         a state of tensors, the same on every rank (``ema``; rank 0)
    {name}-rank{R}.json        a state registered ``per_rank`` (``loaders``: rank R's positions)
    recipe.yaml                the resolved recipe (rank 0)
    manifest-rank{R}.json      written last by rank R: size + sha256 of every file rank R wrote

``load`` first compares the checkpoint with the run that resumes from it: the saved
``recipe.yaml`` against the current recipe on every setting an exact resume of the stage
depends on (``resume_settings``: seed, precision, model, the stage but for when it
checkpoints and whether it recomputes activations, the data its tasks read) and the world
size; a difference stops the stage with a ``CheckpointError`` naming each differing setting,
before anything is loaded. Architecture settings are thus never taken from the checkpoint:
they must match it.

Each rank writes its share into a directory of its own and Ray Train copies the shares into one
storage directory (in no particular order), so completeness is judged from the manifests, not
from which file came last: a checkpoint is valid when the manifest of every rank (0 ..
world size - 1) is there and every file it lists has its size and checksum. ``verify`` says
why one is not; ``choose`` takes the newest valid one of a list and names the ones it skipped.

Checkpoints written before manifests existed (``trainer.json`` without ``format``) are
accepted if they load: ``trainer.json`` and the loader positions parse and every DeepSpeed
file and the EMA weights read back (a truncated file does not). They hold no task counts.

Nothing is unpickled blindly: DeepSpeed's files are read with ``weights_only=True`` and only
DeepSpeed's own plain classes allow-listed; weights go through safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from training.recipe import Recipe

DS_TAG = "state"
FORMAT = 2  # trainer.json "format"; checkpoints without it predate manifests
MANIFEST = "manifest-rank{rank}.json"
MISSING = "the directory is missing"  # verify's reason for a kept checkpoint that was deleted
DELETED = "deleted"  # the marker object standing for a deleted checkpoint in object storage
META = ("format", "world_size", "step")  # trainer.json keys that name no registered state
# stage settings that change when state is saved or how much memory a step takes, not what
# the stage computes: a resume may change them
NOT_COMPARED = ("checkpoint_every", "gradient_checkpointing")


class CheckpointError(ValueError):
    """The stage cannot resume: every checkpoint Ray Train kept is damaged or incomplete, or
    the one chosen was written with other settings than the run resuming from it."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _torch_load(path: Path | str, map_location=None):
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return _torch_load(path, map_location)

    return SafeTorchCheckpointEngine()


class Checkpointer:
    """The resumable state of one stage on one rank: objects registered once by name, saved
    and loaded together (see the module docstring for where each goes)."""

    def __init__(self, rank: int, world_size: int, recipe: Recipe, stage_index: int):
        self.rank, self.world_size = rank, world_size
        self.recipe, self.stage_index = recipe, stage_index
        self.states: dict[str, Stateful] = {}
        self.per_rank: set[str] = set()
        self.engine: str | None = None  # the name the DeepSpeed engine is registered under

    def register(self, name: str, obj: Any, *, per_rank: bool = False) -> None:
        """``obj``: a DeepSpeed engine (``save_checkpoint`` / ``load_checkpoint``) or a
        ``Stateful``; ``per_rank``: each rank saves and loads its own state."""
        if name in self.states or name in META:
            raise ValueError(f"checkpoint state {name!r} is registered twice or reserved")
        if hasattr(obj, "save_checkpoint") and hasattr(obj, "load_checkpoint"):
            if self.engine is not None or per_rank:
                raise ValueError(f"{name!r}: one DeepSpeed engine per checkpoint, not per rank")
            self.engine = name
        self.states[name] = obj
        if per_rank:
            self.per_rank.add(name)

    def _file(self, name: str, suffix: str) -> str:
        return f"{name}-rank{self.rank}{suffix}" if name in self.per_rank else f"{name}{suffix}"

    def save(self, directory: Path, step: int) -> Path:
        """Write this rank's share into ``directory`` (every rank calls it, each into a
        directory of its own, in the same order: DeepSpeed's save is collective); the rank's
        manifest comes last."""
        directory.mkdir(parents=True, exist_ok=True)
        shared: dict[str, Any] = {"format": FORMAT, "world_size": self.world_size, "step": step}
        for name, obj in self.states.items():
            if name == self.engine:
                obj.save_checkpoint(str(directory / "deepspeed"), tag=DS_TAG)
                continue
            if name not in self.per_rank and self.rank != 0:
                continue  # the same on every rank: rank 0 writes it
            state = obj.state_dict()
            if state and all(isinstance(v, torch.Tensor) for v in state.values()):
                tensors = {k: v.detach().contiguous() for k, v in state.items()}
                save_file(tensors, directory / self._file(name, ".safetensors"))
            elif name in self.per_rank:
                (directory / self._file(name, ".json")).write_text(json.dumps(state))
            else:
                shared[name] = state
        if self.rank == 0:
            from core.config import dump_yaml

            (directory / "trainer.json").write_text(json.dumps(shared))
            (directory / "recipe.yaml").write_text(dump_yaml(self.recipe))
        write_manifest(directory, self.rank, self.world_size, step)
        return directory

    def load(self, directory: Path) -> int:
        """Check that this run may resume from ``directory`` (``CheckpointError`` naming each
        difference), restore every registered state and return the step it was taken at."""
        shared = json.loads((directory / "trainer.json").read_text())
        self.check_resumable(directory, shared)
        if "format" not in shared:  # from before manifests: no task counts yet
            shared.setdefault("task_counts", {})
        if self.engine is not None:
            path, _ = self.states[self.engine].load_checkpoint(
                str(directory / "deepspeed"), tag=DS_TAG, load_module_strict=False
            )
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed state in {directory / 'deepspeed'}")
        for name, obj in self.states.items():
            if name != self.engine:
                obj.load_state_dict(self._read(directory, name, shared))
        return int(shared["step"])

    def _read(self, directory: Path, name: str, shared: dict[str, Any]) -> Any:
        tensors = directory / self._file(name, ".safetensors")
        if tensors.exists():
            return load_file(tensors)
        if name in self.per_rank:
            path = directory / self._file(name, ".json")
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} missing: the checkpoint was written by fewer ranks"
                )
            return json.loads(path.read_text())
        if name not in shared:
            raise CheckpointError(
                f"checkpoint {describe(directory)} holds no {name!r} state: it was written by a "
                "stage configured differently"
            )
        return shared[name]

    def check_resumable(self, directory: Path, shared: dict[str, Any]) -> None:
        """The saved recipe and world size against this run's (every rank reads the same
        files, so every rank stops, or none)."""
        differences = resume_mismatch(read_recipe(directory), self.recipe, self.stage_index)
        saved = shared.get("world_size", self.world_size)  # absent before manifests
        if saved != self.world_size:
            differences.append(f"world size: {saved} in the checkpoint, {self.world_size} now")
        if differences:
            raise CheckpointError(
                f"cannot resume stage {self.recipe.stages[self.stage_index].name!r} from "
                f"checkpoint {describe(directory)}: it was written with other settings: "
                f"{'; '.join(differences)}; resume with the settings the stage started with"
            )


def read_recipe(directory: Path) -> Recipe:
    """The recipe a checkpoint was written with (its ``recipe.yaml``), validated."""
    import yaml
    from pydantic import ValidationError

    path = directory / "recipe.yaml"
    try:
        with warnings.catch_warnings():  # warned about when the run started
            warnings.simplefilter("ignore")
            return Recipe.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise CheckpointError(f"{path} does not read back as a recipe ({e})") from e


def resume_settings(recipe: Recipe, stage_index: int) -> dict[str, Any]:
    """Every setting an exact resume of stage ``stage_index`` depends on, nested as in the
    recipe: seed, precision, model, the stage (but ``NOT_COMPARED``) and the data entries its
    tasks read. ``workers`` is not one: the world size is compared instead."""
    settings: dict[str, Any] = {"seed": recipe.seed, "precision": recipe.precision}
    settings["model"] = recipe.model.model_dump(mode="json")
    if stage_index < len(recipe.stages):
        stage = recipe.stages[stage_index]
        dump = stage.model_dump(mode="json", exclude=set(NOT_COMPARED))
        settings["stages"] = {str(stage_index): dump}
        keys = sorted({task.data for task in stage.tasks.values()})
        settings["data"] = {key: recipe.data[key].model_dump(mode="json") for key in keys}
    return settings


def resume_mismatch(saved: Recipe, current: Recipe, stage_index: int) -> list[str]:
    """``path: value in the checkpoint, value now`` for each setting of ``resume_settings``
    that differs; paths as ``--set`` takes them (``stages.0.optimizer.lr``)."""
    absent = object()

    def show(value: Any) -> str:
        return "(absent)" if value is absent else repr(value)

    def differences(before: Any, now: Any, path: str) -> list[str]:
        if isinstance(before, dict) and isinstance(now, dict):
            out = []
            for key in list(now) + [key for key in before if key not in now]:
                inner = f"{path}.{key}" if path else key
                out += differences(before.get(key, absent), now.get(key, absent), inner)
            return out
        if before == now:
            return []
        return [f"{path}: {show(before)} in the checkpoint, {show(now)} now"]

    before, now = resume_settings(saved, stage_index), resume_settings(current, stage_index)
    return differences(before, now, "")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int, world_size: int, step: int | None) -> Path:
    """Size and sha256 of every file in ``directory`` (this rank's share), written last."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith("manifest-rank"):
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    target = directory / MANIFEST.format(rank=rank)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, target)
    return target


def name_of(directory: Path | str) -> str:
    return str(directory).rstrip("/").rsplit("/", 1)[-1]


def step_of(directory: Path | str) -> int | None:
    """The step a checkpoint (a local folder or an object-store URI) was taken at, from its
    manifest or trainer.json (None: unreadable)."""
    import fsspec

    for name in (MANIFEST.format(rank=0), "trainer.json"):
        try:
            with fsspec.open(f"{directory}/{name}", "rt") as f:
                return int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def describe(directory: Path | str) -> str:
    step = step_of(directory)
    return f"{name_of(directory)} (step {step})" if step is not None else name_of(directory)


def verify(directory: Path) -> str | None:
    """Why ``directory`` is not a checkpoint to resume from, or None when it is."""
    if not directory.is_dir():
        return MISSING
    first = directory / MANIFEST.format(rank=0)
    if not first.exists():
        try:
            trainer = json.loads((directory / "trainer.json").read_text())
        except FileNotFoundError:
            return "incomplete: trainer.json and manifest-rank0.json are missing"
        except (OSError, ValueError) as e:
            return f"incomplete: trainer.json is unreadable ({e})"
        if "format" in trainer:
            return "incomplete: manifest-rank0.json is missing"
        return _verify_legacy(directory, trainer)

    def size(rel: str) -> int | None:
        path = directory / rel
        return path.stat().st_size if path.is_file() else None

    return _check_manifests(
        lambda rel: (directory / rel).read_bytes(), size, lambda rel: sha256(directory / rel)
    )


def verify_stored(uri: str) -> str | None:
    """``verify`` for a checkpoint in object storage, without reading it back: every rank's
    manifest is there and every file it lists has its size. The checksums are checked on the
    copy a resumed stage loads (``ray_stage.RayTrainContext.latest_checkpoint``)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:
        listing = {}
    sizes = {path[len(root) + 1 :]: int(info["size"]) for path, info in listing.items()}
    if not sizes or set(sizes) == {DELETED}:
        return MISSING
    if MANIFEST.format(rank=0) not in sizes:
        if "trainer.json" not in sizes:
            return "incomplete: trainer.json and manifest-rank0.json are missing"
        return "incomplete: manifest-rank0.json is missing"

    def read(rel: str) -> bytes:
        if rel not in sizes:
            raise FileNotFoundError(rel)
        return fs.cat_file(f"{root}/{rel}")

    return _check_manifests(read, sizes.get, None)


def _check_manifests(read, size, digest) -> str | None:
    """Every rank's manifest (``read(rel)`` -> bytes) and the files it lists: ``size(rel)``
    (None: missing) and, unless ``digest`` is None, ``digest(rel)`` (sha256)."""
    try:
        world_size = int(json.loads(read(MANIFEST.format(rank=0)))["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"incomplete: manifest-rank0.json is unreadable ({e})"
    for rank in range(world_size):
        name = MANIFEST.format(rank=rank)
        try:
            files = json.loads(read(name))["files"]
        except FileNotFoundError:
            return f"incomplete: {name} is missing (written by fewer than {world_size} ranks)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"incomplete: {name} is unreadable ({e})"
        for rel, expected in files.items():
            actual = size(rel)
            if actual is None:
                return f"{rel} is missing"
            if actual != expected["size"]:
                return f"{rel} is {actual} bytes, {expected['size']} when written"
            if digest is not None and digest(rel) != expected["sha256"]:
                return f"{rel} does not match its checksum"
    return None


def _verify_legacy(directory: Path, trainer: dict) -> str | None:
    """A checkpoint from before manifests: accepted if every file reads back."""
    if "step" not in trainer:
        return "trainer.json holds no step"
    state = directory / "deepspeed" / DS_TAG
    optim = sorted(state.glob("zero_pp_rank_*_optim_states.pt"))
    files = sorted(state.glob("*.pt"))
    if not (state / "mp_rank_00_model_states.pt").exists():
        return f"deepspeed/{DS_TAG}/mp_rank_00_model_states.pt is missing"
    for path in files:
        try:
            _torch_load(path, map_location="cpu")
        except Exception as e:  # any failure to read back: truncated, garbled
            return f"{path.relative_to(directory).as_posix()} does not load ({type(e).__name__})"
    for rank in range(max(1, len(optim))):
        loaders = directory / f"loaders-rank{rank}.json"
        try:
            json.loads(loaders.read_text())
        except (OSError, ValueError) as e:
            return f"{loaders.name} does not load ({type(e).__name__})"
    ema = directory / "ema.safetensors"
    if ema.exists():
        try:
            load_file(ema)
        except Exception as e:
            return f"ema.safetensors does not load ({type(e).__name__})"
    return None


def choose(candidates: list[Any]) -> tuple[Any, list[tuple[Any, str]]]:
    """The first valid checkpoint of ``candidates`` (newest first: local ``Path``s, or
    object-store URIs checked by ``verify_stored``) and the (checkpoint, why) pairs skipped
    before it."""
    skipped: list[tuple[Any, str]] = []
    for candidate in candidates:
        reason = verify(candidate) if isinstance(candidate, Path) else verify_stored(candidate)
        if reason is None:
            return candidate, skipped
        skipped.append((candidate, reason))
    return None, skipped


def skip_note(chosen: Path | str | None, skipped: list[tuple[Path | str, str]]) -> str:
    """One line: which checkpoints were skipped and why, and where training resumes."""
    parts = [f"skipped checkpoint {describe(path)}: {why}" for path, why in skipped]
    if chosen is not None:
        parts.append(f"resuming from {describe(chosen)}")
    return "; ".join(parts)


def save_weights(weights: torch.nn.Module | Mapping[str, torch.Tensor], path: Path) -> Path:
    """Full weights (a model's state, all groups) as safetensors: what the next stage starts
    from. Written to a temporary name first, so ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    tmp.replace(path)
    return path


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """``path``: a local safetensors file or an object-store URI (copied to a local temporary
    file first, then read like a local one)."""
    from core.storage import get_file, is_remote

    if is_remote(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="omniforge-weights-") as tmp:
            load_weights(model, get_file(str(path), Path(tmp) / Path(str(path)).name))
        return
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
