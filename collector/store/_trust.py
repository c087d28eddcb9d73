"""Node keys of enrolled devices and operator tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from collector.auth import Role, check_token_name
from collector.store._model import (
    EnrollResult,
    NodeKeyRecord,
    TokenNameTakenError,
    TokenRecord,
)
from collector.store._schema import devices, node_keys, operator_tokens


def enroll_device(
    connection: Connection,
    device_id: str,
    hostname: str,
    agent_version: str,
    key_id: str,
    key_hash: str,
    now: datetime,
) -> EnrollResult:
    """Bind a new node key to device_id, or to a new id if device_id is enrolled.

    A device counts as enrolled when it has any node key, revoked or not, or
    is revoked: otherwise anyone with the enrollment secret could take over a
    revoked device's id and history. A device row without keys and not
    revoked, from before node keys existed, is claimed by the first
    enrollment. The device row is locked before its keys are read, so that of
    two concurrent enrollments of one id the second sees the first one's key
    and gets a new id. On SQLite the BEGIN IMMEDIATE write lock serializes
    them.
    """
    _check_device_id(device_id)
    _check_aware("enrollment time", now)
    _insert_device_if_missing(connection, device_id, now)
    _lock_device(connection, device_id)

    new_id_assigned = _is_enrolled(connection, device_id)
    if new_id_assigned:
        device_id = str(uuid.uuid4())
        # A plain INSERT: a collision with an existing row raises instead of
        # binding the key to another device.
        connection.execute(
            insert(devices).values(device_id=device_id, first_seen=now, last_seen=now)
        )

    connection.execute(
        update(devices)
        .where(devices.c.device_id == device_id)
        .values(
            hostname=hostname,
            hostname_key=hostname.casefold(),
            agent_version=agent_version,
            revoked_time=None,
        )
    )
    connection.execute(
        insert(node_keys).values(
            key_id=key_id,
            device_id=device_id,
            key_hash=key_hash,
            create_time=now,
            revoke_time=None,
        )
    )
    return EnrollResult(device_id=device_id, new_id_assigned=new_id_assigned)


def find_node_key(connection: Connection, key_id: str) -> NodeKeyRecord | None:
    """Return the node key with key_id, or None if there is none."""
    query = select(node_keys).where(node_keys.c.key_id == key_id)
    record = connection.execute(query).mappings().first()
    if record is None:
        return None
    return NodeKeyRecord(
        key_id=record["key_id"],
        device_id=record["device_id"],
        key_hash=record["key_hash"],
        create_time=record["create_time"],
        revoke_time=record["revoke_time"],
    )


def revoke_device(connection: Connection, device_id: str, now: datetime) -> int | None:
    """Revoke the device's valid node keys; return how many, None if unknown.

    The device's revoked_time is set unless it is set already.
    """
    _check_aware("revocation time", now)
    if _lock_device(connection, device_id) is None:
        return None
    result = connection.execute(
        update(node_keys)
        .where(node_keys.c.device_id == device_id)
        .where(node_keys.c.revoke_time.is_(None))
        .values(revoke_time=now)
    )
    connection.execute(
        update(devices)
        .where(devices.c.device_id == device_id)
        .where(devices.c.revoked_time.is_(None))
        .values(revoked_time=now)
    )
    return int(result.rowcount)


def create_token(
    connection: Connection,
    name: str,
    role: Role,
    token_id: str,
    token_hash: str,
    created_by: str,
    now: datetime,
) -> None:
    """Insert an operator token; raise TokenNameTakenError if the name is taken."""
    check_token_name(name)
    role = Role(role)
    _check_aware("creation time", now)
    statement = (
        _dialect_insert(connection, operator_tokens)
        .values(
            token_id=token_id,
            name=name,
            role=int(role),
            token_hash=token_hash,
            create_time=now,
            created_by=created_by,
        )
        .on_conflict_do_nothing(index_elements=[operator_tokens.c.name])
        .returning(operator_tokens.c.token_id)
    )
    if connection.execute(statement).first() is None:
        raise TokenNameTakenError(
            f"an operator token named {name!r} exists already (revoked tokens keep "
            "their names); choose another name"
        )


def find_token(connection: Connection, token_id: str) -> TokenRecord | None:
    """Return the operator token with token_id, or None if there is none."""
    query = select(operator_tokens).where(operator_tokens.c.token_id == token_id)
    record = connection.execute(query).mappings().first()
    return None if record is None else _token_record(record)


def list_tokens(connection: Connection) -> list[TokenRecord]:
    """Return every operator token, revoked ones included, by name."""
    query = select(operator_tokens).order_by(operator_tokens.c.name)
    return [_token_record(record) for record in connection.execute(query).mappings()]


def revoke_token(connection: Connection, name: str, now: datetime) -> bool | None:
    """Revoke the token called name.

    Returns None for an unknown name, False when it was revoked already and
    True when this call revoked it.
    """
    _check_aware("revocation time", now)
    result = connection.execute(
        update(operator_tokens)
        .where(operator_tokens.c.name == name)
        .where(operator_tokens.c.revoke_time.is_(None))
        .values(revoke_time=now)
    )
    if result.rowcount:
        return True
    query = select(operator_tokens.c.token_id).where(operator_tokens.c.name == name)
    if connection.execute(query).first() is None:
        return None
    return False


def mark_token_used(connection: Connection, token_id: str, now: datetime) -> None:
    """Move the token's last-use time forward to now; an unknown id changes nothing."""
    _check_aware("use time", now)
    last_use = operator_tokens.c.last_use_time
    connection.execute(
        update(operator_tokens)
        .where(operator_tokens.c.token_id == token_id)
        .where(last_use.is_(None) | (last_use < now))
        .values(last_use_time=now)
    )


