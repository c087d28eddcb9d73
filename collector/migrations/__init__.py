"""Alembic migrations of the collector's store.

No alembic.ini is needed: alembic_config() builds the configuration in code,
with the script location set to this package's folder, so the migrations also
run from an installed package. A new revision is made with, for example::

    from alembic import command
    from collector.migrations import alembic_config

    command.revision(alembic_config(), message="add trips")
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import Connection

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None) -> Config:
    """Return an Alembic configuration for these migrations.

    With a connection, env.py runs the migrations on it, inside its current
    transaction; without one, only commands that need no database work.
    """
    config = Config()
    # Config values go through configparser interpolation, so "%" is doubled.
    config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    config.set_main_option("version_path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config
