"""The self-healing handlers of the OpsService and their request checks.

They cover SetPolicy, GetPolicy, ListRules, ChangeRuleState, SendCommand and
ListRemediations. OpsServicer in collector._ops inherits them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from agent.healing.actions import validate_action
from agent.healing.actions.base import LocalAllowlist
from agent.healing.bounds import is_control, is_layout_character, truncate
from agent.healing.policy import allowlist_of, check_policy
from agent.text import count_text
from collector import fleet
from collector._authz import current_operator
from collector._ops_cli_healing import check_required_parameters
from collector._ops_common import (
    FLEET_SCAN_CHUNK,
    DeviceStreams,
    InvalidPageTokenError,
    _abort_failed,
    _abort_invalid,
    _decode_base64,
    _ends_with_status,
    _failure,
    _invalid,
    _log_rejected,
    _Rejected,
    _timestamp,
    _to_datetime,
    effective_page_size,
)
from collector._validation import InvalidMessageError, validate_device_id
from collector.store import (
    COMMAND_SUMMARY_RULE,
    CommandRecord,
    RemediationPosition,
    RuleStateRecord,
    Store,
    StoredRemediationRecord,
    UnknownDeviceError,
)
from fleetmend.v1 import ops_pb2, ops_pb2_grpc, remediation_pb2

logger = logging.getLogger(__name__)

# The page token of ListRemediations, in the format of the tokens in
# collector._ops.
_REMEDIATIONS_TOKEN_PREFIX = "r1."  # noqa: S105 - a page position, not a secret

# Rule names, as remediation.proto states them.
RULE_NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
# The store returns the outcomes of at most this many latest runs per rule,
# so a circuit breaker cannot look further back.
MAX_BREAKER_WINDOW = 1000
MAX_RULE_REASON_CHARS = 500
# Bound on the agent's problems quoted in one INVALID_ARGUMENT message, which
# gRPC carries in a header.
MAX_AGENT_PROBLEMS_CHARS = 2000
# Time to live of a command, as ops.proto states it.
DEFAULT_COMMAND_TTL = timedelta(hours=24)
MIN_COMMAND_TTL = timedelta(minutes=1)
MAX_COMMAND_TTL = timedelta(days=7)
# Largest seconds value of a google.protobuf.Duration (10000 years).
MAX_DURATION_SECONDS = 315_576_000_000


class HealingHandlers(ops_pb2_grpc.OpsServiceServicer):
    """The self-healing methods of OpsServicer, which sets these attributes."""

    _store: Store
    _clock: Callable[[], datetime]
    _streams: DeviceStreams

    @_ends_with_status(ops_pb2.SetPolicyResponse)
    async def SetPolicy(
        self, request: ops_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.SetPolicyResponse:
        policy = remediation_pb2.Policy()
        policy.CopyFrom(request.policy)
        policy.version = 0
        try:
            validate_policy(policy)
        except ValueError as error:
            raise _invalid(context, "SetPolicy", str(error)) from None
        set_by = current_operator().name
        try:
            version = await asyncio.to_thread(
                self._store.set_policy, policy, set_by, self._clock()
            )
        except Exception as error:
            raise _failure(context, "SetPolicy", error) from error
        logger.info(
            "policy version %d with %s set by %s",
            version,
            count_text(len(policy.rules), "rule"),
            set_by,
        )
        self._streams.notify_policy_changed()
        return ops_pb2.SetPolicyResponse(version=version)

    async def GetPolicy(
        self, request: ops_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.GetPolicyResponse:
        try:
            response = await asyncio.to_thread(self._get_policy)
        except Exception as error:
            await _abort_failed(context, "GetPolicy", error)
        return response

    def _get_policy(self) -> ops_pb2.GetPolicyResponse:
        record = self._store.current_policy()
        if record is None:
            return ops_pb2.GetPolicyResponse()
        policy = remediation_pb2.Policy()
        policy.CopyFrom(record.policy)
        policy.version = record.version
        generation = fleet.policy_generation(record, self._store.rule_states())
        return ops_pb2.GetPolicyResponse(policy=policy, generation=generation)

    async def ListRules(
        self, request: ops_pb2.ListRulesRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.ListRulesResponse:
        try:
            response = await asyncio.to_thread(self._list_rules)
        except Exception as error:
            await _abort_failed(context, "ListRules", error)
        return response

    def _list_rules(self) -> ops_pb2.ListRulesResponse:
        response = ops_pb2.ListRulesResponse(rules=self._list_rule_states())
        record = self._store.current_policy()
        if record is None:
            return response
        # Agents report the generation of the effective policy, not the
        # version that SetPolicy assigned.
        generation = fleet.policy_generation(record, self._store.rule_states())
        count, reason = self._store.policy_rejections(generation)
        response.rejecting_devices = count
        response.rejected_reason_example = reason
        return response

    def _list_rule_states(self, only: str = "") -> list[ops_pb2.RuleState]:
        """Return the fleet state of each rule of the current policy, in its order.

        only limits the result to the rule of that name.
        """
        record = self._store.current_policy()
        if record is None:
            return []
        rules = [rule for rule in record.policy.rules if not only or rule.name == only]
        if not rules:
            return []
        states = self._store.rule_states()
        statistics = self._store.rule_statistics(fleet.utc_day_start(self._clock()))
        # Only devices that applied the current effective policy count, so a
        # device still on an older one does not count for a rule it refused.
        refusals = self._store.rule_refusals(fleet.policy_generation(record, states))
        canary_rules = {
            rule.name
            for rule in rules
            if _stage(states.get(rule.name)) == ops_pb2.RULE_STAGE_CANARY
        }
        device_ids = self._command_device_ids() if canary_rules else []
        messages = []
        for rule in rules:
            state = states.get(rule.name)
            stats = statistics.get(rule.name)
            message = ops_pb2.RuleState(
                name=rule.name,
                stage=_stage(state),
                reason=state.reason if state is not None else "",
                dry_run=rule.dry_run,
            )
            if stats is not None:
                message.runs = stats.runs
                message.failures = stats.failures
                message.runs_today = stats.runs_today
            if rule.name in refusals:
                refusing, reason = refusals[rule.name]
                message.refusing_devices = refusing
                message.refused_reason_example = reason
            if rule.name in canary_rules:
                message.canary_devices = sum(
                    1
                    for device_id in device_ids
                    if fleet.in_canary(device_id, rule.name, rule.fleet.canary_percent)
                )
            messages.append(message)
        return messages

    @_ends_with_status(ops_pb2.ChangeRuleStateResponse)
    async def ChangeRuleState(
        self,
        request: ops_pb2.ChangeRuleStateRequest,
        context: grpc.aio.ServicerContext,
    ) -> ops_pb2.ChangeRuleStateResponse:
        if not request.name:
            raise _invalid(context, "ChangeRuleState", "name is required")
        if request.change not in _RULE_CHANGES:
            raise _invalid(
                context,
                "ChangeRuleState",
                f"change {request.change} is not one of promote, pause or resume",
            )
        if len(request.reason) > MAX_RULE_REASON_CHARS:
            raise _invalid(
                context,
                "ChangeRuleState",
                f"reason has {len(request.reason)} characters, more than the "
                f"maximum of {MAX_RULE_REASON_CHARS}",
            )
        if any(is_control(c) or is_layout_character(c) for c in request.reason):
            # Agents and the CLI print the reason on terminals, where an ESC
            # would start an escape sequence.
            raise _invalid(
                context,
                "ChangeRuleState",
                "reason contains a control or line break character; write it as "
                "one line of plain text",
            )
        changed_by = current_operator().name
        try:
            changed = await asyncio.to_thread(
                self._change_rule_state, request, changed_by
            )
        except _Rejected as rejected:
            _log_rejected(context, "ChangeRuleState", rejected)
            raise
        except Exception as error:
            raise _failure(context, "ChangeRuleState", error) from error
        if changed is None:
            not_found = _Rejected(
                grpc.StatusCode.NOT_FOUND,
                f"rule {request.name[:80]!r} is not in the current policy",
            )
            _log_rejected(context, "ChangeRuleState", not_found)
            raise not_found
        rule_state, was_changed = changed
        if was_changed:
            logger.info(
                "rule %s %s by %s: now %s",
                request.name,
                _RULE_CHANGES[request.change],
                changed_by,
                _STAGE_NAMES.get(rule_state.stage, "unknown"),
            )
            self._streams.notify_policy_changed()
        return ops_pb2.ChangeRuleStateResponse(rule=rule_state, changed=was_changed)

    def _change_rule_state(
        self, request: ops_pb2.ChangeRuleStateRequest, changed_by: str
    ) -> tuple[ops_pb2.RuleState, bool] | None:
        """Apply the change; return the new state and whether it changed.

        Returns None for a rule not in the current policy, and raises _Rejected
        for a promotion of a paused rule.
        """
        record = self._store.current_policy()
        rule = None
        if record is not None:
            rule = next(
                (
                    candidate
                    for candidate in record.policy.rules
                    if candidate.name == request.name
                ),
                None,
            )
        if rule is None:
            return None
        current = self._store.rule_states().get(rule.name)
        stage = _STAGE_NAMES.get(_stage(current), fleet.ACTIVE)
        statistics = self._store.rule_statistics(fleet.utc_day_start(self._clock()))
        stats = statistics.get(rule.name)
        runs = stats.runs if stats is not None else 0
        target = _target_stage(request, rule, stage, runs, changed_by)
        if target is None:
            return self._list_rule_states(only=rule.name)[0], False
        new_stage, reason = target
        updated = self._store.set_rule_state(
            rule.name, new_stage, reason, changed_by, self._clock()
        )
        if updated is None:
            return None
        return self._list_rule_states(only=rule.name)[0], True

    @_ends_with_status(ops_pb2.SendCommandResponse)
    async def SendCommand(
        self, request: ops_pb2.SendCommandRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.SendCommandResponse:
        try:
            time_to_live = _parse_command_request(request)
        except ValueError as error:
            raise _invalid(context, "SendCommand", str(error)) from None
        created_by = current_operator().name
        try:
            records = await asyncio.to_thread(
                self._create_commands, request, time_to_live, created_by
            )
        except _Rejected as rejected:
            _log_rejected(context, "SendCommand", rejected)
            raise
        except Exception as error:
            raise _failure(context, "SendCommand", error) from error
        device_ids = [record.device_id for record in records]
        sent = self._streams.deliver_commands(device_ids) if device_ids else set()
        action_name = request.action.WhichOneof("kind")
        logger.info(
            "command %s for %s created by %s, %d sent at once",
            action_name,
            count_text(len(records), "device"),
            created_by,
            len(sent),
        )
        return ops_pb2.SendCommandResponse(
            commands=[
                ops_pb2.CommandStatus(
                    command_id=record.command_id,
                    device_id=record.device_id,
                    expire_time=_timestamp(record.expire_time),
                    sent=record.device_id in sent,
                )
                for record in records
            ]
        )

    def _create_commands(
        self,
        request: ops_pb2.SendCommandRequest,
        time_to_live: timedelta,
        created_by: str,
    ) -> list[CommandRecord]:
        """Check the target devices and store one command per device.

        Raises _Rejected with NOT_FOUND for an unknown device and
        FAILED_PRECONDITION for a revoked one.
        """
        if request.all_devices:
            device_ids = self._command_device_ids()
            if not device_ids:
                return []
        else:
            device_ids = sorted(set(request.device_ids))
            revoked = sorted(self._store.revoked_device_ids(device_ids))
            if revoked:
                subject = (
                    f"device {revoked[0]} is"
                    if len(revoked) == 1
                    else f"devices {', '.join(revoked)} are"
                )
                raise _Rejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{subject} revoked and cannot receive commands until enrolled "
                    "again; leave them out",
                )
        now = self._clock()
        try:
            return self._store.create_commands(
                request.action, device_ids, now + time_to_live, created_by, now
            )
        except UnknownDeviceError as error:
            raise _Rejected(grpc.StatusCode.NOT_FOUND, str(error)) from None

    def _command_device_ids(self) -> list[str]:
        """Return the ids of every device that is not revoked, in id order."""
        device_ids: list[str] = []
        after = ""
        while True:
            devices = self._store.list_devices(
                limit=FLEET_SCAN_CHUNK, after_device_id=after
            )
            chunk = [device.device_id for device in devices]
            revoked = self._store.revoked_device_ids(chunk)
            device_ids.extend(item for item in chunk if item not in revoked)
            if len(devices) < FLEET_SCAN_CHUNK:
                return device_ids
            after = chunk[-1]

    async def ListRemediations(
        self,
        request: ops_pb2.ListRemediationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> ops_pb2.ListRemediationsResponse:
        try:
            query = _parse_remediations_request(request)
        except ValueError as error:
            await _abort_invalid(context, "ListRemediations", str(error))
        try:
            records, summaries = await asyncio.to_thread(self._list_remediations, query)
        except Exception as error:
            await _abort_failed(context, "ListRemediations", error)
        page = records[: query.page_size]
        response = ops_pb2.ListRemediationsResponse(
            remediations=[stored_remediation_message(record) for record in page],
            summaries=summaries,
        )
        if len(records) > query.page_size:
            response.next_page_token = encode_remediations_token(page[-1].position)
        return response

    def _list_remediations(
        self, query: _RemediationQuery
    ) -> tuple[list[StoredRemediationRecord], list[ops_pb2.RuleSummary]]:
        records = self._store.list_remediations(
            query.page_size + 1,
            query.before,
            device_id=query.device_id,
            rule=query.rule,
            outcome=query.outcome,
            since=query.since,
        )
        # Every page carries the summary of every matching record, as
        # ListRemediationsResponse.summaries states.
        summaries = self._store.summarize_remediations(
            device_id=query.device_id,
            rule=query.rule,
            outcome=query.outcome,
            since=query.since,
        )
        return records, summaries


def validate_policy(policy: remediation_pb2.Policy) -> None:
    """Check the structure of a policy as SetPolicy states; raise ValueError.

    Every rule needs a valid unique name, a condition and an action, fleet
    limits in range, and valid durations and numbers. The name "command" is
    rejected, because it labels the records of operator commands. Last, the
    policy goes through the agent's own check with a permissive allowlist, so
    that a policy which every agent of this version would reject is rejected
    here. What remains for each agent is its local allowlist of services and
    cache sets, which refuses single rules.
    """
    first_index: dict[str, int] = {}
    for index, rule in enumerate(policy.rules):
        if not rule.name:
            raise ValueError(f"rules[{index}] has no name")
        if not RULE_NAME_PATTERN.fullmatch(rule.name):
            raise ValueError(
                f"rules[{index}] has the invalid name {rule.name[:80]!r}; use 1 to "
                "64 of a-z, 0-9, '_' and '-'"
            )
        if rule.name == COMMAND_SUMMARY_RULE:
            raise ValueError(
                f"rules[{index}] is named {rule.name!r}, the name under which "
                "`fleetmend remediations` lists the records of operator commands; "
                "give the rule another name"
            )
        if rule.name in first_index:
            raise ValueError(
                f"rule name {rule.name!r} is used twice, by rules"
                f"[{first_index[rule.name]}] and rules[{index}]"
            )
        first_index[rule.name] = index
        where = f"rule {rule.name!r}"
        if not rule.condition.WhichOneof("kind"):
            choices = ", ".join(_oneof_names(remediation_pb2.Condition))
            raise ValueError(f"{where} has no condition; set one of {choices}")
        check_action(rule.action, where)
        if rule.paused or rule.paused_reason:
            raise ValueError(
                f"{where} sets paused or paused_reason, which only the collector's "
                f"fleet limits set; leave them out and run `fleetmend rules pause "
                f"{rule.name}` instead"
            )
        _check_fleet_limits(rule.fleet, where)
        _check_values(rule, where)
    problems = check_policy(policy, LocalAllowlist()).problems
    if problems:
        raise ValueError(_agent_problems("policy", "reject", problems))


def _agent_problems(subject: str, verb: str, problems: list[str]) -> str:
    """Return the agent's problems with a subject, as one message for an operator."""
    listed = truncate("; ".join(problems), MAX_AGENT_PROBLEMS_CHARS)
    return f"agents would {verb} this {subject}: {listed}"


