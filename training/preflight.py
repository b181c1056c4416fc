"""The data check of a recipe, on the driver, before any worker starts (``train run``) or
instead of training (``train plan``).

Each stage's tasks are resolved as the workers will resolve them (``sources.resolve_data``
once per data entry, then ``loaders.build_task_loaders`` for rank 0 of the real world size;
no sample is decoded), so the buckets and counts seen here are the ones training draws from.
Catalog data opens no shard (counts and texts come from the index); shard paths are scanned
(tar headers and the small JSON / txt members), as every rank scans them today. Texts are
counted in one pass per data entry, for every kind its tasks read.

Problems, each naming its stage, task, bucket or data entry:

- error: a data entry cannot be resolved (unknown dataset or version, bad filter, no shards);
- error: a task has no sample of the kind it reads;
- error: no bucket of a task has one sample per worker, so no rank can draw any (training
  would stop at its first step with "task 't2i' has no training data in any bucket");
- warning: a bucket with fewer samples than workers (its samples are left out of training);
- warning: a bucket with fewer samples than a full batch on every worker (world size x the
  bucket's per-rank batch): its batches repeat samples;
- warning: samples of a task without their text (generation and understanding: a caption,
  edits: an instruction); empty text trains, but teaches nothing about text;
- error: the held-out split (``training/data/holdout.py``) leaves a task no training sample.

Counts are of training samples: each data entry's held-out samples are left out of them and
counted apart (``BucketCount.held_out``, ``DataCheck.splits``: the rule and counts per entry,
which the runner records on the stage's catalog run and MLflow run). A task with no held-out
sample (no split, or none of its kind held out) is a note: its evaluation reads training
samples.

Bucket shapes depend on the model's geometry. A tiny size is built to read it (~20 ms);
a production size takes it from its checkpoints, so ``train run`` checks its buckets only
through ``train plan``, which builds the model anyway (``DataCheck.notes`` says so).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from catalog.db import CatalogError
from catalog.names import DatasetRef, is_catalog_uri
from training.data.conversation import sample_conversation
from training.data.holdout import FLOOR_DIVISOR
from training.data.loaders import build_task_loaders
from training.data.samples import meta_and_kind, open_shard
from training.data.sources import DataSource, resolve_data
from training.recipe import ModelConfig, Recipe
from training.tasks import task_spec

__all__ = [
    "BucketCount",
    "DataCheck",
    "DataCheckError",
    "Problem",
    "check_data",
    "model_geometry",
    "run_check",
]

Severity = Literal["error", "warning"]
Code = Literal[
    "no_catalog",  # catalog:// data and no catalog
    "unreadable",  # the data entry does not resolve
    "no_samples",  # no sample of the task's kind
    "no_bucket",  # no bucket with one sample per worker
    "bucket_left_out",  # a bucket with fewer samples than workers
    "partial_batch",  # a bucket with fewer samples than a full batch on every worker
    "missing_text",  # samples without caption / instruction
    "all_held_out",  # the held-out split leaves no training sample
]
TEXT_FIELDS = ("recaption", "instruction", "caption")  # what decode.sample_text falls back to


@dataclass(frozen=True)
class Problem:
    """One problem of the data against the recipe, and what it concerns."""

    severity: Severity
    code: Code
    message: str
    stage: str | None = None  # "1 (align)"
    task: str | None = None
    bucket: str | None = None  # training bucket, FRAMESxHEIGHTxWIDTH
    data: str | None = None  # key of the recipe's data section

    def where(self) -> str:
        parts = [
            f"stage {self.stage}" if self.stage else None,
            f"task {self.task}" if self.task else None,
            f"bucket {self.bucket}" if self.bucket else None,
            f"data {self.data!r}" if self.data else None,
        ]
        return ", ".join(p for p in parts if p)

    def __str__(self) -> str:
        where = self.where()
        return f"{self.severity}: {where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class BucketCount:
    """A task's training bucket as training will see it."""

    stage: str
    task: str
    bucket: str
    samples: int  # usable samples, all ranks together
    batch: int  # samples per rank and step
    drawable: bool  # at least one sample per worker
    held_out: int = 0  # samples of the bucket held out for evaluation (not in ``samples``)


