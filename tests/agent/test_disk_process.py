"""The disk section read in a child process, with the fake smartctl on PATH."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sections import DiskProcessError, read_disks
from agent.wire.disk import disks_to_proto
from fleetmend.v1 import report_pb2
from tests.fakes.smartctl_replay import (
    MIXED_CASES,
    build_sysfs_tree,
    load_sysfs_spec,
    read_call_log,
    replay_environment,
    scan_with_replay,
)


def write_fake_python(path: Path, body: str) -> str:
    """Write an executable shell script to run in place of the Python interpreter."""
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


def test_child_section_matches_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), tmp_path / "sys")
    in_process = scan_with_replay(sys_root, MIXED_CASES, tmp_path)
    expected = disks_to_proto(in_process.scan)

    child_log = tmp_path / "child.jsonl"
    for name, value in replay_environment(MIXED_CASES, child_log).items():
        monkeypatch.setenv(name, value)
    section = read_disks(sys_root=sys_root)

    assert isinstance(section, report_pb2.DiskSection)
    assert len(section.disks) == len(in_process.scan.disks)
    assert section == expected
    assert len(read_call_log(child_log)) == len(in_process.calls)


def test_agent_process_keeps_pysmart_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importing pySMART sets LANG=C for its process, so a fresh interpreter
    # that reads the section must still have its own LANG and no pySMART.
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), tmp_path / "sys")
    for name, value in replay_environment(MIXED_CASES, tmp_path / "c.jsonl").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from agent.sections import read_disks\n"
        f"section = read_disks(sys_root=Path({str(sys_root)!r}))\n"
        "print(len(section.disks), os.environ['LANG'], 'pySMART' in sys.modules)\n"
    )

    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )

    assert completed.returncode == 0, completed.stderr
    disks, lang, loaded = completed.stdout.split()
    assert int(disks) > 0
    assert lang == "de_DE.UTF-8"
    assert loaded == "False"


def test_child_warnings_logged_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), tmp_path / "sys")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    with caplog.at_level(logging.WARNING, logger="agent.probes"):
        section = read_disks(sys_root=sys_root, python=sys.executable)

    messages = [
        record.getMessage()
        for record in caplog.records
        if record.name == "agent.probes.disk"
    ]
    assert "cannot read SMART data: smartctl was not found on PATH" in messages[0]
    assert all(
        disk.smart_state == report_pb2.SMART_STATE_SMARTCTL_MISSING
        for disk in section.disks
    )
    assert len(section.errors) >= 1


def test_child_failure_names_status(tmp_path: Path) -> None:
    error = "ModuleNotFoundError: No module named 'pySMART'"
    python = write_fake_python(tmp_path / "python", f'echo "{error}" >&2\nexit 3')

    with pytest.raises(DiskProcessError) as raised:
        read_disks(python=python)

    message = str(raised.value)
    assert "exited with status 3" in message
    assert error in message


def test_child_garbage_output_rejected(tmp_path: Path) -> None:
    python = write_fake_python(tmp_path / "python", "echo 'not json'")

    with pytest.raises(DiskProcessError) as raised:
        read_disks(python=python)

    assert "printed no valid section" in str(raised.value)
    assert "b'not json" in str(raised.value)


def test_child_timeout_kills_it(tmp_path: Path) -> None:
    python = write_fake_python(tmp_path / "python", "exec sleep 60")

    with pytest.raises(DiskProcessError) as raised:
        read_disks(python=python, timeout_seconds=0.5)

    assert "did not finish within 0.5 s and was killed" in str(raised.value)


def test_child_not_startable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-python")

    with pytest.raises(DiskProcessError) as raised:
        read_disks(python=missing)

    assert f"could not be started with {missing}" in str(raised.value)
