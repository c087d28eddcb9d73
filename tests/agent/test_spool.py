"""The agent's SQLite spool: order, acks, size cap, corruption, modes, full disk."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.spool import Spool, read_stats
from fleetmend.v1 import report_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]


def report(sequence: int, padding: int = 0) -> report_pb2.Report:
    message = report_pb2.Report(sequence=sequence, full=sequence == 1)
    message.collect_time.GetCurrentTime()
    message.host.hostname = "spool-test" + "x" * padding
    return message


def test_pending_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    for sequence in (3, 1, 2, 5):
        spool.put(report(sequence))

    everything = [r.sequence for r in spool.pending()]
    after_two = [r.sequence for r in spool.pending(after_sequence=2, limit=1)]

    assert everything == [1, 2, 3, 5]
    assert after_two == [3]
    assert spool.pending()[0].report().host.hostname == "spool-test"


def test_acknowledge_removes_covered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    for sequence in range(1, 6):
        spool.put(report(sequence))

    removed = spool.acknowledge(3)

    assert removed == 3
    assert [r.sequence for r in spool.pending()] == [4, 5]
    assert spool.remove([5]) == 1
    assert spool.stats().pending_reports == 1


def test_spool_survives_reopen(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool.db", 1 << 20)
    first.put(report(1))
    first.put(report(2))
    first.close()

    second = Spool(tmp_path / "spool.db", 1 << 20)

    assert [r.sequence for r in second.pending()] == [1, 2]


def test_cap_drops_oldest_routine(tmp_path: Path) -> None:
    size = len(report(1, padding=100).SerializeToString())
    spool = Spool(tmp_path / "spool.db", max_bytes=size * 3 + 60)
    spool.put_remediation(1, b"r" * 50)
    for sequence in range(2, 7):
        spool.put(report(sequence, padding=100))

    kinds = {r.sequence: r.kind for r in spool.pending(kind=None)}

    assert kinds == {1: "remediation", 4: "report", 5: "report", 6: "report"}
    assert spool.stats().dropped_reports == 2


def test_cap_drops_remediation_records_last(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=100)
    spool.put_remediation(1, b"r" * 40)
    spool.put(report(2))
    spool.put_remediation(3, b"r" * 40)
    spool.put_remediation(4, b"r" * 40)

    kinds = {r.sequence: r.kind for r in spool.pending(kind=None)}

    # The routine report goes first, then the oldest remediation record.
    assert kinds == {3: "remediation", 4: "remediation"}
    assert spool.stats().dropped_reports == 2


def test_discard_counts_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 20)
    spool.put_remediation(1, b"r" * 40)
    spool.put_remediation(2, b"r" * 40)

    assert spool.discard(1) is True
    assert spool.discard(1) is False
    assert [r.sequence for r in spool.pending(kind=None)] == [2]
    assert spool.dropped_pending() == 1


def test_remediation_flood_bounded(tmp_path: Path) -> None:
    cap = 1 << 20
    spool = Spool(tmp_path / "spool.db", max_bytes=cap)
    for sequence in range(1, 41):
        spool.put_remediation(sequence, b"r" * (100 * 1024))

    stats = spool.stats()

    assert stats.stored_bytes <= cap
    assert stats.pending_remediations == 10
    assert stats.dropped_reports == 30
    assert [r.sequence for r in spool.pending(kind=None)][0] == 31


def test_dropped_count_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    size = len(report(1).SerializeToString())
    spool = Spool(path, max_bytes=size * 2)
    for sequence in range(1, 5):
        spool.put(report(sequence))
    spool.close()

    reopened = Spool(path, max_bytes=size * 2)
    carrier = report(5)
    reopened.remove([3, 4])
    reopened.put(carrier, carry_dropped=True)

    assert carrier.dropped_reports == 2
    assert reopened.dropped_pending() == 0
    assert reopened.stats().dropped_reports == 2
    assert reopened.pending()[0].report().dropped_reports == 2
    reopened.remove([5])
    assert reopened.stats().dropped_reports == 0


def test_garbage_file_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not an SQLite database\x00" * 200)

    spool = Spool(path, 1 << 20)
    spool.put(report(1))

    moved = list(tmp_path.glob("spool.db.corrupt-*Z"))
    assert len(moved) == 1
    assert moved[0].read_bytes().startswith(b"this is not")
    assert [r.sequence for r in spool.pending()] == [1]
    assert "is corrupt" in caplog.text
    assert str(moved[0]) in caplog.text


def test_truncated_spool_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1 << 24)
    for sequence in range(1, 400):
        spool.put(report(sequence, padding=200))
    spool.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)

    fresh = Spool(path, 1 << 24)

    assert len(list(tmp_path.glob("spool.db.corrupt-*Z"))) == 1
    assert fresh.stats().pending_reports == 0


def test_spool_file_mode(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    spool.put(report(1))

    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"


def test_spool_unreadable_by_other_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    spool.put(report(1))
    os.chmod(tmp_path, 0o755)  # noqa: S103 - let the other user reach the folder

    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            str(spool.path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "Permission denied" in result.stderr


def test_read_stats_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    assert read_stats(path, 1 << 20) is None
    spool = Spool(path, 1 << 20)
    spool.put(report(1))

    stats = read_stats(path, 1 << 20)

    assert stats is not None
    assert stats.pending_reports == 1
    assert not list(tmp_path.glob("*.corrupt-*"))


# Runs inside a private mount namespace with a 256 KiB tmpfs at argv[1]: fill
# the disk, spool reports, free the space, and print what the spool did.
FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    from agent.spool import Spool
    from fleetmend.v1 import report_pb2

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    root = Path(sys.argv[1])
    spool = Spool(root / "spool.db", 1 << 20)
    filler = root / "filler"
    try:
        with filler.open("wb") as handle:
            while True:
                handle.write(b"x" * 4096)
                handle.flush()
    except OSError:
        pass
    for sequence in range(1, 21):
        report = report_pb2.Report(sequence=sequence)
        report.host.hostname = "h" * 300
        spool.put(report)
    print("full", spool.stats().unspooled, len(spool.pending(limit=100)))
    filler.unlink()
    written = spool.retry_unspooled()
    stats = spool.stats()
    print("freed", written, stats.unspooled, stats.pending_reports)
    """
)


def test_full_disk_keeps_reports(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private tmpfs")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT, encoding="utf-8")
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", "/mnt"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"this machine forbids a tmpfs mount: {probe.stderr.strip()}")

    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs -o size=256k tmpfs "$1" && exec "$2" "$3" "$1"',
            "sh",
            str(mount_point),
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    full = lines[0].split()
    freed = lines[1].split()
    assert int(full[1]) > 0, result.stdout
    assert full[2] == "20"
    assert freed[2:] == ["0", "20"]
    assert "the disk is full" in result.stderr
    assert result.stderr.count("the disk is full") == 1
    assert "writable again" in result.stderr
