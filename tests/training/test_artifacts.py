"""Input grids and samples of a stage (training.artifacts) over real shards, a real task loader,
the tiny omni_video model and a real MLflow store (SQLite): one labelled cell per distinct
sample, edits as source and target, and the grids logged as MLflow step images."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from catalog.shards import ShardWriter, bucket_name, sample_json
from core import tracking
from core.tracking import MetricLogger
from training.artifacts import SAMPLE_PROMPTS, StageArtifacts
from training.data.loaders import TaskLoader
from training.models.registry import build_model

SQUARE = {f"sq{i}": (40 * i, 200 - 30 * i, 90) for i in range(5)}  # key -> colour, 32x32
TALL = {"tall0": (250, 20, 20)}  # the only 24x40 image: a bucket of one sample
EDITS = {f"ed{i}": ((50, 50, 50), (200, 60 * i, 10)) for i in range(2)}  # source, target


def png(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("grid-shards")
    writer = ShardWriter(str(root), prefix="g", max_samples=4)

    def put(key, kind, w, h, members, text):
        row = {"key": key, "kind": kind, "status": "accepted", "width": w, "height": h,
               "num_frames": 1, "fps": None}  # fmt: skip
        if kind == "image_edit":
            row.update(target_width=w, target_height=h, target_num_frames=1)
        members = {"json": sample_json(row), "txt": text.encode(), **members}
        writer.write(bucket_name(w, h, 1), key, members)

    for key, colour in {**SQUARE, **TALL}.items():
        w, h = (32, 32) if key in SQUARE else (24, 40)
        put(key, "image", w, h, {"png": png(w, h, colour)}, f"a card of {key}")
    for key, (src, tgt) in EDITS.items():
        put(key, "image_edit", 32, 32, {"src.png": png(32, 32, src), "tgt.png": png(32, 32, tgt)},
            f"recolour {key}")  # fmt: skip
    return [s.uri for s in writer.close()]


@pytest.fixture(scope="module")
def model():
    return build_model("omni_video", "tiny")


@pytest.fixture
def store(tmp_path, monkeypatch) -> tuple[str, str]:
    """A real MLflow store (SQLite, artifacts next to it) and a run in it."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, tracking.start_run(uri, "grids", "stage")


class Stage(StageArtifacts):
    """What the mixin reads of a ``Trainer``: rank 0, its model, settings and tracker."""

    def __init__(self, out: Path, uri: str, run_id: str, model, step: int = 0,
                 size: str = "tiny", world_size: int = 2):  # fmt: skip
        self.rank, self.step, self.device, self.ema = 0, step, "cpu", None
        self.world_size = world_size
        out.mkdir(parents=True, exist_ok=True)  # the runner creates the stage folder
        self.model = model
        self.spec = SimpleNamespace(output=str(out), tracking_uri=uri, mlflow_run_id=run_id)
        self.out_dir = out  # a local stage folder is written directly (trainer.stage_files)
        self.recipe = SimpleNamespace(seed=3, model=SimpleNamespace(size=size))
        self.stage = SimpleNamespace(condition_dropout=0.0)
        self.tracker = MetricLogger(uri, run_id)


def loader(task: str, shards: list[str], model) -> TaskLoader:
    return TaskLoader(task, shards, tokenize=model.tokenize, geometry=model.geometry,
                      frame_area=1024, token_budget=4096, seed=5, decode_threads=1)  # fmt: skip


def pixels(grid, box) -> np.ndarray:
    return np.asarray(grid.image.crop(box)).reshape(-1, 3).astype(int)


def near(grid, box, colour) -> bool:
    """The frame in ``box`` is flat ``colour`` (+-2: resizing a flat image to its bucket)."""
    return bool((np.abs(pixels(grid, box) - np.array(colour)) <= 2).all())


def images(uri: str, run_id: str) -> dict[str, set[int]]:
    """MLflow step images of the run: key -> steps (from ``images/KEY+step+N+...png``)."""
    from mlflow.tracking import MlflowClient

    found: dict[str, set[int]] = {}
    for a in MlflowClient(uri).list_artifacts(run_id, "images"):
        name = a.path.split("/")[-1]
        if name.endswith(".png"):
            key, _, step = name.split("+")[:3]
            found.setdefault(key.replace("~", "/"), set()).add(int(step))
    return found


