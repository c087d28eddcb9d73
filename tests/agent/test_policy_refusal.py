"""Rules outside the laptop's allowlist: each is refused, the rest of the policy runs.

A real PolicyStore and HealingEngine in tmp_path, with a real spool and report
builder, restart services through the fake systemctl that replays recorded
outputs (tests/fakes/systemctl, tests/data/services).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from agent import clock as clock_module
from agent.healing.actions.base import LocalAllowlist
from agent.healing.bounds import MAX_REASON_CHARS, MAX_RULES
from agent.healing.conditions import ConditionEvaluator, Readings
from agent.healing.engine import HealingEngine
from agent.healing.limits import Limits
from agent.healing.policy import (
    PolicyStore,
    check_policy,
    policy_from_toml,
    validate_policy,
)
from agent.healing.services import SystemdBackend
from agent.report import ReportBuilder
from agent.spool import SPOOL_FILE, Spool
from agent.state import StateStore
from fleetmend.v1 import remediation_pb2, report_pb2
from tests.agent import test_services
from tests.agent.test_engine import START, ManualClock
from tests.agent.test_services import FakeServices

Outcome = remediation_pb2.RemediationOutcome

# The fixture that puts the fake service tools first on PATH.
fake_services = test_services.fake_services

CUPS = "cups.service"
AVAHI = "avahi-daemon.service"

TWO_RULES = f"""
[[rules]]
name = "restart-cups"
condition.service_not_running = {{ service = "{CUPS}" }}
action.restart_service = {{ service = "{CUPS}", settle = "2s" }}
limits.cooldown = "60s"

[[rules]]
name = "restart-avahi"
condition.service_not_running = {{ service = "{AVAHI}" }}
action.restart_service = {{ service = "{AVAHI}", settle = "2s" }}
limits.cooldown = "60s"
"""

AVAHI_REASON = (
    f"service {AVAHI} is not in healing.services in this device's agent.toml "
    f"(allowed: {CUPS}); add it there and restart the agent to let this rule run"
)


def collector_policy(version: int, text: str = TWO_RULES) -> remediation_pb2.Policy:
    policy = policy_from_toml(text, "collector")
    policy.version = version
    return policy


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    manual = ManualClock(START)
    monkeypatch.setattr(clock_module, "clock", manual)
    return manual


@dataclass
class Agent:
    """The healing pieces of one agent start, on a shared state folder."""

    engine: HealingEngine
    policies: PolicyStore
    builder: ReportBuilder
    spool: Spool

    def spooled(self) -> list[remediation_pb2.RemediationRecord]:
        records: list[remediation_pb2.RemediationRecord] = []
        for item in self.spool.pending(kind="remediation", limit=1000):
            records.extend(report_pb2.Report.FromString(item.body).remediations)
        return records


StartAgent = Callable[[frozenset[str]], Agent]


@pytest.fixture
def start_agent(
    tmp_path: Path, clock: ManualClock, fake_services: FakeServices
) -> Iterator[StartAgent]:
    """Return a function that starts the healing pieces with an allowlist."""
    spools: list[Spool] = []
    state_dir = tmp_path / "state"
    state_dir.mkdir()

    def start(services: frozenset[str]) -> Agent:
        store = StateStore(state_dir)
        builder = ReportBuilder(store, store.load_or_create())
        spool = Spool(state_dir / SPOOL_FILE)
        spools.append(spool)
        allowlist = LocalAllowlist(services=services)
        policies = PolicyStore(state_dir, remediation_pb2.Policy(), allowlist)
        engine = HealingEngine(
            state_dir,
            policies,
            allowlist,
            builder,
            spool,
            ConditionEvaluator(services=SystemdBackend()),
            Limits(tz=START.tzinfo),
        )
        return Agent(engine, policies, builder, spool)

    yield start
    for spool in spools:
        spool.close()


def set_failed(fake_services: FakeServices, *services: str) -> None:
    for service in services:
        fake_services.set(
            service,
            status=["systemd-show-failed"],
            after_restart=["systemd-show-active-running"],
        )


def set_active(fake_services: FakeServices, service: str) -> None:
    fake_services.set(service, status=["systemd-show-active-running"])


def restarted(fake_services: FakeServices) -> list[str]:
    return [argv[-1] for _, argv in fake_services.calls() if argv[0] == "restart"]


# -- check_policy on its own ------------------------------------------------------


def test_check_splits_refusals_from_problems() -> None:
    allowlist = LocalAllowlist(services=frozenset({CUPS}))

    check = check_policy(collector_policy(5), allowlist)

    assert check.problems == []
    assert check.refused == {"restart-avahi": AVAHI_REASON}


def test_check_refuses_cache_set_outside_allowlist() -> None:
    text = """
