"""``omniforge``: one CLI for data engineers and ML engineers.

Commands that users can get wrong (a config field, a dataset name, a filter) print one clear
message and exit with status 2; a traceback is shown only for bugs (or with OMNIFORGE_DEBUG=1).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import typer
from rich.text import Text

from catalog.filters import FilterError
from catalog.schema import SchemaError
from catalog.store import CatalogError
from core.cluster import ClusterUnreachable
from core.config import ConfigError, ConfigWarning
from core.weights import MissingWeights, WeightsError
from curation.engine import CurationAborted
from curation.output import OutputBusy
from curation.sink import OutputError
from orchestration import (
    catalog_cmd,
    cluster_cmd,
    config_cmd,
    curate_cmd,
    doctor_cmd,
    jobs_cmd,
    mlflow_cmd,
    plan_cmd,
    postgres_cmd,
    s3_cmd,
    train_cmd,
)
from orchestration.common import console, err_console
from orchestration.jobs import JobError
from orchestration.quiet import quiet_libraries
from orchestration.services import ServiceError

app = typer.Typer(
    name="omniforge",
    help="Curate image/video/edit corpora into shards and train unified video models on them.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(catalog_cmd.app, name="catalog")
app.add_typer(curate_cmd.app, name="curate")
app.add_typer(train_cmd.app, name="train")
app.add_typer(cluster_cmd.app, name="cluster")
app.add_typer(jobs_cmd.submit_app, name="submit")
app.add_typer(jobs_cmd.jobs_app, name="jobs")
app.add_typer(mlflow_cmd.app, name="mlflow")
app.add_typer(plan_cmd.app, name="plan")
app.add_typer(s3_cmd.app, name="s3")
app.add_typer(postgres_cmd.app, name="postgres")
app.command("doctor")(doctor_cmd.doctor)


def _version(value: bool) -> None:
    if value:
        console.print(f"omniforge {package_version()}", markup=False)
        raise typer.Exit()


def package_version() -> str:
    """The installed package's version, with the checkout's git commit when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    from catalog.db import code_version

    try:
        installed = version("omniforge")
    except PackageNotFoundError:
        installed = "unknown"
    commit = code_version()
    return installed if commit == installed else f"{installed} ({commit})"


@app.callback()
def main_options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="show the libraries' own notices and logs (Ray, MLflow, DeepSpeed); hidden by default",
    ),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="print the version and exit",
    ),
) -> None:
    """Curate image/video/edit corpora into shards and train unified video models on them."""
    quiet_libraries(verbose)


USER_ERRORS = (
    ClusterUnreachable,
    ConfigError,
    CatalogError,
    FilterError,
    SchemaError,
    MissingWeights,
    WeightsError,
    ServiceError,
    JobError,
    FileNotFoundError,
    ValueError,
    CurationAborted,
    OutputBusy,
    OutputError,
)


@app.command("sample-data")
def sample_data(
    out: Path = typer.Argument(..., help="directory to write the corpus into"),
    seed: int = typer.Option(0, help="same seed, same bytes"),
) -> None:
    """Write the deterministic synthetic corpus (images, videos, edit pairs, corrupt files)."""
    from curation.sample_data import generate

    labels = generate(out, seed=seed)
    kinds: dict[str, int] = {}
    for label in labels:
        kinds[label["kind"]] = kinds.get(label["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    console.print(
        f"wrote {len(labels)} labelled items to {out} ({summary}); truth in {out / 'labels.jsonl'}"
    )


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_out"), help="everything the demo writes goes here"),
    catalog: str | None = typer.Option(
        None, help="catalog URL or SQLite file path (default: a SQLite file inside --output)"
    ),
    tracking_uri: str | None = typer.Option(
        None, help="MLflow tracking URI (default: a SQLite store inside --output)"
    ),
) -> None:
    """The main job on embedded defaults: sample corpus -> curation -> catalog + MLflow."""
    from orchestration.demo import run_demo

    run_demo(output, catalog, tracking_uri)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one readable line and exit status 2."""
    warnings.simplefilter("default", ConfigWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    signal.signal(signal.SIGTERM, _terminate)  # `jobs cancel`, `kill`: clean up like Ctrl-C
    try:
        # Without standalone mode typer returns (not raises) the code of `raise typer.Exit(n)`.
        code = app(args=argv, standalone_mode=False)
    except USER_ERRORS as e:
        if os.environ.get("OMNIFORGE_DEBUG"):
            raise
        # the message as text: brackets in it ([ENOSPC], a file name) are not markup
        err_console.print(Text.assemble(("error:", "bold red"), f" {e}"), highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        if isinstance(e, _click_errors()):
            e.show()
            sys.exit(e.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_errors() -> tuple[type[Exception], ...]:
    """Usage errors: typer >= 0.20 raises its vendored click's exceptions, older typer click's."""
    import click

    errors: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        pass
    else:
        errors.append(ClickException)
    return tuple(errors)
