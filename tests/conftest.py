"""Shared test helpers: free loopback ports, the installed console scripts, the
session log that the secret leak check reads."""

from __future__ import annotations

import logging
import os
import socket
import stat
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
def traversable_checkout() -> Iterator[None]:
    """Let other users pass through the folders above the checkout during the session.

    Tests that check file permissions run project code as an unprivileged
    user (setpriv to uid 65534) with this checkout's virtual environment. A
    checkout inside a private folder, such as one made by mktemp -d, keeps
    that user out of the interpreter itself. As root, this adds search
    permission (o+x, not read) to each such folder for the session and puts
    the old modes back at the end.
    """
    changed: list[tuple[Path, int]] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        for folder in Path(sys.prefix).resolve().parents:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((folder, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for folder, mode in changed:
            folder.chmod(mode)


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
