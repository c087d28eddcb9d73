"""Alembic environment: runs the migrations on the connection the store passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from collector.store._schema import metadata


def run_migrations(connection: Connection) -> None:
    # render_as_batch lets later migrations alter tables on SQLite, which
    # supports few forms of ALTER TABLE.
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    # Offline (--sql) mode prints the SQL for the dialect of the configured URL.
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    configured_connection = context.config.attributes.get("connection")
    if configured_connection is None:
        raise RuntimeError(
            "no database connection: run the migrations through "
            "collector.store.Store.migrate(), or pass a connection to "
            "collector.migrations.alembic_config()"
        )
    run_migrations(configured_connection)
