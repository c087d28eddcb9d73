"""Database fixtures: every store test runs on SQLite and on PostgreSQL.

PostgreSQL runs only where FLEETMEND_TEST_POSTGRES_URL names a server, as a
postgresql+psycopg:// URL of a user that may create databases. Each test gets a
database of its own there, named fleetmend_test_<run>_<number>, and drops it
at the end, so parallel runs on one server do not see each other.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from collector.store import Store

POSTGRES_URL_VARIABLE = "FLEETMEND_TEST_POSTGRES_URL"

_RUN_SUFFIX = secrets.token_hex(4)
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server_url() -> URL:
    """Return the URL of the PostgreSQL test server, or skip without one."""
    configured = os.environ.get(POSTGRES_URL_VARIABLE, "")
    if not configured:
        pytest.skip(
            f"{POSTGRES_URL_VARIABLE} is not set; set it to a "
            "postgresql+psycopg:// URL of a user that may create databases"
        )
    return make_url(configured)


@pytest.fixture
def postgres_database_url(postgres_server_url: URL) -> Iterator[str]:
    """Create an empty database on the test server and drop it afterwards."""
    name = f"fleetmend_test_{_RUN_SUFFIX}_{next(_database_numbers)}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield postgres_server_url.set(database=name).render_as_string(
            hide_password=False
        )
        with admin.connect() as connection:
            # FORCE ends connections that a failed test left open.
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the URL of an empty database, once per supported dialect."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/collector/store.db"
    url: str = request.getfixturevalue("postgres_database_url")
    return url


@pytest.fixture
def empty_store(database_url: str) -> Iterator[Store]:
    """Open a store on an empty, unmigrated database."""
    store = Store.open(database_url)
    yield store
    store.close()


@pytest.fixture
def store(empty_store: Store) -> Store:
    """Return a store whose schema is migrated to the latest revision."""
    empty_store.migrate()
    return empty_store
