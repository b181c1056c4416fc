"""``omniforge cluster up|down|status``: a local Ray head for development.

The dashboard and the Jobs API listen on 127.0.0.1 only. Ray's own gRPC servers (GCS,
raylet, object manager) listen on the node's address whatever is asked (Ray maps 127.0.0.1 to
the node IP so that workers can join), so the head also turns on Ray's token
authentication (the token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN[_PATH]``; ``cluster up``
creates the file, readable by its owner only, when there is none). Jobs go to it with
``omniforge submit ... `` (no ``--address`` needed: the running head is found from
``OMNIFORGE_HOME/services/cluster.json``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import typer

from core.secrets import ensure_ray_token as _ensure_token
from core.secrets import ray_token
from orchestration import services
from orchestration.common import command_prefix, console

app = typer.Typer(help="A local Ray head for development (bound to 127.0.0.1).")

NAME = "cluster"
AGENT_PORT = 52365


def enable_client_auth() -> None:
    """Make Ray clients in this process send the token when one exists and the mode is unset
    (a token-auth cluster refuses requests without it; a cluster without auth ignores it)."""
    if "RAY_AUTH_MODE" in os.environ or ray_token() is None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config  # Ray caches the mode: re-read it (as ray.init does)

    Config.initialize("")


def local_address() -> str | None:
    """The Jobs API URL of the head started by ``cluster up``, if it is running."""
    service = services.running(NAME)
    return service.url if service else None


def start_head(
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: Path | None = None,
    timeout: float = 120.0,
) -> services.Service:
    for p, what in ((port, "--port"), (dashboard_port, "--dashboard-port")):
        if not services.port_free(p):
            raise services.ServiceError(f"{what} {p}: 127.0.0.1:{p} is already in use")
    # Ray puts unix sockets under the temp dir: keep its path short (108-byte limit).
    temp = temp_dir or Path(tempfile.gettempdir()) / f"omniforge-ray-{os.getuid()}-{port}"
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--temp-dir={temp}",
        # The job agent's HTTP port (Ray's default 52365 is taken by any other Ray on the
        # machine, and the head then accepts no jobs): the default when free, else any.
        f"--dashboard-agent-listen-port={_free_or_any(AGENT_PORT)}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    url = f"http://127.0.0.1:{dashboard_port}"
    auth = _ensure_token()
    # Job drivers run `omniforge ...` from PATH: put this interpreter's scripts first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {"PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": auth}
    service = services.start(
        NAME,
        argv,
        url=url,
        health=f"{url}/api/gcs_healthz",
        env=env,
        timeout=timeout,
        info={"gcs_address": f"127.0.0.1:{port}", "temp_dir": str(temp)},
        headers=auth_headers(),
    )
    _wait_for_jobs_api(url, timeout)
    return service


def _free_or_any(port: int) -> int:
    if services.port_free(port):
        return port
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_headers() -> dict[str, str]:
    token = ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _wait_for_jobs_api(url: str, timeout: float) -> None:
    """The dashboard answers before its job module is ready: list jobs until it works."""
    import time

    from ray.job_submission import JobSubmissionClient

    enable_client_auth()
    deadline = time.monotonic() + timeout
    while True:
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception as e:  # connection refused / 503 while the job agent starts
            if time.monotonic() > deadline:
                raise services.ServiceError(f"the Jobs API at {url} is not ready: {e}") from e
            time.sleep(1.0)


@app.command("up")
def up(
    port: int = typer.Option(6379, "--port", help="GCS port (127.0.0.1)"),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="dashboard + Jobs API"),
    num_cpus: int | None = typer.Option(None, "--num-cpus", help="CPUs to offer (default: all)"),
    num_gpus: int | None = typer.Option(None, "--num-gpus", help="GPUs to offer (default: all)"),
) -> None:
    """Start a local Ray head on 127.0.0.1 (GCS, dashboard and Jobs API on loopback only)."""
    service = start_head(port, dashboard_port, num_cpus, num_gpus)
    omniforge = command_prefix()
    console.print(
        f"Ray head running (pid {service.pid}): Jobs API and dashboard {service.url}, "
        f"GCS {service.info['gcs_address']}\n"
        f"submit with: {omniforge} submit curate CONFIG --input ... --output ...   "
        f"(log: {service.log})\nstop with: {omniforge} cluster down",
        markup=False,
    )


@app.command("down")
def down() -> None:
    """Stop the Ray head started by ``cluster up`` (and only it)."""
    service = services.stop(NAME)
    if service is None:
        console.print("no local Ray head is running")
    else:
        console.print(f"stopped the Ray head (pid {service.pid}, {service.url})")


@app.command("status")
def status() -> None:
    """Whether the local head runs, and where."""
    service = services.running(NAME)
    if service is None:
        console.print("no local Ray head is running (start one with: omniforge cluster up)")
        raise typer.Exit(1)
    console.print(
        f"Ray head running (pid {service.pid}): {service.url}, GCS {service.info['gcs_address']}"
    )
