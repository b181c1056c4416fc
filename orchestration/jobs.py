"""Cluster jobs through the Ray Jobs API: package the project, submit, follow, cancel.

A job runs the same CLI a user runs locally (``omniforge curate run`` / ``omniforge train
run``) as its entrypoint. The config is validated here first (a bad field fails before
anything is sent) and shipped resolved, next to the project's packages:

- ``runtime_env.py_modules``: this checkout's ``catalog``, ``curation``, ``training`` and
  ``orchestration`` packages, so the cluster runs the code that was submitted (the cluster's
  image provides the dependencies);
- ``runtime_env.working_dir``: a staging folder holding the resolved config / recipe;
- ``runtime_env.env_vars``: ``OMNIFORGE_JOB_ID`` only; every catalog run the job records
  carries it (``catalog.runs.current_job_id``).

Secrets never travel with a job: entrypoints, runtime envs and metadata are visible to anyone
who can read the dashboard. A catalog or tracking URL holding a password is refused here;
the cluster's nodes get it from their own environment (``OMNIFORGE_CATALOG_URL`` or
``OMNIFORGE_CATALOG_URL_FILE``, AWS_* keys, ...).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from catalog.db import code_version
from catalog.runs import ENV_JOB_ID
from core.cluster import unreachable
from core.config import config_hash, dump_yaml, flatten
from core.secrets import has_secret, mask_urls, masked_params

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("catalog", "curation", "training", "orchestration")
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_RETRIES = 30


class JobError(RuntimeError):
    """A job could not be submitted, or ended in a state the caller did not want."""


@dataclass
class JobSpec:
    kind: str  # "curate" | "train"
    args: list[str]  # the CLI arguments after ``omniforge``
    files: dict[str, str]  # file name in the working dir -> text
    metadata: dict[str, str]


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` / an http ``RAY_ADDRESS``, else the head
    started by ``omniforge cluster up``."""
    from orchestration.cluster_cmd import local_address

    if address:
        return check_address(address)
    for name in ADDRESS_ENV:
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    local = local_address()
    if local:
        return local
    raise JobError(
        "no Ray cluster given: pass --address http://HOST:8265 (the head's dashboard / Jobs "
        "API), set RAY_API_SERVER_ADDRESS, or start a local head with `omniforge cluster up`"
    )


def check_address(address: str) -> str:
    """The Jobs API is the dashboard's http(s) URL. Ray would take ``HOST:PORT`` for a GCS
    address and wait 45 s for a GCS that is not there: refuse it at once."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    hint = address.split("://", 1)[-1]
    raise JobError(
        f"--address {address}: the Jobs API address is the dashboard's http URL; "
        f"use --address http://{hint} (port 8265 unless the head chose another)"
    )


def _reachable(url: str) -> str | None:
    """None when a TCP connection to the URL's host and port opens, else why not (Ray's
    client would otherwise wait for the system's connect timeout, minutes)."""
    parsed = urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return unreachable(parsed.hostname or "", port)


def client(address: str | None):
    """A Jobs API client for the cluster; ``JobError`` with what to do when it cannot be
    reached."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from orchestration.cluster_cmd import enable_client_auth

    url = resolve_address(address)
    why = _reachable(url)
    if why is None:
        enable_client_auth()
        try:
            return JobSubmissionClient(url)
        except ConnectionError as e:
            why = str(e)
        except AuthenticationError:
            raise JobError(
                f"the Ray Jobs API at {url} refused this client: it needs the cluster's token "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN (RAY_AUTH_TOKEN_PATH names another file)"
            ) from None
        except (RuntimeError, ValueError) as e:  # something answers, but not Ray's Jobs API
            raise JobError(
                f"{url} is not a Ray Jobs API ({str(e).strip().splitlines()[0][:200]}): "
                "check --address (the head's dashboard, port 8265 by default)"
            ) from None
    raise JobError(
        f"cannot reach the Ray Jobs API at {url} ({why}): is the cluster running? "
        "Check --address (`omniforge cluster status` for the local head)"
    )


def job_info(jobs_client, job_id: str):
    """The job's details; ``JobError`` naming the id when the cluster has no such job."""
    try:
        return jobs_client.get_job_info(job_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobError(
                f"no job {job_id!r} on {jobs_client.get_address()}: "
                "`omniforge jobs ls` lists the cluster's jobs"
            ) from None
        raise


def refuse_secrets(**values: str | None) -> None:
    """Secret-bearing URLs must come from the cluster's environment, not the job."""
    for option, value in values.items():
        if value and has_secret(value):
            raise JobError(
                f"--{option.replace('_', '-')} {mask_urls(value)} holds a password: job "
                "entrypoints and runtime envs are readable by everyone with dashboard access. "
                "Give the cluster's nodes the URL through their environment instead "
                "(OMNIFORGE_CATALOG_URL or OMNIFORGE_CATALOG_URL_FILE for the catalog, "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow) and omit it here"
            )


