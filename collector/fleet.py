"""Fleet limits of self-healing rules: canary sets, the circuit breaker, daily budgets.

Everything here is a pure function of the stored policy, the rule states and
the run statistics, so the collector and the operator tools compute the same
effective policy for a device. The collector applies the StateChanges that
evaluate() returns with Store.set_rule_state.

A rule's stage is one of:

- "active": every device runs it;
- "canary": only devices in its canary set run it. Others get it paused;
- "paused": no device runs it, for the state's reason.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Protocol

from fleetmend.v1 import remediation_pb2

ACTIVE = "active"
CANARY = "canary"
PAUSED = "paused"
STAGES = (ACTIVE, CANARY, PAUSED)

# The changed_by of every state change that the fleet limits make.
FLEET_LIMITS_ACTOR = "fleet limits"

# Outcomes that count as runs of a rule's action. Skips, dry runs, refusals,
# escalations and undos do not run the action.
RUN_OUTCOMES = frozenset(
    {
        remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED,
        remediation_pb2.REMEDIATION_OUTCOME_FAILED,
    }
)

_BUDGET_REASON = re.compile(r"daily budget of \d+ runs used")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class PolicyRecordLike(Protocol):
    """A stored policy: the collector's version, the rules, when it was set."""

    @property
    def version(self) -> int: ...
    @property
    def policy(self) -> remediation_pb2.Policy: ...
    @property
    def set_time(self) -> datetime: ...


