"""``omniforge s3 up|down|status``: an S3-compatible server on 127.0.0.1 for development and tests.

It is moto's server mode (``moto[server]``, in the ``dev`` / ``s3-server`` extras): the real S3
REST API, objects kept in the server's memory (gone when it stops). Clients reach it through
the standard variables, printed by ``up``: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (any values: moto does not check them) and ``AWS_DEFAULT_REGION``.
For data that must outlive the process use MinIO or a real bucket; nothing in omniforge
depends on which server answers.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import typer

from orchestration import services
from orchestration.common import command_prefix, console, show_service, stop_service

app = typer.Typer(help="A local S3-compatible server (127.0.0.1, in memory) for development.")

NAME = "s3"
# what a client of the local server needs; moto accepts any key pair
CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "omniforge-local",
    "AWS_SECRET_ACCESS_KEY": "omniforge-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def client_env(url: str) -> dict[str, str]:
    """The environment a client of the server at ``url`` needs."""
    return {"AWS_ENDPOINT_URL": url, **CLIENT_ENV}


def start_server(port: int = 9000, buckets: tuple[str, ...] = (), timeout: float = 90.0):
    """Start the server, create ``buckets``; returns the ``services.Service``."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if moto is None:
        raise services.ServiceError(
            "moto_server is not installed: pip install 'omniforge[s3-server]' (moto[server])"
        )
    if not services.port_free(port):
        raise services.ServiceError(f"--port {port}: 127.0.0.1:{port} is already in use")
    url = f"http://127.0.0.1:{port}"
    service = services.start(
        NAME,
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        url=url,
        health=f"{url}/moto-api/",
        timeout=timeout,
        info={"buckets": list(buckets)},
    )
    try:
        for bucket in buckets:
            make_bucket(url, bucket)
    except Exception:
        services.stop(NAME)
        raise
    return service


def make_bucket(url: str, bucket: str) -> None:
    import s3fs

    env = client_env(url)
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=url,
        skip_instance_cache=True,
    )
    if not fs.exists(bucket):
        fs.mkdir(bucket)


@app.command("up")
def up(
    port: int = typer.Option(9000, "--port", help="port on 127.0.0.1"),
    bucket: list[str] = typer.Option([], "--bucket", help="bucket(s) to create"),
) -> None:
    """Start the server; prints the variables a client needs."""
    service = start_server(port, tuple(bucket))
    exports = "\n".join(f"  export {k}={v}" for k, v in client_env(service.url).items())
    made = f"; buckets: {', '.join(bucket)}" if bucket else ""
    console.print(
        f"S3 server running (pid {service.pid}) at {service.url} (in memory{made})\n"
        f"{exports}\n"
        f"then use s3://BUCKET/PREFIX paths; stop with: {command_prefix()} s3 down "
        f"(log: {service.log})",
        markup=False,
    )


@app.command("down")
def down() -> None:
    """Stop the server started by ``s3 up`` (its objects are gone)."""
    stop_service(NAME, "S3 server")


@app.command("status")
def status() -> None:
    show_service(NAME, "S3 server", "s3")