def refuse_secrets_in(config: Any, what: str) -> None:
    """A config shipped with a job must not carry a secret (it is stored in the cluster's GCS
    and readable by its users): name the field that does."""
    plain, shown = flatten(config), masked_params(config)
    bad = [key for key, value in plain.items() if shown[key] != value]
    if bad:
        raise JobError(
            f"{what} field(s) {', '.join(bad)} hold a secret; jobs carry no secrets: set it in "
            "the cluster's environment (for example a URL without the password, and the "
            "password in the variable the component reads)"
        )


def curate_spec(
    config: Any,
    input: str,
    output: str,
    *,
    catalog: str | None = None,
    tracking_uri: str | None = None,
) -> JobSpec:
    """``omniforge curate run`` on the cluster with the resolved curation ``config``."""
    refuse_secrets(catalog=catalog, tracking_uri=tracking_uri, input=input, output=output)
    refuse_secrets_in(config, "curation config")
    args = ["curate", "run", "--config", "curate.yaml", "--input", input, "--output", output]
    args += _common(catalog, tracking_uri)
    return JobSpec(
        "curate",
        args,
        {"curate.yaml": dump_yaml(config)},
        _metadata("curate", config.name, config_hash(config)),
    )


def train_spec(
    recipe: Any,
    output: str,
    *,
    stages: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    catalog: str | None = None,
    tracking_uri: str | None = None,
    placement: str | None = None,
) -> JobSpec:
    """``omniforge train run`` on the cluster with the resolved ``recipe``."""
    refuse_secrets(catalog=catalog, tracking_uri=tracking_uri, output=output)
    refuse_secrets_in(recipe, "recipe")
    args = ["train", "run", "recipe.yaml", "--output", output]
    if stages:
        args += ["--stages", stages]
    if workers is not None:
        args += ["--workers", str(workers)]
    if resume:
        args.append("--resume")
    if placement:
        args += ["--placement", placement]
    args += _common(catalog, tracking_uri)
    return JobSpec(
        "train",
        args,
        {"recipe.yaml": dump_yaml(recipe)},
        _metadata("train", recipe.name, config_hash(recipe)),
    )


def _common(catalog: str | None, tracking_uri: str | None) -> list[str]:
    out = []
    if catalog:
        out += ["--catalog", catalog]
    if tracking_uri:
        out += ["--tracking-uri", tracking_uri]
    return out


def _metadata(kind: str, name: str, digest: str) -> dict[str, str]:
    return {
        "omniforge.kind": kind,
        "omniforge.name": name,
        "omniforge.config_hash": digest,
        "omniforge.code_version": code_version(),
    }


def new_job_id(kind: str) -> str:
    return f"omniforge-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@contextmanager
def staged(spec: JobSpec) -> Iterator[Path]:
    """A temporary working dir holding the job's files (uploaded by ``submit_job``)."""
    folder = Path(tempfile.mkdtemp(prefix="omniforge-job-"))
    try:
        for name, text in spec.files.items():
            (folder / name).write_text(text)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def runtime_env(job_id: str, working_dir: Path, package: bool = True) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "env_vars": {ENV_JOB_ID: job_id, "PYTHONUNBUFFERED": "1"},
        "config": {"setup_timeout_seconds": 1800},
    }
    if package:
        env["py_modules"] = [str(ROOT / p) for p in PACKAGES]
    return env


def submit(
    spec: JobSpec,
    address: str | None = None,
    *,
    package: bool = True,
    job_id: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> str:
    """Submit ``spec``; returns the submission id (also stored on the job's catalog runs)."""
    job_id = job_id or new_job_id(spec.kind)
    jobs = client(address)
    with staged(spec) as folder:
        for attempt in range(AGENT_RETRIES + 1):
            try:
                jobs.submit_job(
                    entrypoint=shlex.join(["omniforge", *spec.args]),
                    submission_id=job_id,
                    runtime_env=runtime_env(job_id, folder, package),
                    metadata=spec.metadata,
                    entrypoint_num_cpus=num_cpus,
                    entrypoint_num_gpus=num_gpus,
                )
                break
            except RuntimeError as e:  # a head that just started has no job agent yet
                if "No available agent" not in str(e) or attempt == AGENT_RETRIES:
                    raise
                time.sleep(2.0)
    return job_id


def wait(
    job_id: str,
    address: str | None = None,
    *,
    timeout: float | None = None,
    poll: float = 1.0,
    on_status: Callable[[str], None] | None = None,
) -> str:
    """Poll until the job ends; returns its final status."""
    jobs = client(address)
    job_info(jobs, job_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status != last and on_status is not None:
            on_status(status)
        last = status
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def follow_logs(job_id: str, address: str | None, write: Callable[[str], None]) -> None:
    """Stream the job's log (secrets in URLs masked) until the job ends."""
    jobs = client(address)
    job_info(jobs, job_id)

    async def run() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(mask_urls(chunk))

    asyncio.run(run())
