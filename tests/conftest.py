"""Shared test helpers: free loopback ports and the installed console scripts."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

BIN_DIR = Path(sys.executable).parent


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
