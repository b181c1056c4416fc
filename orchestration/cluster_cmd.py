"""``omniforge cluster up|down|status``: a local Ray head for development, and worker nodes
beside it on the same machine (``--workers N``: a multi-node cluster for tests and demos).

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
from core.secrets import use_ray_token as enable_client_auth
from orchestration import services
from orchestration.common import command_prefix, console, stop_service

app = typer.Typer(help="A local Ray head for development (bound to 127.0.0.1).")

NAME = "cluster"
AGENT_PORT = 52365


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
    argv = _ray_start(
        num_cpus,
        num_gpus,
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--temp-dir={temp}",
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    service = services.start(
        NAME,
        argv,
        url=url,
        health=f"{url}/api/gcs_healthz",
        env=_node_env(),
        timeout=timeout,
        info={"gcs_address": f"127.0.0.1:{port}", "temp_dir": str(temp)},
        headers=auth_headers(),
    )
    _wait_for_jobs_api(url, timeout)
    return service


def _ray_start(num_cpus: int | None, num_gpus: int | None, *args: str) -> list[str]:
    """``ray start ... --block`` for a node of this machine (the head or a worker)."""
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--block",
        *args,
        # The job agent's HTTP port (Ray's default 52365 is taken by any other Ray on the
        # machine, and the head then accepts no jobs): the default when free, else any.
        f"--dashboard-agent-listen-port={_free_or_any(AGENT_PORT)}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    return argv


def _node_env() -> dict[str, str]:
    # Job drivers run `omniforge ...` from PATH: put this interpreter's scripts first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {"PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": _ensure_token()}


WORKER = "cluster-worker"


def start_workers(count: int, num_cpus: int | None = None, timeout: float = 120.0) -> None:
    """Start ``count`` worker nodes beside the head ``cluster up`` started, on this machine:
    each with its own raylet, object store and resources, as a node of another machine would
    be. One at a time (two starting at once on one machine race for the same socket names),
    each waited for until a driver of the cluster sees it (``ray.nodes()``: the dashboard
    lists a node a moment earlier, and a run started in between would plan for fewer CPUs
    than the cluster has)."""
    import ray

    head = services.running(NAME)
    if head is None:
        raise services.ServiceError("no local Ray head is running: start it with `cluster up`")
    gcs = head.info["gcs_address"]
    enable_client_auth()
    ray.init(address=gcs, log_to_driver=False, configure_logging=False)
    try:
        for _ in range(count):
            expected = 2 + len(workers())  # the head, the workers started before, this one
            services.start(
                f"{WORKER}-{expected - 1}",
                _ray_start(num_cpus, None, f"--address={gcs}"),
                url=head.url,
                health=lambda expected=expected: sum(n["Alive"] for n in ray.nodes()) >= expected,
                env=_node_env(),
                timeout=timeout,
                info={"head": gcs, "num_cpus": num_cpus},
            )
    finally:
        ray.shutdown()


def workers() -> list[services.Service]:
    """The worker nodes ``cluster up --workers`` started that are running."""
    folder = services.home() / "services"
    names = sorted(p.stem for p in folder.glob(f"{WORKER}-*.json")) if folder.is_dir() else []
    return [s for n in names if (s := services.running(n)) is not None]


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
    worker_nodes: int = typer.Option(
        0, "--workers", help="worker nodes to start on this machine too (a multi-node cluster)"
    ),
    worker_cpus: int | None = typer.Option(
        None, "--worker-cpus", help="CPUs each worker node offers (default: all)"
    ),
) -> None:
    """Start a local Ray head on 127.0.0.1 (GCS, dashboard and Jobs API on loopback only),
    and with ``--workers N`` N worker nodes beside it."""
    service = start_head(port, dashboard_port, num_cpus, num_gpus)
    try:
        if worker_nodes:
            start_workers(worker_nodes, worker_cpus)
    except Exception:
        down()
        raise
    omniforge = command_prefix()
    nodes = f", {worker_nodes} worker node(s)" if worker_nodes else ""
    console.print(
        f"Ray head running (pid {service.pid}){nodes}: Jobs API and dashboard {service.url}, "
        f"GCS {service.info['gcs_address']}\n"
        f"submit with: {omniforge} submit curate CONFIG --input ... --output ...   "
        f"(log: {service.log})\nstop with: {omniforge} cluster down",
        markup=False,
    )


@app.command("down")
def down() -> None:
    """Stop the Ray head started by ``cluster up`` and its worker nodes (and only them)."""
    for worker in workers():
        services.stop(worker.name)
    stop_service(NAME, "local Ray head")


@app.command("status")
def status() -> None:
    """Whether the local head runs, and where."""
    service = services.running(NAME)
    if service is None:
        console.print("no local Ray head is running (start one with: omniforge cluster up)")
        raise typer.Exit(1)
    nodes = f", {len(workers())} worker node(s)" if workers() else ""
    console.print(
        f"Ray head running (pid {service.pid}){nodes}: {service.url}, "
        f"GCS {service.info['gcs_address']}"
    )
