"""A real collector process, a real agent process on this machine, and the CLI.

The collector serves TLS with a folder made by `fleetmend-collector init`, the
agent enrolls with the enrollment secret and then runs without flags, and the
CLI uses an admin token made by `fleetmend-collector token create`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from collector.store import Store
from tests.e2e.harness import (
    Collector,
    agent_command,
    agent_env,
    cli,
    enroll_agent,
)


def run_agent(collector: Collector, tmp_path: Path, reports: int) -> None:
    if not (tmp_path / "agent" / "enrollment.json").exists():
        enroll_agent(collector, tmp_path)
    result = subprocess.run(
        agent_command(tmp_path / "agent", "--exit-after", str(reports)),
        env=agent_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def stored_sequences(collector: Collector) -> tuple[int, int]:
    """Return the stored report count and highest committed sequence of the device."""
    store = Store.open(collector.database_url)
    try:
        devices = store.list_devices(limit=10)
        assert len(devices) == 1
        device_id = devices[0].device_id
        return store.count_reports(device_id), store.committed_sequence(device_id)
    finally:
        store.close()


def issued_sequences(state_dir: Path) -> int:
    identity = json.loads((state_dir / "identity.json").read_text(encoding="utf-8"))
    return int(identity["next_sequence"]) - 1


def test_this_machine_reaches_operators(collector: Collector, tmp_path: Path) -> None:
    run_agent(collector, tmp_path, reports=2)

    devices = cli(collector, "--json", "devices")
    shown = cli(collector, "--json", "device", "show", socket.gethostname())

    assert devices.returncode == 0, devices.stderr
    listed = json.loads(devices.stdout)
    assert [d["hostname"] for d in listed["devices"]] == [socket.gethostname()]
    assert shown.returncode == 0, shown.stderr
    device = json.loads(shown.stdout)["device"]
    assert device["host"]["kernel_version"] == os.uname().release
    assert any(v["mount_point"] == "/" for v in device["host"]["volumes"])
    assert "disks" in device
    assert device["committed_sequence"] == "2"


def test_table_output_names_host(collector: Collector, tmp_path: Path) -> None:
    run_agent(collector, tmp_path, reports=2)

    devices = cli(collector, "devices")
    shown = cli(collector, "device", "show", socket.gethostname())

    assert devices.returncode == 0, devices.stderr
    assert socket.gethostname() in devices.stdout
    assert shown.returncode == 0, shown.stderr
    assert os.uname().release in shown.stdout


def test_restart_loses_and_repeats_nothing(
    collector: Collector, tmp_path: Path
) -> None:
    run_agent(collector, tmp_path, reports=2)
    run_agent(collector, tmp_path, reports=2)

    count, committed = stored_sequences(collector)

    assert issued_sequences(tmp_path / "agent") == 4
    assert count == 4
    assert committed == 4


def test_sigterm_flushes_before_exit(collector: Collector, tmp_path: Path) -> None:
    enroll_agent(collector, tmp_path)
    process = subprocess.Popen(
        agent_command(tmp_path / "agent"),
        env=agent_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        identity = tmp_path / "agent" / "identity.json"
        if identity.exists() and issued_sequences(tmp_path / "agent") >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)

    count, committed = stored_sequences(collector)

    assert process.returncode == 0, stderr
    assert count == issued_sequences(tmp_path / "agent")
    assert committed == count


def test_revoked_device_is_refused(collector: Collector, tmp_path: Path) -> None:
    run_agent(collector, tmp_path, reports=1)
    count_before, _ = stored_sequences(collector)
    device_id = json.loads(
        (tmp_path / "agent" / "identity.json").read_text(encoding="utf-8")
    )["device_id"]

    revoked = cli(collector, "device", "revoke", device_id)
    log_path = tmp_path / "agent-after-revoke.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            agent_command(tmp_path / "agent", "--log-level", "info"),
            env=agent_env(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "rejected this device's node key" in log_path.read_text("utf-8"):
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    audit = cli(collector, "--json", "audit")

    assert revoked.returncode == 0, revoked.stderr
    assert "rejected this device's node key" in log_path.read_text("utf-8")
    count_after, _ = stored_sequences(collector)
    assert count_after == count_before
    assert audit.returncode == 0, audit.stderr
    events = json.loads(audit.stdout)["events"]
    assert [e["action"] for e in events if e["actor"] == "e2e-admin"] == [
        "RevokeDevice"
    ]