@dataclass
class DataCheck:
    """The outcome of ``check_data``: every problem, the buckets, and what was not checked."""

    recipe: str
    world_size: int
    problems: list[Problem] = field(default_factory=list)
    buckets: list[BucketCount] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # data key -> the held-out split's record (``Split.record()``), None: the entry has none
    splits: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # (stage label, task) -> (training samples, held-out samples)
    task_counts: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def bucket_summary(self) -> str:
        """The bucket warnings counted in one line ("" when there are none)."""
        left = [p for p in self.warnings if p.code == "bucket_left_out"]
        partial = [p for p in self.warnings if p.code == "partial_batch"]
        parts = []
        if left:
            which = {(p.stage, p.task, p.bucket) for p in left}
            samples = sum(b.samples for b in self.buckets if (b.stage, b.task, b.bucket) in which)
            parts.append(
                f"{len(left)} bucket(s) left out (fewer samples than workers; {samples} sample(s))"
            )
        if partial:
            parts.append(f"{len(partial)} bucket(s) smaller than a full batch (samples repeat)")
        return "; ".join(parts)

    def summary(self) -> str:
        """The warnings in one line (``train run`` says this; ``train plan`` shows each)."""
        parts = [self.bucket_summary()] if self.bucket_summary() else []
        texts = [p for p in self.warnings if p.code == "missing_text"]
        if texts:
            parts.append(
                f"{len(texts)} task(s) with samples lacking text: "
                + ", ".join(f"stage {p.stage} {p.task}" for p in texts)
            )
        return "; ".join(parts) + "; `omniforge train plan` shows each"

    def raise_for_errors(self) -> None:
        if self.errors:
            raise DataCheckError(self)


class DataCheckError(ValueError):
    """The data cannot feed the recipe: every error and text warning, one line each, and the
    bucket warnings counted (the CLI prints it as one error, exit status 2)."""

    def __init__(self, check: DataCheck):
        self.check = check
        n = len(check.errors)
        lines = [str(p) for p in check.errors + check.warnings if p.bucket is None]
        if check.bucket_summary():  # each bucket is in `train plan`'s tables
            lines.append(f"warning: {check.bucket_summary()}")
        super().__init__(
            f"the data of recipe {check.recipe!r} cannot feed it on {check.world_size} "
            f"worker(s): {n} error(s), {len(check.warnings)} warning(s); fix the data or the "
            "recipe (`omniforge train plan` runs this check):\n  - " + "\n  - ".join(lines)
        )


def model_geometry(model: ModelConfig) -> Any | None:
    """The family's ``Geometry`` when it is known without loading checkpoints (tiny sizes:
    the model is built, in milliseconds); None for production sizes."""
    if model.size != "tiny":
        return None
    from training.models.registry import build_model

    return build_model(model.family, model.size).geometry