def check_action(action: remediation_pb2.Action, where: str) -> None:
    """Raise ValueError unless one action is set with valid durations and numbers."""
    if not action.WhichOneof("kind"):
        choices = ", ".join(_oneof_names(remediation_pb2.Action))
        raise ValueError(f"{where} has no action; set one of {choices}")
    _check_values(action, where)


def _check_fleet_limits(limits: remediation_pb2.FleetLimits, where: str) -> None:
    if limits.canary_percent > 100:
        raise ValueError(
            f"{where} has fleet.canary_percent {limits.canary_percent}; give 0 to "
            "100 (0 and 100 mean the whole fleet at once)"
        )
    ratio = limits.max_failure_ratio
    if not (math.isfinite(ratio) and 0 <= ratio <= 1):
        raise ValueError(
            f"{where} has fleet.max_failure_ratio {ratio}; give a ratio from 0 to 1"
        )
    if limits.breaker_window > MAX_BREAKER_WINDOW:
        raise ValueError(
            f"{where} has fleet.breaker_window {limits.breaker_window}, more than "
            f"the maximum of {MAX_BREAKER_WINDOW} runs"
        )


def _check_values(message: Message, where: str, path: str = "") -> None:
    """Check every set duration, ratio, percentage and hour under message.

    Raises ValueError naming the field by its path from the rule or action.
    """
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        items = value if field.is_repeated else [value]
        for position, item in enumerate(items):
            item_name = f"{name}[{position}]" if field.is_repeated else name
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if isinstance(item, Duration):
                    _check_duration(item, f"{where} {item_name}")
                else:
                    _check_values(item, where, f"{item_name}.")
            elif field.type in (
                FieldDescriptor.TYPE_DOUBLE,
                FieldDescriptor.TYPE_FLOAT,
            ):
                _check_number(field.name, item, f"{where} {item_name}")
            elif field.name in ("start_hour", "end_hour") and item > 23:
                raise ValueError(f"{where} has {item_name} {item}; give 0 to 23")


