"""Self-healing policies, fleet states of rules, and operator commands."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, RowMapping, delete, insert, select, text, update

from collector.store._devices import refused_rules_of
from collector.store._model import (
    RULE_STAGES,
    CommandRecord,
    PolicyRecord,
    RuleStageName,
    RuleStateRecord,
    UnknownDeviceError,
)
from collector.store._schema import commands, devices, policies, rule_states
from fleetmend.v1 import remediation_pb2

# Largest number of ids bound in one IN list; SQLite before 3.32 accepts at
# most 999 parameters per statement.
_IN_LIST_SIZE = 900

# Key of the PostgreSQL advisory lock that serializes set_policy calls (the
# bytes of "fmpolicy").
_POSTGRES_POLICY_LOCK = 0x666D706F6C696379


def set_policy(
    connection: Connection,
    policy: remediation_pb2.Policy,
    set_by: str,
    now: datetime,
) -> int:
    """Store policy as the next version and return that version.

    Rules without a state get one: "canary" when their fleet.canary_percent is
    1 to 99, else "active". States of rules that the policy no longer has are
    deleted, so a rule that comes back later starts afresh. A rule whose
    definition differs from the previous policy's rule of that name is rolled
    out again: see _roll_out_again.
    """
    _check_aware("policy set time", now)
    names = [rule.name for rule in policy.rules]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"policy has more than one rule named {', '.join(map(repr, repeated))}; "
            "give every rule a unique name"
        )

    if connection.dialect.name == "postgresql":
        # Concurrent calls would otherwise both miss a new rule's state and
        # both insert it. SQLite serializes writers with BEGIN IMMEDIATE.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": _POSTGRES_POLICY_LOCK},
        )

    previous = current_policy(connection)
    result = connection.execute(
        insert(policies).values(policy_pb=b"", set_by=set_by, set_time=now)
    )
    (version,) = result.inserted_primary_key or (None,)
    if version is None:
        raise RuntimeError("the database returned no version for the new policy")
    stored = remediation_pb2.Policy()
    stored.CopyFrom(policy)
    stored.version = int(version)
    connection.execute(
        update(policies)
        .where(policies.c.version == version)
        .values(policy_pb=stored.SerializeToString())
    )

    known = set(connection.execute(select(rule_states.c.name)).scalars())
    removed = sorted(known - set(names))
    for start in range(0, len(removed), _IN_LIST_SIZE):
        chunk = removed[start : start + _IN_LIST_SIZE]
        connection.execute(delete(rule_states).where(rule_states.c.name.in_(chunk)))

    new_states = [
        {
            "name": rule.name,
            "stage": "canary" if _has_canary_set(rule) else "active",
            "reason": "",
            "changed_time": now,
            "changed_by": set_by,
            "rollout_time": now,
        }
        for rule in policy.rules
        if rule.name not in known
    ]
    if new_states:
        connection.execute(insert(rule_states), new_states)

    if previous is not None:
        before = {rule.name: rule for rule in previous.policy.rules}
        for rule in policy.rules:
            old = before.get(rule.name)
            if old is not None and rule.name in known and _redefined(old, rule):
                _roll_out_again(connection, rule, int(version), set_by, now)
    return int(version)


def _has_canary_set(rule: remediation_pb2.Rule) -> bool:
    return 1 <= rule.fleet.canary_percent <= 99


def _definition(rule: remediation_pb2.Rule) -> remediation_pb2.Rule:
    """Return what the agents run of a rule: all but its name and fleet limits."""
    definition = remediation_pb2.Rule()
    definition.CopyFrom(rule)
    definition.ClearField("name")
    definition.ClearField("fleet")
    definition.ClearField("paused")
    definition.ClearField("paused_reason")
    return definition


def _redefined(old: remediation_pb2.Rule, new: remediation_pb2.Rule) -> bool:
    return _definition(old) != _definition(new)


def _roll_out_again(
    connection: Connection,
    rule: remediation_pb2.Rule,
    version: int,
    set_by: str,
    now: datetime,
) -> None:
    """Start a redefined rule's rollout over, as for a new rule of that name.

    Its runs before now no longer count for promotion or the circuit breaker.
    A rule with a canary set goes back to canary, and any other to active.
    A paused rule stays paused with its reason, and an operator's resume
    then starts it in canary.
    """
    values: dict[str, object] = {"rollout_time": now}
    paused = (
        connection.execute(
            select(rule_states.c.stage).where(rule_states.c.name == rule.name)
        ).scalar_one()
        == "paused"
    )
    if not paused:
        if _has_canary_set(rule):
            stage = "canary"
            reason = (
                f"changed in policy version {version}, so it runs on its canary "
                "set again"
            )
        else:
            stage = "active"
            reason = f"changed in policy version {version}; its run counts restart"
        values.update(stage=stage, reason=reason, changed_time=now, changed_by=set_by)
    connection.execute(
        update(rule_states).where(rule_states.c.name == rule.name).values(**values)
    )


def current_policy(connection: Connection) -> PolicyRecord | None:
    """Return the policy with the highest version, or None before the first."""
    query = select(policies).order_by(policies.c.version.desc()).limit(1)
    record = connection.execute(query).mappings().first()
    if record is None:
        return None
    policy = remediation_pb2.Policy()
    policy.ParseFromString(record["policy_pb"])
    return PolicyRecord(
        version=int(record["version"]),
        policy=policy,
        set_by=record["set_by"],
        set_time=record["set_time"],
    )


def rule_states_by_name(connection: Connection) -> dict[str, RuleStateRecord]:
    """Return every stored rule state by rule name."""
    query = select(rule_states).order_by(rule_states.c.name)
    return {
        record["name"]: _rule_state_record(record)
        for record in connection.execute(query).mappings()
    }


def set_rule_state(
    connection: Connection,
    name: str,
    stage: str,
    reason: str,
    changed_by: str,
    now: datetime,
) -> RuleStateRecord | None:
    """Replace a rule's stage and reason; return None for a rule without a state."""
    _check_aware("rule state change time", now)
    checked_stage = check_stage(stage)
    statement = (
        update(rule_states)
        .where(rule_states.c.name == name)
        .values(
            stage=checked_stage,
            reason=reason,
            changed_time=now,
            changed_by=changed_by,
        )
        .returning(*rule_states.c)
    )
    record = connection.execute(statement).mappings().first()
    if record is None:
        return None
    return _rule_state_record(record)