def check_data(
    recipe: Recipe,
    *,
    world_size: int,
    geometry: Any | None,
    catalog: Any = None,
    stages: Iterable[int] | None = None,
) -> DataCheck:
    """Check the data of ``stages`` (0-based; default all) of ``recipe`` for ``world_size``
    workers; ``geometry``: the model's (None: bucket sizes are not checked, see the module
    docstring); ``catalog``: where ``catalog://`` data is resolved (None: nowhere, a problem
    for such data). Reports every problem; raises nothing for bad data."""
    world_size = max(1, int(world_size))
    check = DataCheck(recipe.name, world_size)
    chosen = list(range(len(recipe.stages)) if stages is None else stages)
    sources = _resolve(recipe, chosen, catalog, check)
    check.splits = {k: None if s.split is None else s.split.record() for k, s in sources.items()}
    for key in sorted(k for k, rec in check.splits.items() if rec is None):
        check.notes.append(
            f"data {key!r} has no held-out split (holdout: null or fraction 0): evaluation "
            "reads training samples"
        )
    if geometry is None:
        check.notes.append(
            f"bucket sizes not checked: size {recipe.model.size!r} takes its geometry from its "
            "checkpoints; `omniforge train plan` builds the model and checks them"
        )
    kinds = _kinds_read(recipe, chosen)
    texts: dict[str, dict[str, tuple[int, int]]] = {}  # data -> kind -> (without text, all)
    for index in chosen:
        stage = recipe.stages[index]
        label = f"{index + 1} ({stage.name})"
        for task, tc in stage.tasks.items():
            src = sources.get(tc.data)
            if src is None:  # its resolution problem is reported once, for the data entry
                continue
            kind = task_spec(task).kind
            if sum(src.counts_for(task, "all").values()) == 0:
                what = src.uri
                if src.keys is not None:
                    what += f" with filter {recipe.data[tc.data].filter!r}"
                check.problems.append(
                    Problem(
                        "error",
                        "no_samples",
                        f"{what} has no accepted {kind} sample, the kind {task} reads",
                        label,
                        task,
                        data=tc.data,
                    )
                )
                continue
            train = sum(src.counts_for(task, "train").values())
            held = sum(src.counts_for(task, "eval").values()) if src.split else 0
            check.task_counts[(label, task)] = (train, held)
            if src.split is not None and _holdout_problems(check, label, task, tc.data, src):
                continue
            if tc.data not in texts:  # one pass over the entry, whichever task asks first
                texts[tc.data] = _text_counts(src, kinds[tc.data], catalog)
            no_caption, no_text, total = texts[tc.data].get(kind, (0, 0, 0))
            # understanding tasks also learn conversations (training.data.conversation)
            missing = no_caption if task_spec(task).generation else no_text
            _text_problems(check, label, task, tc.data, missing, total)
            if geometry is not None:
                _bucket_problems(check, recipe, index, label, task, src, geometry)
    return check


def _holdout_problems(check: DataCheck, label: str, task: str, data: str, src: Any) -> bool:
    """An error when the split leaves the task no training sample (True: nothing more to
    check), a note when it holds none of the task's samples out."""
    kind = task_spec(task).kind
    train, held = check.task_counts[(label, task)]
    rule = src.split.config
    if train == 0:
        check.problems.append(
            Problem(
                "error",
                "all_held_out",
                f"all {held} {kind} sample(s) are held out for evaluation (holdout fraction "
                f"{rule.fraction:g}, min_samples {rule.min_samples}): no training data left; "
                f"add data or lower data.{data}.holdout",
                label,
                task,
                data=data,
            )
        )
        return True
    if held == 0:
        check.notes.append(
            f"stage {label} task {task}: none of the {train} {kind} sample(s) of data {data!r} "
            f"is held out (fraction {rule.fraction:g}; the min_samples floor needs "
            f"{FLOOR_DIVISOR} samples or more): its evaluation reads training samples"
        )
    return False


def _kinds_read(recipe: Recipe, chosen: list[int]) -> dict[str, frozenset[str]]:
    """Data entry -> the sample kinds the chosen stages' tasks read from it."""
    kinds: dict[str, set[str]] = {}
    for index in chosen:
        for task, tc in recipe.stages[index].tasks.items():
            kinds.setdefault(tc.data, set()).add(task_spec(task).kind)
    return {data: frozenset(k) for data, k in kinds.items()}