def _check_number(field_name: str, value: float, where: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} is {value}; give a finite number of at least 0")
    if field_name == "ratio" and value > 1:
        raise ValueError(f"{where} is {value}; give a ratio from 0 to 1")


def _check_duration(duration: Duration, where: str) -> None:
    if duration.seconds < 0 or duration.nanos < 0:
        raise ValueError(f"{where} is negative; give a span of at least 0s")
    if duration.seconds > MAX_DURATION_SECONDS or duration.nanos > 999_999_999:
        raise ValueError(f"{where} is out of the range of a protobuf Duration")


def _is_remediation_position(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 4:
        return False
    types = (int, str, int, int)
    return all(
        isinstance(item, kind) and not isinstance(item, bool)
        for item, kind in zip(value, types, strict=True)
    )


def _oneof_names(message_type: type[Message]) -> list[str]:
    """Return the field names of the "kind" oneof of a Condition or an Action."""
    oneof = message_type.DESCRIPTOR.oneofs_by_name["kind"]
    return [field.name for field in oneof.fields]


_STAGES = {
    fleet.ACTIVE: ops_pb2.RULE_STAGE_ACTIVE,
    fleet.CANARY: ops_pb2.RULE_STAGE_CANARY,
    fleet.PAUSED: ops_pb2.RULE_STAGE_PAUSED,
}
_STAGE_NAMES = {stage: name for name, stage in _STAGES.items()}
_RULE_CHANGES = {
    ops_pb2.RULE_CHANGE_PROMOTE: "promoted",
    ops_pb2.RULE_CHANGE_PAUSE: "paused",
    ops_pb2.RULE_CHANGE_RESUME: "resumed",
}


def _stage(state: RuleStateRecord | None) -> ops_pb2.RuleStage.ValueType:
    """Return the RuleStage of a stored rule state; a rule without one is active."""
    if state is None:
        return ops_pb2.RULE_STAGE_ACTIVE
    return _STAGES.get(state.stage, ops_pb2.RULE_STAGE_UNSPECIFIED)


def _target_stage(
    request: ops_pb2.ChangeRuleStateRequest,
    rule: remediation_pb2.Rule,
    stage: str,
    runs: int,
    changed_by: str,
) -> tuple[str, str] | None:
    """Return the stage and reason that a change leads to, None if it changes nothing.

    runs is the rule's runs across the fleet so far. Raises _Rejected with
    FAILED_PRECONDITION for promoting a paused rule.
    """
    note = f": {request.reason}" if request.reason else ""
    if request.change == ops_pb2.RULE_CHANGE_PAUSE:
        return fleet.PAUSED, f"paused by {changed_by}{note}"
    if request.change == ops_pb2.RULE_CHANGE_PROMOTE:
        if stage == fleet.PAUSED:
            raise _Rejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rule {rule.name!r} is paused; resume it with `fleetmend rules "
                f"resume {rule.name}` before promoting it",
            )
        if stage == fleet.ACTIVE:
            return None
        return fleet.ACTIVE, f"promoted by {changed_by}{note}"
    if stage != fleet.PAUSED:
        return None
    # As the fleet limits resume a rule after a budget pause: a rule with a
    # canary set that has not had promote_after_runs runs yet goes back to
    # its canary devices.
    limits = rule.fleet
    if fleet.has_canary_set(limits.canary_percent) and not (
        limits.promote_after_runs and runs >= limits.promote_after_runs
    ):
        return fleet.CANARY, f"resumed by {changed_by}{note}"
    return fleet.ACTIVE, f"resumed by {changed_by}{note}"