def test_input_grids_show_each_distinct_sample_once_labelled(shards, model, store, tmp_path):
    uri, run_id = store
    host = Stage(tmp_path / "stage", uri, run_id, model, step=0)
    t2i = loader("t2i", shards, model)
    weights = t2i.bucket_weights()
    (one,) = [b for b, n in weights.items() if n == 1]
    (five,) = [b for b, n in weights.items() if n == 5]
    grids = host._log_input_grids("t2i", t2i, [five, one])

    for bucket, expected in ((five, SQUARE), (one, TALL)):
        grid = grids[bucket]
        assert len(grid.cells) == len(expected)  # the 1-sample bucket: one cell
        assert sorted(c.label[1] for c in grid.cells) == sorted(expected)
        for cell in grid.cells:
            key = cell.label[1]
            assert cell.label[0] == f"t2i · {bucket}"
            assert " ".join(cell.label[2:]) == f"prompt: a card of {key}"
            assert (pixels(grid, cell.label_box) < 128).any()  # the text is drawn
            (panel,) = cell.panels
            assert near(grid, panel.box, expected[key])
            assert min(panel.box[2] - panel.box[0], panel.box[3] - panel.box[1]) >= 128

    edits = loader("i2i_edit", shards, model)
    (bucket,) = edits.bucket_weights()
    grid = host._log_input_grids("i2i_edit", edits, [bucket])[bucket]
    assert sorted(c.label[1] for c in grid.cells) == sorted(EDITS)
    for cell in grid.cells:
        source, target = cell.panels
        assert (source.role, target.role) == ("source", "target")
        assert near(grid, source.box, EDITS[cell.label[1]][0])
        assert near(grid, target.box, EDITS[cell.label[1]][1])
        assert " ".join(cell.label[2:]) == f"instruction: recolour {cell.label[1]}"

    out = tmp_path / "stage" / "inputs"
    names = {f"t2i-{five}.png", f"t2i-{one}.png", f"i2i_edit-{bucket}.png"}
    assert {p.name for p in out.glob("*.png")} == names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "inputs")} == names
    assert images(uri, run_id) == {
        f"inputs/t2i/{five}": {0},
        f"inputs/t2i/{one}": {0},
        f"inputs/i2i_edit/{bucket}": {0},
    }
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_samples_are_logged_at_each_evaluation_for_step_comparison(shards, model, store,
                                                                   tmp_path):  # fmt: skip
    uri, run_id = store
    host = Stage(tmp_path / "stage", uri, run_id, model, step=0)
    t2i = loader("t2i", shards, model)
    weights = t2i.bucket_weights()
    (five,) = [b for b, n in weights.items() if n == 5]
    (one,) = [b for b, n in weights.items() if n == 1]
    batch = t2i.next_batch(five, size=7)  # 5 samples, then the first two again
    assert len(set(batch.keys)) == 5
    host._held_out = {"t2i": batch}

    results = host.evaluate("start")  # held-out loss and the samples of step 0
    assert set(results) == {"eval_loss/t2i"}
    assert json.loads((tmp_path / "stage" / "eval-start.json").read_text()) == results
    host.step = 7
    grid = host.log_samples()["t2i"]  # the trainer's call at stage end

    keys = list(dict.fromkeys(batch.keys))[:SAMPLE_PROMPTS]
    assert [c.label[1] for c in grid.cells] == keys
    for cell in grid.cells:
        reference, output = cell.panels
        assert (reference.role, output.role) == ("reference", "output")
        assert near(grid, reference.box, SQUARE[cell.label[1]])
        assert " ".join(cell.label[2:]) == f"prompt: a card of {cell.label[1]}"

    folder = tmp_path / "stage" / "samples"
    first, last = folder / f"t2i-{five}-step0.png", folder / f"t2i-{five}-step7.png"
    assert {p.name for p in folder.glob("*.png")} == {first.name, last.name}
    # the same weights and the same fixed noise at both steps: the same picture but the title
    a, b = np.asarray(Image.open(first)), np.asarray(Image.open(last))
    assert a.shape == b.shape
    top = grid.cells[0].label_box[1]
    assert (a[top:] == b[top:]).all() and (a[:top] != b[:top]).any()
    assert images(uri, run_id)[f"samples/t2i/{five}"] == {0, 7}

    host._held_out = {"t2i": t2i.next_batch(one, size=3)}  # one sample, three times
    (cell,) = host.log_samples()["t2i"].cells
    assert cell.label[1] == "tall0"


@pytest.mark.parametrize(("size", "world_size", "sampled"), [("7b", 2, False), ("7b", 1, True)])
def test_a_large_model_on_several_ranks_samples_only_at_the_end(shards, model, store, tmp_path,
                                                                size, world_size, sampled):  # fmt: skip
    """Rank 0 would sample alone while the other ranks wait: at the start only where it is
    cheap (one worker; the tiny size: the test above); the stage end samples at every size."""
    uri, run_id = store
    host = Stage(tmp_path / "stage", uri, run_id, model, size=size, world_size=world_size)
    t2i = loader("t2i", shards, model)
    (five,) = [b for b, n in t2i.bucket_weights().items() if n == 5]
    host._held_out = {"t2i": t2i.next_batch(five, size=4)}

    assert set(host.evaluate("start")) == {"eval_loss/t2i"}  # the held-out loss all the same
    folder = tmp_path / "stage" / "samples"
    start = folder / f"t2i-{five}-step0.png"
    assert start.exists() == sampled
    host.step = 5
    assert set(host.log_samples()) == {"t2i"}  # the trainer's call at stage end
    assert {p.name for p in folder.glob("*.png")} == {f"t2i-{five}-step5.png"} | (
        {start.name} if sampled else set()
    )
