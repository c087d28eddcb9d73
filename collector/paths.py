"""Default locations of the collector's data."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "fleetmend-collector"
SYSTEM_DATA_DIR = Path("/var/lib/fleetmend-collector")
DATABASE_FILENAME = "collector.db"


def running_as_root() -> bool:
    """Return True for a POSIX process with effective user id 0.

    Windows has no effective user id, so this is always False there.
    """
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


def default_data_dir(*, as_root: bool | None = None) -> Path:
    """Return the data directory: the system one for root, else the user's.

    as_root defaults to whether this process runs as root.
    """
    if as_root is None:
        as_root = running_as_root()
    if as_root:
        return SYSTEM_DATA_DIR
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_database_url(*, as_root: bool | None = None) -> str:
    """Return the SQLAlchemy URL of the SQLite file in the default data directory."""
    path = default_data_dir(as_root=as_root) / DATABASE_FILENAME
    return f"sqlite:///{path.as_posix()}"
