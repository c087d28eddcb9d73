"""Values that cross the store's public interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from collector.auth import Role
from fleetmend.v1 import remediation_pb2, report_pb2

# Fleet stage of a rule, as stored in rule_states.stage.
RuleStageName = Literal["active", "canary", "paused"]
RULE_STAGES: tuple[RuleStageName, ...] = ("active", "canary", "paused")

# Position of a stored remediation record in list_remediations order: the
# record's start time in microseconds since the Unix epoch, then device id,
# report sequence number and index in the report. Plain ints and a string, so
# that a page token can carry it as JSON.
RemediationPosition = tuple[int, str, int, int]


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


class UnknownDeviceError(ValueError):
    """Devices named in a request that the store does not know."""

    def __init__(self, device_ids: tuple[str, ...]) -> None:
        super().__init__(
            f"unknown device ids: {', '.join(device_ids)}; list the known ones "
            "with `fleetmend devices`"
        )
        self.device_ids = device_ids


@dataclass(frozen=True)
class IngestResult:
    """The changes that a committed batch of reports made."""

    # Per device in the batch, the highest sequence number now committed.
    committed: dict[str, int]
    # Rules that got new remediation records in this batch.
    rules: frozenset[str] = frozenset()
    # Devices that sent new remediation records in this batch.
    remediation_devices: frozenset[str] = frozenset()
    # Commands whose done_time this batch set.
    done_command_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PolicyRecord:
    """A stored policy version, with its version field set."""

    version: int
    policy: remediation_pb2.Policy
    set_by: str
    set_time: datetime


@dataclass(frozen=True)
class RuleStateRecord:
    """The fleet stage of a rule and why it is in it."""

    name: str
    stage: RuleStageName
    reason: str
    changed_time: datetime
    # Operator name, or whatever the fleet limits pass, such as "fleet".
    changed_by: str
    # When the rule's present definition was set by set_policy; None for a
    # rule stored before the collector recorded it.
    rollout_time: datetime | None = None


@dataclass(frozen=True)
class RuleStats:
    """Runs of a rule across the fleet; a run is a record that succeeded or failed.

    Runs are ordered by the records' start time. runs, failures and
    last_outcomes count the runs of the rule's present definition, those that
    started at or after its state's rollout_time. runs_today counts every run
    of the day, since the daily budget limits actions whatever their
    definition. The "since_change" values count only runs that started at or
    after the rule state's changed_time. For a rule without a state, or one
    without a rollout_time, every run counts.
    """

    runs: int
    failures: int
    # Runs that started at or after the since_day_start passed to
    # rule_statistics.
    runs_today: int
    # RemediationOutcome values of the latest runs, newest first, at most
    # RULE_STATS_OUTCOMES of them.
    last_outcomes: tuple[int, ...]
    runs_since_change: int = 0
    failures_since_change: int = 0
    last_outcomes_since_change: tuple[int, ...] = field(default=())


# Number of latest run outcomes that rule_statistics returns per rule.
RULE_STATS_OUTCOMES = 1000


@dataclass(frozen=True)
class CommandRecord:
    """An operator command for one device."""

    command_id: str
    device_id: str
    action: remediation_pb2.Action
    created_by: str
    create_time: datetime
    expire_time: datetime
    # When the device reported a record of the command; None until then.
    done_time: datetime | None

    def to_message(self) -> remediation_pb2.Command:
        """Return the command as the agent receives it."""
        command = remediation_pb2.Command(command_id=self.command_id)
        command.action.CopyFrom(self.action)
        command.expire_time.FromDatetime(self.expire_time)
        return command


@dataclass(frozen=True)
class StoredRemediationRecord:
    """A remediation record as a device reported it, with where it is stored."""

    device_id: str
    # The device's hostname now, empty before its first host report.
    hostname: str
    sequence: int
    idx: int
    record: remediation_pb2.RemediationRecord
    receive_time: datetime
    # The record's start_time, or receive_time when it carries none.
    start_time: datetime

    @property
    def position(self) -> RemediationPosition:
        """Return the value of list_remediations' before that pages past this one."""
        return (
            datetime_to_microseconds(self.start_time),
            self.device_id,
            self.sequence,
            self.idx,
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def datetime_to_microseconds(value: datetime) -> int:
    """Return an aware datetime as microseconds since the Unix epoch."""
    return (value - _EPOCH) // timedelta(microseconds=1)


def microseconds_to_datetime(value: int) -> datetime:
    """Return microseconds since the Unix epoch as an aware datetime in UTC."""
    return _EPOCH + timedelta(microseconds=value)
