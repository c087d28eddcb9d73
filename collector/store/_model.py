"""Values that cross the store's public interface."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from collector.auth import Role
from fleetmend.v1 import report_pb2


@dataclass(frozen=True)
class IncomingReport:
    """A report received on a device's stream, not yet committed."""

    device_id: str
    report: report_pb2.Report
    received_time: datetime
    # True when the report's collect_time is not to be trusted; the store then
    # dates the device's last report by received_time.
    clock_skewed: bool = False


class StoreError(Exception):
    """The database could not be opened, migrated or written."""


@dataclass(frozen=True)
class NodeKeyRecord:
    """A stored node key: its public id, the device it is bound to, its hash."""

    key_id: str
    device_id: str
    key_hash: str
    create_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True)
class TokenRecord:
    """A stored operator token, without its secret."""

    token_id: str
    name: str
    role: Role
    token_hash: str
    create_time: datetime
    # Who created it: "local:<login name>" for `fleetmend-collector token create`.
    created_by: str
    revoke_time: datetime | None
    last_use_time: datetime | None


@dataclass(frozen=True)
class AuditRecord:
    """An entry of the audit log: one operator action and its outcome."""

    event_id: int
    event_time: datetime
    # Token name, or "local:<login name>" for a command run on the collector host.
    actor: str
    # Role of the token; None when the call carried no valid token.
    role: Role | None
    action: str
    arguments_json: str
    # "OK", or the status code name of a refused or failed call.
    outcome: str
    # Network address of the caller; empty for a local command.
    peer: str


@dataclass(frozen=True)
class OutageRecord:
    """A declared outage of an application, with the devices it affects."""

    outage_id: int
    app_id: str
    start_time: datetime
    end_time: datetime
    time_zone: str
    message: str
    declared_by: str
    declare_time: datetime
    affected_device_ids: tuple[str, ...]


@dataclass(frozen=True)
class EnrollResult:
    """The device id that an enrollment bound its node key to."""

    device_id: str
    # True when the requested id belonged to an enrolled device, so that a new
    # one was assigned.
    new_id_assigned: bool


class TokenNameTakenError(ValueError):
    """An operator token of that name exists already, revoked or not."""