def _resolve(
    recipe: Recipe, chosen: list[int], catalog: Any, check: DataCheck
) -> dict[str, DataSource]:
    """Each data entry the chosen stages read, resolved once; a failure is a problem."""
    keys = sorted({tc.data for i in chosen for tc in recipe.stages[i].tasks.values()})
    sources = {}
    for key in keys:
        data = recipe.data[key]
        users = ", ".join(
            f"stage {i + 1} ({recipe.stages[i].name})"
            for i in chosen
            if any(tc.data == key for tc in recipe.stages[i].tasks.values())
        )
        if catalog is None and is_catalog_uri(data.uri):
            message = (
                f"{data.uri} needs a catalog and none is configured (--catalog); read by {users}"
            )
            check.problems.append(Problem("error", "no_catalog", message, data=key))
            continue
        try:
            sources[key] = resolve_data(data, catalog)
        except (ValueError, OSError, CatalogError) as e:  # catalog, filter, shard listing
            message = f"{data.uri} cannot be read ({e}); read by {users}"
            check.problems.append(Problem("error", "unreadable", message, data=key))
    return sources


def _bucket_problems(
    check: DataCheck,
    recipe: Recipe,
    index: int,
    label: str,
    task: str,
    src: DataSource,
    geometry: Any,
) -> None:
    """The task's buckets as rank 0 of ``world_size`` builds them, against one sample per
    worker (drawable at all) and a full batch per worker (no sample repeated in a step)."""
    stage = recipe.stages[index]
    only = stage.model_copy(update={"tasks": {task: stage.tasks[task]}})

    def build(part: str, world_size: int) -> Any:
        (loader,) = build_task_loaders(
            only,
            recipe.data,
            None,
            0,
            world_size,
            recipe.seed,
            geometry,
            _no_tokenizer,
            sources={stage.tasks[task].data: src},
            part=part,
        ).values()
        return loader

    held: dict[Any, int] = {}
    if src.split is not None:
        with build("eval", 1) as evaluation:  # one rank: every held-out sample counts
            held = evaluation.bucket_weights()
    with build("train", check.world_size) as loader:  # nothing is open: closing is for form
        _judge_buckets(check, label, task, loader, held)


def _judge_buckets(
    check: DataCheck, label: str, task: str, loader: Any, held: dict[Any, int]
) -> None:
    ws = check.world_size
    drawable = loader.bucket_weights()
    for shape, n in sorted(drawable.items()):
        b = loader.batch_size(shape)
        check.buckets.append(BucketCount(label, task, str(shape), n, b, True, held.get(shape, 0)))
        if n < ws * b:
            check.problems.append(
                Problem(
                    "warning",
                    "partial_batch",
                    f"{n} sample(s), fewer than a full batch on every worker ({ws} x {b} = "
                    f"{ws * b}): its batches repeat samples",
                    label,
                    task,
                    str(shape),
                )
            )
    for shape, n in sorted(loader.excluded.items()):
        b = loader.batch_size(shape)
        check.buckets.append(BucketCount(label, task, str(shape), n, b, False, held.get(shape, 0)))
    for shape in sorted(set(held) - set(drawable) - set(loader.excluded)):  # all held out
        b = loader.batch_size(shape)
        check.buckets.append(BucketCount(label, task, str(shape), 0, b, False, held[shape]))
    if not drawable:
        listed = ", ".join(f"{s} has {n}" for s, n in sorted(loader.excluded.items()))
        check.problems.append(
            Problem(
                "error",
                "no_bucket",
                f"no bucket can be drawn on {ws} workers: a bucket needs at least one sample per "
                f"worker ({ws}); {listed or 'no sample maps to a bucket'}. Add data, or train "
                "on fewer workers (--workers)",
                label,
                task,
            )
        )
        return
    for shape, n in sorted(loader.excluded.items()):
        check.problems.append(
            Problem(
                "warning",
                "bucket_left_out",
                f"{n} sample(s), fewer than the {ws} workers (one each): no rank draws it, "
                "its samples are left out",
                label,
                task,
                str(shape),
            )
        )


def _no_tokenizer(texts: list[str]) -> Any:
    raise AssertionError("the data check reads no batch")  # loaders tokenise in next_batch only


