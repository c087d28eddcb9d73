"""A TLS collector process set up as an IT admin would, and the agent and CLI."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import BIN_DIR
from tests.trust import channel_to, remember_secret


@dataclass
class Collector:
    address: str
    database_url: str
    tls_dir: Path
    admin_token_file: Path
    process: subprocess.Popen[bytes]


def wait_serving(address: str, tls_dir: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    with channel_to(address, tls_dir) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, "collector exited during start"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError(f"collector on {address} did not start serving")


def run_checked(*command: str) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def agent_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    config = tmp_path / "agent.toml"
    # No DNS look-ups of catalog hosts: tests send nothing beyond loopback.
    config.write_text(
        "[usage]\nresolve_hosts = false\n[intervals]\nreport_min = 1\n",
        encoding="utf-8",
    )
    env["FLEETMEND_CONFIG"] = str(config)
    # The node key goes to a file in the state folder, not to a keyring of the
    # machine that runs the tests.
    env["FLEETMEND_KEY_STORE"] = "file"
    # The self-healing rules would add reports of their own to the counted
    # sequences; tests/e2e/test_self_healing.py turns them on.
    env["FLEETMEND_HEALING_ENABLED"] = "false"
    env.pop("FLEETMEND_COLLECTOR", None)
    return env


def enroll_agent(collector: Collector, tmp_path: Path) -> None:
    """Enroll the agent of tmp_path as an installer would."""
    result = subprocess.run(
        [
            str(BIN_DIR / "fleetmend-agent"),
            "enroll",
            "--collector",
            collector.address,
            "--ca-file",
            str(collector.tls_dir / "ca.pem"),
            "--secret-file",
            str(collector.tls_dir / "enrollment-secret"),
            "--state-dir",
            str(tmp_path / "agent"),
        ],
        env=agent_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    key = (tmp_path / "agent" / "node-key").read_text(encoding="utf-8").strip()
    remember_secret(key)


def agent_command(state_dir: Path, *extra: str) -> list[str]:
    """Return `fleetmend-agent run`, which takes the collector from enrollment."""
    return [
        str(BIN_DIR / "fleetmend-agent"),
        "run",
        "--state-dir",
        str(state_dir),
        *extra,
    ]


def cli(collector: Collector, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN_DIR / "fleetmend"),
            "--collector",
            collector.address,
            "--ca-file",
            str(collector.tls_dir / "ca.pem"),
            "--token-file",
            str(collector.admin_token_file),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
