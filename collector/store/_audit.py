"""The audit log: operator actions and refused calls, newest first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, RowMapping, insert, select

from collector.auth import Role
from collector.store._model import AuditRecord
from collector.store._schema import audit_events


@dataclass(frozen=True)
class AuditEvent:
    """An audit log event to append, with the fields of an AuditRecord except its id."""

    event_time: datetime
    # Token name, or "local:<login name>" for a command run on the collector host.
    actor: str
    # Role of the token, or None when the call carried no valid token.
    role: Role | None
    action: str
    arguments_json: str
    # "OK", or the status code name of a refused or failed call.
    outcome: str
    # Network address of the caller, empty for a local command.
    peer: str


def append_audit_event(connection: Connection, event: AuditEvent) -> int:
    """Insert event and return its event id."""
    return append_audit(
        connection,
        event.event_time,
        event.actor,
        event.role,
        event.action,
        event.arguments_json,
        event.outcome,
        event.peer,
    )


def append_audit(
    connection: Connection,
    event_time: datetime,
    actor: str,
    role: Role | None,
    action: str,
    arguments_json: str,
    outcome: str,
    peer: str,
) -> int:
    """Insert an audit event and return its event id."""
    if event_time.utcoffset() is None:
        raise ValueError(
            f"event time {event_time} is naive; pass a timezone-aware datetime"
        )
    result = connection.execute(
        insert(audit_events).values(
            event_time=event_time,
            actor=actor,
            role=None if role is None else int(Role(role)),
            action=action,
            arguments_json=arguments_json,
            outcome=outcome,
            peer=peer,
        )
    )
    (event_id,) = result.inserted_primary_key or (None,)
    if event_id is None:
        raise RuntimeError("the database returned no id for the new audit event")
    return int(event_id)


def list_audit(
    connection: Connection, limit: int, before_event_id: int | None, actor: str
) -> list[AuditRecord]:
    """Return up to limit events with an id below before_event_id, newest first.

    actor, if not empty, keeps only that actor's events.
    """
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    query = select(audit_events).order_by(audit_events.c.event_id.desc()).limit(limit)
    if before_event_id is not None:
        query = query.where(audit_events.c.event_id < before_event_id)
    if actor:
        query = query.where(audit_events.c.actor == actor)
    return [_audit_record(record) for record in connection.execute(query).mappings()]


def _audit_record(record: RowMapping) -> AuditRecord:
    role = record["role"]
    return AuditRecord(
        event_id=int(record["event_id"]),
        event_time=record["event_time"],
        actor=record["actor"],
        role=None if role is None else Role(role),
        action=record["action"],
        arguments_json=record["arguments_json"],
        outcome=record["outcome"],
        peer=record["peer"],
    )
