"""The built-in recipes in training/recipes: every one validates cleanly and trains existing
module groups; the production (7b) templates carry the papers' published values (the table in
published_values.yaml, each value checked against the line of ../shared/papers it cites) and
refuse to build without local weights."""

import fnmatch
import functools
import math
import re
import warnings
from pathlib import Path

import pytest
import yaml

from catalog.filters import parse_filter
from catalog.names import is_catalog_uri
from catalog.schema import COLUMNS
from catalog.shards import ASPECT_CLASSES
from core.config import ConfigWarning, load_config
from core.weights import MissingWeights
from training.data.buckets import batch_size_for, bucket_for, tokens
from training.models.registry import build_model
from training.recipe import FAMILIES, Recipe, StageConfig
from training.tasks import EDIT_TASKS, IMAGE_TASKS, task_spec

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
ALL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
PRODUCTION = ["haplo_omni_7b", "omni_video_7b", "vino_7b"]
# ConfigWarnings a recipe is allowed to raise (substrings of the message); none so far.
EXPECTED_WARNINGS: dict[str, list[str]] = {}
# pretrained keys of the 7b size (training/models/production.py)
PRETRAINED_KEYS = {
    "omni_video": {"mllm", "vision_encoder", "dit", "vae"},
    "haplo_omni": {"pre_decoder", "base_decoder", "post_decoder", "vae"},
    "vino": {"vlm", "mmdit", "vae"},  # the VLM brings its own vision tower
}
# 7b geometry: Wan / HunyuanVideo VAE 8x spatial * patch 2, 4x temporal
SPATIAL_7B, TEMPORAL_7B = 16, 4


def load(name: str) -> Recipe:
    """Load a recipe; fail on any ConfigWarning not listed in EXPECTED_WARNINGS."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = load_config(Recipe, RECIPES / f"{name}.yaml")
    expected = EXPECTED_WARNINGS.get(name, [])
    unexpected = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ConfigWarning) and not any(e in str(w.message) for e in expected)
    ]
    assert not unexpected, f"{name}: unexpected ConfigWarning(s): {unexpected}"
    return recipe


@functools.cache
def tiny(family: str):
    """The family's tiny model: its module groups have the same names at every size."""
    return build_model(family, "tiny")


def test_one_recipe_per_family_and_size():
    """Every registered family has a recipe at every size it builds, named
    ``<family>_<size>`` and no other; the 7b ones are the PRODUCTION templates checked below."""
    from training.models.registry import FAMILIES, SIZES

    models = {name: load(name).model for name in ALL}
    found = sorted((m.family, m.size, name) for name, m in models.items())
    assert found == sorted((f, s, f"{f}_{s}") for f in FAMILIES for s in SIZES[f])
    assert sorted(name for _, size, name in found if size == "7b") == PRODUCTION


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates_and_trains_existing_groups(name):
    r = load(name)
    assert r.name == name
    model = tiny(r.model.family)
    supported = set(model.supported_tasks())
    for stage in r.stages:
        chosen = model.select_groups(stage.trainable)  # raises on a glob matching nothing
        assert set(model.set_trainable(stage.trainable)) <= set(chosen)  # not only frozen groups
        assert set(stage.tasks) <= supported, (stage.name, sorted(set(stage.tasks) - supported))
    for key, data in r.data.items():
        if data.filter is not None:
            parse_filter(data.filter, COLUMNS)  # column names exist, grammar is valid
        assert is_catalog_uri(data.uri), key


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_template_shape(name):
    r = load(name)
    assert r.model.size == "7b" and r.precision == "auto"
    assert set(r.model.pretrained) == PRETRAINED_KEYS[r.model.family]
    assert all(Path(p).is_absolute() for p in r.model.pretrained.values())
    for stage in r.stages:
        assert stage.checkpoint_every <= stage.steps
        # the token budget holds at least one sample of every task in its largest bucket
        for task_name, task in stage.tasks.items():
            frames = 1 if task_name in IMAGE_TASKS else task.num_frames
            media = 2 if task_name in EDIT_TASKS else 1
            largest = max(
                tokens(
                    bucket_for(w, h, frames, stage.frame_area, SPATIAL_7B, TEMPORAL_7B),
                    SPATIAL_7B,
                    TEMPORAL_7B,
                )
                for w, h in ASPECT_CLASSES
            )
            assert largest * media <= stage.token_budget, (stage.name, task_name)
            if stage.batch_size is not None:  # the batch a paper states holds for every task
                assert largest * media * stage.batch_size <= stage.token_budget, (
                    stage.name,
                    task_name,
                )


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_template_refuses_to_build_without_weights(name, offline):
    r = load(name)
    present = [p for p in r.model.pretrained.values() if Path(p).exists()]
    if present:
        pytest.skip(f"placeholder weight dirs exist on this machine: {present}")
    m = r.model
    with pytest.raises(MissingWeights) as err:
        build_model(m.family, m.size, m.pretrained, r.stages[0].timestep_shift)
    message = str(err.value)
    for group, path in m.pretrained.items():
        assert f"{group} directory {path} does not exist" in message
    assert "hf download" in message


