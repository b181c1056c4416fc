"""The libraries' own notices: hidden by default, shown with ``omniforge --verbose``.

Each source is turned down where it is decided, before the library logs, not by redirecting
stderr (a real error still reaches the terminal):

- Ray's "Token authentication is enabled for this Ray cluster" notice on every local
  ``ray.init`` (logger ``ray._private.authentication``; the token itself is ours:
  ``core.secrets.ensure_ray_token``);
- MLflow's INFO lines ("Creating initial MLflow database tables...", artifact repository
  notices): ``MLFLOW_LOGGING_LEVEL``, which MLflow reads when it configures its logger, in the
  environment so the processes this one starts (Ray's workers, job drivers) inherit it;
- Alembic's migration INFO lines ("Context impl SQLiteImpl.", "Running upgrade ...") from the
  catalog's and MLflow's schema migrations (logger ``alembic``);
- DeepSpeed's "Setting accelerator to CPU" warning when it is imported on a machine without
  a GPU (a filter on its logger for that module's records only).

``--verbose`` leaves every library at its own default and sets ``OMNIFORGE_VERBOSE=1`` for
the processes started from here.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "OMNIFORGE_VERBOSE"
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"
_OURS = "WARNING"
QUIET_LOGGERS = {
    "ray._private.authentication": logging.ERROR,
    "alembic": logging.WARNING,
    "mlflow": logging.WARNING,
}


class _AcceleratorNotice(logging.Filter):
    """DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." warning on import (its
    logger's level is reset by DeepSpeed when it is imported; a filter stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or record.filename != "real_accelerator.py"


_DEEPSPEED_FILTER = _AcceleratorNotice()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_libraries(verbose_: bool = False) -> None:
    """Turn the libraries' notices down unless ``verbose_`` (or ``OMNIFORGE_VERBOSE=1``); a
    later call with ``verbose_`` (a subcommand's own ``--verbose``) turns them back up."""
    if verbose_:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        if os.environ.get(MLFLOW_LEVEL_ENV) == _OURS:
            del os.environ[MLFLOW_LEVEL_ENV]
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    os.environ.setdefault(MLFLOW_LEVEL_ENV, _OURS)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("DeepSpeed").addFilter(
        _DEEPSPEED_FILTER
    )  # added once (Filterer skips a known one)