class RuleStateLike(Protocol):
    """The stored stage of one rule, with its reason and last change."""

    @property
    def name(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def changed_time(self) -> datetime: ...
    @property
    def changed_by(self) -> str: ...


class RuleStatsLike(Protocol):
    """Run counts of one rule across the fleet."""

    @property
    def runs(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def runs_today(self) -> int: ...
    # Outcomes of the latest runs, newest first.
    @property
    def last_outcomes(self) -> tuple[int, ...]: ...
    # The same, counting only runs since the rule state's changed_time.
    @property
    def last_outcomes_since_change(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class StateChange:
    """A new stage for a rule, decided by the fleet limits."""

    rule: str
    previous_stage: str
    stage: str
    reason: str


def utc_day_start(now: datetime) -> datetime:
    """Return midnight UTC of the day that contains now."""
    return datetime.combine(now.astimezone(UTC).date(), time(), tzinfo=UTC)


# Canary sets


def canary_bucket(device_id: str, rule_name: str) -> int:
    """Return the device's bucket, 0 to 99, for the rule's canary set.

    The bucket is a SHA-256 hash of the rule name and the device id, so it is
    the same on every collector and across restarts, and each rule picks a
    different set of devices.
    """
    digest = hashlib.sha256(f"{rule_name}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def has_canary_set(percent: int) -> bool:
    """Return whether canary_percent limits a rule to part of the fleet."""
    return 1 <= percent <= 99


def in_canary(device_id: str, rule_name: str, percent: int) -> bool:
    """Return whether the device is in the rule's canary set of percent of devices.

    A percent of 0 or 100 and above means the whole fleet.
    """
    if not has_canary_set(percent):
        return True
    return canary_bucket(device_id, rule_name) < percent


# Effective policy


def policy_generation(
    record: PolicyRecordLike, states: Mapping[str, RuleStateLike]
) -> int:
    """Return the version of the effective policy: the time of its last change.

    The generation is the latest of the policy's set_time and the
    changed_time of its rules' states, in microseconds since the Unix epoch.
    It increases with every new policy and every state change, as long as
    the collector's clock does not step back.
    """
    # NOTE: two changes within the same microsecond, or a clock that steps
    # back, give a generation that is not higher than the previous one.
    latest = record.set_time
    for rule in record.policy.rules:
        state = states.get(rule.name)
        if state is not None and state.changed_time > latest:
            latest = state.changed_time
    return (latest - _EPOCH) // _MICROSECOND


def effective_policy(
    record: PolicyRecordLike, states: Mapping[str, RuleStateLike], device_id: str
) -> remediation_pb2.Policy:
    """Return the policy that the device runs, with the fleet limits applied.

    A rule paused in its state is paused with the state's reason. A canary
    rule is paused on devices outside its canary set, with the reason
    "canary: not in the first N%". A rule without a state is active. The
    policy's version is the generation; its fleet_version is the record's
    version, the number that SetPolicy returned.
    """
    policy = remediation_pb2.Policy()
    policy.CopyFrom(record.policy)
    policy.version = policy_generation(record, states)
    policy.fleet_version = record.version
    for rule in policy.rules:
        state = states.get(rule.name)
        if state is None:
            continue
        if state.stage == PAUSED:
            rule.paused = True
            rule.paused_reason = state.reason or "paused"
        elif state.stage == CANARY:
            percent = rule.fleet.canary_percent
            if not in_canary(device_id, rule.name, percent):
                rule.paused = True
                rule.paused_reason = f"canary: not in the first {percent}%"
    return policy


# Evaluation


def failures_in_window(outcomes: tuple[int, ...], window: int) -> int:
    """Return the failed runs among the newest window runs of outcomes."""
    runs = [outcome for outcome in outcomes if outcome in RUN_OUTCOMES][:window]
    return sum(
        1 for outcome in runs if outcome == remediation_pb2.REMEDIATION_OUTCOME_FAILED
    )


def is_budget_pause(state: RuleStateLike) -> bool:
    """Return whether the state is a pause by the daily budget."""
    return (
        state.stage == PAUSED
        and state.changed_by == FLEET_LIMITS_ACTOR
        and _BUDGET_REASON.fullmatch(state.reason) is not None
    )


def evaluate(
    policy: remediation_pb2.Policy,
    states: Mapping[str, RuleStateLike],
    stats: Mapping[str, RuleStatsLike],
    now: datetime,
) -> list[StateChange]:
    """Return the stage changes that the fleet limits make for the policy's rules.

    For each rule that has a state, in this order:

    - a rule paused by the daily budget resumes once its runs_today is below
      the budget again, so on the next UTC day, or when a new policy raised
      or removed the budget. It resumes in canary while its canary runs are
      below promote_after_runs, else active;
    - the circuit breaker pauses an active or canary rule when more than
      max_failure_ratio of the breaker_window window runs failed. A window
      that is not yet full counts its missing runs as successes, so it trips
      only once the ratio cannot fall back below the limit;
    - the daily budget pauses an active or canary rule whose runs_today is at
      or above daily_budget;
    - a canary rule is promoted to active after promote_after_runs runs with
      a failure ratio at or below max_failure_ratio, or at once when its
      canary_percent covers the whole fleet. A promote_after_runs of 0 leaves
      the promotion to an operator.

    After an operator changed a rule's state, the breaker looks only at the
    runs since that change, so a rule that an operator resumed does not trip
    again on the failures that paused it. stats must count runs_today from
    utc_day_start(now).
    """
    changes: list[StateChange] = []
    for rule in policy.rules:
        state = states.get(rule.name)
        if state is None:
            continue
        rule_stats = stats.get(rule.name)
        stage, reason = _next_stage(rule, state, rule_stats, now)
        if stage != state.stage or reason != state.reason:
            changes.append(StateChange(rule.name, state.stage, stage, reason))
    return changes


def _next_stage(
    rule: remediation_pb2.Rule,
    state: RuleStateLike,
    stats: RuleStatsLike | None,
    now: datetime,
) -> tuple[str, str]:
    limits = rule.fleet
    runs = stats.runs if stats is not None else 0
    failures = stats.failures if stats is not None else 0
    runs_today = stats.runs_today if stats is not None else 0
    outcomes: tuple[int, ...] = ()
    if stats is not None:
        outcomes = stats.last_outcomes
        if state.changed_by != FLEET_LIMITS_ACTOR:
            outcomes = stats.last_outcomes_since_change

    stage, reason = state.stage, state.reason
    if is_budget_pause(state):
        if limits.daily_budget and runs_today >= limits.daily_budget:
            return stage, reason
        stage, reason = _resume_stage(limits, runs, state, now)
    if stage == PAUSED:
        return stage, reason

    if limits.breaker_window:
        failed = failures_in_window(outcomes, limits.breaker_window)
        if failed > limits.max_failure_ratio * limits.breaker_window:
            return PAUSED, (
                f"circuit breaker: {failed} of the last {limits.breaker_window} "
                f"runs failed, more than {_percent(limits.max_failure_ratio)}"
            )
    if limits.daily_budget and runs_today >= limits.daily_budget:
        return PAUSED, f"daily budget of {limits.daily_budget} runs used"
    if stage == CANARY:
        if not has_canary_set(limits.canary_percent):
            return ACTIVE, "promoted: the canary set covers the whole fleet"
        if _canary_passed(limits, runs, failures):
            return ACTIVE, (
                f"promoted after {runs} canary runs, {failures} failed "
                f"(at most {_percent(limits.max_failure_ratio)} allowed)"
            )
    return stage, reason


def _resume_stage(
    limits: remediation_pb2.FleetLimits,
    runs: int,
    state: RuleStateLike,
    now: datetime,
) -> tuple[str, str]:
    if utc_day_start(now) > state.changed_time:
        reason = "resumed: a new UTC day began after the daily budget was used"
    elif limits.daily_budget:
        reason = f"resumed: the daily budget was raised to {limits.daily_budget} runs"
    else:
        reason = "resumed: the policy has no daily budget any more"
    # NOTE: the stage before the budget pause is not stored, so a canary rule
    # that an operator promoted before enough runs resumes in canary.
    if has_canary_set(limits.canary_percent) and not (
        limits.promote_after_runs and runs >= limits.promote_after_runs
    ):
        return CANARY, reason
    return ACTIVE, reason


def _canary_passed(
    limits: remediation_pb2.FleetLimits, runs: int, failures: int
) -> bool:
    if not limits.promote_after_runs or runs < limits.promote_after_runs:
        return False
    return failures <= limits.max_failure_ratio * runs


def _percent(ratio: float) -> str:
    return f"{ratio * 100:g}%"