def check_stage(stage: str) -> RuleStageName:
    """Return stage as a RuleStageName, or raise ValueError for another value."""
    for known in RULE_STAGES:
        if stage == known:
            return known
    raise ValueError(
        f"invalid rule stage {stage!r}; use one of {', '.join(RULE_STAGES)}"
    )


def create_commands(
    connection: Connection,
    action: remediation_pb2.Action,
    device_ids: Sequence[str],
    expire_time: datetime,
    created_by: str,
    now: datetime,
) -> list[CommandRecord]:
    """Insert one command per device, each with a new uuid4 id, by device id.

    Repeated device ids get one command. Raises UnknownDeviceError, before
    writing anything, when a device id is not stored.
    """
    _check_aware("command create time", now)
    _check_aware("command expire time", expire_time)
    if expire_time <= now:
        raise ValueError(
            f"command expire time {expire_time.isoformat()} is not after its "
            f"create time {now.isoformat()}; pass a positive time to live"
        )
    if action.WhichOneof("kind") is None:
        raise ValueError("command action is empty; set one of the Action fields")
    unique_ids = sorted(set(device_ids))
    if not unique_ids:
        return []

    known: set[str] = set()
    for start in range(0, len(unique_ids), _IN_LIST_SIZE):
        chunk = unique_ids[start : start + _IN_LIST_SIZE]
        query = select(devices.c.device_id).where(devices.c.device_id.in_(chunk))
        known.update(connection.execute(query).scalars())
    unknown = tuple(device_id for device_id in unique_ids if device_id not in known)
    if unknown:
        raise UnknownDeviceError(unknown)

    records = [
        CommandRecord(
            command_id=str(uuid.uuid4()),
            device_id=device_id,
            action=_copy_action(action),
            created_by=created_by,
            create_time=now,
            expire_time=expire_time,
            done_time=None,
        )
        for device_id in unique_ids
    ]
    action_pb = action.SerializeToString()
    connection.execute(
        insert(commands),
        [
            {
                "command_id": record.command_id,
                "device_id": record.device_id,
                "action_pb": action_pb,
                "created_by": created_by,
                "create_time": now,
                "expire_time": expire_time,
                "done_time": None,
            }
            for record in records
        ],
    )
    return records


