"""Fleet limits as pure functions: canary sets, promotion, breaker, budget."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from collector import fleet
from collector.store._model import PolicyRecord, RuleStateRecord, RuleStats
from fleetmend.v1 import remediation_pb2

T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
FAILED = remediation_pb2.REMEDIATION_OUTCOME_FAILED
SKIPPED = remediation_pb2.REMEDIATION_OUTCOME_SKIPPED


def rule(name: str = "clear-cache", **limits: float) -> remediation_pb2.Rule:
    built = remediation_pb2.Rule(name=name)
    built.action.notify.title = "disk almost full"
    built.condition.free_space_below.mount_point = "/"
    built.condition.free_space_below.ratio = 0.1
    built.fleet.CopyFrom(remediation_pb2.FleetLimits(**limits))  # type: ignore[arg-type]
    return built


def policy(*rules: remediation_pb2.Rule) -> remediation_pb2.Policy:
    return remediation_pb2.Policy(version=7, rules=list(rules))


def record(built: remediation_pb2.Policy, set_time: datetime = T0) -> PolicyRecord:
    return PolicyRecord(
        version=built.version, policy=built, set_by="admin", set_time=set_time
    )


def state(
    stage: str,
    name: str = "clear-cache",
    *,
    reason: str = "",
    changed_time: datetime = T0,
    changed_by: str = fleet.FLEET_LIMITS_ACTOR,
) -> RuleStateRecord:
    return RuleStateRecord(
        name=name,
        stage=stage,  # type: ignore[arg-type]
        reason=reason,
        changed_time=changed_time,
        changed_by=changed_by,
    )


def stats(
    outcomes: Iterable[int] = (),
    *,
    runs_today: int | None = None,
    since_change: Iterable[int] | None = None,
) -> RuleStats:
    """Return statistics of runs with these outcomes, newest first."""
    last = tuple(outcomes)
    recent = last if since_change is None else tuple(since_change)
    return RuleStats(
        runs=len(last),
        failures=last.count(FAILED),
        runs_today=len(last) if runs_today is None else runs_today,
        last_outcomes=last,
        runs_since_change=len(recent),
        failures_since_change=recent.count(FAILED),
        last_outcomes_since_change=recent,
    )


def evaluate_one(
    built: remediation_pb2.Rule,
    current: RuleStateRecord,
    rule_stats: RuleStats | None,
    now: datetime = T0,
) -> list[fleet.StateChange]:
    states = {built.name: current}
    statistics = {} if rule_stats is None else {built.name: rule_stats}
    return fleet.evaluate(policy(built), states, statistics, now)


# Canary sets


def test_canary_bucket_stable() -> None:
    device_id = "2f0c4b1e-7f57-4a36-9c6e-0d7d8c1f4a10"
    first = fleet.canary_bucket(device_id, "clear-cache")
    assert fleet.canary_bucket(device_id, "clear-cache") == first
    assert 0 <= first < 100


@pytest.mark.parametrize("percent", [1, 5, 10, 25, 50, 90, 99])
def test_canary_share_close_to_percent(percent: int) -> None:
    device_ids = [str(uuid.UUID(int=number * 7919 + 13)) for number in range(20_000)]
    members = sum(fleet.in_canary(d, "clear-cache", percent) for d in device_ids)
    share = members / len(device_ids) * 100
    # For 20,000 independent draws the standard deviation of the share is
    # below 0.36 percentage points, so 1.5 points is more than 4 of them.
    assert abs(share - percent) < 1.5


def test_canary_sets_grow_with_percent() -> None:
    device_ids = [str(uuid.UUID(int=number)) for number in range(2000)]
    small = {d for d in device_ids if fleet.in_canary(d, "restart", 10)}
    large = {d for d in device_ids if fleet.in_canary(d, "restart", 40)}
    assert small
    assert small <= large


def test_canary_sets_differ_per_rule() -> None:
    device_ids = [str(uuid.UUID(int=number)) for number in range(2000)]
    first = {d for d in device_ids if fleet.in_canary(d, "restart", 20)}
    second = {d for d in device_ids if fleet.in_canary(d, "clear-cache", 20)}
    assert first != second


@pytest.mark.parametrize("percent", [0, 100])
def test_canary_whole_fleet_percent(percent: int) -> None:
    device_ids = [str(uuid.UUID(int=number)) for number in range(500)]
    assert all(fleet.in_canary(d, "restart", percent) for d in device_ids)


# Effective policy


def test_effective_policy_active_unchanged() -> None:
    built = policy(rule("clear-cache"))
    states = {"clear-cache": state(fleet.ACTIVE)}
    effective = fleet.effective_policy(record(built), states, str(uuid.uuid4()))
    assert not effective.rules[0].paused
    assert effective.rules[0].paused_reason == ""
    assert effective.rules[0].action == built.rules[0].action


def test_effective_policy_paused_reason() -> None:
    built = policy(rule("clear-cache"), rule("restart"))
    states = {
        "clear-cache": state(fleet.PAUSED, reason="paused by alice: broken"),
        "restart": state(fleet.ACTIVE, "restart"),
    }
    effective = fleet.effective_policy(record(built), states, str(uuid.uuid4()))
    assert effective.rules[0].paused
    assert effective.rules[0].paused_reason == "paused by alice: broken"
    assert not effective.rules[1].paused


def test_effective_policy_leaves_record_unchanged() -> None:
    built = policy(rule("clear-cache"))
    states = {"clear-cache": state(fleet.PAUSED, reason="breaker")}
    fleet.effective_policy(record(built), states, str(uuid.uuid4()))
    assert not built.rules[0].paused
    assert built.version == 7


def test_effective_policy_canary_split() -> None:
    built = policy(rule("clear-cache", canary_percent=30))
    states = {"clear-cache": state(fleet.CANARY)}
    device_ids = [str(uuid.UUID(int=number)) for number in range(300)]
    inside = []
    for device_id in device_ids:
        effective = fleet.effective_policy(record(built), states, device_id)
        member = fleet.in_canary(device_id, "clear-cache", 30)
        assert effective.rules[0].paused is not member
        if member:
            inside.append(device_id)
        else:
            assert effective.rules[0].paused_reason == "canary: not in the first 30%"
    assert 0 < len(inside) < len(device_ids)


def test_effective_policy_rule_without_state_active() -> None:
    built = policy(rule("clear-cache", canary_percent=30))
    effective = fleet.effective_policy(record(built), {}, str(uuid.uuid4()))
    assert not effective.rules[0].paused


def test_generation_changes_with_state() -> None:
    built = policy(rule("clear-cache"))
    device_id = str(uuid.uuid4())
    before = fleet.effective_policy(
        record(built), {"clear-cache": state(fleet.ACTIVE)}, device_id
    )
    later = T0 + timedelta(minutes=5)
    after = fleet.effective_policy(
        record(built),
        {"clear-cache": state(fleet.PAUSED, reason="x", changed_time=later)},
        device_id,
    )
    assert after.version > before.version


def test_generation_same_for_same_states() -> None:
    built = policy(rule("clear-cache"))
    states = {"clear-cache": state(fleet.ACTIVE)}
    first = fleet.effective_policy(record(built), states, str(uuid.uuid4()))
    second = fleet.effective_policy(record(built), states, str(uuid.uuid4()))
    assert first.version == second.version


def test_generation_grows_with_new_policy() -> None:
    built = policy(rule("clear-cache"))
    states = {"clear-cache": state(fleet.ACTIVE)}
    old = fleet.policy_generation(record(built), states)
    newer = fleet.policy_generation(record(built, T0 + timedelta(seconds=1)), states)
    assert newer > old


def test_generation_ignores_states_of_other_rules() -> None:
    built = policy(rule("clear-cache"))
    later = T0 + timedelta(hours=1)
    states = {
        "clear-cache": state(fleet.ACTIVE),
        "gone": state(fleet.PAUSED, "gone", changed_time=later),
    }
    assert fleet.policy_generation(record(built), states) == fleet.policy_generation(
        record(built), {"clear-cache": state(fleet.ACTIVE)}
    )


# Canary promotion

PROMOTION_CASES = [
    # (outcomes newest first, promote_after_runs, max_failure_ratio, promoted)
    ([SUCCEEDED] * 10, 10, 0.1, True),
    ([SUCCEEDED] * 9, 10, 0.1, False),
    ([FAILED] + [SUCCEEDED] * 9, 10, 0.1, True),
    ([FAILED] * 2 + [SUCCEEDED] * 8, 10, 0.1, False),
    ([SUCCEEDED] * 50, 0, 0.1, False),
    ([SUCCEEDED] * 20, 20, 0.0, True),
]


@pytest.mark.parametrize(
    ("outcomes", "after_runs", "ratio", "promoted"), PROMOTION_CASES
)
def test_canary_promotion(
    outcomes: list[int], after_runs: int, ratio: float, promoted: bool
) -> None:
    built = rule(
        canary_percent=10, promote_after_runs=after_runs, max_failure_ratio=ratio
    )
    changes = evaluate_one(built, state(fleet.CANARY), stats(outcomes))
    if promoted:
        assert len(changes) == 1
        assert changes[0].previous_stage == fleet.CANARY
        assert changes[0].stage == fleet.ACTIVE
        assert "promoted after" in changes[0].reason
    else:
        assert changes == []


def test_canary_whole_fleet_promoted() -> None:
    built = rule(canary_percent=100, promote_after_runs=10)
    changes = evaluate_one(built, state(fleet.CANARY), stats([]))
    assert [change.stage for change in changes] == [fleet.ACTIVE]


def test_canary_without_stats_stays() -> None:
    built = rule(canary_percent=10, promote_after_runs=10)
    assert evaluate_one(built, state(fleet.CANARY), None) == []


# Circuit breaker

BREAKER_CASES = [
    # (outcomes newest first, breaker_window, max_failure_ratio, tripped)
    ([FAILED] * 6 + [SUCCEEDED] * 4, 10, 0.5, True),
    ([FAILED] * 5 + [SUCCEEDED] * 5, 10, 0.5, False),
    # Only the newest window runs count.
    ([SUCCEEDED] * 10 + [FAILED] * 50, 10, 0.5, False),
    # A window that is not full yet trips once the ratio cannot recover.
    ([FAILED] * 6, 10, 0.5, True),
    ([FAILED] * 5, 10, 0.5, False),
    # Skips are not runs and do not fill the window.
    ([SKIPPED] * 20 + [FAILED] * 6, 10, 0.5, True),
    ([FAILED], 10, 0.0, True),
    ([FAILED] * 100, 0, 0.5, False),
]


@pytest.mark.parametrize(("outcomes", "window", "ratio", "tripped"), BREAKER_CASES)
def test_breaker(outcomes: list[int], window: int, ratio: float, tripped: bool) -> None:
    built = rule(breaker_window=window, max_failure_ratio=ratio)
    changes = evaluate_one(built, state(fleet.ACTIVE), stats(outcomes))
    if tripped:
        assert len(changes) == 1
        assert changes[0].stage == fleet.PAUSED
        assert changes[0].reason.startswith("circuit breaker: ")
    else:
        assert changes == []


def test_breaker_reason_counts() -> None:
    built = rule(breaker_window=10, max_failure_ratio=0.5)
    outcomes = [FAILED] * 7 + [SUCCEEDED] * 3
    changes = evaluate_one(built, state(fleet.ACTIVE), stats(outcomes))
    assert changes[0].reason == (
        "circuit breaker: 7 of the last 10 runs failed, more than 50%"
    )


def test_breaker_trips_canary_rule() -> None:
    built = rule(canary_percent=10, promote_after_runs=5, breaker_window=5)
    changes = evaluate_one(built, state(fleet.CANARY), stats([FAILED] * 5))
    assert [change.stage for change in changes] == [fleet.PAUSED]


def test_breaker_leaves_paused_rule() -> None:
    built = rule(breaker_window=5, max_failure_ratio=0.1)
    paused = state(fleet.PAUSED, reason="paused by alice", changed_by="alice")
    assert evaluate_one(built, paused, stats([FAILED] * 5)) == []


def test_breaker_after_operator_resume_counts_new_runs() -> None:
    built = rule(breaker_window=10, max_failure_ratio=0.5)
    resumed = state(fleet.ACTIVE, reason="resumed by alice", changed_by="alice")
    history = [SUCCEEDED] * 2 + [FAILED] * 10
    assert evaluate_one(built, resumed, stats(history, since_change=history[:2])) == []
    failing = [FAILED] * 6 + [FAILED] * 10
    changes = evaluate_one(built, resumed, stats(failing, since_change=failing[:6]))
    assert [change.stage for change in changes] == [fleet.PAUSED]


# Daily budget


def test_budget_pauses_at_limit() -> None:
    built = rule(daily_budget=5)
    changes = evaluate_one(built, state(fleet.ACTIVE), stats([SUCCEEDED] * 5))
    assert len(changes) == 1
    assert changes[0].stage == fleet.PAUSED
    assert changes[0].reason == "daily budget of 5 runs used"


def test_budget_below_limit_runs() -> None:
    built = rule(daily_budget=5)
    outcomes = [SUCCEEDED] * 30
    assert evaluate_one(built, state(fleet.ACTIVE), stats(outcomes, runs_today=4)) == []


def test_budget_pause_holds_same_day() -> None:
    built = rule(daily_budget=5)
    paused = state(fleet.PAUSED, reason="daily budget of 5 runs used")
    later = T0 + timedelta(hours=10)
    assert evaluate_one(built, paused, stats([SUCCEEDED] * 6), later) == []


def test_budget_resumes_next_utc_day() -> None:
    built = rule(daily_budget=5)
    paused = state(fleet.PAUSED, reason="daily budget of 5 runs used")
    next_day = datetime(2026, 5, 5, 0, 0, 1, tzinfo=UTC)
    changes = evaluate_one(
        built, paused, stats([SUCCEEDED] * 6, runs_today=0), next_day
    )
    assert len(changes) == 1
    assert changes[0].stage == fleet.ACTIVE
    assert "new UTC day" in changes[0].reason


def test_budget_resumes_canary_in_canary() -> None:
    built = rule(daily_budget=5, canary_percent=20, promote_after_runs=100)
    paused = state(fleet.PAUSED, reason="daily budget of 5 runs used")
    next_day = T0 + timedelta(days=1)
    changes = evaluate_one(
        built, paused, stats([SUCCEEDED] * 6, runs_today=0), next_day
    )
    assert [change.stage for change in changes] == [fleet.CANARY]


def test_budget_raised_resumes_same_day() -> None:
    built = rule(daily_budget=10)
    paused = state(fleet.PAUSED, reason="daily budget of 5 runs used")
    changes = evaluate_one(built, paused, stats([SUCCEEDED] * 5), T0)
    assert [change.stage for change in changes] == [fleet.ACTIVE]
    assert changes[0].reason == "resumed: the daily budget was raised to 10 runs"


def test_operator_pause_not_resumed() -> None:
    built = rule(daily_budget=5)
    paused = state(
        fleet.PAUSED, reason="daily budget of 5 runs used", changed_by="alice"
    )
    next_day = T0 + timedelta(days=1)
    assert evaluate_one(built, paused, stats([], runs_today=0), next_day) == []


def test_breaker_pause_not_resumed_next_day() -> None:
    built = rule(daily_budget=5, breaker_window=5)
    paused = state(fleet.PAUSED, reason="circuit breaker: 5 of the last 5 runs failed")
    next_day = T0 + timedelta(days=1)
    assert (
        evaluate_one(built, paused, stats([FAILED] * 5, runs_today=0), next_day) == []
    )


def test_resumed_rule_trips_breaker_same_pass() -> None:
    built = rule(daily_budget=5, breaker_window=5, max_failure_ratio=0.5)
    paused = state(fleet.PAUSED, reason="daily budget of 5 runs used")
    next_day = T0 + timedelta(days=1)
    changes = evaluate_one(built, paused, stats([FAILED] * 5, runs_today=0), next_day)
    assert len(changes) == 1
    assert changes[0].stage == fleet.PAUSED
    assert changes[0].reason.startswith("circuit breaker: ")


def test_evaluate_skips_rules_without_state() -> None:
    built = rule(daily_budget=1)
    changes = fleet.evaluate(policy(built), {}, {built.name: stats([FAILED] * 5)}, T0)
    assert changes == []


def test_utc_day_start() -> None:
    assert fleet.utc_day_start(T0) == datetime(2026, 5, 4, tzinfo=UTC)
