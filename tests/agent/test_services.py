"""Service backends: parsers on recorded outputs, backends through fake tools.

The recordings in tests/data/services are real outputs of systemctl, launchctl
and sc.exe from public sources (each names its origin in its first line). The
fakes in tests/fakes replay them and log their calls.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.healing.services import (
    LaunchdBackend,
    ServiceError,
    SystemdBackend,
    WindowsScmBackend,
    backend_for_platform,
    parse_launchctl_error,
    parse_launchctl_print,
    parse_sc_error,
    parse_sc_query,
    parse_systemctl_show,
)

FAKES_DIR = Path(__file__).resolve().parent.parent / "fakes"
RECORDINGS_DIR = Path(__file__).resolve().parent.parent / "data" / "services"
_METADATA_KEYS = ("origin", "shows", "kept", "exit status", "stream")


def recording(name: str) -> str:
    """Return the body of a recording, without its metadata lines."""
    lines = (RECORDINGS_DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    while lines and lines[0].removeprefix("# ").partition(":")[0] in _METADATA_KEYS:
        lines.pop(0)
    return "\n".join(lines) + "\n"


@dataclass
class FakeServices:
    """The fake service tools' state file and call log."""

    state_path: Path
    log_path: Path

    def set(self, service: str, **entry: Any) -> None:
        """Set the fake's state for one service (see tests/fakes/systemctl)."""
        state = self.state()
        state[service] = entry
        self.state_path.write_text(json.dumps(state), encoding="utf-8")

    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        result: dict[str, Any] = json.loads(self.state_path.read_text("utf-8"))
        return result

    def calls(self) -> list[tuple[str, list[str]]]:
        """Return each call the fakes received, as (tool, argv)."""
        if not self.log_path.exists():
            return []
        entries = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [(entry["tool"], entry["argv"]) for entry in entries]


@pytest.fixture
def fake_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeServices:
    """Put the fake systemctl, launchctl and sc first on PATH."""
    fakes = FakeServices(tmp_path / "fake-state.json", tmp_path / "fake-calls.log")
    fakes.state_path.write_text("{}", encoding="utf-8")
    monkeypatch.setenv("PATH", f"{FAKES_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SERVICES_STATE", str(fakes.state_path))
    monkeypatch.setenv("FAKE_SERVICES_LOG", str(fakes.log_path))
    monkeypatch.setenv("FAKE_SERVICES_RECORDINGS", str(RECORDINGS_DIR))
    return fakes


def test_every_recording_names_its_origin() -> None:
    files = sorted(RECORDINGS_DIR.glob("*.txt"))
    assert files
    for path in files:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# origin: "), path.name
        assert len(first) > len("# origin: ") + 10, path.name


# systemd


@pytest.mark.parametrize(
    ("name", "active", "state", "detail"),
    [
        ("systemd-show-active-running", True, "active/running", "result success"),
        (
            "systemd-show-active-running-webapp",
            True,
            "active/running",
            "result success",
        ),
        ("systemd-show-failed", False, "failed/failed", "result exit-code"),
        ("systemd-show-inactive-dead", False, "inactive/dead", "result success"),
        ("systemd-show-active-after-failed-reload", True, "active/running", ""),
    ],
)
def test_systemctl_show_parses(
    name: str, active: bool, state: str, detail: str
) -> None:
    status = parse_systemctl_show(recording(name), "unit.service")
    assert status.active is active
    assert status.state == state
    assert status.detail == detail


def test_systemctl_show_without_activestate() -> None:
    with pytest.raises(ServiceError, match="no ActiveState"):
        parse_systemctl_show(recording("systemd-show-excerpt-no-activestate"), "ssh")


def test_systemctl_show_value_output_rejected() -> None:
    # `--value` output has no keys, so the backend does not use that option.
    with pytest.raises(ServiceError, match="no ActiveState"):
        parse_systemctl_show(recording("systemd-show-value-activestate"), "postfix")


def test_systemctl_show_not_found() -> None:
    text = "LoadState=not-found\nActiveState=inactive\nSubState=dead\n"
    with pytest.raises(ServiceError, match="not found"):
        parse_systemctl_show(text, "nope.service")


def test_systemd_status_through_fake(fake_services: FakeServices) -> None:
    fake_services.set("cups.service", status=["systemd-show-failed"])
    status = SystemdBackend().status("cups.service")
    assert status.active is False
    assert status.state == "failed/failed"
    assert fake_services.calls() == [
        (
            "systemctl",
            ["show", "-p", "LoadState", "-p", "ActiveState", "-p", "SubState"]
            + ["-p", "Result", "--", "cups.service"],
        )
    ]