def pending_commands(
    connection: Connection, device_id: str, now: datetime
) -> list[CommandRecord]:
    """Return the device's commands not done and expiring after now, oldest first."""
    _check_aware("time", now)
    query = (
        select(commands)
        .where(commands.c.device_id == device_id)
        .where(commands.c.done_time.is_(None))
        .where(commands.c.expire_time > now)
        .order_by(commands.c.create_time, commands.c.command_id)
    )
    return [_command_record(record) for record in connection.execute(query).mappings()]


def get_command(connection: Connection, command_id: str) -> CommandRecord | None:
    """Return the command with command_id, or None if unknown."""
    query = select(commands).where(commands.c.command_id == command_id)
    record = connection.execute(query).mappings().first()
    if record is None:
        return None
    return _command_record(record)


def device_policy_status(
    connection: Connection, device_id: str
) -> remediation_pb2.PolicyStatus | None:
    """Return the device's latest reported PolicyStatus, with its refused rules.

    Returns None for an unknown device and for one whose reports never carried
    a policy status.
    """
    query = select(
        devices.c.policy_applied_version,
        devices.c.policy_rejected_version,
        devices.c.policy_rejected_reason,
        devices.c.policy_applied_fleet_version,
        devices.c.policy_rejected_fleet_version,
        devices.c.policy_status_sequence,
    ).where(devices.c.device_id == device_id)
    record = connection.execute(query).mappings().first()
    if record is None or record["policy_status_sequence"] == 0:
        return None
    return remediation_pb2.PolicyStatus(
        applied_version=record["policy_applied_version"],
        rejected_version=record["policy_rejected_version"],
        rejected_reason=record["policy_rejected_reason"],
        applied_fleet_version=record["policy_applied_fleet_version"],
        rejected_fleet_version=record["policy_rejected_fleet_version"],
        refused_rules=refused_rules_of(connection, device_id),
    )


def _rule_state_record(record: RowMapping) -> RuleStateRecord:
    return RuleStateRecord(
        name=record["name"],
        stage=check_stage(record["stage"]),
        reason=record["reason"],
        changed_time=record["changed_time"],
        changed_by=record["changed_by"],
        rollout_time=record["rollout_time"],
    )


def _command_record(record: RowMapping) -> CommandRecord:
    action = remediation_pb2.Action()
    action.ParseFromString(record["action_pb"])
    return CommandRecord(
        command_id=record["command_id"],
        device_id=record["device_id"],
        action=action,
        created_by=record["created_by"],
        create_time=record["create_time"],
        expire_time=record["expire_time"],
        done_time=record["done_time"],
    )


def _copy_action(action: remediation_pb2.Action) -> remediation_pb2.Action:
    copy = remediation_pb2.Action()
    copy.CopyFrom(action)
    return copy


def _check_aware(name: str, value: datetime) -> None:
    if value.utcoffset() is None:
        raise ValueError(f"{name} {value} is naive; pass a timezone-aware datetime")
