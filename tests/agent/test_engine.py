"""The healing engine against a fake systemctl on PATH, a real spool and state files."""

from __future__ import annotations

import os
import stat
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import clock as clock_module
from agent.healing.actions.base import LocalAllowlist
from agent.healing.conditions import ConditionEvaluator, ConditionResult, Readings
from agent.healing.engine import HealingEngine
from agent.healing.limits import STATE_FILE, HealingState, Limits
from agent.healing.policy import PolicyStore, policy_from_toml
from agent.healing.services import SystemdBackend
from agent.report import ReportBuilder
from agent.spool import SPOOL_FILE, Spool
from agent.state import StateStore
from agent.usage.catalog import Catalog
from fleetmend.v1 import remediation_pb2, report_pb2

Outcome = remediation_pb2.RemediationOutcome

START = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

# systemctl show -p LoadState -p ActiveState -p SubState -p Result prints
# these four KEY=VALUE lines. The state file contains "ActiveState SubState Result".
FAKE_SYSTEMCTL = textwrap.dedent(
    """\
    #!/bin/sh
    dir="$FAKE_SYSTEMCTL_DIR"
    echo "$*" >> "$dir/calls"
    case "$1" in
      show)
        set -- $(cat "$dir/state")
        printf 'LoadState=loaded\\nActiveState=%s\\n' "$1"
        printf 'SubState=%s\\nResult=%s\\n' "$2" "$3"
        ;;
      restart)
        cp "$dir/after_restart" "$dir/state"
        ;;
    esac
    """
)

FAILED_STATE = "failed failed exit-code"
ACTIVE_STATE = "active running success"

RESTART_RULE = """
[[rules]]
name = "restart-cups"
condition.service_not_running = {{ service = "cups.service" }}
action.restart_service.service = "cups.service"
action.restart_service.settle = "2s"
action.restart_service.max_failures = {max_failures}
limits.cooldown = "{cooldown}s"
limits.max_runs_per_day = {max_runs}
{extra}
"""


