"""How the agent names policy versions, unmeasured values, refusals, the
disk condition and the `rules` preview.

Real PolicyStore, HealingEngine, spool and report builder run in tmp_path.
Services go through the fake systemctl, which replays the recorded outputs in
tests/data/services, and disks through the fake smartctl, which replays those
in tests/data/smartctl.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.cli import main
from agent.healing.actions import restart_service
from agent.healing.actions.base import ActionContext, LocalAllowlist
from agent.healing.conditions import (
    ConditionEvaluator,
    ConditionResult,
    Readings,
    disk_failure,
)
from agent.healing.policy import (
    POLICY_FILE,
    PolicyStore,
    check_policy,
    policy_from_toml,
)
from agent.healing.services import SystemdBackend
from agent.wire.disk import disks_to_proto
from collector import fleet
from collector.findings import compute_findings
from fleetmend.v1 import ops_pb2, remediation_pb2, report_pb2
from tests.agent import test_policy_refusal
from tests.agent.test_engine import START
from tests.agent.test_policy_refusal import CUPS, Agent, StartAgent, set_failed
from tests.agent.test_services import FakeServices
from tests.fakes.smartctl_replay import (
    MIXED_CASES,
    build_sysfs_tree,
    load_sysfs_spec,
    scan_with_replay,
)

Outcome = remediation_pb2.RemediationOutcome

# Fixtures shared with the refusal tests: a manual clock, the fake service
# tools first on PATH, and a function that starts the healing pieces.
clock = test_policy_refusal.clock
fake_services = test_policy_refusal.fake_services
start_agent = test_policy_refusal.start_agent

GENERATION = 1_796_420_193_222_163

RESTART_CUPS = f"""
[[rules]]
name = "restart-cups"
condition.service_not_running = {{ service = "{CUPS}" }}
action.restart_service = {{ service = "{CUPS}", settle = "2s" }}
limits.cooldown = "60s"
"""


def fleet_policy(
    text: str, fleet_version: int = 1, generation: int = GENERATION
) -> remediation_pb2.Policy:
    policy = policy_from_toml(text, "collector")
    policy.version = generation
    policy.fleet_version = fleet_version
    return policy


# -- one policy, one operator-visible number ---------------------------------------


@dataclass(frozen=True)
class StoredPolicy:
    """A policy as the collector's store returns it (fleet.PolicyRecordLike)."""

    version: int
    policy: remediation_pb2.Policy
    set_time: datetime


def test_effective_policy_carries_fleet_version() -> None:
    stored = policy_from_toml(RESTART_CUPS, "collector")
    stored.version = 4
    set_time = datetime(2026, 12, 4, 9, 30, tzinfo=UTC)
    record = StoredPolicy(4, stored, set_time)

    policy = fleet.effective_policy(record, {}, "device-1")

    assert policy.fleet_version == 4
    assert policy.version == fleet.policy_generation(record, {})
    assert policy.version != 4


def test_applied_policy_logged_with_both_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PolicyStore(
        tmp_path, remediation_pb2.Policy(), LocalAllowlist(services=frozenset({CUPS}))
    )
    caplog.set_level(logging.INFO, logger="agent.healing.policy")

    assert store.apply(fleet_policy(RESTART_CUPS)) == []

    assert caplog.messages == [
        f"applied fleet policy version 1 (generation {GENERATION}) from the "
        "collector: 1 rule"
    ]
    assert store.status.applied_version == GENERATION
    assert store.status.applied_fleet_version == 1


def test_rejected_policy_logged_with_both_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PolicyStore(tmp_path, remediation_pb2.Policy(), LocalAllowlist())
    bad = fleet_policy(RESTART_CUPS.replace("restart-cups", "Bad Name"), 2)

    problems = store.apply(bad)

    assert problems
    assert caplog.messages[0].startswith(
        f"rejected fleet policy version 2 (generation {GENERATION}) from the "
        "collector: "
    )
    assert store.status.rejected_version == GENERATION
    assert store.status.rejected_fleet_version == 2