def test_systemd_restart_through_fake(fake_services: FakeServices) -> None:
    fake_services.set(
        "cups.service",
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running"],
    )
    backend = SystemdBackend()
    backend.restart("cups.service")
    assert backend.status("cups.service").active is True
    assert fake_services.calls()[0] == ("systemctl", ["restart", "--", "cups.service"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "systemd-restart-access-denied",
            "Failed to restart nsca.service: Access denied",
        ),
        (
            "systemd-restart-job-failed",
            "Job for sshd.service failed because the control",
        ),
        ("systemd-restart-unit-not-found", "Unit network-manager.service not found."),
    ],
)
def test_systemd_restart_error_message(
    fake_services: FakeServices, name: str, message: str
) -> None:
    fake_services.set("x.service", status=["systemd-show-failed"], restart=name)
    with pytest.raises(ServiceError) as raised:
        SystemdBackend().restart("x.service")
    assert message in str(raised.value)
    assert "exit" in str(raised.value)


def test_missing_tool_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match="systemctl not found"):
        SystemdBackend().status("cups.service")


# launchd


@pytest.mark.parametrize(
    ("name", "active", "state", "detail"),
    [
        ("launchd-print-running", True, "running", "pid 893"),
        ("launchd-print-running-mysql", True, "running", "pid 24784, last exit code 1"),
        (
            "launchd-print-not-running",
            False,
            "not running",
            "last exit code (never exited)",
        ),
        (
            "launchd-print-not-running-jetsam",
            False,
            "not running",
            "last exit reason JETSAM_REASON_MEMORY_IDLE_EXIT",
        ),
        # Its coalition blocks contain "state = active", which is not the service's.
        ("launchd-print-gui-last-exit-1", False, "not running", "last exit code 1"),
    ],
)
def test_launchctl_print_parses(
    name: str, active: bool, state: str, detail: str
) -> None:
    status = parse_launchctl_print(recording(name), "label")
    assert status.active is active
    assert status.state == state
    assert status.detail == detail


def test_launchctl_print_without_state() -> None:
    with pytest.raises(ServiceError, match="no state line"):
        parse_launchctl_print(recording("launchd-print-not-found"), "com.alice.nope")


def test_launchctl_error_line() -> None:
    text = recording("launchd-print-not-found")
    assert parse_launchctl_error(text) == (
        'Could not find service "com.alice.nope" in domain for user gui: 501'
    )


def test_launchd_status_through_fake(fake_services: FakeServices) -> None:
    fake_services.set("dev.mysql", status=["launchd-print-running-mysql"])
    status = LaunchdBackend().status("dev.mysql")
    assert status.active is True
    assert fake_services.calls() == [("launchctl", ["print", "system/dev.mysql"])]


def test_launchd_status_not_found(fake_services: FakeServices) -> None:
    fake_services.set("com.alice.nope", status=["launchd-print-not-found"])
    with pytest.raises(ServiceError, match="not found: Could not find service"):
        LaunchdBackend().status("com.alice.nope")


def test_launchd_kickstart_through_fake(fake_services: FakeServices) -> None:
    fake_services.set(
        "org.nixos.nix-daemon",
        status=["launchd-print-not-running"],
        after_restart=["launchd-print-running"],
    )
    backend = LaunchdBackend()
    backend.restart("org.nixos.nix-daemon")
    assert backend.status("org.nixos.nix-daemon").active is True
    assert fake_services.calls()[0] == (
        "launchctl",
        ["kickstart", "-k", "system/org.nixos.nix-daemon"],
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("launchd-kickstart-not-permitted", "1: Operation not permitted"),
        ("launchd-kickstart-not-found", "Could not find service"),
    ],
)
def test_launchd_kickstart_error(
    fake_services: FakeServices, name: str, message: str
) -> None:
    fake_services.set(
        "org.nixos.nix-daemon", status=["launchd-print-not-running"], restart=name
    )
    with pytest.raises(ServiceError) as raised:
        LaunchdBackend().restart("org.nixos.nix-daemon")
    assert message in str(raised.value)


# Windows service control manager