class ManualClock(clock_module.Clock):
    """A clock that moves only when advanced; waits advance it instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._monotonic = 1000.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.is_set():
            return True
        self.advance(max(0.0, seconds))
        return event.is_set()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    manual = ManualClock(START)
    monkeypatch.setattr(clock_module, "clock", manual)
    return manual


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a fake systemctl first on PATH; return the folder of its state and calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(FAKE_SYSTEMCTL)
    script.chmod(0o755)
    state = tmp_path / "systemctl-state"
    state.mkdir()
    (state / "state").write_text(FAILED_STATE)
    (state / "after_restart").write_text(FAILED_STATE)
    (state / "calls").write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMCTL_DIR", str(state))
    return state


def restarts(systemctl: Path) -> int:
    calls = (systemctl / "calls").read_text().splitlines()
    return sum(1 for line in calls if line.startswith("restart"))


@dataclass
class Harness:
    engine: HealingEngine
    spool: Spool
    builder: ReportBuilder
    state_dir: Path

    def spooled(self) -> list[remediation_pb2.RemediationRecord]:
        records: list[remediation_pb2.RemediationRecord] = []
        for item in self.spool.pending(kind="remediation", limit=1000):
            report = report_pb2.Report.FromString(item.body)
            assert item.sequence == report.sequence
            records.extend(report.remediations)
        return records


HarnessFactory = Callable[..., Harness]


@pytest.fixture
def harness_factory(
    tmp_path: Path, clock: ManualClock, systemctl: Path
) -> Iterator[HarnessFactory]:
    spools: list[Spool] = []

    def factory(
        policy_text: str,
        services: frozenset[str] = frozenset({"cups.service"}),
        tz: object = UTC,
    ) -> Harness:
        state_dir = tmp_path / "state"
        state_dir.mkdir(exist_ok=True)
        store = StateStore(state_dir)
        builder = ReportBuilder(store, store.load_or_create())
        spool = Spool(state_dir / SPOOL_FILE)
        spools.append(spool)
        allowlist = LocalAllowlist(services=services)
        policy = policy_from_toml(policy_text, "test policy")
        policies = PolicyStore(state_dir, policy, allowlist)
        engine = HealingEngine(
            state_dir,
            policies,
            allowlist,
            builder,
            spool,
            ConditionEvaluator(services=SystemdBackend()),
            Limits(tz=tz),  # type: ignore[arg-type]
        )
        return Harness(engine, spool, builder, state_dir)

    yield factory
    for spool in spools:
        spool.close()


def restart_policy(
    cooldown: int = 3600, max_runs: int = 3, max_failures: int = 3, extra: str = ""
) -> str:
    return RESTART_RULE.format(
        cooldown=cooldown, max_runs=max_runs, max_failures=max_failures, extra=extra
    )


def test_failed_verification_record(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy())

    records = harness.engine.evaluate()

    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_FAILED]
    record = records[0]
    assert record.rule == "restart-cups"
    assert record.action.restart_service.service == "cups.service"
    assert "cups.service" in record.reason
    assert record.unit == "active"
    assert record.after == 0.0
    assert record.start_time.ToDatetime(UTC) == START
    assert restarts(systemctl) == 1
    assert harness.spooled() == records


def test_successful_restart_record(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    (systemctl / "after_restart").write_text(ACTIVE_STATE)
    harness = harness_factory(restart_policy())

    records = harness.engine.evaluate()

    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_SUCCEEDED]
    assert records[0].after == 1.0
    # The service is active now, so the condition no longer holds.
    assert harness.engine.evaluate() == []
    assert restarts(systemctl) == 1


def test_condition_not_holding_writes_nothing(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    (systemctl / "state").write_text(ACTIVE_STATE)
    harness = harness_factory(restart_policy())

    assert harness.engine.evaluate() == []
    assert harness.spooled() == []
    assert restarts(systemctl) == 0


def test_repeated_skips_counted(
    harness_factory: HarnessFactory, clock: ManualClock, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy(cooldown=3600))
    first = harness.engine.evaluate()
    assert [r.outcome for r in first] == [Outcome.REMEDIATION_OUTCOME_FAILED]

    clock.advance(60)
    skipped = harness.engine.evaluate()
    assert [r.outcome for r in skipped] == [Outcome.REMEDIATION_OUTCOME_SKIPPED]
    assert skipped[0].reason.startswith("cooldown of 3600 s")
    pending_after_first_skip = len(harness.spool.pending(kind="remediation"))

    for _ in range(5):
        clock.advance(60)
        assert harness.engine.evaluate() == []

    assert len(harness.spool.pending(kind="remediation")) == pending_after_first_skip
    state = HealingState.load(harness.state_dir).rule("restart-cups")
    assert state.pending is not None
    assert state.pending.repeat_count == 5
    assert restarts(systemctl) == 1

    # After the cooldown the rule acts again: the pending count goes out first.
    clock.advance(3600)
    records = harness.engine.evaluate()
    assert [r.outcome for r in records] == [
        Outcome.REMEDIATION_OUTCOME_SKIPPED,
        Outcome.REMEDIATION_OUTCOME_FAILED,
    ]
    assert records[0].repeat_count == 5
    assert records[0].reason == skipped[0].reason
    assert restarts(systemctl) == 2


def test_pending_skip_written_daily(
    harness_factory: HarnessFactory, clock: ManualClock
) -> None:
    # A cap of 1 run a day with a cooldown longer than the day keeps the
    # rule skipping with one reason.
    harness = harness_factory(restart_policy(cooldown=30 * 86400, max_runs=1))
    harness.engine.evaluate()
    clock.advance(60)
    harness.engine.evaluate()
    written: list[remediation_pb2.RemediationRecord] = []
    for _ in range(25):
        clock.advance(3600)
        written += harness.engine.evaluate()

    assert len(written) == 1
    assert written[0].outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    # 25 hourly repeats: the first starts the pending record, and the one a day
    # later is counted before the record is written.
    assert written[0].repeat_count == 25


def test_quiet_hours_skip(
    harness_factory: HarnessFactory, clock: ManualClock, systemctl: Path
) -> None:
    # START is 12:00 UTC; quiet from 11:00 to 13:00.
    harness = harness_factory(
        restart_policy(
            extra="limits.quiet_hours = [{ start_hour = 11, end_hour = 13 }]"
        )
    )

    records = harness.engine.evaluate()

    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_SKIPPED]
    assert records[0].reason == "quiet hours 11:00 to 13:00 (local time)"
    assert restarts(systemctl) == 0
    clock.advance(3600)
    records = harness.engine.evaluate()
    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_FAILED]


def test_consent_skip(harness_factory: HarnessFactory, systemctl: Path) -> None:
    harness = harness_factory(restart_policy(extra="limits.require_consent = true"))

    records = harness.engine.evaluate()

    assert records[0].outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert records[0].reason == "needs the user's consent, and no tray is running"
    assert restarts(systemctl) == 0


def test_daily_cap_skip(harness_factory: HarnessFactory, clock: ManualClock) -> None:
    harness = harness_factory(restart_policy(cooldown=0, max_runs=2, max_failures=10))
    outcomes = []
    for _ in range(3):
        outcomes += [r.outcome for r in harness.engine.evaluate()]
        clock.advance(60)

    assert outcomes == [
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_SKIPPED,
    ]
    assert harness.engine.last_records[0].reason == (
        "daily cap: 2 runs today (local time), at most 2"
    )


def test_escalation_stops_rule(
    harness_factory: HarnessFactory, clock: ManualClock, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy(cooldown=0, max_runs=10, max_failures=2))
    outcomes = []
    for _ in range(4):
        outcomes += [r.outcome for r in harness.engine.evaluate()]
        clock.advance(60)

    assert outcomes == [
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_ESCALATED,
        Outcome.REMEDIATION_OUTCOME_SKIPPED,
    ]
    assert harness.engine.last_records[0].reason.startswith(
        "stopped after repeated failures"
    )
    assert restarts(systemctl) == 2


def test_dry_run_changes_nothing(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy() + "dry_run = true\n")

    records = harness.engine.evaluate()

    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_DRY_RUN]
    assert restarts(systemctl) == 0


def test_paused_rule_not_evaluated(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(
        restart_policy() + 'paused = true\npaused_reason = "breaker"\n'
    )

    assert harness.engine.evaluate() == []
    assert (systemctl / "calls").read_text() == ""


def test_disabled_engine_runs_nothing(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy())
    harness.engine.enabled = False

    assert harness.engine.evaluate() == []
    assert restarts(systemctl) == 0


def test_state_file_private(harness_factory: HarnessFactory) -> None:
    harness = harness_factory(restart_policy())
    harness.engine.evaluate()

    mode = stat.S_IMODE(os.stat(harness.state_dir / STATE_FILE).st_mode)
    assert mode == 0o600


# -- operator commands ------------------------------------------------------------


def command(
    command_id: str, service: str = "cups.service", ttl: float = 3600
) -> remediation_pb2.Command:
    message = remediation_pb2.Command(command_id=command_id)
    message.action.restart_service.service = service
    message.action.restart_service.settle.seconds = 1
    message.expire_time.FromDatetime(START + timedelta(seconds=ttl))
    return message


def test_command_not_allowlisted_refused(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy())

    record = harness.engine.run_command(command("c1", service="sshd.service"))

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert record.command_id == "c1"
    assert record.rule == ""
    assert record.reason == (
        "service sshd.service is not in healing.services in this device's "
        "agent.toml (allowed: cups.service); add it there and restart the agent "
        "to let this command run"
    )
    assert restarts(systemctl) == 0
    assert harness.spooled() == [record]


def test_command_expired_refused(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy())

    record = harness.engine.run_command(command("c1", ttl=-1))

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert record.reason.startswith("the command expired at")
    assert restarts(systemctl) == 0


def test_command_runs_once(harness_factory: HarnessFactory, systemctl: Path) -> None:
    (systemctl / "after_restart").write_text(ACTIVE_STATE)
    harness = harness_factory(restart_policy())

    first = harness.engine.run_command(command("c1"))
    (systemctl / "state").write_text(FAILED_STATE)
    again = harness.engine.run_command(command("c1"))

    assert first.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED
    assert again.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert again.reason.startswith("command c1 already ran at")
    assert restarts(systemctl) == 1
    # The run id survives a restart of the agent.
    assert "c1" in HealingState.load(harness.state_dir).commands


def test_command_ignores_rule_cooldown(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy(cooldown=3600))
    harness.engine.evaluate()

    harness.engine.submit_command(command("c2"))
    records = harness.engine.run_queued_commands()

    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_FAILED]
    assert restarts(systemctl) == 2


def test_command_refused_when_disabled(
    harness_factory: HarnessFactory, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy())
    harness.engine.enabled = False

    record = harness.engine.run_command(command("c3"))

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert "healing.enabled = false" in record.reason


# -- policies from the collector ---------------------------------------------------


def test_rejected_policy_reported(harness_factory: HarnessFactory) -> None:
    harness = harness_factory(restart_policy())
    harness.builder.build(full=True)
    bad = policy_from_toml(restart_policy(), "collector")
    bad.version = 9
    bad.rules[0].action.restart_service.service = "sshd.service"
    bad.rules[0].action.restart_service.max_failures = 99

    assert harness.engine.apply_policy(bad) is False

    assert harness.builder.policy_status_changed()
    report = harness.builder.build(full=False)
    assert report.policy_status.rejected_version == 9
    assert "max_failures 99 is out of range" in report.policy_status.rejected_reason
    assert report.policy_status.applied_version == 0
    assert not harness.builder.policy_status_changed()


def test_applied_policy_used(harness_factory: HarnessFactory, systemctl: Path) -> None:
    (systemctl / "state").write_text(ACTIVE_STATE)
    harness = harness_factory(restart_policy())
    good = policy_from_toml(restart_policy(), "collector")
    good.version = 4
    good.rules[0].name = "restart-cups-v4"

    assert harness.engine.apply_policy(good) is True

    (systemctl / "state").write_text(FAILED_STATE)
    records = harness.engine.evaluate()
    assert [r.rule for r in records] == ["restart-cups-v4"]
    assert records[0].policy_version == 4
    assert harness.builder.build(full=True).policy_status.applied_version == 4


# -- conditions on readings -------------------------------------------------------


def evaluate_condition(
    condition: remediation_pb2.Condition,
    readings: Readings,
    evaluator: ConditionEvaluator | None = None,
    monotonic: float = 0.0,
) -> ConditionResult:
    return (evaluator or ConditionEvaluator()).evaluate(
        "r1",
        condition,
        readings,
        START,
        monotonic,
    )


def test_free_space_from_readings() -> None:
    host = report_pb2.HostFacts()
    host.volumes.add(mount_point="/data", total_bytes=1000, free_bytes=50)
    condition = remediation_pb2.Condition()
    condition.free_space_below.mount_point = "/data"
    condition.free_space_below.ratio = 0.1

    result = evaluate_condition(condition, Readings(host=host))

    assert result.holds
    assert result.value == 50.0
    assert result.unit == "free bytes of /data"
    condition.free_space_below.ratio = 0.01
    assert not evaluate_condition(condition, Readings(host=host)).holds
    condition.free_space_below.bytes = 60
    assert evaluate_condition(condition, Readings(host=host)).holds


def test_credential_expiry_window() -> None:
    section = report_pb2.CredentialSection()
    credential = section.credentials.add(
        kind=report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
        account="alice",
        expiry=report_pb2.CREDENTIAL_EXPIRY_AT_TIME,
    )
    credential.expire_time.FromDatetime(START + timedelta(days=10))
    condition = remediation_pb2.Condition()
    condition.credential_expiring_within.within.FromTimedelta(timedelta(days=14))

    result = evaluate_condition(condition, Readings(credentials=section))

    assert result.holds
    assert result.value == 10 * 86400
    assert "local password of alice expires in 10d 0h" in result.detail
    condition.credential_expiring_within.kind = "certificate"
    assert not evaluate_condition(condition, Readings(credentials=section)).holds


def test_battery_and_disk_conditions() -> None:
    batteries = report_pb2.BatterySection()
    batteries.batteries.add(name="BAT0", design_capacity=50_000, full_capacity=25_000)
    battery = remediation_pb2.Condition()
    battery.battery_health_below.ratio = 0.6
    disks = report_pb2.DiskSection()
    disks.disks.add(name="sda")
    failing = disks.disks.add(name="sdb")
    failing.ata_attributes.add(
        id=5, name="Reallocated_Sector_Ct", when_failed="FAILING_NOW"
    )
    disk = remediation_pb2.Condition()
    disk.disk_failing.SetInParent()

    battery_result = evaluate_condition(battery, Readings(batteries=batteries))
    disk_result = evaluate_condition(disk, Readings(disks=disks))

    assert battery_result.holds
    assert battery_result.value == 0.5
    assert disk_result.holds
    assert disk_result.value == 1.0
    assert "sdb" in disk_result.detail
    assert not evaluate_condition(disk, Readings()).holds


class ScriptedSampler:
    """CPU samples from a list, one per call, as CpuSampler.sample returns them."""

    def __init__(self, samples: list[float]) -> None:
        self.samples = samples

    def sample(self, app_id: str, catalog: Catalog) -> float:
        return self.samples.pop(0)


def test_cpu_above_must_be_sustained() -> None:
    sampler = ScriptedSampler([90.0, 90.0, 90.0, 10.0, 90.0])
    evaluator = ConditionEvaluator(cpu_sampler=sampler, catalog=lambda: Catalog(()))
    condition = remediation_pb2.Condition()
    condition.process_cpu_above.app_id = "indexer"
    condition.process_cpu_above.percent = 50
    condition.process_cpu_above.sustained.seconds = 300

    def holds_at(monotonic: float) -> bool:
        result = evaluate_condition(condition, Readings(), evaluator, monotonic)
        return result.holds

    assert not holds_at(0)
    assert not holds_at(200)
    assert holds_at(300)
    # A sample below the threshold starts the sustained time again.
    assert not holds_at(360)
    assert not holds_at(700)


def test_dry_run_cooldown_writes_nothing(
    harness_factory: HarnessFactory, clock: ManualClock, systemctl: Path
) -> None:
    harness = harness_factory(restart_policy(cooldown=3600) + "dry_run = true\n")

    first = harness.engine.evaluate()
    clock.advance(60)
    second = harness.engine.evaluate()
    clock.advance(3600)
    third = harness.engine.evaluate()

    assert [r.outcome for r in first] == [Outcome.REMEDIATION_OUTCOME_DRY_RUN]
    assert second == []
    assert [r.outcome for r in third] == [Outcome.REMEDIATION_OUTCOME_DRY_RUN]
    assert restarts(systemctl) == 0


def test_expired_throttle_undone(harness_factory: HarnessFactory) -> None:
    import subprocess

    import psutil

    from agent.healing.actions import throttle_process

    harness = harness_factory(restart_policy())
    child = subprocess.Popen(["sleep", "60"])
    try:
        os.setpriority(os.PRIO_PROCESS, child.pid, 10)
        throttle_process.ThrottleStore(
            harness.state_dir / throttle_process.STATE_FILE
        ).save(
            [
                throttle_process.Throttle(
                    app_id="indexer",
                    pid=child.pid,
                    create_time=psutil.Process(child.pid).create_time(),
                    old_nice=0,
                    old_ionice=None,
                    start=(START - timedelta(hours=2)).isoformat(),
                    until=(START - timedelta(hours=1)).isoformat(),
                    rule="throttle-indexer",
                )
            ]
        )

        records = [
            r
            for r in harness.engine.evaluate()
            if r.outcome == Outcome.REMEDIATION_OUTCOME_UNDONE
        ]

        assert len(records) == 1
        assert records[0].rule == "throttle-indexer"
        assert records[0].action.throttle_process.app_id == "indexer"
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == 0
        assert records[0] in harness.spooled()
    finally:
        child.kill()
        child.wait()


def test_removed_rule_flushes_pending(
    harness_factory: HarnessFactory, clock: ManualClock
) -> None:
    harness = harness_factory(restart_policy(cooldown=3600))
    harness.engine.evaluate()
    for _ in range(3):
        clock.advance(60)
        harness.engine.evaluate()
    replacement = policy_from_toml(restart_policy(), "collector")
    replacement.version = 2
    replacement.rules[0].name = "restart-cups-v2"
    replacement.rules[0].paused = True
    assert harness.engine.apply_policy(replacement)

    records = harness.engine.evaluate()

    assert [r.rule for r in records] == ["restart-cups"]
    assert records[0].repeat_count == 2
    assert "restart-cups" not in HealingState.load(harness.state_dir).rules
