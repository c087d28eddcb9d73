"""Alembic revisions of the store: which are applied, which are pending."""

from __future__ import annotations

import logging

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from collector.migrations import alembic_config
from collector.store._model import StoreError

logger = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serializes collectors migrating the
# same database at the same time (the bytes of "fmmigrat").
_POSTGRES_MIGRATION_LOCK = 0x666D6D6967726174


def pending_revisions(connection: Connection) -> list[str]:
    """Return the revisions not yet applied on connection, oldest first.

    Raises StoreError when the database is at a revision that these migrations
    do not contain, which happens after a newer collector migrated it.
    """
    script = ScriptDirectory.from_config(alembic_config())
    known = {revision.revision for revision in script.walk_revisions()}
    current = MigrationContext.configure(connection).get_current_heads()

    unknown = [revision for revision in current if revision not in known]
    if unknown:
        raise StoreError(
            f"the database is at revision {', '.join(unknown)}, which this "
            "collector does not know; a newer collector has migrated it, so run "
            "that version (or restore a backup taken before its migration)"
        )

    applied: set[str] = set()
    for head in current:
        for revision in script.iterate_revisions(head, "base"):
            applied.add(revision.revision)

    oldest_first = reversed(list(script.walk_revisions()))
    return [rev.revision for rev in oldest_first if rev.revision not in applied]


def upgrade(connection: Connection) -> list[str]:
    """Apply the pending revisions inside connection's transaction.

    Returns the revisions applied, oldest first.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": _POSTGRES_MIGRATION_LOCK},
        )

    pending = pending_revisions(connection)
    if not pending:
        return []

    command.upgrade(alembic_config(connection), "heads")
    for revision in pending:
        logger.info("applied store migration %s", revision)
    return pending
