"""Catalog database plumbing: URL, engine (SQLite locking), migrations, code version."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

ENV_URL = "OMNIFORGE_CATALOG_URL"
ENV_HOME = "OMNIFORGE_HOME"


class CatalogError(RuntimeError):
    pass


class NotFound(CatalogError):
    pass


def default_url() -> str:
    """``OMNIFORGE_CATALOG_URL`` (or the secret file named by ``OMNIFORGE_CATALOG_URL_FILE``:
    the URL may hold a database password), else a SQLite file under ``OMNIFORGE_HOME``."""
    from core.secrets import read_secret

    url = read_secret(ENV_URL)
    if url:
        return url
    home = Path(os.environ.get(ENV_HOME) or Path.home() / ".omniforge")
    return f"sqlite:///{home / 'catalog.db'}"


def code_version() -> str:
    """git commit of the code (``+dirty`` when modified), else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omniforge")
    except PackageNotFoundError:
        return "unknown"


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///FILE`` URL (None for other databases and memory)."""
    if not url.startswith("sqlite"):
        return None
    db_path = url.split(":///", 1)[-1].split("?", 1)[0]
    if not db_path or db_path == ":memory:" or "://" in db_path:
        return None
    return Path(db_path)


def require_existing(url: str) -> None:
    """Read-only commands open a catalog that exists: opening a missing SQLite file would
    create it (and its folder), leaving an empty catalog behind a typo."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise NotFound(
            f"no catalog at {path}: nothing has been curated or registered there yet "
            "(`omniforge demo` or `omniforge curate run` create it); pass --catalog with the "
            "path or URL of an existing catalog"
        )


WAL_ATTEMPTS = 100  # about a minute of retries at most


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        db_path = url.split(":///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):  # pragma: no cover - exercised through every test
            dbapi_conn.isolation_level = None  # SQLAlchemy's BEGIN below, not pysqlite's
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=60000")
            _use_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # one writer at a time; readers of WAL are not blocked by it
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _use_wal(cur) -> None:
    """Switch a SQLite file to WAL (persistent: done once by whoever opens it first).

    Changing the journal mode needs an exclusive lock and SQLite answers "database is
    locked" at once, without its busy handler, while another connection holds a lock (two
    processes opening a new catalog together): read the mode first, and retry the switch."""
    for attempt in range(WAL_ATTEMPTS):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == WAL_ATTEMPTS - 1:
                raise
            time.sleep(min(1.0, 0.05 * (attempt + 1)))  # back off; the other opener finishes


def migrate(engine: Engine) -> str:
    """Upgrade the schema to the newest revision (no-op when current); returns the revision."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return head
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head