def _parse_command_request(request: ops_pb2.SendCommandRequest) -> timedelta:
    """Validate a SendCommandRequest as ops.proto states; return its time to live.

    Raises ValueError.
    """
    check_action(request.action, "the command")
    check_required_parameters(request.action)
    problems = validate_action(request.action, allowlist_of(request.action))
    if problems:
        raise ValueError(_agent_problems("command", "refuse", problems))
    if request.all_devices and request.device_ids:
        raise ValueError("give device_ids or all_devices, not both")
    if not request.all_devices and not request.device_ids:
        raise ValueError("no devices: give device_ids or set all_devices")
    for device_id in request.device_ids:
        try:
            validate_device_id(device_id)
        except InvalidMessageError:
            raise ValueError(
                f"device id {device_id[:80]!r} is not a UUID in canonical form"
            ) from None
    if not request.HasField("time_to_live"):
        return DEFAULT_COMMAND_TTL
    ttl = request.time_to_live
    if not (0 <= ttl.nanos <= 999_999_999 and ttl.seconds <= MAX_DURATION_SECONDS):
        raise ValueError("time_to_live is not a valid Duration")
    time_to_live = ttl.ToTimedelta()
    if not MIN_COMMAND_TTL <= time_to_live <= MAX_COMMAND_TTL:
        raise ValueError(
            f"time_to_live {ttl.ToJsonString()} is outside 1 minute to 7 days"
        )
    return time_to_live