@pytest.fixture
def agent_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FLEETMEND_CONFIG at settings that allow cron.service and thumbnails."""
    for name in list(os.environ):
        if name.startswith("FLEETMEND_"):
            monkeypatch.delenv(name)
    config = tmp_path / "agent.toml"
    config.write_text(
        "[usage]\nresolve_hosts = false\n[healing]\n"
        'services = ["cron.service"]\ncache_sets = ["thumbnails"]\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("FLEETMEND_CONFIG", str(config))
    return config


def store_policy(state_dir: Path, policy: remediation_pb2.Policy) -> None:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    allowlist = LocalAllowlist(
        services=frozenset({"cron.service"}), cache_sets=frozenset({"thumbnails"})
    )
    assert (
        PolicyStore(state_dir, remediation_pb2.Policy(), allowlist).apply(policy) == []
    )
    assert (state_dir / POLICY_FILE).exists()


def run_rules(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    status = main(["rules", "--state-dir", str(state_dir)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_rules_title_names_fleet_version(
    tmp_path: Path, agent_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    store_policy(state_dir, fleet_policy(THUMBNAILS_RULE, 3))

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    assert out.splitlines()[0] == (
        f"Fleet policy version 3 (generation {GENERATION}) from the collector, "
        "1 rule. A dry run: nothing was changed."
    )


# -- records carry only values that were read ---------------------------------------


def test_unreadable_status_refused_record_unmeasured(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    # No state for cups.service: the fake systemctl exits 99 for its status.
    agent = start_agent(frozenset({"cron.service"}))
    agent.engine.apply_policy(fleet_policy(RESTART_CUPS))

    records = agent.engine.evaluate()

    assert [record.outcome for record in records] == [
        Outcome.REMEDIATION_OUTCOME_REFUSED
    ]
    assert records[0].unit == ""
    assert records[0].before == 0
    assert records[0].after == 0
    assert agent.spooled() == records


def test_unreadable_status_condition_says_unknown(
    start_agent: StartAgent,
    fake_services: FakeServices,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent: Agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(fleet_policy(RESTART_CUPS))
    caplog.set_level(logging.WARNING, logger="agent.healing.conditions")

    first = agent.engine.evaluate()
    second = agent.engine.evaluate()
    previews = agent.engine.preview(Readings())

    assert first == []
    assert second == []
    assert agent.spooled() == []
    detail = previews[0].condition.detail
    assert detail.startswith(f"service {CUPS}: status unknown: ")
    assert "fake systemctl" in detail
    assert previews[0].condition.holds is False
    assert previews[0].condition.value is None
    unknown = [m for m in caplog.messages if "status unknown" in m]
    assert len(unknown) == 1


def test_new_status_error_logged_again(
    start_agent: StartAgent,
    fake_services: FakeServices,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(fleet_policy(RESTART_CUPS))
    caplog.set_level(logging.INFO, logger="agent.healing.conditions")

    agent.engine.evaluate()
    fake_services.set(CUPS, status=["systemd-show-active-running"])
    agent.engine.evaluate()
    fake_services.set(CUPS, status=["no-such-recording"])
    agent.engine.evaluate()

    unknown = [m for m in caplog.messages if "status unknown" in m]
    assert len(unknown) == 2
    assert "service cups.service: status can be read again" in caplog.messages


def test_restart_status_error_has_no_unit(
    tmp_path: Path, fake_services: FakeServices
) -> None:
    context = ActionContext(tmp_path, LocalAllowlist(services=frozenset({CUPS})))
    params = remediation_pb2.RestartService(service=CUPS)

    result = restart_service.execute(params, context, backend=SystemdBackend())

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert result.unit == ""
    assert "fake systemctl" in result.reason


def test_measured_refusal_keeps_value(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_failed(fake_services, CUPS)
    agent = start_agent(frozenset({"cron.service"}))
    agent.engine.apply_policy(fleet_policy(RESTART_CUPS))

    records = agent.engine.evaluate()

    assert records[0].outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert records[0].unit == f"service {CUPS} active (1) or not (0)"
    assert records[0].before == 0


# -- one wording for a refusal -------------------------------------------------------

REFUSAL = (
    "service cups.service is not in healing.services in this device's agent.toml "
    "(allowed: cron.service); add it there and restart the agent to let this {} run"
)


def test_rule_and_command_refusal_same_wording(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_failed(fake_services, CUPS)
    agent = start_agent(frozenset({"cron.service"}))
    agent.engine.apply_policy(fleet_policy(RESTART_CUPS))
    command = remediation_pb2.Command(command_id="c1")
    command.action.restart_service.service = CUPS
    command.expire_time.FromDatetime(START.replace(year=START.year + 1))

    rule_records = agent.engine.evaluate()
    command_record = agent.engine.run_command(command)

    assert agent.policies.refused == {"restart-cups": REFUSAL.format("rule")}
    assert rule_records[0].reason == REFUSAL.format("rule")
    assert command_record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert command_record.reason == REFUSAL.format("command")


def test_invalid_command_says_invalid(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    agent = start_agent(frozenset({"cron.service"}))
    command = remediation_pb2.Command(command_id="n1")
    command.action.notify.body = "no title"
    command.expire_time.FromDatetime(START.replace(year=START.year + 1))

    record = agent.engine.run_command(command)

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert record.reason == (
        "invalid command: notify: title is empty; give the notice a title"
    )


def test_cache_set_refusal_same_wording() -> None:
    policy = fleet_policy(
        """
