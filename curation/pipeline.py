"""The curation pipeline: a flat list of stages on Ray Data, a resumable sink, a catalog commit.

``run_curation`` lists the inputs (stable partitions), skips partitions a previous run already
finished, checks every model's weights before any work, prints the plan, runs the stages on
Ray Data, writes shards + index per partition, then commits the dataset version (last), writes
the report and logs to MLflow. ``reselect`` re-applies thresholds to an existing index
(no model runs) and writes a new version whose parent is the old one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog.config import config_hash, dump_yaml, flatten, load_yaml, validate
from catalog.index import read_index
from catalog.records import Node, VersionInfo
from catalog.store import Catalog
from curation.adapter import apply_stage, plan_resources, rows_to_arrow
from curation.config import CurationConfig
from curation.sink import PartitionWriter, finished_partitions, read_shard_manifests
from curation.sources import list_inputs
from curation.stages.base import Stage, check_required


@dataclass
class CurationResult:
    version: VersionInfo
    summary: dict[str, Any]
    report: Path
    mlflow_run_id: str | None


def build_stages(cfg: CurationConfig) -> tuple[list[Stage], dict[str, str]]:
    """The ordered stages of this config, and the stages left off with the reason."""
    from curation.stages.frames import FrameSampleStage
    from curation.stages.motion import MotionStage
    from curation.stages.ocr import OcrStage
    from curation.stages.pairs import EditPairStage
    from curation.stages.probe import ProbeStage
    from curation.stages.select import SelectStage
    from curation.stages.split import SceneSplitStage

    skipped: dict[str, str] = {}
    stages: list[Stage] = [
        ProbeStage(cfg),  # container, codec, size, fps, rotation; kind from content
        SceneSplitStage(cfg),  # scenes -> clips (videos), spans in the index
        FrameSampleStage(cfg),  # N frames per clip, shared by every scorer below
        EditPairStage(cfg),  # edit pairs: aspect difference, source -> target change
    ]
    for name in ("aesthetic", "watermark"):  # CLIP-embedding scorers need weights
        stage = _model_stage(name, cfg, skipped)
        if stage is not None:
            stages.append(stage)
    if cfg.motion.enabled:
        stages.append(MotionStage(cfg))  # optical flow on downscaled frame pairs
    else:
        skipped["motion"] = "motion.enabled is false"
    if cfg.ocr.enabled:
        stages.append(OcrStage(cfg))  # PP-OCR text detection -> text area
    else:
        skipped["ocr"] = "ocr.enabled is false"
    stages.append(SelectStage(cfg))  # thresholds -> status + reasons
    if cfg.recaption.backend != "none":
        from curation.stages.recaption import RecaptionStage

        stages.append(RecaptionStage(cfg))  # captions for accepted samples
    else:
        skipped["recaption"] = "recaption.backend is 'none'"
    return stages, skipped


def _model_stage(name: str, cfg: CurationConfig, skipped: dict[str, str]) -> Stage | None:
    enabled = getattr(cfg, name).enabled
    if enabled is False:
        skipped[name] = f"{name}.enabled is false"
        return None
    if name == "aesthetic":
        from curation.stages.aesthetic import AestheticStage as cls
    else:
        from curation.stages.watermark import WatermarkStage as cls
    stage = cls(cfg)
    if enabled or cfg.profile == "full":
        return stage  # required: missing weights stop the run at start-up
    missing = [f for f in stage.required_files() if not Path(f.path).is_file()]
    if missing:
        skipped[name] = f"weights not found: {missing[0].path} ({missing[0].how_to_get})"
        return None
    return stage


def run_identity(cfg: CurationConfig, inputs: list[dict]) -> str:
    """Config hash + input listing: a rerun with the same identity resumes."""
    h = hashlib.sha256(config_hash(cfg).encode())
    for row in inputs:
        h.update(row["key"].encode())
    return h.hexdigest()


def run_curation(
    source: str,
    output: str | Path,
    cfg: CurationConfig,
    *,
    catalog: Catalog,
    address: str | None = None,
    tracking_uri: str | None = None,
    console: Any = None,
) -> CurationResult:
    start = time.monotonic()
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages, skipped = build_stages(cfg)
    check_required(stages)  # before any work: name every missing weights file

    inputs = list_inputs(source, cfg.kind, staging=out / "_staging")
    for i, row in enumerate(inputs):
        row["partition"] = i // cfg.partition_size
    identity = run_identity(cfg, inputs)
    _claim_output(out, identity, source, cfg)
    finished = catalog.find_committed(cfg.name, str(out), identity)
    if finished is not None:  # the same run finished earlier: nothing to do
        if console is not None:
            console.print(f"{out} already holds {finished.ref} from this config and input")
        return _finish(
            out,
            cfg,
            finished,
            finished.run_id,
            catalog,
            stages,
            skipped,
            len(inputs),
            start,
            None,
            console,
        )
    version = catalog.begin_version(cfg.name, root_uri=str(out), config_hash=identity)
    run_id = _resume_or_start_run(
        catalog,
        version,
        f"curate {source} -> {out}",
        identity,
        {"input": source, "output": str(out)},
    )

    done = finished_partitions(str(out))
    pending = [r for r in inputs if r["partition"] not in done]
    num_partitions = (len(inputs) + cfg.partition_size - 1) // cfg.partition_size
    _print_plan(console, stages, skipped, len(inputs), num_partitions, len(done))
    version = _write_and_commit(
        catalog, version, run_id, out, cfg, stages, pending, num_partitions, address
    )
    return _finish(
        out,
        cfg,
        version,
        run_id,
        catalog,
        stages,
        skipped,
        len(inputs),
        start,
        tracking_uri,
        console,
    )


def _write_and_commit(
    catalog: Catalog,
    version: VersionInfo,
    run_id: int,
    out: Path,
    cfg: CurationConfig,
    stages: list[Stage],
    pending: list[dict],
    num_partitions: int,
    address: str | None,
) -> VersionInfo:
    """Run the pending partitions, then commit the version (last); a failure marks the run."""
    try:
        if pending:
            _run_ray(pending, stages, PartitionWriter(str(out), cfg, str(run_id)), address)
        missing = set(range(num_partitions)) - finished_partitions(str(out))
        if missing:
            raise RuntimeError(f"partitions {sorted(missing)[:10]} did not finish; rerun to resume")
        catalog.add_shards(version.id, read_shard_manifests(str(out)))
        version = catalog.commit_version(version.id, str(out / "index"))
    except BaseException as e:
        catalog.update_run(run_id, status="failed", message=f"{type(e).__name__}: {e}"[:2000])
        raise
    catalog.add_edge(Node("run", run_id), Node("version", version.id), "output")
    return version


def _resume_or_start_run(
    catalog: Catalog, version: VersionInfo, name: str, identity: str, params: dict
) -> int:
    """The run writing ``version``: the interrupted one when resuming (rows keep its id)."""
    if version.run_id is not None:
        catalog.update_run(version.run_id, status="running", message="resumed")
        return version.run_id
    run_id = catalog.start_run("curation", name, config_hash=identity, params=params)
    catalog.attach_run(version.id, run_id)
    return run_id


BLOCK_ROWS = 4


def _run_ray(rows: list[dict], stages: list[Stage], writer: PartitionWriter, address: str | None):
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    import ray.data

    resources = ray.cluster_resources()
    plan = plan_resources(stages, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
    by_partition: dict[int, list[dict]] = {}
    for row in rows:
        by_partition.setdefault(row["partition"], []).append(row)
    # Small blocks: a map task processes whole blocks, so a partition-sized block would run
    # each stage of a small job on one CPU. The sink regroups rows by partition.
    block = min(s.batch_size for s in stages) if stages else BLOCK_ROWS
    tables = [
        rows_to_arrow(part[i : i + block])
        for part in by_partition.values()
        for i in range(0, len(part), block)
    ]
    ds = ray.data.from_arrow(tables)
    for stage in stages:
        ds = apply_stage(ds, stage, plan[stage.name])
    ds = ds.map_batches(_drop_frames, batch_format="pyarrow", num_cpus=0.25)
    # as many shuffle partitions as write partitions (Ray's default is 200)
    ds = ds.groupby("partition", num_partitions=len(by_partition)).map_groups(
        _write_partition, fn_args=(writer,), batch_format="pyarrow", num_cpus=0.5, max_retries=3
    )
    ds.take_all()


def _write_partition(batch: pa.Table, writer: PartitionWriter) -> pa.Table:
    return writer(batch)


def _drop_frames(batch: pa.Table) -> pa.Table:
    drop = [c for c in ("frames", "target_frames", "frame_times") if c in batch.column_names]
    return batch.drop_columns(drop)


def _claim_output(out: Path, identity: str, source: str, cfg: CurationConfig) -> None:
    """One output folder holds one run: a rerun with the same identity resumes, another fails."""
    state = out / "_state.json"
    if state.exists():
        previous = json.loads(state.read_text())
        if previous.get("identity") != identity:
            raise ValueError(
                f"{out} holds a different curation run (input {previous.get('input')!r}, "
                "other config or inputs); choose another --output or remove it"
            )
        return
    (out / "config.yaml").write_text(dump_yaml(cfg))
    state.write_text(json.dumps({"identity": identity, "input": source}, indent=1))


def _print_plan(console, stages, skipped, num_inputs, num_partitions, num_done) -> None:
    if console is None:
        return
    console.print(
        f"[bold]curation plan[/]: {num_inputs} inputs in {num_partitions} partitions"
        + (f" ({num_done} already finished, skipped)" if num_done else "")
    )
    for i, stage in enumerate(stages, 1):
        console.print(f"  {i}. {stage.describe()}")
    console.print("  -> sink: WebDataset shards per bucket + Parquet index per partition")
    for name, why in skipped.items():
        console.print(f"  [yellow]skipped[/] {name}: {why}")


def _finish(
    out, cfg, version, run_id, catalog, stages, skipped, num_inputs, start, tracking_uri, console
) -> CurationResult:
    from curation import report
    from curation.summary import print_summary, summarize

    index = read_index(str(out / "index"))
    shards = catalog.shards(version.id)
    summary = summarize(
        index,
        stages_run=[s.name for s in stages],
        stages_skipped=skipped,
        elapsed_s=time.monotonic() - start,
        shards=shards,
        num_inputs=num_inputs,
    )
    summary["catalog"] = version.ref
    thumbs = {p.stem: p.read_bytes() for p in (out / "_thumbs").glob("*.jpg")}
    report_path = report.write_report(index, thumbs, cfg.select, summary, out / "report.html")
    mlflow_id = None
    if tracking_uri:
        mlflow_id = report.log_to_mlflow(
            tracking_uri,
            "curation",
            f"curate {cfg.name}@{version.version}",
            flatten(cfg),
            summary,
            report_path,
            extra_artifacts=[out / "config.yaml"],
            tags={"omniforge.catalog": version.ref, "omniforge.config_hash": version.config_hash},
        )
    catalog.update_run(run_id, status="succeeded", mlflow_run_id=mlflow_id)
    if console is not None:
        print_summary(summary, console)
        console.print(f"report: {report_path}\ncatalog: {version.ref}")
    return CurationResult(version, summary, report_path, mlflow_id)


def load_run_config(output: str | Path) -> CurationConfig:
    """The resolved config a previous run saved in its output folder."""
    return validate(CurationConfig, load_yaml(Path(output) / "config.yaml"), str(output))


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
) -> CurationResult:
    """Apply ``cfg.select`` to an existing index and write a new version (no model runs)."""
    import shutil

    from curation.stages.select import SelectStage

    start = time.monotonic()
    src, out = Path(source_root).resolve(), Path(output).resolve()
    if src == out:
        raise ValueError("curate select writes a new version: --output must differ from the source")
    out.mkdir(parents=True, exist_ok=True)
    rows = read_index(str(src / "index")).to_pylist()
    identity = hashlib.sha256(f"{config_hash(cfg)}:{parent.id if parent else src}".encode())
    identity = identity.hexdigest()
    _claim_output(out, identity, str(src), cfg)
    if (src / "_thumbs").is_dir():
        shutil.copytree(src / "_thumbs", out / "_thumbs", dirs_exist_ok=True)
    version = catalog.begin_version(
        cfg.name, root_uri=str(out), config_hash=identity, parent_id=parent.id if parent else None
    )
    run_id = _resume_or_start_run(
        catalog,
        version,
        f"select {src} -> {out}",
        identity,
        {"source": str(src), "output": str(out)},
    )
    if parent is not None:
        catalog.add_edge(Node("version", parent.id), Node("run", run_id), "input")
    stages: list[Stage] = [SelectStage(cfg)]
    num_partitions = 1 + max((r.get("partition") or 0) for r in rows) if rows else 0
    done = finished_partitions(str(out))
    pending = [r for r in rows if (r.get("partition") or 0) not in done]
    for r in pending:
        r["partition"] = r.get("partition") or 0
    _print_plan(
        console,
        stages,
        {"models": "scores are read from the index"},
        len(rows),
        num_partitions,
        len(done),
    )
    version = _write_and_commit(
        catalog, version, run_id, out, cfg, stages, pending, num_partitions, address
    )
    return _finish(
        out, cfg, version, run_id, catalog, stages, {}, len(rows), start, tracking_uri, console
    )
