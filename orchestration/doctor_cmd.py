"""``omniforge doctor``: is this machine ready to curate and train? One table, ok/warn/fail.

Each check is read-only (it creates no catalog, folder or token) and quick: libraries are
imported, configured services are asked over HTTP with a short timeout, weights are looked
for where ``core.weights`` looks, free disk is read where outputs go. ``fail``: a command will
not work until it is fixed (exit status 1); ``warn``: it will work, with a cost or a stage
skipped (the detail says which and what to do).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.table import Table

from catalog.db import ENV_HOME, default_url, sqlite_file
from core.secrets import mask_urls
from orchestration import services
from orchestration.common import (
    OutputFormat,
    OutputOption,
    command_prefix,
    console,
    human_bytes,
    print_json,
)

OK, WARN, FAIL = "ok", "warn", "fail"
STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red"}
DISK_FAIL = 1 << 30  # below 1 GiB free a curation or a checkpoint will not fit
DISK_WARN = 10 << 30  # below 10 GiB a real corpus or a few checkpoints will not
HTTP_TIMEOUT_S = 3.0
SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed compiles for CPU training's all-reduce


@dataclass
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""  # how to fix it, in full (the JSON output; the table stays readable)


def check_libraries() -> list[Check]:
    """Ray, DeepSpeed and MLflow import (a broken install fails here, not minutes into a job)."""
    out = []
    for module, what in (
        ("ray", "curation workers, Ray Train, jobs"),
        ("deepspeed", "the training engine"),
        ("mlflow", "tracking"),
    ):
        try:
            lib = importlib.import_module(module)
        except Exception as e:  # ImportError, or a library failing while it imports
            out.append(Check(module, FAIL, f"cannot import {module} ({what}): {_first_line(e)}"))
        else:
            out.append(Check(module, OK, f"{module} {getattr(lib, '__version__', '?')}"))
    return out


def check_weights() -> list[Check]:
    """Each model the full curation profile needs, where ``core.weights`` looks for it. The
    default profile skips a stage whose weights are missing: a warning, not a failure."""
    from core.config import load_config
    from core.weights import model_roots
    from curation.config import CurationConfig
    from curation.pipeline import build_stages

    cfg = load_config(CurationConfig, None, ["profile=full"])
    stages, _ = build_stages(cfg)
    out = []
    seen: set[str] = set()
    for stage in stages:
        for weights in stage.required_files():
            if str(weights.path) in seen:
                continue
            seen.add(str(weights.path))
            problem = weights.problem()
            if problem is None:
                out.append(Check(f"weights: {stage.name}", OK, f"{weights.what}: {weights.path}"))
            else:
                detail = f"{problem}: the default profile skips {stage.name}"
                out.append(Check(f"weights: {stage.name}", WARN, detail, weights.how_to_get))
    roots = ", ".join(str(r) for r in model_roots())
    out.append(Check("weights: roots", OK, f"looked for under {roots} (first match wins)"))
    return out


def check_ray() -> Check:
    """The Jobs API of the configured cluster answers (none configured: fine, each command
    starts a local Ray)."""
    from orchestration import jobs
    from orchestration.cluster_cmd import auth_headers

    try:
        url = jobs.resolve_address(None)
    except jobs.JobError:
        joins = os.environ.get("RAY_ADDRESS", "")
        if joins and not joins.startswith(("http://", "https://")):
            # ray.init() joins the cluster RAY_ADDRESS names (HOST:PORT of its GCS, or auto)
            return Check("ray cluster", OK, f"RAY_ADDRESS={joins}: commands join that cluster")
        return Check("ray cluster", OK, "none configured: each command starts a local Ray")
    if services.http_ok(f"{url}/api/version", HTTP_TIMEOUT_S, headers=auth_headers()):
        return Check("ray cluster", OK, f"Jobs API at {url} answers")
    return Check(
        "ray cluster",
        FAIL,
        f"Jobs API at {url} does not answer: start the head (`omniforge cluster up`) or fix "
        "RAY_API_SERVER_ADDRESS / RAY_ADDRESS",
    )


def check_mlflow() -> Check:
    """The configured tracking server answers, or a local store's folder is writable."""
    from orchestration.mlflow_cmd import local_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_uri()
    if not uri:
        return Check(
            "mlflow", OK, "no tracking server configured: pass --tracking-uri to record runs"
        )
    shown = mask_urls(uri)
    if uri.startswith(("http://", "https://")):
        if services.http_ok(f"{uri.rstrip('/')}/health", HTTP_TIMEOUT_S):
            return Check("mlflow", OK, f"tracking server {shown} answers")
        return Check(
            "mlflow",
            FAIL,
            f"tracking server {shown} does not answer: start it (`omniforge mlflow up`) or fix "
            "MLFLOW_TRACKING_URI",
        )
    path = sqlite_file(uri) or Path(uri.removeprefix("file://"))
    folder = _existing(path.parent)
    if os.access(folder, os.W_OK):
        return Check("mlflow", OK, f"local store {shown}")
    return Check("mlflow", FAIL, f"local store {shown}: {folder} is not writable")


