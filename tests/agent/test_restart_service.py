"""restart_service through the fake systemctl, launchctl and sc on PATH."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from agent import clock as clock_module
from agent.healing.actions import restart_service
from agent.healing.actions.base import ActionContext, LocalAllowlist, Outcome
from agent.healing.services import LaunchdBackend, SystemdBackend, WindowsScmBackend
from fleetmend.v1 import remediation_pb2
from tests.agent import test_services
from tests.agent.test_services import FakeServices

UNIT = "cups.service"

# The fixture that puts the fake service tools first on PATH.
fake_services = test_services.fake_services


class StepClock(clock_module.Clock):
    """A clock whose waits return at once and move its time forward."""

    def __init__(self, start: datetime) -> None:
        self.current = start
        self.waits: list[float] = []

    def now(self) -> datetime:
        return self.current

    def wait(self, event: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.current += timedelta(seconds=seconds)
        return event.is_set()


@pytest.fixture
def step_clock(monkeypatch: pytest.MonkeyPatch) -> StepClock:
    clock = StepClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    monkeypatch.setattr(clock_module, "clock", clock)
    return clock


def params(service: str = UNIT, **fields: object) -> remediation_pb2.RestartService:
    message = remediation_pb2.RestartService(service=service)
    for key, value in fields.items():
        if isinstance(value, timedelta):
            duration = Duration()
            duration.FromTimedelta(value)
            getattr(message, key).CopyFrom(duration)
        else:
            setattr(message, key, value)
    return message


def context(tmp_path: Path, *services: str, dry_run: bool = False) -> ActionContext:
    return ActionContext(
        state_dir=tmp_path,
        allowlist=LocalAllowlist(services=frozenset(services or (UNIT,))),
        dry_run=dry_run,
    )


def restarts(fakes: FakeServices) -> int:
    return sum(1 for _, argv in fakes.calls() if argv[0] in ("restart", "kickstart"))


# validate


def test_validate_accepts_defaults() -> None:
    assert restart_service.validate(params(), LocalAllowlist(frozenset({UNIT}))) == []


def test_validate_rejects_service_not_allowlisted() -> None:
    problems = restart_service.validate(params("sshd.service"), LocalAllowlist())
    assert len(problems) == 1
    assert (
        "service sshd.service is not in healing.services in this device's "
        in (problems[0])
    )


@pytest.mark.parametrize("name", ["-H evil", "cups service", "cups;reboot"])
def test_validate_rejects_non_service_name(name: str) -> None:
    # Even an allowlist that names it permits no such service.
    problems = restart_service.validate(params(name), LocalAllowlist(frozenset({name})))

    assert problems == [
        f"service '{name}' is not a service name (1 to 256 letters, digits and "
        "@._:-), so no allowlist can permit it"
    ]


def test_validate_rejects_empty_service() -> None:
    problems = restart_service.validate(params(""), LocalAllowlist())
    assert problems == ["service is empty; name the service"]


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"settle": timedelta(milliseconds=500)}, "settle 0.5 s is out of range"),
        ({"settle": timedelta(minutes=11)}, "settle 660 s is out of range"),
        ({"max_failures": 11}, "max_failures 11 is out of range"),
        ({"failure_window": timedelta(seconds=30)}, "failure_window 30 s is out"),
        ({"failure_window": timedelta(days=2)}, "failure_window 172800 s is out"),
    ],
)
def test_validate_rejects_out_of_range(fields: dict[str, object], text: str) -> None:
    problems = restart_service.validate(
        params(**fields), LocalAllowlist(frozenset({UNIT}))
    )
    assert len(problems) == 1
    assert text in problems[0]


@pytest.mark.parametrize(
    "fields",
    [
        {"settle": timedelta(seconds=1)},
        {"settle": timedelta(minutes=10)},
        {"max_failures": 1},
        {"max_failures": 10},
        {"failure_window": timedelta(minutes=1)},
        {"failure_window": timedelta(days=1)},
    ],
)
def test_validate_accepts_bounds(fields: dict[str, object]) -> None:
    assert (
        restart_service.validate(params(**fields), LocalAllowlist(frozenset({UNIT})))
        == []
    )


def test_execute_refuses_not_allowlisted(
    tmp_path: Path, fake_services: FakeServices
) -> None:
    result = restart_service.execute(params("sshd.service"), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert fake_services.calls() == []


# execute on systemd


def test_restart_failed_unit_succeeds(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running"],
    )
    result = restart_service.execute(
        params(settle=timedelta(seconds=30)), context(tmp_path)
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    assert result.before == 0.0
    assert result.after == 1.0
    assert result.details["state_before"] == "failed/failed"
    assert result.details["state_after"] == "active/running"
    assert step_clock.waits == [30.0]
    assert restarts(fake_services) == 1
    # status, restart, status right after, status after the settle time
    assert [argv[0] for _, argv in fake_services.calls()] == [
        "show",
        "restart",
        "show",
        "show",
    ]


def test_active_unit_is_skipped(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(UNIT, status=["systemd-show-active-running"])
    result = restart_service.execute(params(), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert "already active" in result.reason
    assert restarts(fake_services) == 0


def test_dry_run_says_command(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(UNIT, status=["systemd-show-failed"])
    result = restart_service.execute(params(), context(tmp_path, dry_run=True))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert "would run `systemctl restart -- cups.service`" in result.reason
    assert restarts(fake_services) == 0
    assert not (tmp_path / restart_service.STATE_FILE).exists()


def test_unit_fails_again_during_settle(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    # Active right after the restart, failed again after the settle time.
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running", "systemd-show-failed"],
    )
    result = restart_service.execute(params(), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "is failed/failed after 10 s" in result.reason
    assert "failed restart 1 of 3" in result.reason
    assert result.after == 0.0


def test_unit_not_active_after_restart(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-inactive-dead"],
    )
    result = restart_service.execute(params(), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "inactive/dead right after the restart" in result.reason
    assert step_clock.waits == []


def test_restart_error_is_failed(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT, status=["systemd-show-failed"], restart="systemd-restart-access-denied"
    )
    result = restart_service.execute(params(), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "Access denied" in result.reason


def test_status_error_is_failed(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(UNIT, status=["systemd-show-excerpt-no-activestate"])
    result = restart_service.execute(params(), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "no ActiveState" in result.reason
    assert restarts(fake_services) == 0


def test_escalates_after_max_failures(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running", "systemd-show-failed"],
    )
    action = params(max_failures=2, failure_window=timedelta(hours=1))
    outcomes = []
    for _ in range(3):
        result = restart_service.execute(action, context(tmp_path))
        outcomes.append(result.outcome)
        step_clock.current += timedelta(minutes=5)
    assert outcomes == [
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_ESCALATED,
    ]
    assert "failed to restart 2 times within 3600 s" in result.reason
    assert restarts(fake_services) == 2
    stored = json.loads((tmp_path / restart_service.STATE_FILE).read_text())
    assert len(stored["services"][UNIT]) == 2
    assert (tmp_path / restart_service.STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_failures_expire_after_window(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running", "systemd-show-failed"],
    )
    action = params(max_failures=1, failure_window=timedelta(minutes=10))
    first = restart_service.execute(action, context(tmp_path))
    assert first.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    blocked = restart_service.execute(action, context(tmp_path))
    assert blocked.outcome == Outcome.REMEDIATION_OUTCOME_ESCALATED
    step_clock.current += timedelta(minutes=11)
    again = restart_service.execute(action, context(tmp_path))
    assert again.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert restarts(fake_services) == 2


def test_success_clears_failures(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running", "systemd-show-failed"],
    )
    action = params(max_failures=2)
    assert (
        restart_service.execute(action, context(tmp_path)).outcome
        == Outcome.REMEDIATION_OUTCOME_FAILED
    )
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running"],
    )
    assert (
        restart_service.execute(action, context(tmp_path)).outcome
        == Outcome.REMEDIATION_OUTCOME_SUCCEEDED
    )
    stored = json.loads((tmp_path / restart_service.STATE_FILE).read_text())
    assert UNIT not in stored["services"]


def test_damaged_state_file_is_ignored(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    (tmp_path / restart_service.STATE_FILE).write_text("{not json")
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running"],
    )
    result = restart_service.execute(params(), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED


def test_shutdown_during_settle(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running"],
    )
    stop = threading.Event()
    stop.set()
    result = restart_service.execute(params(), context(tmp_path), stop=stop)
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "interrupted" in result.reason


# execute on launchd and Windows


def test_launchd_restart_succeeds(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    label = "org.nixos.nix-daemon"
    fake_services.set(
        label,
        status=["launchd-print-not-running"],
        after_restart=["launchd-print-running"],
    )
    result = restart_service.execute(
        params(label), context(tmp_path, label), backend=LaunchdBackend()
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    assert result.details["detail_after"] == "pid 893"


def test_launchd_kickstart_not_permitted(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    label = "org.nixos.nix-daemon"
    fake_services.set(
        label,
        status=["launchd-print-not-running"],
        restart="launchd-kickstart-not-permitted",
    )
    result = restart_service.execute(
        params(label), context(tmp_path, label), backend=LaunchdBackend()
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "Operation not permitted" in result.reason


def test_windows_restart_succeeds(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set(
        "Tomcat9",
        status=["sc-query-stopped-crashed-1067"],
        stop="sc-stop-stopped",
        after_stop=["sc-query-stopped"],
        restart="sc-start-running",
        after_restart=["sc-query-running"],
    )
    result = restart_service.execute(
        params("Tomcat9"),
        context(tmp_path, "Tomcat9"),
        backend=WindowsScmBackend(sc="sc"),
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    assert result.details["state_before"] == "STOPPED"
    assert result.details["state_after"] == "RUNNING"


def test_windows_dry_run_command(
    tmp_path: Path, fake_services: FakeServices, step_clock: StepClock
) -> None:
    fake_services.set("Tomcat9", status=["sc-query-stopped"])
    result = restart_service.execute(
        params("Tomcat9"),
        context(tmp_path, "Tomcat9", dry_run=True),
        backend=WindowsScmBackend(sc="sc"),
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert "sc stop Tomcat9; sc start Tomcat9" in result.reason


def test_default_backend_is_systemd_here() -> None:
    assert restart_service.describe_restart(SystemdBackend(), UNIT) == (
        "systemctl restart -- cups.service"
    )