def _text_problems(
    check: DataCheck, label: str, task: str, data: str, missing: int, total: int
) -> None:
    """A warning, not an error: empty text trains (the tokenizers give begin / end tokens), as
    the demo's caption-less folder media do, but it teaches nothing about text."""
    if not missing:
        return
    spec = task_spec(task)
    what = "instruction" if spec.edit else "caption"
    role = "the condition it generates from" if spec.generation else "the text it learns to write"
    fields = "recaption / instruction / caption in the index, or a txt member"
    if not spec.generation:
        fields += "; or a conversation"
    if missing == total:
        article = "an" if spec.edit else "a"
        message = (
            f"none of its {total} {spec.kind} samples has {article} {what} ({role}; {fields}): "
            f"it trains on empty text; recaption the data or give {what}s in a manifest"
        )
    else:
        message = f"{missing} of {total} {spec.kind} samples have no {what} ({role}; {fields})"
    check.problems.append(Problem("warning", "missing_text", message, label, task, data=data))


def _text_counts(
    src: DataSource, kinds: Iterable[str], catalog: Any
) -> dict[str, tuple[int, int, int]]:
    """Per kind of ``kinds``: (samples without a caption, samples without a caption or a
    conversation, all samples) in the source, as ``decode.sample_text`` finds a caption (a
    ``txt`` member, else the index row's fields) and ``sample_conversation`` a conversation.
    One pass over the source (the shards of path data are opened once, whichever tasks read
    them)."""
    wanted = set(kinds)
    counts: Counter = Counter()  # (kind, has caption, has conversation) -> samples
    if is_catalog_uri(src.uri):
        for kind, has, chat in _index_texts(src, wanted, catalog):
            counts[(kind, has, chat)] += 1
    else:
        for uri, _ in src.shards:
            with open_shard(uri) as reader:
                for key, members in reader:
                    if src.keys is not None and key not in src.keys:
                        continue
                    meta, kind = meta_and_kind(reader, members)
                    if kind not in wanted:
                        continue
                    text = reader.read(members["txt"]) if "txt" in members else b""
                    has = bool(text.strip()) or _has_text(meta)
                    counts[(kind, has, sample_conversation(meta) is not None)] += 1
    out = {}
    for k in wanted:
        n = {(has, chat): counts[(k, has, chat)] for has in (False, True) for chat in (False, True)}
        out[k] = (n[False, False] + n[False, True], n[False, False], sum(n.values()))
    return out


def _index_texts(
    src: DataSource, kinds: set[str], catalog: Any
) -> Iterable[tuple[str, bool, bool]]:
    """(kind, has text, has a conversation) of each accepted sample of ``kinds`` in catalog
    data, from its index (the curation sink writes the ``txt`` member from these same fields;
    an index written before conversations existed has none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from catalog.index import open_index

    ref = DatasetRef.parse(src.uri)
    version = catalog.get_version(ref.name, ref.version)
    index = open_index(version.index_uri)
    chats = ["num_turns"] if "num_turns" in index.schema.names else []
    table = index.to_table(
        columns=["key", "kind", *TEXT_FIELDS, *chats],
        filter=(pc.field("status") == "accepted")
        & pc.field("kind").isin(pa.array(sorted(kinds), pa.string())),
    )
    for row in table.to_pylist():
        if src.keys is None or row["key"] in src.keys:
            yield row["kind"], _has_text(row), bool(row.get("num_turns"))


def _has_text(row: dict[str, Any]) -> bool:
    return any(str(row.get(f) or "").strip() for f in TEXT_FIELDS)


def run_check(
    recipe: Recipe,
    *,
    world_size: int,
    catalog: Any,
    stages: Iterable[int] | None,
    say: Callable[[str], None],
) -> DataCheck:
    """``train run``'s check before any worker starts: raises ``DataCheckError`` listing every
    problem when there is an error; otherwise says each warning and note and returns."""
    check = check_data(
        recipe,
        world_size=world_size,
        geometry=model_geometry(recipe.model),
        catalog=catalog,
        stages=stages,
    )
    check.raise_for_errors()
    if check.warnings:
        say(f"data check on {check.world_size} worker(s): {check.summary()}")
    for note in check.notes:
        say(f"data check: {note}")
    return check
