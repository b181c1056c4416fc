"""``omniforge mlflow up|down|status``: a lean MLflow tracking server on 127.0.0.1.

Backend: a SQL store, SQLite under ``OMNIFORGE_HOME/mlflow`` by default, PostgreSQL when a
``postgresql://`` URL is given (with its password from ``OMNIFORGE_MLFLOW_BACKEND_URI`` or the
file named by ``OMNIFORGE_MLFLOW_BACKEND_URI_FILE``, never from the command line). The URL
reaches the server through its environment (``MLFLOW_BACKEND_STORE_URI``), so it is not in
the process list either. Artifacts are proxied by the server (``--serve-artifacts``) to a
local folder or an object store (``s3://bucket/prefix``; MinIO via ``MLFLOW_S3_ENDPOINT_URL`` and
the usual ``AWS_*`` variables in the server's environment), so clients need no store access.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import typer

from core.secrets import mask_urls, read_secret
from orchestration import services
from orchestration.common import command_prefix, console, show_service, stop_service

app = typer.Typer(help="A local MLflow tracking server (127.0.0.1, SQL backend).")

NAME = "mlflow"
BACKEND_ENV = "OMNIFORGE_MLFLOW_BACKEND_URI"


def start_server(
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    port: int = 5000,
    timeout: float = 90.0,
) -> services.Service:
    folder = services.home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or read_secret(BACKEND_ENV) or f"sqlite:///{folder / 'mlflow.db'}"
    if not backend.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql")):
        raise ValueError(
            f"backend store {mask_urls(backend)!r}: use sqlite:///FILE or postgresql://... "
            "(the file store is in maintenance mode in MLflow 3)"
        )
    artifacts = artifacts_destination or str(folder / "artifacts")
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    if not services.port_free(port):
        raise services.ServiceError(f"--port {port}: 127.0.0.1:{port} is already in use")
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    argv = [
        mlflow,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
    ]
    env = {
        "MLFLOW_BACKEND_STORE_URI": backend,  # environment, not argv: it may hold a password
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    url = f"http://127.0.0.1:{port}"
    return services.start(
        NAME,
        argv,
        url=url,
        health=f"{url}/health",
        env=env,
        timeout=timeout,
        info={"backend": mask_urls(backend), "artifacts": mask_urls(artifacts)},
    )


def local_uri() -> str | None:
    """The tracking URI of the server started by ``mlflow up``, if it runs."""
    service = services.running(NAME)
    return service.url if service else None


@app.command("up")
def up(
    backend_store_uri: str | None = typer.Option(
        None,
        "--backend-store-uri",
        help=f"sqlite:///FILE or postgresql://USER@HOST/DB (a password only via ${BACKEND_ENV} "
        f"or ${BACKEND_ENV}_FILE); default: SQLite under OMNIFORGE_HOME/mlflow",
    ),
    artifacts_destination: str | None = typer.Option(
        None, "--artifacts-destination", help="folder or s3://bucket/prefix for artifacts"
    ),
    port: int = typer.Option(5000, "--port", help="port on 127.0.0.1"),
) -> None:
    """Start the tracking server; runs log to it with --tracking-uri http://127.0.0.1:PORT."""
    if backend_store_uri and mask_urls(backend_store_uri) != backend_store_uri:
        raise ValueError(
            "--backend-store-uri holds a password: put the URL in "
            f"${BACKEND_ENV} or a file named by ${BACKEND_ENV}_FILE instead"
        )
    service = start_server(backend_store_uri, artifacts_destination, port)
    console.print(
        f"MLflow server running (pid {service.pid}) at {service.url}\n"
        f"  backend {service.info['backend']}, artifacts {service.info['artifacts']}\n"
        f"  log with --tracking-uri {service.url}; open {service.url} in a browser; "
        f"stop with: {command_prefix()} mlflow down (log: {service.log})",
        markup=False,
    )


@app.command("down")
def down() -> None:
    """Stop the server started by ``mlflow up``."""
    stop_service(NAME, "MLflow server")


@app.command("status")
def status() -> None:
    show_service(NAME, "MLflow server", "mlflow")
