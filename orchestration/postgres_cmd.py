"""``omniforge postgres up|down|status``: a PostgreSQL server on 127.0.0.1 for the catalog and
MLflow, without containers (the compose stack's ``postgres`` service, on one machine).

It uses the PostgreSQL server binaries installed on the machine (``initdb``, ``postgres``;
Debian's ``postgresql`` package puts them in ``/usr/lib/postgresql/VERSION/bin``). The first
``up`` creates a cluster with a generated password (scram-sha-256, connections from 127.0.0.1
only) and the databases ``omniforge`` (the catalog) and ``mlflow``. The password is never
printed or put on a command line: ``up`` writes each database's full URL to a file readable by
its owner only, for ``OMNIFORGE_CATALOG_URL_FILE`` and ``OMNIFORGE_MLFLOW_BACKEND_URI_FILE``.
PostgreSQL refuses to run as root: a root caller runs the server as the ``postgres`` system
user, with its data in a folder that user owns (``/var/tmp/omniforge-postgres-UID-PORT``).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import typer

from orchestration import services
from orchestration.common import command_prefix, console, show_service, stop_service

app = typer.Typer(help="A local PostgreSQL server (127.0.0.1) for the catalog and MLflow.")

NAME = "postgres"
USER = "omniforge"
DATABASES = ("omniforge", "mlflow")
SYSTEM_USER = "postgres"  # who runs the server when the caller is root


def binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, else the newest ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    raise services.ServiceError(
        f"{name} not found: install the PostgreSQL server (e.g. apt-get install postgresql)"
    )


def folder(port: int) -> Path:
    """Where the cluster lives: ``OMNIFORGE_HOME/postgres-PORT``, or for root a folder the
    ``postgres`` user can reach (root's own folders are often closed to other users)."""
    if os.geteuid() == 0:
        return Path("/var/tmp") / f"omniforge-postgres-{os.getuid()}-{port}"
    return services.home() / f"postgres-{port}"


def url_file(database: str) -> Path:
    return services.home() / "postgres" / f"{database}.url"


def _run_as() -> str | None:
    return SYSTEM_USER if os.geteuid() == 0 else None


def _run(argv: list[str], env: dict[str, str] | None = None, user: str | None = None) -> str:
    """Run a PostgreSQL program; its stdout, or ``ServiceError`` with what it printed."""
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        user=user,
        check=False,
    )
    if done.returncode != 0:
        what = (done.stderr or done.stdout).strip()
        raise services.ServiceError(f"{Path(argv[0]).name} failed:\n{what}")
    return done.stdout


def init_cluster(data: Path, password: str) -> None:
    """``initdb`` of a new cluster owned by ``USER`` with ``password`` (read from a file)."""
    data.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / ".pwfile"
    pwfile.write_text(password)
    try:
        if _run_as() is not None:
            shutil.chown(data.parent, SYSTEM_USER)
            shutil.chown(data, SYSTEM_USER)
            shutil.chown(pwfile, SYSTEM_USER)
        os.chmod(pwfile, 0o600)
        _run(
            [
                binary("initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            user=_run_as(),
        )
    finally:
        pwfile.unlink(missing_ok=True)


def start_server(port: int = 5432, timeout: float = 90.0) -> services.Service:
    """Start the server (creating the cluster and databases on first use)."""
    if not services.port_free(port):
        raise services.ServiceError(f"--port {port}: 127.0.0.1:{port} is already in use")
    root = folder(port)
    data = root / "data"
    secret = services.home() / "postgres" / "password"
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        secret.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_hex(16)
        _write_private(secret, password)
        init_cluster(data, password)
    elif not secret.exists():
        raise services.ServiceError(
            f"{data} holds a cluster whose password file {secret} is gone; remove {root} "
            "to start over"
        )
    password = secret.read_text().strip()
    sockets = root / "sockets"
    sockets.mkdir(exist_ok=True)
    if _run_as() is not None:
        shutil.chown(sockets, SYSTEM_USER)
    argv = [
        binary("postgres"),
        "-D",
        str(data),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-k",
        str(sockets),
    ]
    url = f"postgresql://127.0.0.1:{port}"
    service = services.start(
        NAME,
        argv,
        url=url,
        health=lambda: _ready(port),
        timeout=timeout,
        info={"port": port, "data": str(data)},
        user=_run_as(),
    )
    try:
        for database in DATABASES:
            create_database(port, database, password)
            _write_private(url_file(database), create_database(port, database, password))
    except Exception:
        services.stop(NAME, sig=signal.SIGINT)
        raise
    return service


def _ready(port: int) -> bool:
    done = subprocess.run(
        [binary("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def create_database(port: int, database: str, password: str) -> str:
    """Create ``database`` (owned by ``USER``) unless it exists; returns its URL."""
    env = {"PGPASSWORD": password}  # the environment of a child, never its argv
    psql = [binary("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", "postgres"]
    found = _run([*psql, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{database}'"], env)
    if found.strip() != "1":
        _run([binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, database], env)
    return f"postgresql://{USER}:{password}@127.0.0.1:{port}/{database}"


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by its owner only from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@app.command("up")
def up(port: int = typer.Option(5432, "--port", help="port on 127.0.0.1")) -> None:
    """Start the server; prints the variables that point the catalog and MLflow at it."""
    service = start_server(port)
    console.print(
        f"PostgreSQL running (pid {service.pid}) on 127.0.0.1:{port}, data in "
        f"{service.info['data']}\n"
        f"  export OMNIFORGE_CATALOG_URL_FILE={url_file('omniforge')}\n"
        f"  export OMNIFORGE_MLFLOW_BACKEND_URI_FILE={url_file('mlflow')}\n"
        f"  (files readable by you only: the URLs hold the generated password)\n"
        f"stop with: {command_prefix()} postgres down (log: {service.log})",
        markup=False,
    )


@app.command("down")
def down() -> None:
    """Stop the server (fast shutdown: open sessions are ended); its data stays."""
    stop_service(NAME, "PostgreSQL server", sig=signal.SIGINT, article="",
                 note="; its data stays in place")  # fmt: skip


@app.command("status")
def status() -> None:
    show_service(NAME, "PostgreSQL server", "postgres")
