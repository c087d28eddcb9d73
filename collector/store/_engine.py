"""Engines for the two supported databases: SQLite files and PostgreSQL."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from collector.store._model import StoreError

logger = logging.getLogger(__name__)

# How long a SQLite connection waits for another writer before it fails with
# "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

# How long a PostgreSQL connection attempt may take, in seconds.
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10

# Connection execution option that makes SQLite start the transaction with
# BEGIN IMMEDIATE, which takes the write lock up front. A transaction that reads
# first and writes later could otherwise fail with SQLITE_BUSY when another
# connection committed in between, without waiting for busy_timeout.
WRITE_OPTION = "fleetmend_write"

_SUPPORTED_URLS = "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DATABASE"

# user:password@ in a URL that make_url could not parse.
_PASSWORD_IN_URL = re.compile(r"(://[^/:@]*:)[^/@]*@")


def redact_url(url: str) -> str:
    """Return url with its password replaced by ***, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return _PASSWORD_IN_URL.sub(r"\1***@", url)


def create_store_engine(url: str) -> Engine:
    """Create an engine for url and check that the database can be reached.

    Raises StoreError for a URL that is invalid or names an unsupported
    database, a SQLite folder that cannot be created, or a database that
    cannot be reached.
    """
    parsed = _parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _create_sqlite_engine(url, parsed)
    else:
        engine = _create_postgres_engine(parsed)

    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except (SQLAlchemyError, sqlite3.Error) as error:
        engine.dispose()
        if parsed.get_backend_name() == "sqlite":
            advice = "check that the file is a SQLite database and is writable"
        else:
            advice = (
                "check that the server is running, the URL is right and its "
                "user may connect"
            )
        raise StoreError(
            f"cannot open database {redact_url(url)}: {describe_error(error)}; {advice}"
        ) from error
    return engine


def describe_error(error: BaseException) -> str:
    """Return the driver's message of a SQLAlchemy error, without SQL or values.

    SQLAlchemy's own message carries the statement and its parameters, which
    may be whole serialized reports.
    """
    original = getattr(error, "orig", None)
    cause = original if original is not None else error
    message = str(cause).strip().splitlines()
    first_line = message[0] if message else ""
    return f"{type(cause).__name__}: {first_line}"


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise StoreError(
            f"invalid database URL {redact_url(url)}; use {_SUPPORTED_URLS}"
        ) from error

    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise StoreError(
            f"unsupported database URL {redact_url(url)}: "
            f"driver {parsed.drivername!r}; use {_SUPPORTED_URLS}"
        )
    return parsed


def _create_sqlite_engine(url: str, parsed: URL) -> Engine:
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise StoreError(
            f"unsupported SQLite URL {redact_url(url)}: the store needs a "
            "database file, so use sqlite:///PATH"
        )

    path = Path(database).expanduser()
    _prepare_sqlite_file(url, path)
    engine = create_engine(parsed.set(database=str(path)))
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _prepare_sqlite_file(url: str, path: Path) -> None:
    """Create the database's folder (mode 0700) and file (mode 0600) if missing.

    SQLite creates the -wal and -shm files with the permissions of the
    database file. Existing folders and files keep their permissions.
    """
    folder = path.parent
    try:
        if not folder.exists():
            folder.mkdir(parents=True, mode=0o700)
            # mkdir applies the umask; the folder of device data stays private.
            folder.chmod(0o700)
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(descriptor)
    except OSError as error:
        raise StoreError(
            f"cannot create SQLite database {path} for {redact_url(url)}: {error}"
        ) from error


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _begin_sqlite_transaction), so the
    # sqlite3 module must not start transactions of its own.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        (journal_mode,) = cursor.fetchone()
        if str(journal_mode).lower() != "wal":
            logger.warning(
                "SQLite kept journal mode %s instead of WAL; concurrent readers "
                "will block writers",
                journal_mode,
            )
        # FULL syncs the WAL at every commit. NORMAL would be faster but can lose
        # the last commits on a power loss, after the agents have dropped those
        # reports because they were acknowledged. Batched ingest keeps the cost
        # to one sync per batch.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    if connection.get_execution_options().get(WRITE_OPTION):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def _create_postgres_engine(parsed: URL) -> Engine:
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_SECONDS
    if "application_name" not in parsed.query:
        connect_args["application_name"] = "fleetmend-collector"
    # pool_pre_ping replaces connections that a server restart closed.
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
