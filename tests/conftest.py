"""Shared test helpers: free loopback ports, the installed console scripts, the
session log that the secret leak check reads."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_DIR = Path(sys.executable).parent

# Every log record of the agent and collector code that runs in the test
# process goes to this file in the session's base temporary folder, at DEBUG.
SESSION_LOG_NAME = "fleetmend-session.log"
# Test modules that read what the rest of the session wrote, so they run last.
RUN_LAST_MODULES = ("test_secret_leaks.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests of RUN_LAST_MODULES behind all others."""
    last = [item for item in items if item.path.name in RUN_LAST_MODULES]
    if last:
        others = [item for item in items if item.path.name not in RUN_LAST_MODULES]
        items[:] = others + last


@pytest.fixture(scope="session", autouse=True)
def session_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Write every agent and collector log record of the session to one file."""
    path = tmp_path_factory.getbasetemp() / SESSION_LOG_NAME
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    loggers = [logging.getLogger(name) for name in ("agent", "collector")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def bin_dir() -> Path:
    """Folder of the fleetmend, fleetmend-agent and fleetmend-collector scripts."""
    return BIN_DIR


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """A TLS folder with a CA, a certificate for 127.0.0.1 and an enrollment secret."""
    from tests.trust import make_tls_dir

    return make_tls_dir(tmp_path / "tls")