@dataclass(frozen=True)
class _RemediationQuery:
    """A validated ListRemediationsRequest."""

    page_size: int
    before: RemediationPosition | None
    device_id: str
    rule: str
    outcome: int
    since: datetime | None


def _parse_remediations_request(
    request: ops_pb2.ListRemediationsRequest,
) -> _RemediationQuery:
    """Validate a ListRemediationsRequest; raise ValueError."""
    page_size = effective_page_size(request.page_size)
    before = (
        decode_remediations_token(request.page_token) if request.page_token else None
    )
    if request.device_id:
        try:
            validate_device_id(request.device_id)
        except InvalidMessageError:
            raise ValueError(
                f"device_id {request.device_id[:80]!r} is not a UUID in canonical form"
            ) from None
    if request.outcome not in remediation_pb2.RemediationOutcome.values():
        raise ValueError(f"outcome {request.outcome} is not a RemediationOutcome")
    since = None
    if request.HasField("start_after_time"):
        since = _to_datetime("start_after_time", request.start_after_time)
    return _RemediationQuery(
        page_size, before, request.device_id, request.rule, request.outcome, since
    )


def encode_remediations_token(position: RemediationPosition) -> str:
    """Return the token of the page that follows the record at position."""
    payload = json.dumps(list(position), separators=(",", ":"))
    encoded = base64.urlsafe_b64encode(payload.encode()).decode()
    return _REMEDIATIONS_TOKEN_PREFIX + encoded


def decode_remediations_token(token: str) -> RemediationPosition:
    """Return the position before which the page of token starts."""
    raw = _decode_base64(token, _REMEDIATIONS_TOKEN_PREFIX)
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise InvalidPageTokenError(
            "page token is not a remediation position"
        ) from error
    if not _is_remediation_position(value):
        raise InvalidPageTokenError("page token is not a remediation position")
    return (value[0], value[1], value[2], value[3])


def stored_remediation_message(
    record: StoredRemediationRecord,
) -> ops_pb2.StoredRemediation:
    """Return a stored remediation record as a StoredRemediation message."""
    return ops_pb2.StoredRemediation(
        device_id=record.device_id,
        hostname=record.hostname,
        record=record.record,
        receive_time=_timestamp(record.receive_time),
    )