def _insert_device_if_missing(
    connection: Connection, device_id: str, now: datetime
) -> None:
    # On PostgreSQL a concurrent insert of the same id waits for the other
    # transaction and then does nothing.
    statement = (
        _dialect_insert(connection, devices)
        .values(device_id=device_id, first_seen=now, last_seen=now)
        .on_conflict_do_nothing(index_elements=[devices.c.device_id])
    )
    connection.execute(statement)


def _lock_device(connection: Connection, device_id: str) -> str | None:
    """Lock the device's row until the transaction ends; None if it is missing.

    FOR UPDATE applies on PostgreSQL. SQLite renders no lock clause and relies
    on the BEGIN IMMEDIATE write lock that the store takes for every write.
    """
    query = (
        select(devices.c.device_id)
        .where(devices.c.device_id == device_id)
        .with_for_update()
    )
    found: str | None = connection.execute(query).scalar_one_or_none()
    return found


def _is_enrolled(connection: Connection, device_id: str) -> bool:
    revoked = select(devices.c.revoked_time).where(devices.c.device_id == device_id)
    if connection.execute(revoked).scalar_one_or_none() is not None:
        return True
    query = (
        select(node_keys.c.key_id).where(node_keys.c.device_id == device_id).limit(1)
    )
    return connection.execute(query).first() is not None


def _token_record(record: RowMapping) -> TokenRecord:
    return TokenRecord(
        token_id=record["token_id"],
        name=record["name"],
        role=Role(record["role"]),
        token_hash=record["token_hash"],
        create_time=record["create_time"],
        created_by=record["created_by"],
        revoke_time=record["revoke_time"],
        last_use_time=record["last_use_time"],
    )


def _check_device_id(device_id: str) -> None:
    if not device_id:
        raise ValueError("device id is empty")


def _check_aware(label: str, value: datetime) -> None:
    if value.utcoffset() is None:
        raise ValueError(f"{label} {value} is naive; pass a timezone-aware datetime")


def _dialect_insert(
    connection: Connection, table: Any
) -> sqlite.Insert | postgresql.Insert:
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