[[rules]]
name = "clear-chat"
condition.disk_failing = {}
action.clear_cache = { cache_sets = ["browser", "chat", "package_manager"] }
"""
    allowlist = LocalAllowlist(cache_sets=frozenset({"browser", "thumbnails"}))

    check = check_policy(collector_policy(2, text), allowlist)

    assert check.problems == []
    assert check.refused == {
        "clear-chat": "cache sets chat, package_manager are not in "
        "healing.cache_sets in this device's agent.toml (allowed: browser, "
        "thumbnails); add them there and restart the agent to let this rule run"
    }


def test_check_structural_problem_refuses_nothing() -> None:
    policy = collector_policy(5)
    policy.rules[0].action.clear_cache.cache_sets.append("../../etc")

    check = check_policy(policy, LocalAllowlist(services=frozenset({CUPS})))

    assert check.refused == {}
    assert len(check.problems) == 1
    assert check.problems[0].startswith("rule 'restart-cups': action: clear_cache: ")
    assert "unknown cache set '../../etc'" in check.problems[0]


def test_check_empty_service_is_a_problem() -> None:
    policy = collector_policy(5)
    policy.rules[1].action.restart_service.service = ""

    check = check_policy(policy, LocalAllowlist(services=frozenset({CUPS})))

    assert check.refused == {}
    assert check.problems == [
        "rule 'restart-avahi': action: restart_service: service is empty; name the "
        "service"
    ]


def test_local_policy_check_stays_whole() -> None:
    problems = validate_policy(
        collector_policy(0), LocalAllowlist(services=frozenset({CUPS}))
    )

    assert len(problems) == 1
    assert problems[0].startswith("rule 'restart-avahi': action: restart_service: ")
    assert AVAHI in problems[0]


# -- the store and the engine -------------------------------------------------------


def test_policy_applied_with_refused_rule(start_agent: StartAgent) -> None:
    agent = start_agent(frozenset({CUPS}))

    assert agent.engine.apply_policy(collector_policy(5)) is True

    status = agent.policies.status
    assert status.applied_version == 5
    assert status.rejected_version == 0
    assert list(status.refused_rules) == [
        remediation_pb2.RefusedRule(rule_name="restart-avahi", reason=AVAHI_REASON)
    ]
    report = agent.builder.build(full=False)
    assert list(report.policy_status.refused_rules) == list(status.refused_rules)


def test_permitted_rule_acts_refused_rule_recorded(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_failed(fake_services, CUPS, AVAHI)
    agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(collector_policy(5))

    records = agent.engine.evaluate()

    assert [(r.rule, r.outcome) for r in records] == [
        ("restart-cups", Outcome.REMEDIATION_OUTCOME_SUCCEEDED),
        ("restart-avahi", Outcome.REMEDIATION_OUTCOME_REFUSED),
    ]
    refused = records[1]
    assert refused.reason == AVAHI_REASON
    assert refused.policy_version == 5
    assert refused.repeat_count == 0
    assert refused.action.restart_service.service == AVAHI
    assert restarted(fake_services) == [CUPS]
    assert agent.spooled() == records


def test_refusal_recorded_while_condition_false(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_active(fake_services, CUPS)
    set_active(fake_services, AVAHI)
    agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(collector_policy(5))

    records = agent.engine.evaluate()

    assert [(r.rule, r.outcome) for r in records] == [
        ("restart-avahi", Outcome.REMEDIATION_OUTCOME_REFUSED)
    ]
    # The condition's value: 1 while the service is active.
    assert records[0].before == 1.0
    assert agent.engine.evaluate() == []
    assert restarted(fake_services) == []


def test_refusal_repeats_raise_count_only(
    start_agent: StartAgent, fake_services: FakeServices, clock: ManualClock
) -> None:
    set_failed(fake_services, CUPS, AVAHI)
    agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(collector_policy(5))
    first = agent.engine.evaluate()

    # The condition holds twice more, then not, then again: three repeats.
    clock.advance(120)
    assert agent.engine.evaluate() == []
    clock.advance(120)
    assert agent.engine.evaluate() == []
    set_active(fake_services, AVAHI)
    clock.advance(120)
    assert agent.engine.evaluate() == []
    set_failed(fake_services, AVAHI)
    clock.advance(timedelta(days=1).total_seconds())
    flushed = agent.engine.evaluate()

    assert [r.outcome for r in first] == [
        Outcome.REMEDIATION_OUTCOME_SUCCEEDED,
        Outcome.REMEDIATION_OUTCOME_REFUSED,
    ]
    assert len(flushed) == 1
    assert flushed[0].rule == "restart-avahi"
    assert flushed[0].outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert flushed[0].reason == AVAHI_REASON
    assert flushed[0].repeat_count == 3
    assert AVAHI not in restarted(fake_services)
    assert len(agent.spooled()) == 3


def test_refusal_once_per_version_across_restart(
    start_agent: StartAgent, fake_services: FakeServices, clock: ManualClock
) -> None:
    set_failed(fake_services, AVAHI)
    set_active(fake_services, CUPS)
    first = start_agent(frozenset({CUPS}))
    first.engine.apply_policy(collector_policy(5))
    assert [r.outcome for r in first.engine.evaluate()] == [
        Outcome.REMEDIATION_OUTCOME_REFUSED
    ]

    # The same allowlist after a restart: version 5 was already recorded.
    clock.advance(120)
    second = start_agent(frozenset({CUPS}))
    assert second.engine.evaluate() == []

    # A new policy version gets a record of its own.
    second.engine.apply_policy(collector_policy(6))
    records = second.engine.evaluate()

    assert [(r.outcome, r.policy_version) for r in records] == [
        (Outcome.REMEDIATION_OUTCOME_REFUSED, 5),
        (Outcome.REMEDIATION_OUTCOME_REFUSED, 6),
    ]
    # The first is version 5's pending repeat, written when the key changed.
    assert records[0].repeat_count == 1
    assert records[1].repeat_count == 0
    assert restarted(fake_services) == []


def test_structurally_bad_policy_rejected_whole(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_failed(fake_services, CUPS, AVAHI)
    agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(collector_policy(5))
    bad = collector_policy(7)
    bad.rules[0].limits.max_runs_per_day = 100_000

    assert agent.engine.apply_policy(bad) is False

    status = agent.policies.status
    assert status.applied_version == 5
    assert status.rejected_version == 7
    assert status.rejected_reason == (
        "rule 'restart-cups': limits.max_runs_per_day is 100000, more than the "
        "maximum 1440"
    )
    # The refused rules are still those of version 5, which stays in force.
    assert [r.rule_name for r in status.refused_rules] == ["restart-avahi"]
    records = agent.engine.evaluate()
    assert {r.policy_version for r in records} == {5}
    assert restarted(fake_services) == [CUPS]


def test_allowlist_grows_on_restart(
    start_agent: StartAgent, fake_services: FakeServices, clock: ManualClock
) -> None:
    set_failed(fake_services, AVAHI)
    set_active(fake_services, CUPS)
    narrow = start_agent(frozenset({CUPS}))
    narrow.engine.apply_policy(collector_policy(5))
    narrow.engine.evaluate()
    clock.advance(120)
    narrow.engine.evaluate()

    wide = start_agent(frozenset({CUPS, AVAHI}))

    assert wide.policies.applied_version == 5
    assert wide.policies.refused == {}
    assert list(wide.policies.status.refused_rules) == []
    records = wide.engine.evaluate()
    assert [(r.rule, r.outcome, r.repeat_count) for r in records] == [
        ("restart-avahi", Outcome.REMEDIATION_OUTCOME_REFUSED, 1),
        ("restart-avahi", Outcome.REMEDIATION_OUTCOME_SUCCEEDED, 0),
    ]
    assert restarted(fake_services) == [AVAHI]


def test_allowlist_shrinks_on_restart(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_failed(fake_services, CUPS, AVAHI)
    start_agent(frozenset({CUPS, AVAHI})).engine.apply_policy(collector_policy(5))

    narrow = start_agent(frozenset({AVAHI}))
    records = narrow.engine.evaluate()

    assert narrow.policies.applied_version == 5
    assert set(narrow.policies.refused) == {"restart-cups"}
    assert [(r.rule, r.outcome) for r in records] == [
        ("restart-cups", Outcome.REMEDIATION_OUTCOME_REFUSED),
        ("restart-avahi", Outcome.REMEDIATION_OUTCOME_SUCCEEDED),
    ]
    assert restarted(fake_services) == [AVAHI]


def test_preview_names_refusal(
    start_agent: StartAgent, fake_services: FakeServices
) -> None:
    set_failed(fake_services, CUPS, AVAHI)
    agent = start_agent(frozenset({CUPS}))
    agent.engine.apply_policy(collector_policy(5))

    previews = {p.rule.name: p for p in agent.engine.preview(Readings())}

    assert previews["restart-avahi"].skip_reason == (
        f"refused on this device: {AVAHI_REASON}"
    )
    assert previews["restart-cups"].skip_reason == ""
    assert restarted(fake_services) == []


def test_refused_rules_status_bounded(tmp_path: Path) -> None:
    policy = remediation_pb2.Policy(version=9)
    for index in range(MAX_RULES):
        rule = policy.rules.add(name=f"r{index}")
        rule.condition.disk_failing.SetInParent()
        rule.action.restart_service.service = f"{index:03d}" + "s" * 253
    store = PolicyStore(tmp_path, remediation_pb2.Policy(), LocalAllowlist())

    assert store.apply(policy) == []

    status = store.status
    assert len(status.refused_rules) == MAX_RULES
    assert all(len(r.reason) <= MAX_REASON_CHARS for r in status.refused_rules)
    assert status.ByteSize() < MAX_RULES * (MAX_REASON_CHARS + 100)