@pytest.mark.parametrize(
    ("name", "active", "state", "detail"),
    [
        ("sc-query-running", True, "RUNNING", "win32 exit code 0"),
        ("sc-query-running-driver-xp", True, "RUNNING", "win32 exit code 0"),
        ("sc-query-stopped", False, "STOPPED", "win32 exit code 0"),
        ("sc-query-stopped-never-started", False, "STOPPED", "win32 exit code 1077"),
        ("sc-query-stopped-crashed-1067", False, "STOPPED", "win32 exit code 1067"),
        ("sc-query-stopped-1066-excerpt", False, "STOPPED", "win32 exit code 1066"),
        ("sc-start-running", True, "RUNNING", "win32 exit code 0"),
    ],
)
def test_sc_query_parses(name: str, active: bool, state: str, detail: str) -> None:
    status = parse_sc_query(recording(name), "svc")
    assert status.active is active
    assert status.state == state
    assert status.detail == detail


@pytest.mark.parametrize("name", ["sc-query-not-found", "sc-query-not-found-spanish"])
def test_sc_query_not_found(name: str) -> None:
    with pytest.raises(ServiceError, match="not found"):
        parse_sc_query(recording(name), "edrsvc")


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("sc-start-access-denied", 5, "Access is denied."),
        (
            "sc-start-already-running",
            1056,
            "An instance of the service is already running.",
        ),
        ("sc-start-already-running-chinese", 1056, "服务的实例已在运行中。"),
        ("sc-query-not-found-spanish", 1060, "El servicio especificado no existe"),
    ],
)
def test_sc_error_parses(name: str, code: int, message: str) -> None:
    parsed_code, parsed_message = parse_sc_error(recording(name))
    assert parsed_code == code
    assert parsed_message.startswith(message)


def test_sc_error_absent() -> None:
    assert parse_sc_error(recording("sc-query-running")) == (
        None,
        "SERVICE_NAME: windefend",
    )


def test_windows_restart_through_fake(fake_services: FakeServices) -> None:
    fake_services.set(
        "Eagle",
        status=["sc-query-stopped-never-started"],
        stop="sc-stop-stopped",
        after_stop=["sc-query-stopped"],
        restart="sc-start-running",
        after_restart=["sc-query-running"],
    )
    backend = WindowsScmBackend(sc="sc")
    backend.restart("Eagle")
    assert backend.status("Eagle").active is True
    assert fake_services.calls() == [
        ("sc", ["stop", "Eagle"]),
        ("sc", ["query", "Eagle"]),
        ("sc", ["start", "Eagle"]),
        ("sc", ["query", "Eagle"]),
    ]


def test_windows_restart_waits_for_stopped(fake_services: FakeServices) -> None:
    # After "sc stop" the service reports RUNNING twice before STOPPED.
    fake_services.set(
        "Eagle",
        status=["sc-query-running"],
        stop="sc-stop-stopped",
        after_stop=["sc-query-running", "sc-query-running", "sc-query-stopped"],
        restart="sc-start-running",
        after_restart=["sc-query-running"],
    )
    WindowsScmBackend(sc="sc", poll_interval=0.01).restart("Eagle")
    verbs = [argv[0] for _, argv in fake_services.calls()]
    assert verbs == ["stop", "query", "query", "query", "start"]


def test_windows_restart_stop_timeout(fake_services: FakeServices) -> None:
    fake_services.set(
        "Eagle",
        status=["sc-query-running"],
        stop="sc-stop-stopped",
        after_stop=["sc-query-running"],
    )
    backend = WindowsScmBackend(sc="sc", stop_timeout=0.05, poll_interval=0.01)
    with pytest.raises(ServiceError, match="did not stop within"):
        backend.restart("Eagle")
    assert ("sc", ["start", "Eagle"]) not in fake_services.calls()


def test_windows_start_error(fake_services: FakeServices) -> None:
    fake_services.set(
        "Development Service",
        status=["sc-query-stopped"],
        stop="sc-stop-stopped",
        after_stop=["sc-query-stopped"],
        restart="sc-start-access-denied",
    )
    with pytest.raises(ServiceError, match=r"error 5\): Access is denied"):
        WindowsScmBackend(sc="sc").restart("Development Service")


def test_windows_status_not_found(fake_services: FakeServices) -> None:
    fake_services.set("malwar", status=["sc-query-not-found"])
    with pytest.raises(ServiceError, match="not found"):
        WindowsScmBackend(sc="sc").status("malwar")


@pytest.mark.parametrize(
    ("platform", "kind"),
    [
        ("linux", SystemdBackend),
        ("darwin", LaunchdBackend),
        ("win32", WindowsScmBackend),
    ],
)
def test_backend_for_platform(platform: str, kind: type) -> None:
    assert isinstance(backend_for_platform(platform), kind)


def test_backend_for_unknown_platform() -> None:
    with pytest.raises(ServiceError, match="freebsd"):
        backend_for_platform("freebsd14")
