"""One run's life, the same for curation, training stages and plans: started (or resumed),
then succeeded, or failed with a one-line message; its MLflow run, when it has one, ends the
same way.

    with run_lifecycle(catalog, "curation", name, params=...) as run:
        ...                      # work; run.id is the catalog run, run.note(text) records a note
        run.mlflow_run_id = ...  # linked when known; ended with the catalog run
    # left normally: succeeded; an exception: failed, message = failure_message(error)

``resume=<run id>`` puts an interrupted run back to ``running`` (message "resumed") instead of
starting a new one. ``run.stay_running()`` leaves the run running on a normal exit (a stage
stopped on purpose, to be resumed). The MLflow run is ended through ``core.tracking``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from core import tracking

logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters of a failed run's message


def failure_message(error: BaseException) -> str:
    """What a failed run records: a ``ValueError`` (our user-facing errors: configs, data,
    checkpoints) by its own message, the one line the CLI prints; anything else with its type
    name first, since the message alone may not say what happened."""
    if isinstance(error, KeyboardInterrupt):
        text = "interrupted"
    elif isinstance(error, ValueError) and str(error):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}".rstrip(": ")
    return tracking.truncate(text, MESSAGE_LIMIT)


@dataclass
class RunHandle:
    catalog: Any
    id: int | None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    finish: bool = True

    def note(self, message: str) -> None:
        """A message on the run while it goes on (a resume point, a warning)."""
        if self.id is not None:
            self.catalog.update_run(self.id, message=message)

    def stay_running(self) -> None:
        """Leave the run ``running`` on a normal exit: it stopped on purpose and resumes later."""
        self.finish = False

    def _end(self, status: str, message: str | None = None) -> None:
        if self.tracking_uri and self.mlflow_run_id:
            tracking.finish_run(
                self.tracking_uri,
                self.mlflow_run_id,
                "FINISHED" if status == "succeeded" else "FAILED",
            )
        if self.id is not None:
            changes: dict[str, Any] = {"status": status}
            if message is not None:
                changes["message"] = message
            if self.mlflow_run_id:
                changes["mlflow_run_id"] = self.mlflow_run_id
            self.catalog.update_run(self.id, **changes)


@contextmanager
def run_lifecycle(
    catalog: Any,
    kind: str,
    name: str,
    *,
    resume: int | None = None,
    params: dict[str, Any] | None = None,
    config_hash: str | None = None,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> Iterator[RunHandle]:
    """Start (or resume) a catalog run of ``kind`` and end it with the block (see the module
    docstring). ``catalog`` None runs the block untracked (a handle whose ``id`` is None)."""
    run_id = None
    if catalog is not None:
        if resume is not None:
            catalog.update_run(resume, status="running", message="resumed")
            run_id = resume
        else:
            run_id = catalog.start_run(
                kind, name, config_hash=config_hash, params=params, mlflow_run_id=mlflow_run_id
            )
    run = RunHandle(catalog, run_id, tracking_uri, mlflow_run_id)
    try:
        yield run
    except BaseException as e:
        try:
            run._end("failed", failure_message(e))
        except Exception as end_error:  # the first error is the one to see
            logger.warning("could not mark run %s failed: %s", run_id, end_error)
        raise
    if run.finish:
        run._end("succeeded")