def check_catalog() -> Check:
    """The default catalog (``OMNIFORGE_CATALOG_URL`` or ``~/.omniforge``) opens, without
    creating it."""
    url = default_url()
    shown = mask_urls(url)
    path = sqlite_file(url)
    if path is not None:
        if path.is_file():
            return Check("catalog", OK, f"{shown}")
        if os.access(_existing(path.parent), os.W_OK):
            return Check("catalog", OK, f"{shown} (created by the first curate run or demo)")
        return Check("catalog", FAIL, f"{shown}: {_existing(path.parent)} is not writable")
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, connect_args={"connect_timeout": int(HTTP_TIMEOUT_S)})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as e:  # driver missing, refused, bad password: all say "cannot open"
        return Check("catalog", FAIL, f"cannot open {shown}: {_first_line(e)}")
    return Check("catalog", OK, f"{shown} answers")


def check_disk() -> list[Check]:
    """Free space where outputs go: the current folder (runs/, demo_out/), OMNIFORGE_HOME,
    the catalog's folder, the compiled ops' folder. One line per file system."""
    places = {
        "current folder (outputs)": Path.cwd(),
        "OMNIFORGE_HOME": Path(os.environ.get(ENV_HOME) or Path.home() / ".omniforge"),
        "torch extensions": extensions_root(),
    }
    catalog_file = sqlite_file(default_url())
    if catalog_file is not None:
        places["catalog"] = catalog_file.parent
    groups: dict[int, tuple[Path, list[str]]] = {}  # file system -> (a folder, what is there)
    for what, path in places.items():
        folder = _existing(path)
        groups.setdefault(folder.stat().st_dev, (folder, []))[1].append(what)
    out = []
    for folder, whats in groups.values():
        free = shutil.disk_usage(folder).free
        status = FAIL if free < DISK_FAIL else WARN if free < DISK_WARN else OK
        detail = f"{human_bytes(free)} free ({', '.join(whats)})"
        out.append(Check(f"disk: {folder}", status, detail))
    return out


def extensions_root() -> Path:
    """Where torch builds and caches C++ ops: ``TORCH_EXTENSIONS_DIR`` (``make`` sets it to
    the checkout's ``.torch_extensions``), else torch's per-user cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_extensions"


def check_deepspeed_op() -> Check:
    """DeepSpeed's shared-memory op for CPU training: compiled once (about 100 s on 2 CPUs),
    then loaded from the cache."""
    root = extensions_root()
    found = sorted(root.glob(f"**/{SHM_OP}/{SHM_OP}.so")) if root.is_dir() else []
    if found:
        return Check("deepspeed op", OK, f"{SHM_OP} compiled: {found[0]}")
    compiler = shutil.which("c++") or shutil.which("g++")
    where = (
        f"TORCH_EXTENSIONS_DIR={root}"
        if os.environ.get("TORCH_EXTENSIONS_DIR")
        else f"{root} (set TORCH_EXTENSIONS_DIR to keep it elsewhere)"
    )
    if compiler is None:
        return Check(
            "deepspeed op",
            WARN,
            f"{SHM_OP} not compiled and no C++ compiler on PATH: CPU training cannot build "
            "it; install g++ (GPU training does not need it)",
        )
    return Check(
        "deepspeed op",
        WARN,
        f"{SHM_OP} not compiled yet: the first CPU training compiles it (about 100 s on "
        f"2 CPUs) into {where}",
    )


def run_checks() -> list[Check]:
    checks: list[Check] = [
        Check("python", OK, f"{sys.version.split()[0]} at {sys.executable}"),
    ]
    steps: list[Callable[[], Check | list[Check]]] = [
        check_libraries,
        check_weights,
        check_ray,
        check_mlflow,
        check_catalog,
        check_disk,
        check_deepspeed_op,
    ]
    for step in steps:
        try:
            result = step()
        except Exception as e:  # one broken check must not hide the others
            result = Check(step.__name__.removeprefix("check_"), FAIL, _first_line(e))
        checks += result if isinstance(result, list) else [result]
    return checks


def doctor(output: OutputFormat = OutputOption) -> None:
    """Check that this machine is ready: libraries, weights, services, disk.

    Libraries import, model weights are where they are looked for, the configured Ray
    cluster, MLflow server and catalog answer, there is disk space where outputs go, and
    DeepSpeed's CPU op is compiled. Exit status 1 when a check fails (warnings do not)."""
    checks = run_checks()
    if output == OutputFormat.json:
        print_json([asdict(c) for c in checks])
    else:
        table = Table(title="omniforge doctor")
        table.add_column("check", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("detail", overflow="fold")
        for c in checks:
            table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.detail)
        console.print(table)
        if any(c.hint for c in checks):
            console.print(
                f"how to get each missing file: {command_prefix()} doctor --output json "
                "(the hint fields)",
                markup=False,
            )
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        if output != OutputFormat.json:
            console.print(f"[bold red]{len(failed)} check(s) failed[/]: {', '.join(failed)}")
        raise typer.Exit(1)


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where it would be created)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
