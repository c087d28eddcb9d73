"""The healing engine: evaluate the rules, act through the actions, write records.

Each evaluation runs every rule that is not paused: its condition on the
latest readings, its local limits, then the action's precheck, change and
verification. A RemediationRecord is written when a rule acts or fails, and
when it is skipped for a reason other than its previous skip. Repeats of the
same skip only raise repeat_count on a pending record. That record is written
when the reason changes, when the rule acts, or a day after the first repeat,
so a rule that stays in cooldown adds at most one record a day to the spool.
A dry-run rule writes a record each time it runs and none while its cooldown
or daily cap holds it back.

A rule that the laptop's allowlist refuses (PolicyStore.refused) never acts.
It gets one REFUSED record with the reason per policy version, whether or not
its condition holds. After that, each evaluation in which its condition holds
raises repeat_count on a pending REFUSED record, which is written like a
pending skip.

Records go to the spool as reports that carry only remediations, numbered by
the report builder like every report, so they wait offline and are acked like
reports.

Operator commands (run_command) are refused when their action is invalid
("invalid command: ...") or outside the local allowlist (worded as a refused
rule is), when expired, when their id has already run, or when self-healing
is turned off here. A command that passes runs at
once: it is not a rule, so the rules' cooldowns, daily caps and quiet hours do
not apply to it, and the operator who sent it answers for the timing. Every
refusal is a REFUSED record with the reason. The ids of refused commands are
stored like those of run ones, and a command whose id is stored gets a REFUSED
record that is returned but not spooled, because its first record already was.

An error while evaluating one rule becomes a FAILED record of that rule, and
the other rules still run. Once the stop event is set, no further rule or
command starts, and actions that wait end their wait. Record reasons are cut
to MAX_REASON_CHARS, and an action over MAX_RECORD_ACTION_BYTES is copied into
its record as its kind only. A record sets before, after and unit only from a
value that the action or the condition read.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent import clock as clock_module
from agent.healing.actions import (
    ACTION_MODULES,
    action_name,
    action_params,
    load_action,
)
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
)
from agent.healing.bounds import (
    MAX_COMMAND_ID,
    MAX_LOG_CHARS,
    MAX_NANOS,
    MAX_REASON_CHARS,
    MAX_RECORD_ACTION_BYTES,
    MAX_TIMESTAMP_SECONDS,
    MIN_TIMESTAMP_SECONDS,
    check_text,
    truncate,
)
from agent.healing.conditions import ConditionEvaluator, ConditionResult, Readings
from agent.healing.limits import HealingState, Limits, RuleState
from agent.healing.policy import PolicyStore, command_refusal, log_refused
from agent.report import ReportBuilder
from agent.spool import Spool
from agent.text import count_text
from fleetmend.v1 import remediation_pb2

log = logging.getLogger(__name__)

# A pending skip record is written at the latest this long after it started.
PENDING_FLUSH = timedelta(days=1)
# While a throttle is in place, the foreground is checked this often between
# evaluations, so that a throttled app brought to the front gets its
# priority back within seconds.
FOREGROUND_CHECK_SECONDS = 5.0

# RuleState.last_skip_reason of a refused rule starts with this, then the
# policy version and the reason, so that a new version gets a new record.
REFUSED_KEY_PREFIX = "refused in policy version "

# Outcomes after which the action counts as run for cooldowns and daily caps.
_RAN = frozenset(
    {
        Outcome.REMEDIATION_OUTCOME_SUCCEEDED,
        Outcome.REMEDIATION_OUTCOME_FAILED,
        Outcome.REMEDIATION_OUTCOME_DRY_RUN,
        Outcome.REMEDIATION_OUTCOME_ESCALATED,
    }
)


@dataclass(frozen=True)
class RulePreview:
    """A rule's condition now, its limits and a dry run of its action."""

    rule: remediation_pb2.Rule
    condition: ConditionResult
    skip_reason: str
    result: ActionResult