def test_budget_rule_example():
    """The documented conversion: tokens per sample = (1 + (F-1)/4) * (H/16) * (W/16)."""
    shape = bucket_for(1, 1, 33, 320 * 320, SPATIAL_7B, TEMPORAL_7B)
    assert (shape.height, shape.width, shape.frames) == (320, 320, 33)
    assert tokens(shape, SPATIAL_7B, TEMPORAL_7B) == (1 + 32 // 4) * 20 * 20 == 3600


# ---- published values: tests/training/published_values.yaml ----------------------------------

PUBLISHED: dict = yaml.safe_load(Path(__file__).with_name("published_values.yaml").read_text())
# the papers live beside the project's checkouts: /work/main/../shared/papers
PAPERS = RECIPES.parents[1].parent / "shared" / "papers"
NO_PAPERS = (
    f"papers folder {PAPERS} not found (a checkout outside the project's workspace): the "
    "check of the cited lines is skipped; the template values are still checked against "
    "published_values.yaml"
)
CITE = re.compile(r"([A-Za-z0-9_.-]+\.txt):(\d+)(?:-(\d+))?")
# pseudo-fields of the table -> the recipe field that sets them
FIELD_LINE = {"global_batch": "batch_size", "local_batch": "batch_size"}


MODEL = "model"  # the table's key for the recipe's model section (no stage has that name)


def entries(name: str):
    """(stage, field, entry) of every published value of recipe ``name``."""
    for stage, fields in PUBLISHED[name].items():
        for field, entry in fields.items():
            yield stage, field, entry


def widest_batch(stage: StageConfig, task_name: str) -> int:
    """Samples per local batch of ``task_name`` at its widest bucket (the smallest batch): the
    stage's ``batch_size``, or fewer where the token budget packs fewer."""
    task = stage.tasks[task_name]
    frames = 1 if task_name in IMAGE_TASKS else task.num_frames
    shapes = [
        bucket_for(w, h, frames, stage.frame_area, SPATIAL_7B, TEMPORAL_7B)
        for w, h in ASPECT_CLASSES
    ]
    widest = max(shapes, key=lambda s: tokens(s, SPATIAL_7B, TEMPORAL_7B))
    media = task_spec(task_name).num_media
    return batch_size_for(
        widest, stage.token_budget, SPATIAL_7B, TEMPORAL_7B, media, stage.batch_size
    )


def local_batch(stage: StageConfig, entry: dict) -> int | dict[str, int]:
    """The local batch of the entry's ``task``, or without one the batch every task of the
    stage gets (task -> batch when they differ: the paper's one batch does not hold)."""
    if "task" in entry:
        return widest_batch(stage, entry["task"])
    batches = {name: widest_batch(stage, name) for name in stage.tasks}
    return batches.popitem()[1] if len(set(batches.values())) == 1 else batches


def template_value(recipe: Recipe, stage: StageConfig, field: str, entry: dict):
    """The template's value of a table field (see the header of published_values.yaml)."""
    if field == "trainable":
        spec = FAMILIES[recipe.model.family]
        return [
            g
            for g in spec.groups
            if g not in spec.frozen and any(fnmatch.fnmatchcase(g, p) for p in stage.trainable)
        ]
    if field in ("tasks", "distill"):
        return sorted(getattr(stage, field))
    if field in ("local_batch", "global_batch"):
        local = local_batch(stage, entry)
        if field == "local_batch" or isinstance(local, dict):
            return local
        return local * recipe.workers * stage.grad_accumulation
    value = stage
    for key in field.split("."):
        value = value[key] if isinstance(value, dict) else getattr(value, key)
    return value


def same(a, b) -> bool:
    """Equal values; numbers up to float rounding, sequences element-wise."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if any(isinstance(v, (bool, str)) or v is None for v in (a, b)):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9)


def normalise(value, field: str):
    """The table's value in the form ``template_value`` returns."""
    return sorted(value) if field in ("tasks", "distill") else value


@pytest.mark.parametrize("name", PRODUCTION)
def test_table_lists_every_stage_of_the_template(name):
    """The table names the template's stages, in order: the paper's stage layout."""
    assert sorted(PUBLISHED) == PRODUCTION
    assert [k for k in PUBLISHED[name] if k != MODEL] == [s.name for s in load(name).stages]


@pytest.mark.parametrize("name", PRODUCTION)
def test_template_has_the_published_values(name):
    """Every value of the table is the template's value (never skipped: needs no papers)."""
    recipe = load(name)
    stages = {s.name: s for s in recipe.stages}
    stages[MODEL] = recipe.model  # its fields are read like a stage's
    wrong = []
    for stage, field, entry in entries(name):
        want = normalise(entry["value"], field)
        got = template_value(recipe, stages[stage], field, entry)
        if field == "trainable":
            want = sorted(want)
            got = sorted(got)
        if not same(got, want):
            wrong.append(f"{stage}.{field}: template {got!r}, paper {want!r} ({entry['source']})")
        if "same_as" in entry:
            other = PUBLISHED[name][entry["same_as"]][field]["value"]
            if not same(normalise(other, field), want):
                wrong.append(f"{stage}.{field}: same_as {entry['same_as']} has {other!r}")
    assert not wrong, "\n".join(wrong)


def numbers(text: str) -> list[float]:
    """The numbers a quote states: 1 \\times 10^{-4}, 1e-4, 20k, 320^2, 480 x 720, 37.9%, 0.95."""
    num = r"\d+(?:\.\d+)?"
    out = [
        float(a) * 10 ** int(b)
        for a, b in re.findall(rf"({num})\s*\\times\s*10\^\{{(-?\d+)\}}", text)
    ]
    out += [float(f"{a}e{b}") for a, b in re.findall(rf"({num})e(-?\d+)", text)]
    out += [float(a) * 1000 for a in re.findall(rf"({num})[kK]\b", text)]
    out += [float(a) ** 2 for a in re.findall(rf"({num})\^2", text)]
    out += [float(a) * float(b) for a, b in re.findall(rf"({num})\s*[×x]\s*({num})", text)]
    return out + [float(a) for a in re.findall(num, text)]


def collapse(text: str) -> str:
    return " ".join(text.split())


def cited_lines(source: str) -> str:
    """The text of ``FILE:LINE`` or ``FILE:FIRST-LAST`` in the papers folder, whitespace collapsed;
    raises AssertionError naming the citation when the file or the lines do not exist."""
    m = CITE.fullmatch(source)
    assert m, f"{source!r} is not FILE.txt:LINE or FILE.txt:FIRST-LAST"
    path = PAPERS / m.group(1)
    assert path.is_file(), f"{source}: no file {path}"
    lines = path.read_text(encoding="utf-8").splitlines()
    first, last = int(m.group(2)), int(m.group(3) or m.group(2))
    assert 1 <= first <= last <= len(lines), f"{source}: {path.name} has {len(lines)} lines"
    return collapse(" ".join(lines[first - 1 : last]))


@pytest.mark.parametrize("name", PRODUCTION)
def test_cited_lines_hold_the_published_values(name):
    """Each table entry's source line holds its quote, and the quote states the value."""
    if not PAPERS.is_dir():
        pytest.skip(NO_PAPERS)
    wrong = []
    for stage, field, entry in entries(name):
        where = f"{stage}.{field} ({entry['source']})"
        text = cited_lines(entry["source"])
        quotes = entry["quote"] if isinstance(entry["quote"], list) else [entry["quote"]]
        wrong += [f"{where}: {q!r} not on the line" for q in quotes if collapse(q) not in text]
        value, said = entry["value"], " ".join(quotes)
        if "same_as" in entry or value is None or isinstance(value, bool):
            continue  # the quote says it in words ("the same settings", "no", "hybrid")
        if isinstance(value, str):
            if value.lower() not in said.lower():
                wrong.append(f"{where}: {value!r} not in the quote {said!r}")
            continue
        if field in ("trainable", "tasks", "distill"):
            continue  # group / task names are ours; the quote names the paper's modules
        stated = numbers(said)
        for v in value if isinstance(value, list) else [value]:
            if not any(math.isclose(v, s, rel_tol=1e-9) for s in stated):
                wrong.append(f"{where}: the quote {said!r} does not state {v!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", PRODUCTION)
def test_template_citations_exist(name):
    """Every FILE.txt:LINE a template's comments cite is a line of a paper in the folder."""
    if not PAPERS.is_dir():
        pytest.skip(NO_PAPERS)
    text = (RECIPES / f"{name}.yaml").read_text()
    cites = [m.group(0) for m in CITE.finditer(text)]
    assert cites, f"{name}.yaml cites no paper line"
    for cite in cites:
        cited_lines(cite)


def stage_block(lines: list[str], stage: str) -> list[str]:
    """The YAML lines of one stage: from its ``- name:`` to the next stage's (``model``: the
    model section)."""
    if stage == MODEL:
        start = next(i for i, line in enumerate(lines) if line.startswith("model:"))
        nxt = (j for j in range(start + 1, len(lines)) if re.match(r"[a-z]", lines[j]))
        return lines[start : next(nxt, len(lines))]
    head = re.compile(rf"\s*- name: {re.escape(stage)}\s*(#.*)?$")
    start = next(i for i, line in enumerate(lines) if head.match(line))
    nxt = (j for j in range(start + 1, len(lines)) if re.match(r"\s*- name: ", lines[j]))
    return lines[start : next(nxt, len(lines))]


def field_text(block: list[str], field: str) -> str | None:
    """A field's YAML line with the comment lines just above it and its nested lines; None
    when the stage does not set it."""
    i = 0
    for key in FIELD_LINE.get(field, field).split("."):
        key_re = re.compile(rf"(^|[\s{{,]){re.escape(key)}:")
        i = next((j for j in range(i, len(block)) if key_re.search(block[j].split("#")[0])), None)
        if i is None:
            return None
    top = i
    while top > 0 and block[top - 1].lstrip().startswith("#"):
        top -= 1
    indent = len(block[i]) - len(block[i].lstrip())
    end = i + 1
    while end < len(block) and len(block[end]) - len(block[end].lstrip()) > indent:
        end += 1
    return "\n".join(block[top:end])


@pytest.mark.parametrize("name", PRODUCTION)
def test_template_comments_cite_the_published_source(name):
    """Each published value's field in the template carries a comment citing the table's
    source (a field left at its default, like stage 1's EMA, is cited in the stage)."""
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    missing = []
    for stage, field, entry in entries(name):
        block = stage_block(lines, stage)
        text = field_text(block, field) or "\n".join(block)
        if entry["source"] not in text:
            missing.append(f"{stage}.{field}: no comment citing {entry['source']}")
    assert not missing, "\n".join(missing)
