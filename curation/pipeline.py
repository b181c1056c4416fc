"""The curation pipeline: a flat list of stages on the streaming engine, pack, catalog commit.

``run_curation`` lists the inputs, takes the output folder (a lock: one run at a time), skips
the inputs a previous run committed, checks every model's weights before any work, prints the
plan, streams blocks of inputs through the stages (each block written and committed as soon as
it is done, ``curation.engine``), packs the blocks' segments into the final shards and index
(``curation.pack``), commits the dataset version (last; the catalog verifies every shard),
then writes the report and logs to MLflow. ``reselect`` re-applies thresholds to an existing
index (no model runs) and writes a new version whose parent is the old one, through the same
engine and sink.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.markup import escape

from catalog.index import read_index
from catalog.lifecycle import run_lifecycle
from catalog.records import Node, VersionInfo
from catalog.shards import ShardInfo
from catalog.store import Catalog
from core.config import config_hash, dump_yaml, flatten, load_yaml, validate
from core.storage import Location, copy_tree, local_cache, location, put_file
from curation.adapter import Step, plan_steps
from curation.config import CurationConfig
from curation.engine import CurationAborted, TableRows, run_blocks, uncommitted
from curation.journal import Journal
from curation.output import LOCK, claim_output, output_location, output_lock, staging_folder
from curation.pack import pack_one, plan_packs, write_final_index, write_shard_list
from curation.sink import (
    TARGET_SUFFIX,
    THUMBS,
    WORK,
    BlockSink,
    read_thumbnails,
    write_atomic,
    writing,
)
from curation.sources import list_inputs
from curation.stages.base import Resources, Row, Stage, check_required
from curation.weights import WORKER_BASE_MB

PACK_THREADS = 4  # packing copies files: threads, on the driver


@dataclass
class CurationResult:
    version: VersionInfo
    summary: dict[str, Any]
    report: Path
    mlflow_run_id: str | None


def build_stages(cfg: CurationConfig) -> tuple[list[Stage], dict[str, str]]:
    """The ordered stages of this config (each built from its own section), and the stages
    left off with the reason."""
    from curation.stages.encode import EncodeStage
    from curation.stages.frames import FrameSampleStage
    from curation.stages.motion import MotionStage
    from curation.stages.ocr import OcrStage
    from curation.stages.pairs import EditPairStage
    from curation.stages.probe import ProbeStage
    from curation.stages.select import SelectStage
    from curation.stages.split import SceneSplitStage

    skipped: dict[str, str] = {}
    stages: list[Stage] = [
        ProbeStage(cfg.probe, cfg.kind),  # container, codec, size, fps; kind from content
        # scenes -> clips (videos), spans in the index; samples their frames in the same pass
        SceneSplitStage(cfg.split, cfg.frames),
        FrameSampleStage(cfg.frames, cfg.probe),  # N frames per clip, for every scorer below
        EditPairStage(),  # edit pairs: aspect difference, source -> target change
    ]
    if cfg.dedup.hash:
        from curation.stages.phash import PerceptualHashStage

        stages.append(PerceptualHashStage())  # pHash per sampled frame: duplicate signal
    else:
        skipped["phash"] = "dedup.hash is false"
    if cfg.motion.enabled:
        stages.append(MotionStage(cfg.motion))  # optical flow on downscaled frame pairs
    else:
        skipped["motion"] = "motion.enabled is false"
    stages += _clip_stages(cfg, skipped)  # aesthetic, watermark: CLIP embeddings + heads
    if cfg.ocr.enabled:
        stages.append(OcrStage(cfg.ocr))  # PP-OCR text detection -> text area
    else:
        skipped["ocr"] = "ocr.enabled is false"
    # thresholds -> status + reasons
    stages.append(SelectStage(cfg.select, cfg.edit, cfg.split.min_clip_s))
    if cfg.dedup.inline:
        if not cfg.dedup.hash:
            raise ValueError("dedup.inline needs dedup.hash: the inline check compares pHashes")
        from curation.stages.dedup_inline import InlineDedupStage

        stages.append(InlineDedupStage(cfg.dedup.inline_max_bits))  # repeats within the run
    else:
        skipped["dedup"] = "dedup.inline is false (curate dedup decides over a version)"
    if cfg.recaption.backend != "none":
        from curation.stages.recaption import RecaptionStage

        stages.append(RecaptionStage(cfg.recaption))  # captions for accepted samples
    else:
        skipped["recaption"] = "recaption.backend is 'none'"
    stages.append(EncodeStage(cfg.shards))  # tar members of accepted samples (clips re-encoded)
    return stages, skipped


def _clip_stages(cfg: CurationConfig, skipped: dict[str, str]) -> list[Stage]:
    """The CLIP-embedding scorers that run: one CLIP model (the aesthetic section's) for both;
    under the default profile a stage without its weights is listed as skipped."""
    wanted = {n: getattr(cfg, n).enabled for n in ("aesthetic", "watermark")}
    for name, enabled in wanted.items():
        if enabled is False:
            skipped[name] = f"{name}.enabled is false"
    if not any(e is not False for e in wanted.values()):
        return []
    from curation.stages.aesthetic import AestheticStage, clip_spec
    from curation.stages.watermark import WatermarkStage

    clip = clip_spec(cfg.aesthetic, cfg.models_dir)
    candidates = {
        "aesthetic": lambda: AestheticStage(cfg.aesthetic, clip, cfg.models_dir),
        "watermark": lambda: WatermarkStage(
            cfg.watermark, clip, cfg.models_dir, cfg.aesthetic.batch_size
        ),
    }
    out: list[Stage] = []
    both = all(e is not False for e in wanted.values())
    for name, make in candidates.items():
        enabled = wanted[name]
        if enabled is False:
            continue
        stage = make()
        if enabled or cfg.profile == "full":
            out.append(stage)  # required: missing weights stop the run at start-up
            continue
        missing = [f for f in stage.required_files() if not Path(f.path).is_file()]
        if missing:
            skipped[name] = f"weights not found: {missing[0].path} ({missing[0].how_to_get})"
        else:
            out.append(stage)
    for stage in out:
        stage.store_embedding = cfg.dedup.embedding  # type: ignore[attr-defined]
    if len(out) == 2 and both:
        # the watermark stage reads the aesthetic stage's embeddings: it never runs CLIP, so
        # it asks for no GPU and holds no CLIP model
        out[1].resources = Resources(out[1].resources.cpus, memory_mb=WORKER_BASE_MB)  # type: ignore[misc]
    return out


def run_identity(cfg: CurationConfig, inputs: list[dict]) -> str:
    """Config hash + input listing: a rerun with the same identity resumes."""
    h = hashlib.sha256(config_hash(cfg).encode())
    for row in inputs:
        h.update(row["key"].encode())
    return h.hexdigest()


@dataclass
class _Job:
    """What one curation run works with, from its start to its report."""

    out: Location
    cfg: CurationConfig
    catalog: Catalog
    stages: list[Stage]
    skipped: dict[str, str]
    address: str | None = None
    tracking_uri: str | None = None
    console: Any = None
    verbose: bool = False
    start: float = field(default_factory=time.monotonic)


def run_curation(
    source: str,
    output: str | Path,
    cfg: CurationConfig,
    *,
    catalog: Catalog,
    address: str | None = None,
    tracking_uri: str | None = None,
    console: Any = None,
    verbose: bool = False,
) -> CurationResult:
    start = time.monotonic()
    out = output_location(output)
    fresh = not out.fs.exists(out.path)
    with output_lock(out):
        try:
            stages, skipped = build_stages(cfg)
            check_required(stages)  # before any work: name every missing weights file
            staging = staging_folder(out)
            inputs = list_inputs(source, cfg.kind, staging=staging, allow=cfg.allow_inputs)
            if not inputs:  # checked before a version is begun: no pending version is left
                raise ValueError(
                    f"--input {source}: no inputs found (no media files, manifests or tars); "
                    "point --input at a folder of images/videos, a JSONL/Parquet manifest or "
                    "tar shards"
                )
        except Exception:  # a mistake found before any work leaves no output folder behind
            _forget_output(out, fresh)
            raise
        job = _Job(
            out, cfg, catalog, stages, skipped, address, tracking_uri, console, verbose, start
        )
        identity = run_identity(cfg, inputs)
        claim_output(out, identity, source, cfg)
        finished = catalog.find_committed(cfg.name, out.uri, identity)
        if finished is not None:  # the same run finished earlier: nothing to do
            if console is not None:
                console.print(
                    f"{out} already holds {finished.ref} from this config and input", markup=False
                )
            return _finish(replace(job, tracking_uri=None), finished, len(inputs))
        version = catalog.begin_version(cfg.name, root_uri=out.uri, config_hash=identity)
        params = {"input": source, "output": out.uri}
        return _run(job, version, inputs, f"curate {source} -> {out}", identity, params)


def _forget_output(out: Location, fresh: bool) -> None:
    """Remove an output folder this run created and did not use (only its lock and an empty
    staging folder are in it), so a mistaken command leaves nothing behind (an object-store
    output has nothing written yet)."""
    if not fresh or out.remote:
        return
    for leftover in (out.local() / "_staging", out.local()):
        if not leftover.is_dir():
            continue
        (leftover / LOCK).unlink(missing_ok=True)
        try:
            leftover.rmdir()
        except OSError:  # not empty: something else is there; leave it
            return


def _run(
    job: _Job,
    version: VersionInfo,
    inputs: Sequence[Row],
    name: str,
    identity: str,
    params: dict[str, Any],
    parent: VersionInfo | None = None,
    against: Sequence[VersionInfo] = (),
) -> CurationResult:
    """The version's run, from start (or resume) to its report: the uncommitted inputs, pack,
    commit, report and MLflow. A failure marks the run failed (committed blocks stay).
    Lineage: ``parent`` is the run's input, each ``against`` version an edge ``against``."""
    with run_lifecycle(
        job.catalog,
        "curation",
        name,
        resume=version.run_id,
        config_hash=identity,
        params=params,
    ) as run:  # the MLflow run is written whole by _finish; the catalog run links to it
        if version.run_id is None:
            job.catalog.attach_run(version.id, run.id)
        version = replace(version, run_id=run.id)
        if parent is not None:
            job.catalog.add_edge(Node("version", parent.id), Node("run", run.id), "input")
        for other in against:
            job.catalog.add_edge(Node("version", other.id), Node("run", run.id), "against")
        version, stats = _write_and_commit(job, version, inputs)
        result = _finish(job, version, len(inputs), stats)
        run.mlflow_run_id = result.mlflow_run_id
        return result


def _write_and_commit(
    job: _Job, version: VersionInfo, inputs: Sequence[Row]
) -> tuple[VersionInfo, dict[str, Any]]:
    """Run the uncommitted inputs, pack, then commit the version (last)."""
    out, cfg = job.out, job.cfg
    journal = Journal(out.uri)
    records = journal.records()
    journal.collect_garbage(records)
    pending = uncommitted(inputs, journal.committed_inputs(records))
    run: dict[str, Any] = {
        "inputs_this_run": len(pending),
        "inputs_skipped": len(inputs) - len(pending),
    }
    _print_plan(job.console, job.stages, job.skipped, len(inputs), len(inputs) - len(pending))
    if pending:
        sink = BlockSink(out.uri, str(version.run_id), cfg.shards.max_samples, cfg.shards.max_bytes)
        with _hash_registry(job, journal, records):
            stats = run_blocks(
                pending,
                job.stages,
                sink,
                journal,
                block_size=cfg.block_size,
                num_inputs=len(inputs),
                address=job.address,
                console=job.console,
                verbose=job.verbose,
            )
        run.update(blocks=stats.blocks, retries=stats.retries, startup_s=stats.startup_s)
        run.update(failed_inputs=stats.failed_inputs, stages=stats.stages)
    records = journal.records()
    missing = len(uncommitted(inputs, journal.committed_inputs(records)))
    if missing:
        raise CurationAborted(f"{missing} inputs were not committed; rerun to resume")
    with writing(out.uri):  # a full disk here is one line too
        shards = _pack(out.uri, records, cfg)
    job.catalog.add_shards(version.id, shards)
    version = job.catalog.commit_version(version.id, out.join("index"))
    job.catalog.add_edge(Node("run", version.run_id), Node("version", version.id), "output")
    with contextlib.suppress(OSError):  # segments and block parts live on in shards/
        out.fs.rm(f"{out.path}/{WORK}", recursive=True)
    return version, run


@contextlib.contextmanager
def _hash_registry(job: _Job, journal: Journal, records: list) -> Iterator[None]:
    """With ``dedup.inline``: the run's ``HashRegistry`` actor (owned by this driver, so it
    ends with it), seeded with the accepted samples of the blocks committed before."""
    from curation.stages.dedup_inline import InlineDedupStage

    stages = [s for s in job.stages if isinstance(s, InlineDedupStage)]
    if not stages:
        yield
        return
    import uuid

    import pyarrow.parquet as pq
    import ray

    from curation.dedup import HashRegistry
    from curation.engine import connect_ray

    connect_ray(job.address, job.verbose)
    name = f"omniforge-hashes-{uuid.uuid4().hex[:12]}"
    registry = ray.remote(HashRegistry).options(name=name, num_cpus=0).remote(stages[0].max_bits)
    wanted = ["key", "kind", "status", "phash", "target_phash"]
    for record in records:
        with journal.fs.open(journal.path(record.written.index_part), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            part = parquet.read(columns=[c for c in wanted if c in names])
        items = [
            (r["key"], r["kind"], [*r["phash"], *(r.get("target_phash") or [])])
            for r in part.to_pylist()
            if r["status"] == "accepted" and r.get("phash")
        ]
        if items:
            ray.get(registry.claim.remote(items))
    for stage in stages:
        stage.registry = name
    try:
        yield
    finally:
        ray.kill(registry)


def _pack(output: str, records: list, cfg: CurationConfig) -> list[ShardInfo]:
    """Segments -> final shards (in threads: it is file copying), then the final index."""
    plans = plan_packs(records, cfg.shards.max_samples, cfg.shards.max_bytes)
    with ThreadPoolExecutor(PACK_THREADS) as pool:
        shards = list(pool.map(lambda p: pack_one(output, p), plans))
    mapping = {seg.path: plan.path for plan in plans for seg in plan.segments}
    write_final_index(output, records, mapping)
    write_shard_list(output, shards)
    return shards


def _print_plan(console, stages, skipped, num_inputs, num_done) -> None:
    if console is None:
        return
    line = f"[bold]curation plan[/]: {num_inputs} inputs"
    if num_done:
        line += f" ({num_done} committed earlier, skipped)"
    console.print(line)
    for i, step in enumerate(plan_steps(stages), 1):
        console.print(f"  {i}. {escape(step.describe())}")
    console.print("  -> pack: segments into shards per bucket; final Parquet index; catalog commit")
    for name, why in skipped.items():
        console.print(f"  [yellow]skipped[/] {escape(name)}: {escape(why)}")


def _finish(
    job: _Job, version: VersionInfo, num_inputs: int, run: dict[str, Any] | None = None
) -> CurationResult:
    """Summary, report and MLflow run of a committed version (the run's status is the
    caller's: ``run_lifecycle``)."""
    from curation.report import write_duplicate_montages, write_report
    from curation.summary import print_summary, summarize
    from curation.tracking import log_to_mlflow

    out, cfg, console = job.out, job.cfg, job.console
    index = read_index(out.join("index"))
    summary = summarize(
        index,
        stages_run=[s.name for s in job.stages],
        stages_skipped=job.skipped,
        elapsed_s=time.monotonic() - job.start,
        shards=job.catalog.shards(version.id),
        num_inputs=num_inputs,
        run=run,
    )
    summary["catalog"] = version.ref
    body = json.dumps(summary, indent=1, default=str).encode()
    write_atomic(out.fs, f"{out.path}/summary.json", body)
    thumbs = read_thumbnails(out.uri)
    # the report is written locally (a copy under OMNIFORGE_HOME for an object store), then
    # uploaded next to the shards; MLflow gets the local file
    local = local_cache(out, "reports") if out.remote else out.local()
    with writing(out.join("report.html")):
        report_path = write_report(index, thumbs, cfg.select, summary, local / "report.html")
        config_path = local / "config.yaml"
        if out.remote:
            put_file(report_path, out.join("report.html"))
            config_path.write_text(dump_yaml(cfg))  # what claim_output wrote to the bucket
    mlflow_id = None
    if job.tracking_uri:
        # MLflow shows images: each duplicate group as one picture (none: no duplicates)
        with tempfile.TemporaryDirectory(prefix="omniforge-duplicates-") as scratch:
            montages = write_duplicate_montages(index, thumbs, Path(scratch) / "duplicates")
            mlflow_id = log_to_mlflow(
                job.tracking_uri,
                "curation",
                f"curate {cfg.name}@{version.version}",
                flatten(cfg),
                summary,
                report_path,
                extra_artifacts=[config_path, *([montages] if montages else [])],
                tags={
                    "omniforge.catalog": version.ref,
                    "omniforge.config_hash": version.config_hash,
                },
                output=version,
            )
    if console is not None:
        print_summary(summary, console)
        where = f"{out.join('report.html')} (copy: {report_path})" if out.remote else report_path
        console.print(f"report: {where}\ncatalog: {version.ref}", markup=False)
    return CurationResult(version, summary, report_path, mlflow_id)


def load_run_config(output: str | Path) -> CurationConfig:
    """The resolved config a previous run saved in its output (a folder or object-store URI)."""
    src = location(output, "source")
    return validate(CurationConfig, load_yaml(src.join("config.yaml")), src.uri)


def reselect(
    source_root: str | Path,
    output: str | Path,
    cfg: CurationConfig,
    *,
    catalog: Catalog,
    parent: VersionInfo | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    console: Any = None,
    verbose: bool = False,
) -> CurationResult:
    """Apply ``cfg.select`` to an existing index and write a new version (no model runs).

    Every index row is an input of its own (its key is its input id); accepted samples are
    written again from their sources (``stages/encode.py``)."""
    return _rewrite(
        "select", source_root, output, cfg, catalog, parent, address, tracking_uri, console,
        verbose,
    )  # fmt: skip


def dedup(
    source_root: str | Path,
    output: str | Path,
    cfg: CurationConfig,
    *,
    catalog: Catalog,
    parent: VersionInfo | None = None,
    against: Sequence[VersionInfo] = (),
    address: str | None = None,
    tracking_uri: str | None = None,
    console: Any = None,
    verbose: bool = False,
) -> CurationResult:
    """``reselect`` that also rejects near-duplicates (``curation/dedup.py``): among the samples
    the thresholds accept, each one that repeats another, or an accepted sample of an
    ``against`` version, gets ``duplicate_of`` and the reason ``duplicate_of: KEY``."""
    from curation.dedup import check_signals, find_duplicates
    from curation.stages.select import select_rows

    shown: list[Row] = []  # the rows the report pictures (curation.report.duplicate_groups)

    def mark(rows: list[Row]) -> None:
        for r in rows:
            r["duplicate_of"] = r["duplicate_signal"] = None  # decided again
        selected = select_rows(rows, cfg.select, cfg.edit, cfg.split.min_clip_s)
        accepted = [r for r in selected if r["status"] == "accepted"]
        earlier = []
        for v in against:
            index = read_index(location(v.root_uri, "against").join("index"))
            earlier += [r for r in index.to_pylist() if r["status"] == "accepted"]
        d = cfg.dedup
        check_signals(accepted, d.max_bits, d.cosine, str(source_root))
        marks = find_duplicates(accepted, d.max_bits, earlier, d.cosine, d.cluster_size)
        for r in rows:
            if r["key"] in marks:
                r["duplicate_of"] = marks[r["key"]].kept
                r["duplicate_signal"] = marks[r["key"]].evidence
        shown.extend(_pictured_duplicates(rows, earlier))

    def thumbs(out: Location) -> None:
        _duplicate_thumbnails(shown, cfg, out)

    return _rewrite(
        "dedup", source_root, output, cfg, catalog, parent, address, tracking_uri, console,
        verbose, against=against, mark=mark, thumbs=thumbs,
    )  # fmt: skip


def _pictured_duplicates(rows: list[Row], earlier: list[Row]) -> list[Row]:
    """The rows of the duplicate groups the report shows (kept samples of earlier versions
    included)."""
    from curation.report import MAX_THUMBNAILS, duplicate_groups
    from curation.sink import index_table

    marked = [r for r in rows if r.get("duplicate_of")]
    if not marked:
        return []
    table = index_table([{"key": r["key"], "duplicate_of": r["duplicate_of"]} for r in marked])
    groups = duplicate_groups(table, MAX_THUMBNAILS)
    wanted = {k for kept, keys, _ in groups for k in (kept, *keys)}
    found = {r["key"]: r for r in [*rows, *earlier] if r["key"] in wanted}
    return list(found.values())


def _duplicate_thumbnails(rows: list[Row], cfg: CurationConfig, out: Location) -> None:
    """Thumbnails of the pictured duplicate groups' samples that the output has none of
    (a version keeps thumbnails of only a few accepted samples), from their sources:
    ``_thumbs/duplicates/KEY.jpg``. A source that no longer reads leaves a placeholder."""
    from curation.stages.frames import FrameSampleStage

    have = set(read_thumbnails(out.uri))
    todo = [r for r in rows if r["key"] not in have]
    if not todo:
        return
    stage = FrameSampleStage(cfg.frames.model_copy(update={"num_frames": 2}), cfg.probe)
    folder = f"{out.path}/{THUMBS}/duplicates"
    out.fs.makedirs(folder, exist_ok=True)
    for r in todo:
        try:
            made = stage.process_row({**r, "frames": None, "target_frames": None})
        except Exception:  # a source that moved: the report says "no thumbnail"
            continue
        write_atomic(out.fs, f"{folder}/{r['key']}.jpg", made["thumb"])
        if made.get("target_thumb"):
            write_atomic(out.fs, f"{folder}/{r['key']}{TARGET_SUFFIX}.jpg", made["target_thumb"])


def _index_inputs(index: pa.Table) -> pa.Table:
    """An index as input rows of a new version: each row is its own input (its key), its
    place in the old version's shards (shard, bucket) and its run are dropped."""
    table = index.append_column("input_id", index["key"])  # input_id never reaches an index
    for name in ("shard", "bucket", "run_id"):
        at = table.column_names.index(name)
        table = table.set_column(at, name, pa.nulls(len(table), table.schema.field(name).type))
    return table


def _rewrite(
    what: str,
    source_root: str | Path,
    output: str | Path,
    cfg: CurationConfig,
    catalog: Catalog,
    parent: VersionInfo | None,
    address: str | None,
    tracking_uri: str | None,
    console: Any,
    verbose: bool,
    against: Sequence[VersionInfo] = (),
    mark: Callable[[list[Row]], None] | None = None,
    thumbs: Callable[[Location], None] | None = None,
) -> CurationResult:
    """A new version from an existing index, without model runs: ``mark`` may set columns on
    the rows first (``dedup``), then select and encode run on every row; ``thumbs`` may add
    thumbnails to the output after the source's are copied."""
    from curation.stages.encode import EncodeStage
    from curation.stages.select import SelectStage

    start = time.monotonic()
    src, out = location(source_root, "source"), output_location(output)
    if src == out:
        raise ValueError(
            f"curate {what} writes a new version: --output must differ from the source"
        )
    with output_lock(out):
        table = _index_inputs(read_index(src.join("index")))
        rows: Sequence[Row] = TableRows(table)  # made into dicts a block at a time
        if mark is not None:  # dedup compares every row with every other: dicts
            rows = table.to_pylist()
            mark(rows)
        sources = ":".join([str(parent.id if parent else src), *(str(v.id) for v in against)])
        kind = "" if what == "select" else f"{what}:"  # a select's identity as it always was
        identity = hashlib.sha256(f"{kind}{config_hash(cfg)}:{sources}".encode())
        claim_output(out, identity.hexdigest(), src.uri, cfg)
        with writing(out.join(THUMBS)):
            copy_tree(src.join(THUMBS), out.join(THUMBS))
            if thumbs is not None:
                thumbs(out)
        version = catalog.begin_version(
            cfg.name,
            root_uri=out.uri,
            config_hash=identity.hexdigest(),
            parent_id=parent.id if parent else None,
        )
        stages: list[Stage] = [
            SelectStage(cfg.select, cfg.edit, cfg.split.min_clip_s),
            EncodeStage(cfg.shards),
        ]
        skipped = {"models": "scores are read from the index"}
        job = _Job(
            out, cfg, catalog, stages, skipped, address, tracking_uri, console, verbose, start
        )
        params = {"source": src.uri, "output": out.uri}
        if against:
            params["against"] = [v.ref for v in against]
        name = f"{what} {src} -> {out}"
        return _run(job, version, rows, name, identity.hexdigest(), params, parent, against)


__all__ = [
    "CurationAborted",
    "CurationResult",
    "Step",
    "build_stages",
    "dedup",
    "reselect",
    "run_curation",
]
