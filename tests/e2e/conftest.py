"""The end-to-end fixture: a collector process on loopback, over TLS."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN_DIR, free_port
from tests.e2e.harness import Collector, run_checked, wait_serving
from tests.trust import enrollment_secret, remember_secret


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A TLS collector set up as an IT admin would: init, a token, serve."""
    address = f"127.0.0.1:{free_port()}"
    database_url = f"sqlite:///{tmp_path / 'collector.db'}"
    tls_dir = tmp_path / "tls"
    token_file = tmp_path / "admin-token"
    collector_bin = str(BIN_DIR / "fleetmend-collector")
    run_checked(collector_bin, "init", "--dir", str(tls_dir), "--name", "127.0.0.1")
    enrollment_secret(tls_dir)
    run_checked(
        collector_bin,
        "token",
        "create",
        "--role",
        "admin",
        "--name",
        "e2e-admin",
        "--database",
        database_url,
        "--output",
        str(token_file),
    )
    remember_secret(token_file.read_text(encoding="utf-8").strip())
    log = (tmp_path / "collector.log").open("wb")
    process = subprocess.Popen(
        [
            collector_bin,
            "serve",
            "--listen",
            address,
            "--database",
            database_url,
            "--tls-dir",
            str(tls_dir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_serving(address, tls_dir, process)
        yield Collector(address, database_url, tls_dir, token_file, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        log.close()