def refusal_is_remembered(command_id: str) -> bool:
    """Return True when a refused command's id is valid to store in healing.json."""
    return bool(command_id) and not check_text("command_id", command_id, MAX_COMMAND_ID)


def _copy_action(
    record: remediation_pb2.RemediationRecord, action: remediation_pb2.Action
) -> None:
    """Copy action into record, only its kind when over MAX_RECORD_ACTION_BYTES.

    The collector has the full action in its policy or command, so a record
    needs only enough of it to name what ran.
    """
    if action.ByteSize() <= MAX_RECORD_ACTION_BYTES:
        record.action.CopyFrom(action)
        return
    name = action_name(action)
    if name:
        getattr(record.action, name).SetInParent()


def outcome_name(outcome: int) -> str:
    """Return an outcome as a lower-case word such as "succeeded" or "dry run"."""
    name = remediation_pb2.RemediationOutcome.Name(outcome)  # type: ignore[arg-type]
    return name.removeprefix("REMEDIATION_OUTCOME_").lower().replace("_", " ")


class HealingEngine:
    """Run the rules of the policy in force and operator commands on one thread.

    run() is the loop of the agent's healing thread, which calls evaluate()
    and run_queued_commands(). submit_command(), apply_policy() and wake() may
    be called from any thread, and evaluate() and run_command() hold a lock.
    """

    def __init__(
        self,
        state_dir: Path,
        policies: PolicyStore,
        allowlist: LocalAllowlist,
        builder: ReportBuilder,
        spool: Spool | None,
        evaluator: ConditionEvaluator | None = None,
        limits: Limits | None = None,
        *,
        on_records: Callable[[], None] = lambda: None,
        foreground_apps: Callable[[], frozenset[str]] = frozenset,
        enabled: bool = True,
    ) -> None:
        """Write records to spool (None: keep them in last_records only)."""
        self.state_dir = state_dir
        self.policies = policies
        self.allowlist = allowlist
        self.builder = builder
        self.spool = spool
        self.evaluator = evaluator or ConditionEvaluator()
        self.limits = limits or Limits()
        self.enabled = enabled
        self._on_records = on_records
        self._foreground_apps = foreground_apps
        self._state = HealingState.load(state_dir)
        self._commands: queue.Queue[remediation_pb2.Command] = queue.Queue()
        self._lock = threading.Lock()
        # Set by a submitted command or by wake(), so that run() stops waiting.
        self._wake = threading.Event()
        # The agent's stop event once run() starts. Actions get it in their
        # ActionContext.
        self.stop = threading.Event()
        self.last_records: list[remediation_pb2.RemediationRecord] = []
        # The policy generation and refused rules last logged by evaluate().
        self._logged_refusals: tuple[int, dict[str, str]] | None = None
        builder.set_policy_status(policies.status)

    # -- entry points from other threads ----------------------------------------

    def submit_command(self, command: remediation_pb2.Command) -> None:
        """Queue an operator command and wake the engine's thread to run it."""
        self._commands.put(command)
        self._wake.set()

    def wake(self) -> None:
        """End the wait of run() early, so that it sees a stop event just set."""
        self._wake.set()

    def apply_policy(self, policy: remediation_pb2.Policy) -> bool:
        """Validate and apply a collector policy; return False if it was rejected.

        The new status goes into the next report either way.
        """
        problems = self.policies.apply(policy)
        self.builder.set_policy_status(self.policies.status)
        self._on_records()
        return not problems

    # -- the engine's thread ------------------------------------------------------

    def run(self, stop: threading.Event, interval_seconds: float) -> None:
        """Evaluate the rules every interval_seconds and run commands, until stop.

        The first evaluation is at once. A submitted command runs as soon as
        the thread is free. An error is logged, and an evaluation that failed
        runs again after the interval. Actions that wait end their wait when
        stop is set; the caller calls wake() after setting it.
        """
        self.stop = stop
        clock = clock_module.clock
        log.info("self-healing starting: rules evaluated every %g s", interval_seconds)
        due = clock.monotonic()
        while not stop.is_set():
            try:
                self.run_queued_commands()
            except Exception:
                log.exception("running operator commands failed")
            now = clock.monotonic()
            if now >= due and not stop.is_set():
                due = now + interval_seconds
                try:
                    self.evaluate()
                except Exception:
                    log.exception(
                        "self-healing evaluation failed; it runs again in %g s",
                        interval_seconds,
                    )
            elif self.enabled and not stop.is_set() and self._throttled():
                self.undo_throttles()
            wait = max(0.0, due - clock.monotonic())
            if self.enabled and self._throttled():
                wait = min(wait, FOREGROUND_CHECK_SECONDS)
            clock.wait(self._wake, wait)
            # A command submitted after the wait returned is in the queue,
            # which the next pass empties, so clearing here loses nothing.
            self._wake.clear()
        log.info("self-healing stopped")

    def _now(self) -> datetime:
        return clock_module.clock.now()

    def readings(self) -> Readings:
        """Return the builder's latest readings of the sections that conditions test."""
        return Readings(
            host=self.builder.latest("host"),  # type: ignore[arg-type]
            disks=self.builder.latest("disks"),  # type: ignore[arg-type]
            batteries=self.builder.latest("batteries"),  # type: ignore[arg-type]
            credentials=self.builder.latest("credentials"),  # type: ignore[arg-type]
        )

    def _context(
        self, dry_run: bool, foreground_apps: frozenset[str] = frozenset()
    ) -> ActionContext:
        return ActionContext(
            state_dir=self.state_dir,
            allowlist=self.allowlist,
            dry_run=dry_run,
            foreground_apps=foreground_apps,
            stop=self.stop,
        )

    def evaluate(self) -> list[remediation_pb2.RemediationRecord]:
        """Evaluate every rule once and undo expired throttles; return the records."""
        if not self.enabled:
            return []
        with self._lock:
            now = self._now()
            records = self._undo_throttles(now)
            policy, refused = self.policies.in_force()
            if self._logged_refusals != (policy.version, refused):
                self._logged_refusals = (policy.version, refused)
                log_refused(policy, refused)
            readings = self.readings()
            for rule in policy.rules:
                if self.stop.is_set():
                    log.info(
                        "shutting down; the remaining rules wait for the next start"
                    )
                    break
                if rule.paused:
                    continue
                state = self._state.rule(rule.name)
                records += self._evaluate_rule_safely(
                    rule,
                    policy.version,
                    state,
                    readings,
                    now,
                    refused.get(rule.name, ""),
                )
            for rule in policy.rules:
                state = self._state.rule(rule.name)
                since = state.pending_since
                if since is not None and now - since >= PENDING_FLUSH:
                    records += self._flush_pending(state)
            records += self._forget_removed_rules(policy)
            self._state.save(now)
            self._write(records)
            return records

    def _evaluate_rule_safely(
        self,
        rule: remediation_pb2.Rule,
        version: int,
        state: RuleState,
        readings: Readings,
        now: datetime,
        refusal: str = "",
    ) -> list[remediation_pb2.RemediationRecord]:
        """Evaluate one rule; an error becomes a FAILED record for that rule only.

        The other rules still run and the state is still saved, so the
        cooldowns of rules that acted survive a restart.
        """
        try:
            return self._evaluate_rule(rule, version, state, readings, now, refusal)
        except Exception as exc:
            log.exception("evaluating rule %s failed", rule.name)
            result = ActionResult(
                Outcome.REMEDIATION_OUTCOME_FAILED,
                reason=f"evaluating the rule failed: {type(exc).__name__}: {exc}",
            )
            record = self._record(rule.action, result, None, now, time.monotonic())
            record.rule = rule.name
            record.policy_version = version
            return [record]

    def _evaluate_rule(
        self,
        rule: remediation_pb2.Rule,
        version: int,
        state: RuleState,
        readings: Readings,
        now: datetime,
        refusal: str,
    ) -> list[remediation_pb2.RemediationRecord]:
        if state.stopped_reason and state.stopped_policy_version != version:
            # A new policy from the operator resolves the escalation.
            state.stopped_reason = ""
        monotonic = clock_module.clock.monotonic()
        condition = self.evaluator.evaluate(
            rule.name, rule.condition, readings, now, monotonic
        )
        if refusal:
            return self._refuse(rule, version, state, refusal, condition, now)
        records: list[remediation_pb2.RemediationRecord] = []
        if state.last_skip_reason.startswith(REFUSED_KEY_PREFIX):
            # The allowlist permits the rule now, so its pending refusal is
            # written and the rule runs from here on.
            state.last_skip_reason = ""
            records = self._flush_pending(state)
        return records + self._evaluate_permitted_rule(
            rule, version, state, readings, condition, now, monotonic
        )

    def _evaluate_permitted_rule(
        self,
        rule: remediation_pb2.Rule,
        version: int,
        state: RuleState,
        readings: Readings,
        condition: ConditionResult,
        now: datetime,
        monotonic: float,
    ) -> list[remediation_pb2.RemediationRecord]:
        """Check the rule's escalation, condition and limits, then act."""
        if state.stopped_reason:
            return self._skip(
                rule, version, state, state.stopped_reason, condition, now
            )
        if not condition.holds:
            return []

        reason = self.limits.skip_reason(rule, state, now)
        if reason and rule.dry_run:
            # A dry run is skipped only by its cooldown or daily cap, and a
            # record of that would only repeat the previous dry run.
            return []
        if reason:
            return self._skip(rule, version, state, reason, condition, now)

        if rule.condition.WhichOneof("kind") == "free_space_below":
            # Precheck on the file system itself: the reading may be minutes old.
            condition = self.evaluator.evaluate(
                rule.name, rule.condition, readings, now, monotonic, live=True
            )
            if not condition.holds:
                return self._skip(
                    rule,
                    version,
                    state,
                    f"condition no longer holds at the precheck: {condition.detail}",
                    condition,
                    now,
                )
        return self._act(rule, version, state, condition, now)

    def _act(
        self,
        rule: remediation_pb2.Rule,
        version: int,
        state: RuleState,
        condition: ConditionResult,
        now: datetime,
    ) -> list[remediation_pb2.RemediationRecord]:
        """Run the rule's action and record its outcome in the rule's state."""
        started = self._now()
        start_monotonic = time.monotonic()
        result = self._execute(rule.action, rule.dry_run, rule.name)
        record = self._record(rule.action, result, condition, started, start_monotonic)
        record.rule = rule.name
        record.policy_version = version
        if result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED:
            return self._skip(rule, version, state, result.reason, condition, now)

        records = self._flush_pending(state)
        state.last_skip_reason = ""
        if result.outcome in _RAN:
            state.runs.append(now)
        if result.outcome == Outcome.REMEDIATION_OUTCOME_ESCALATED:
            state.stopped_reason = (
                f"stopped after repeated failures ({result.reason}); escalated to "
                "the collector, waits for a new policy"
            )
            state.stopped_policy_version = version
        log.info(
            "rule %s: %s: %s (%s)",
            rule.name,
            outcome_name(record.outcome),
            truncate(record.reason, MAX_LOG_CHARS) or "done",
            condition.detail,
        )
        records.append(record)
        return records

    def _execute(
        self, action: remediation_pb2.Action, dry_run: bool, rule_name: str = ""
    ) -> ActionResult:
        name = action_name(action)
        try:
            module: Any = load_action(name)
            context = self._context(dry_run)
            options: dict[str, Any] = {}
            if name == "throttle_process":
                # The throttle remembers its rule for the record of its undo,
                # and finds the app in the agent's catalog, site files included.
                options["source_rule"] = rule_name
                catalog = self.evaluator.catalog()
                if catalog is not None:
                    options["catalog"] = catalog
            return module.execute(action_params(action), context, **options)
        except Exception as exc:
            # An action reports failures as results, so an exception is a bug
            # in it. It is recorded as a failure, which the collector's
            # circuit breaker counts.
            log.exception("action %s raised instead of returning a result", name)
            return ActionResult(
                Outcome.REMEDIATION_OUTCOME_FAILED,
                reason=f"action {name} failed: {type(exc).__name__}: {exc}",
            )

    @staticmethod
    def _record(
        action: remediation_pb2.Action,
        result: ActionResult,
        condition: ConditionResult | None,
        started: datetime,
        start_monotonic: float,
    ) -> remediation_pb2.RemediationRecord:
        record = remediation_pb2.RemediationRecord(
            outcome=result.outcome,
            reason=truncate(result.reason, MAX_REASON_CHARS),
            bytes_freed=result.bytes_freed,
        )
        _copy_action(record, action)
        if result.unit:
            record.before, record.after, record.unit = (
                result.before,
                result.after,
                result.unit,
            )
        elif (
            condition is not None
            and condition.value is not None
            and result.outcome != Outcome.REMEDIATION_OUTCOME_FAILED
        ):
            # The action measured nothing, so the record carries the value
            # that the condition read, unchanged. An action that failed may
            # have changed it, and nothing read it afterwards.
            record.before = record.after = condition.value
            record.unit = condition.unit
        record.start_time.FromDatetime(started)
        record.duration.FromTimedelta(
            timedelta(seconds=max(0.0, time.monotonic() - start_monotonic))
        )
        return record

    def _skip(
        self,
        rule: remediation_pb2.Rule,
        version: int,
        state: RuleState,
        reason: str,
        condition: ConditionResult,
        now: datetime,
        *,
        outcome: Outcome.ValueType = Outcome.REMEDIATION_OUTCOME_SKIPPED,
        key: str = "",
    ) -> list[remediation_pb2.RemediationRecord]:
        """Record a skip for a new reason; count a repeat on the pending record.

        key, when set, replaces reason in the comparison with the previous skip.
        """
        key = key or reason
        record = remediation_pb2.RemediationRecord(
            rule=rule.name,
            policy_version=version,
            outcome=outcome,
            reason=truncate(reason, MAX_REASON_CHARS),
        )
        # A condition that read no value, such as a service whose status is
        # unknown, leaves before, after and unit unset.
        if condition.value is not None:
            record.before = record.after = condition.value
            record.unit = condition.unit
        _copy_action(record, rule.action)
        record.start_time.FromDatetime(now)
        if key != state.last_skip_reason:
            records = self._flush_pending(state)
            state.last_skip_reason = key
            log.info(
                "rule %s: %s: %s",
                rule.name,
                outcome_name(outcome),
                truncate(reason, MAX_LOG_CHARS),
            )
            records.append(record)
            return records
        if state.pending is None:
            record.repeat_count = 1
            state.pending = record
            state.pending_since = now
        else:
            state.pending.repeat_count += 1
            if condition.value is not None:
                state.pending.before = state.pending.after = condition.value
                state.pending.unit = condition.unit
        return []

    def _refuse(
        self,
        rule: remediation_pb2.Rule,
        version: int,
        state: RuleState,
        reason: str,
        condition: ConditionResult,
        now: datetime,
    ) -> list[remediation_pb2.RemediationRecord]:
        """Record a rule that the allowlist refuses: once per policy version.

        Repeats are counted only when the condition holds, that is when the
        rule would have acted.
        """
        key = f"{REFUSED_KEY_PREFIX}{version}: {reason}"
        if key == state.last_skip_reason and not condition.holds:
            return []
        return self._skip(
            rule,
            version,
            state,
            reason,
            condition,
            now,
            outcome=Outcome.REMEDIATION_OUTCOME_REFUSED,
            key=key,
        )

    def _forget_removed_rules(
        self, policy: remediation_pb2.Policy
    ) -> list[remediation_pb2.RemediationRecord]:
        """Drop the state of rules that left the policy; return their pending skips."""
        names = {rule.name for rule in policy.rules}
        records: list[remediation_pb2.RemediationRecord] = []
        for name in [n for n in self._state.rules if n not in names]:
            records += self._flush_pending(self._state.rules.pop(name))
        return records

    @staticmethod
    def _flush_pending(state: RuleState) -> list[remediation_pb2.RemediationRecord]:
        if state.pending is None:
            return []
        record = state.pending
        state.pending = None
        state.pending_since = None
        return [record]

    def undo_throttles(self) -> list[remediation_pb2.RemediationRecord]:
        """Undo the throttles that expired or whose app is in the foreground now."""
        with self._lock:
            records = self._undo_throttles(self._now())
            if records:
                self._write(records)
            return records

    def _throttle_module(self) -> Any:
        try:
            return importlib.import_module(ACTION_MODULES["throttle_process"])
        except ImportError:
            log.debug("throttle_process is not available; no throttles to undo")
            return None

    def _throttled(self) -> bool:
        throttle_process = self._throttle_module()
        if throttle_process is None:
            return False
        store = throttle_process.ThrottleStore(
            self.state_dir / throttle_process.STATE_FILE
        )
        return bool(store.load())

    def _undo_throttles(self, now: datetime) -> list[remediation_pb2.RemediationRecord]:
        """Restore throttles that expired or whose app is in the foreground."""
        throttle_process = self._throttle_module()
        if throttle_process is None:
            return []
        try:
            if not self._throttled():
                return []
            # The foreground is read only while a throttle is in place, since
            # reading it runs xprop or lsappinfo.
            context = self._context(False, self._foreground_apps())
            results = throttle_process.tick(context, now)
        except Exception:
            log.exception("undoing expired throttles failed")
            return []
        records = []
        for result in results:
            action = remediation_pb2.Action()
            action.throttle_process.app_id = result.details.get("app_id", "")
            record = self._record(action, result, None, now, time.monotonic())
            record.rule = result.details.get("rule", "")
            record.policy_version = self.policies.applied_version
            log.info(
                "throttle of %s undone: %s",
                action.throttle_process.app_id,
                result.reason,
            )
            records.append(record)
        return records

    # -- commands -------------------------------------------------------------------

    def run_queued_commands(self) -> list[remediation_pb2.RemediationRecord]:
        """Run the commands that arrived since the last call; return their records."""
        records: list[remediation_pb2.RemediationRecord] = []
        while not self.stop.is_set():
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return records
            records.append(self.run_command(command))
        # Commands left in the queue at shutdown have no stored id, and the
        # collector sends pending commands again at every connect.
        return records

    def _refusal(self, command: remediation_pb2.Command) -> str:
        now = self._now()
        if not self.enabled:
            return "self-healing is turned off on this device (healing.enabled = false)"
        if not command.command_id:
            return "the command has no id"
        bad_id = check_text("command_id", command.command_id, MAX_COMMAND_ID)
        if bad_id:
            return bad_id[0]
        if command.command_id in self._state.commands:
            ran = self._state.commands[command.command_id]
            return f"command {command.command_id} already ran at {ran.isoformat()}"
        if command.command_id in self._state.refused_commands:
            refused = self._state.refused_commands[command.command_id]
            return (
                f"command {command.command_id} was already refused at "
                f"{refused.isoformat()}"
            )
        if not command.HasField("expire_time"):
            return "the command has no expiry time"
        seconds, nanos = command.expire_time.seconds, command.expire_time.nanos
        if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
            return (
                f"the command's expire_time has {seconds} seconds, outside the "
                "Timestamp range of years 1 to 9999"
            )
        if not 0 <= nanos <= MAX_NANOS:
            return (
                f"the command's expire_time has {nanos} nanos; expected 0 to "
                f"{MAX_NANOS}"
            )
        expire = command.expire_time.ToDatetime(now.tzinfo)
        if now > expire:
            return f"the command expired at {expire.isoformat()}"
        return command_refusal(command.action, self.allowlist)

    def run_command(
        self, command: remediation_pb2.Command
    ) -> remediation_pb2.RemediationRecord:
        """Run one operator command now, or refuse it; write and return its record."""
        with self._lock:
            now = self._now()
            start_monotonic = time.monotonic()
            known = self._state.known_command_time(command.command_id)
            refusal = self._refusal(command)
            if refusal:
                result = ActionResult(
                    Outcome.REMEDIATION_OUTCOME_REFUSED, reason=refusal
                )
                if known is None and refusal_is_remembered(command.command_id):
                    # A collector that sends the command again on every
                    # reconnect gets no second record.
                    self._state.refused_commands[command.command_id] = now
                    self._state.save(now)
                log.warning(
                    "refused command %s: %s",
                    truncate(command.command_id, MAX_COMMAND_ID),
                    truncate(refusal, MAX_LOG_CHARS),
                )
            else:
                self._state.commands[command.command_id] = now
                # Saved before the action runs, so a crash during it cannot
                # make the command run twice.
                self._state.save(now)
                result = self._execute(command.action, dry_run=False)
                log.info(
                    "command %s (%s): %s: %s",
                    command.command_id,
                    action_name(command.action),
                    outcome_name(result.outcome),
                    truncate(result.reason, MAX_LOG_CHARS) or "done",
                )
            record = self._record(command.action, result, None, now, start_monotonic)
            record.command_id = truncate(command.command_id, MAX_COMMAND_ID)
            record.policy_version = self.policies.applied_version
            if known is None:
                self._write([record])
            else:
                # The first arrival of this id was recorded and spooled.
                log.info(
                    "command %s arrived again; its first record was already spooled",
                    command.command_id,
                )
                self.last_records = [record]
            return record

    # -- records ----------------------------------------------------------------------

    def _write(self, records: list[remediation_pb2.RemediationRecord]) -> None:
        self.last_records = list(records)
        if not records or self.spool is None:
            return
        report = self.builder.build_remediations(records)
        self.spool.put_remediation(
            report.sequence, report.SerializeToString(deterministic=True)
        )
        log.info(
            "report %d spooled with %s",
            report.sequence,
            count_text(len(records), "remediation record"),
        )
        self._on_records()

    # -- preview for the CLI -------------------------------------------------------

    def preview(self, readings: Readings) -> list[RulePreview]:
        """Evaluate every rule and dry-run its action; change no state or spool."""
        now = self._now()
        previews = []
        policy, refused = self.policies.in_force()
        for rule in policy.rules:
            state = self._state.rules.get(rule.name, RuleState())
            condition = self.evaluator.evaluate(
                rule.name, rule.condition, readings, now, clock_module.clock.monotonic()
            )
            if rule.name in refused:
                # A refused rule never acts, so its action is not dry-run: the
                # result repeats the refusal.
                result = ActionResult(
                    Outcome.REMEDIATION_OUTCOME_REFUSED, reason=refused[rule.name]
                )
                reason = f"refused on this device: {refused[rule.name]}"
                previews.append(RulePreview(rule, condition, reason, result))
                continue
            if rule.paused:
                why = rule.paused_reason or "no reason given"
                reason = f"paused by the collector: {why}"
            else:
                reason = state.stopped_reason or self.limits.skip_reason(
                    rule, state, now
                )
            result = self._execute(rule.action, True, rule.name)
            previews.append(RulePreview(rule, condition, reason, result))
        return previews
