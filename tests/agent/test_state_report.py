"""Device identity persistence and full/delta report assembly."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import clock as clock_module
from agent.report import ReportBuilder
from agent.state import Identity, StateError, StateStore, write_private
from fleetmend.v1 import report_pb2

FIXED_TIME = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def make_builder(state_dir: Path) -> tuple[StateStore, ReportBuilder]:
    store = StateStore(state_dir)
    return store, ReportBuilder(store, store.load_or_create(), clock=lambda: FIXED_TIME)


def host(name: str = "laptop-1") -> report_pb2.HostFacts:
    return report_pb2.HostFacts(hostname=name, os_name="Debian GNU/Linux")


def test_identity_created_once(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "state").load_or_create()
    second = StateStore(tmp_path / "state").load_or_create()

    assert uuid.UUID(first.device_id)
    assert second.device_id == first.device_id
    assert second.next_sequence == 1


def test_identity_file_modes(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.load_or_create()

    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.state_dir).st_mode) == 0o700


def test_identity_unreadable_by_other_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    store = StateStore(tmp_path / "state")
    store.load_or_create()
    os.chmod(tmp_path, 0o755)  # noqa: S103 - let the other user reach the folder

    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            str(store.path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "Permission denied" in result.stderr


def run_as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def nobody_base() -> Iterator[Path]:
    """A folder owned by user 65534 outside pytest's root-only temporary folder."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = Path(tempfile.mkdtemp(prefix="fleetmend-state-test-"))
    os.chown(base, 65534, 65534)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_state_dir_of_other_user_rejected(nobody_base: Path, tmp_path: Path) -> None:
    state_dir = nobody_base / "state"
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n", encoding="utf-8")
    created = run_as_nobody("mkdir", "-m", "0777", str(state_dir))
    assert created.returncode == 0, created.stderr
    for name in ("identity.json", "identity.json.tmp", "agent.lock"):
        planted = run_as_nobody("ln", "-s", str(victim), str(state_dir / name))
        assert planted.returncode == 0, planted.stderr
    owner = pwd.getpwuid(65534).pw_name

    with pytest.raises(StateError) as raised:
        StateStore(state_dir).load_or_create()

    message = str(raised.value)
    assert str(state_dir) in message
    assert f"owned by {owner} (uid 65534)" in message
    assert f"chown root {state_dir}" in message
    assert "--state-dir" in message
    assert victim.read_text(encoding="utf-8") == "keep me\n"
    # The folder is left as its owner made it.
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o777


def test_state_dir_of_own_user_accepted(nobody_base: Path) -> None:
    state_dir = nobody_base / "state"
    script = (
        "from pathlib import Path; from agent.state import StateStore; "
        f"print(StateStore(Path({str(state_dir)!r})).load_or_create().device_id)"
    )

    result = run_as_nobody(sys.executable, "-c", script)

    assert result.returncode == 0, result.stderr
    assert uuid.UUID(result.stdout.strip())
    assert os.stat(state_dir).st_uid == 65534
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700


def test_write_private_ignores_planted_links(tmp_path: Path) -> None:
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n", encoding="utf-8")
    target = tmp_path / "state.json"
    (tmp_path / "state.json.tmp").symlink_to(victim)
    target.symlink_to(victim)

    write_private(target, b"{}")

    assert victim.read_text(encoding="utf-8") == "keep me\n"
    assert not target.is_symlink()
    assert target.read_bytes() == b"{}"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["state.json", "state.json.tmp", "victim.conf"]


def test_lock_file_symlink_rejected(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.prepare_dir()
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n", encoding="utf-8")
    (store.state_dir / "agent.lock").symlink_to(victim)

    expected = "lock file .*agent.lock cannot be opened"
    with pytest.raises(StateError, match=expected), store.exclusive():
        pass

    assert victim.read_text(encoding="utf-8") == "keep me\n"


def test_damaged_identity_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text("{not json", encoding="utf-8")

    with pytest.raises(StateError, match="damaged"):
        store.load_or_create()
    assert store.path.read_text(encoding="utf-8") == "{not json"


def test_sequence_persisted_before_report(tmp_path: Path) -> None:
    store, builder = make_builder(tmp_path)
    builder.update("host", host())

    first = builder.build(full=True)
    second = builder.build(full=False)

    assert (first.sequence, second.sequence) == (1, 2)
    assert json.loads(store.path.read_text())["next_sequence"] == 3
    _, restarted = make_builder(tmp_path)
    assert restarted.build(full=True).sequence == 3


def test_full_report_carries_every_section(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)
    builder.update("host", host())
    builder.update("batteries", report_pb2.BatterySection())

    report = builder.build(full=True)

    assert report.full
    assert report.HasField("host")
    assert report.HasField("batteries")
    assert report.collect_time.ToDatetime(UTC) == FIXED_TIME


def test_quiet_delta_has_no_sections(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)
    builder.update("host", host())
    builder.build(full=True)
    builder.update("host", host())

    delta = builder.build(full=False)

    assert not delta.full
    assert not delta.HasField("host")
    assert delta.ByteSize() < 64


def test_delta_carries_only_changes(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)
    builder.update("host", host())
    builder.update("batteries", report_pb2.BatterySection())
    builder.build(full=True)
    builder.update("host", host("renamed"))

    delta = builder.build(full=False)

    assert delta.HasField("host")
    assert delta.host.hostname == "renamed"
    assert not delta.HasField("batteries")


def test_emptied_section_is_sent(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)
    section = report_pb2.BatterySection(batteries=[report_pb2.Battery(name="BAT0")])
    builder.update("batteries", section)
    builder.build(full=True)
    builder.update("batteries", report_pb2.BatterySection())

    delta = builder.build(full=False)

    assert delta.HasField("batteries")
    assert len(delta.batteries.batteries) == 0


def test_skip_past_committed_sequence(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)

    builder.skip_past(41)

    assert builder.build(full=True).sequence == 42


def test_unknown_section_rejected(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)

    with pytest.raises(ValueError, match="unknown report section"):
        builder.update("weather", host())


def test_snapshot_does_not_number(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    builder = ReportBuilder(store, Identity(device_id="", next_sequence=1))
    builder.update("host", host())

    report = builder.snapshot()

    assert report.sequence == 0
    assert report.full
    assert not store.path.exists()


def test_dropped_count_in_report(tmp_path: Path) -> None:
    _, builder = make_builder(tmp_path)

    carrier = builder.build(full=True, dropped_reports=7)
    plain = builder.build(full=False)

    assert carrier.dropped_reports == 7
    assert plain.dropped_reports == 0


def test_builder_reads_agent_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FixedClock(clock_module.Clock):
        def now(self) -> datetime:
            return FIXED_TIME

    monkeypatch.setattr(clock_module, "clock", FixedClock())
    store = StateStore(tmp_path)
    builder = ReportBuilder(store, store.load_or_create())

    report = builder.build(full=True)

    assert report.collect_time.ToDatetime(UTC) == FIXED_TIME
