"""Alembic environment for the catalog. Run through ``catalog.store.migrate`` (no alembic.ini).

The connection is passed in by the caller (``config.attributes["connection"]``), so the
migration runs inside the caller's transaction: on SQLite that transaction starts with
BEGIN IMMEDIATE, on PostgreSQL it takes an advisory lock, so concurrent first opens serialise.
"""

from alembic import context
from sqlalchemy import text

from catalog.models import Base

MIGRATION_LOCK_ID = 7_310_512_001  # arbitrary, fixed: pg advisory lock for migrations


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"))
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; use `omniforge catalog migrate`")
run_migrations_online()