[[rules]]
name = "clear-chat"
condition.free_space_below = { mount_point = "/", ratio = 0.1 }
action.clear_cache = { cache_sets = ["chat"] }
"""
    )
    allowlist = LocalAllowlist(cache_sets=frozenset({"thumbnails"}))

    check = check_policy(policy, allowlist)

    assert check.refused == {
        "clear-chat": "cache set chat is not in healing.cache_sets in this "
        "device's agent.toml (allowed: thumbnails); add it there and restart the "
        "agent to let this rule run"
    }


# -- the disk condition --------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_disks(tmp_path_factory: pytest.TempPathFactory) -> report_pb2.DiskSection:
    work_dir = tmp_path_factory.mktemp("disks")
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), work_dir / "sys")
    return disks_to_proto(scan_with_replay(sys_root, MIXED_CASES, work_dir).scan)


def disk_named(section: report_pb2.DiskSection, name: str) -> report_pb2.Disk:
    matches = [disk for disk in section.disks if disk.name == name]
    assert len(matches) == 1, f"{name} appears {len(matches)} times"
    return matches[0]


def disk_condition(disks: list[report_pb2.Disk]) -> ConditionResult:
    condition = remediation_pb2.Condition(disk_failing=remediation_pb2.DiskFailing())
    readings = Readings(disks=report_pb2.DiskSection(disks=disks))
    return ConditionEvaluator().evaluate(
        "disks", condition, readings, datetime.now(UTC), 0.0
    )


def collector_says_failing(disk: report_pb2.Disk) -> bool:
    device = ops_pb2.Device()
    device.disks.disks.append(disk)
    findings = compute_findings(device, datetime.now(UTC))
    return any(f.kind == ops_pb2.FINDING_KIND_DISK_FAILING for f in findings)


def test_disk_failing_matches_collector_finding(
    mixed_disks: report_pb2.DiskSection,
) -> None:
    assert len(mixed_disks.disks) == 14
    for disk in mixed_disks.disks:
        assert bool(disk_failure(disk)) == collector_says_failing(disk), disk.name


def test_disk_failing_on_raw_value_alone(
    mixed_disks: report_pb2.DiskSection,
) -> None:
    # The recorded laptop disk with 499 pending sectors, with its failed
    # self-assessment and FAILING_NOW attribute cleared, so that only the raw
    # value of attribute 197 is left.
    disk = report_pb2.Disk()
    disk.CopyFrom(disk_named(mixed_disks, "sdd"))
    disk.self_assessment = report_pb2.SELF_ASSESSMENT_PASSED
    for attribute in disk.ata_attributes:
        attribute.when_failed = ""

    result = disk_condition([disk])

    assert collector_says_failing(disk)
    assert result.holds is True
    assert "attribute 197 Current_Pending_Sector raw value 499" in result.detail


def test_disk_without_smart_says_so(mixed_disks: report_pb2.DiskSection) -> None:
    vda = disk_named(mixed_disks, "vda")

    result = disk_condition([vda])

    assert vda.smart_state == report_pb2.SMART_STATE_NOT_SUPPORTED
    assert result.holds is False
    assert result.value is None
    assert result.detail == "no disk reports health data (vda: SMART not supported)"


def test_disk_condition_names_silent_disks(
    mixed_disks: report_pb2.DiskSection,
) -> None:
    disks = [disk_named(mixed_disks, "nvme0n1"), disk_named(mixed_disks, "vda")]

    result = disk_condition(disks)

    assert result.holds is False
    assert result.value == 0
    assert result.detail == (
        "the one disk that reports health data is not failing; no health data "
        "from vda: SMART not supported"
    )


# -- the read-only `rules` preview ---------------------------------------------------

THUMBNAILS_RULE = """
[[rules]]
name = "thumbnails-always"
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.clear_cache = { cache_sets = ["thumbnails"] }
"""

REFUSED_RULE = """
[[rules]]
name = "browser-always"
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.clear_cache = { cache_sets = ["browser"] }
"""


def test_rules_preview_logs_no_refusal_warning(
    tmp_path: Path,
    agent_config: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    state_dir = tmp_path / "state"
    store_policy(state_dir, fleet_policy(THUMBNAILS_RULE + REFUSED_RULE, 5))
    capsys.readouterr()
    caplog.set_level(logging.WARNING)
    caplog.clear()

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [r.getMessage() for r in warnings if "refused" in r.getMessage()]
    assert refusals == []
    assert "  ! rule browser-always is refused on this device: cache set " in out


def test_rules_paused_rule_shown_paused(
    tmp_path: Path, agent_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    never_met = THUMBNAILS_RULE.replace("ratio = 1.0", "bytes = 1")
    policy = fleet_policy(never_met, 5)
    policy.rules[0].paused = True
    policy.rules[0].paused_reason = "canary: not in the first 10%"
    store_policy(state_dir, policy)

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    assert "Rule thumbnails-always (paused)\n" in out
    words = " ".join(out.split())
    assert (
        "now: paused by the collector: canary: not in the first 10%; the running "
        "agent skips it until the collector resumes it action:"
    ) in words
    assert "nothing to do" not in out


def test_rules_escapes_collector_text(
    tmp_path: Path, agent_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    policy = fleet_policy(THUMBNAILS_RULE, 5)
    policy.rules[0].paused = True
    policy.rules[0].paused_reason = "bad\x1b[31mred\nline"
    store_policy(state_dir, policy)

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    assert "\x1b" not in out
    assert "paused by the collector: bad\\x1b[31mred\\nline;" in out


def test_rules_unreadable_status_no_warning(
    tmp_path: Path,
    agent_config: Path,
    fake_services: FakeServices,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No state for cron.service: the fake systemctl exits 99 for its status.
    state_dir = tmp_path / "state"
    store_policy(state_dir, fleet_policy(RESTART_CUPS.replace(CUPS, "cron.service")))
    caplog.set_level(logging.WARNING)

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    assert "service cron.service: status unknown: " in " ".join(out.split())
    unknown = [m for m in caplog.messages if "status unknown" in m]
    assert unknown == []


def test_rules_dry_run_bytes_once(
    tmp_path: Path, agent_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    store_policy(state_dir, fleet_policy(THUMBNAILS_RULE, 5))

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    dry_runs = [line for line in out.splitlines() if "would free" in line]
    assert len(dry_runs) == 1
    assert dry_runs[0].startswith("  dry run: would free ")
    assert " bytes " not in dry_runs[0]


def test_refusal_warning_logged_once_singular(
    start_agent: StartAgent,
    fake_services: FakeServices,
    caplog: pytest.LogCaptureFixture,
) -> None:
    set_failed(fake_services, CUPS)
    agent = start_agent(frozenset({"cron.service"}))
    agent.engine.apply_policy(fleet_policy(RESTART_CUPS))
    caplog.set_level(logging.INFO)

    agent.engine.evaluate()
    agent.engine.evaluate()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    refused = [m for m in warnings if "refused on this device" in m]
    assert refused == [
        f"fleet policy version 1 (generation {GENERATION}): 1 rule is refused on "
        f"this device and does not run: restart-cups: {REFUSAL.format('rule')}"
    ]
    spooled = [m for m in caplog.messages if m.startswith("report ")]
    assert spooled[0].endswith(" spooled with 1 remediation record")
