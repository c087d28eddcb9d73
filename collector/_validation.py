"""Validation of agent messages before anything from them is queued or stored.

Every check raises InvalidMessageError with the field and the value, which the
Connect handler sends to the agent as INVALID_ARGUMENT. The clock checks at the
end reject nothing: they flag reports whose collect_time is not to be trusted.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from collector.store._schema import MAX_SEQUENCE
from fleetmend.v1 import agent_pb2, report_pb2

HOURS_PER_WEEK = 168

# Bounds for any one field of a report. They are far above what a laptop
# produces, and they cap the memory and rows that one message can cost.
MAX_STRING_CHARS = 4096
MAX_REPEATED_ITEMS = 1024
# Per-field exceptions to MAX_REPEATED_ITEMS, by full field name.
REPEATED_ITEM_LIMITS = {
    "fleetmend.v1.AppUsage.hours_of_week": HOURS_PER_WEEK,
    "fleetmend.v1.AppUsage.minutes": HOURS_PER_WEEK,
    # ATA attribute ids are one byte.
    "fleetmend.v1.Disk.ata_attributes": 255,
}
MAX_AGENT_VERSION_CHARS = 128
# C0 controls, DEL and C1 controls, rejected in the agent version and the
# enrollment hostname, which the collector logs and shows in tables.
CONTROL_CHARACTER_PATTERN = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# The range that google.protobuf.Timestamp allows and Timestamp.ToDatetime
# accepts: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_TIMESTAMP_NANOS = 999_999_999

# Usage sums at most 28 days, which contain each hour of the week 4 times, and
# each of those hours has at most 60 minutes of use.
MAX_MINUTES_PER_HOUR_OF_WEEK = 4 * 60
APP_ID_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")

# Allowed gap between Battery.health_percent and 100 * full_capacity /
# design_capacity, in percentage points, for sources that round the percentage.
HEALTH_PERCENT_TOLERANCE = 1.0
# NVMe temperatures outside this range, in degrees Celsius, are decoding
# errors: no drive operates there.
MIN_DISK_TEMPERATURE_CELSIUS = -60
MAX_DISK_TEMPERATURE_CELSIUS = 200


class InvalidMessageError(ValueError):
    """A message from an agent that the collector rejects, with the reason."""


def parse_connect_request(payload: bytes) -> agent_pb2.ConnectRequest:
    """Deserialize one ConnectRequest, raising InvalidMessageError if malformed."""
    request = agent_pb2.ConnectRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as error:
        raise InvalidMessageError(
            f"message of {len(payload)} bytes is not a valid ConnectRequest"
        ) from error
    return request


def validate_device_id(device_id: str) -> None:
    """Raise InvalidMessageError unless device_id is a UUID in canonical form.

    The canonical form is 36 lowercase characters with hyphens, as str(uuid.UUID)
    writes it, so one device has exactly one spelling in the store.
    """
    try:
        canonical = str(uuid.UUID(device_id))
    except ValueError:
        canonical = None
    if canonical != device_id:
        raise InvalidMessageError(
            f"device_id {device_id[:64]!r} is not a canonical lowercase UUID"
        )


def validate_hello(hello: agent_pb2.Hello) -> None:
    """Raise InvalidMessageError unless the hello names a valid device."""
    validate_device_id(hello.device_id)
    if hello.device_id == str(uuid.UUID(int=0)):
        raise InvalidMessageError(
            f"device_id {hello.device_id} is the nil UUID; the agent must make a "
            "random one"
        )
    if len(hello.agent_version) > MAX_AGENT_VERSION_CHARS:
        raise InvalidMessageError(
            f"agent_version has {len(hello.agent_version)} characters, "
            f"more than the maximum of {MAX_AGENT_VERSION_CHARS}"
        )
    _check_no_control("Hello.agent_version", hello.agent_version)
    if hello.HasField("send_time"):
        _validate_timestamp("fleetmend.v1.Hello.send_time", hello.send_time)


def validate_enroll_request(request: agent_pb2.EnrollRequest) -> None:
    """Raise InvalidMessageError unless the request names a valid device.

    The enrollment secret is checked by the caller, and never appears in the
    message.
    """
    validate_device_id(request.device_id)
    if request.device_id == str(uuid.UUID(int=0)):
        raise InvalidMessageError(
            f"device_id {request.device_id} is the nil UUID; the agent must make a "
            "random one"
        )
    limits = (
        ("hostname", request.hostname, MAX_STRING_CHARS),
        ("agent_version", request.agent_version, MAX_AGENT_VERSION_CHARS),
    )
    for name, value, maximum in limits:
        if len(value) > maximum:
            raise InvalidMessageError(
                f"{name} has {len(value)} characters, more than the maximum of "
                f"{maximum}"
            )
        _check_no_control(f"EnrollRequest.{name}", value)


def validate_report(report: report_pb2.Report) -> None:
    """Raise InvalidMessageError unless the report is safe to store.

    Checks the sequence number, the size of every string and repeated field, the
    range of every Timestamp, and values that contradict each other or are out
    of range. The message names the field and its value. Enum values that this
    version does not know are accepted and stored as numbers.
    """
    if not 1 <= report.sequence <= MAX_SEQUENCE:
        raise InvalidMessageError(
            f"report sequence {report.sequence} is outside 1 to {MAX_SEQUENCE}"
        )
    _validate_bounds(report)
    if report.HasField("host"):
        _validate_host(report.host)
    for disk in report.disks.disks:
        _validate_disk(disk)
    for battery in report.batteries.batteries:
        _validate_battery(battery)
    for credential in report.credentials.credentials:
        _validate_credential(credential)
    if report.HasField("usage"):
        _validate_usage(report.usage)


def _check_no_control(name: str, value: str) -> None:
    # A newline would forge collector log lines, and escape sequences would
    # reach operators' terminals through device tables.
    match = CONTROL_CHARACTER_PATTERN.search(value)
    if match is not None:
        raise InvalidMessageError(
            f"{name} {value[:64]!r} contains the control character "
            f"U+{ord(match.group()):04X}; use printable characters only"
        )


def _check_no_nul(name: str, value: str) -> None:
    # PostgreSQL text columns cannot store NUL characters.
    if "\x00" in value:
        raise InvalidMessageError(f"{name} {value[:64]!r} contains a NUL character")


def _validate_host(host: report_pb2.HostFacts) -> None:
    _check_no_nul("HostFacts.hostname", host.hostname)
    for volume in host.volumes:
        if volume.free_bytes > volume.total_bytes:
            raise InvalidMessageError(
                f"Volume.free_bytes {volume.free_bytes} of volume "
                f"{volume.mount_point!r} is larger than its total_bytes "
                f"{volume.total_bytes}"
            )


def _validate_disk(disk: report_pb2.Disk) -> None:
    if not disk.HasField("nvme_health"):
        return
    celsius = disk.nvme_health.temperature_celsius
    if not MIN_DISK_TEMPERATURE_CELSIUS <= celsius <= MAX_DISK_TEMPERATURE_CELSIUS:
        raise InvalidMessageError(
            f"NvmeHealth.temperature_celsius {celsius} of disk {disk.name!r} is "
            f"outside {MIN_DISK_TEMPERATURE_CELSIUS} to "
            f"{MAX_DISK_TEMPERATURE_CELSIUS}"
        )


def _validate_battery(battery: report_pb2.Battery) -> None:
    if not battery.HasField("health_percent"):
        return
    health = battery.health_percent
    if not math.isfinite(health) or health < 0:
        raise InvalidMessageError(
            f"Battery.health_percent {health} of battery {battery.name!r} is not "
            "a percentage"
        )
    has_capacities = battery.HasField("full_capacity") and battery.HasField(
        "design_capacity"
    )
    if not has_capacities or battery.design_capacity == 0:
        return
    computed = 100 * battery.full_capacity / battery.design_capacity
    if abs(health - computed) > HEALTH_PERCENT_TOLERANCE:
        raise InvalidMessageError(
            f"Battery.health_percent {health:g} of battery {battery.name!r} "
            f"disagrees with full_capacity {battery.full_capacity} / "
            f"design_capacity {battery.design_capacity} = {computed:.1f}%"
        )


def _validate_credential(credential: report_pb2.Credential) -> None:
    at_time = credential.expiry == report_pb2.CREDENTIAL_EXPIRY_AT_TIME
    has_time = credential.HasField("expire_time")
    if at_time and not has_time:
        raise InvalidMessageError(
            f"credential of account {credential.account!r} has expiry "
            "CREDENTIAL_EXPIRY_AT_TIME but no expire_time"
        )
    known = credential.expiry in report_pb2.CredentialExpiry.values()
    # An expiry value that this version does not know may come with a time.
    if has_time and not at_time and known:
        expiry = report_pb2.CredentialExpiry.Name(credential.expiry)
        raise InvalidMessageError(
            f"credential of account {credential.account!r} has an expire_time, "
            f"but its expiry is {expiry}, not CREDENTIAL_EXPIRY_AT_TIME"
        )


def _validate_usage(usage: report_pb2.UsageSection) -> None:
    if not usage.enabled and usage.apps:
        raise InvalidMessageError(
            f"UsageSection.enabled is false but apps lists {len(usage.apps)} "
            "applications"
        )
    app_ids: set[str] = set()
    for app in usage.apps:
        if not APP_ID_PATTERN.fullmatch(app.app_id):
            raise InvalidMessageError(
                f"AppUsage.app_id {app.app_id[:80]!r} does not match "
                f"{APP_ID_PATTERN.pattern}"
            )
        if app.app_id in app_ids:
            raise InvalidMessageError(
                f"AppUsage.app_id {app.app_id!r} is listed more than once"
            )
        app_ids.add(app.app_id)
        _validate_app_usage(app)


def _validate_app_usage(app: report_pb2.AppUsage) -> None:
    # Hours may come in any order, because the contract does not fix one.
    if len(app.hours_of_week) != len(app.minutes):
        raise InvalidMessageError(
            f"app {app.app_id!r} has {len(app.hours_of_week)} hours_of_week "
            f"but {len(app.minutes)} minutes"
        )
    hours: set[int] = set()
    for hour, minutes in zip(app.hours_of_week, app.minutes, strict=True):
        if hour >= HOURS_PER_WEEK:
            raise InvalidMessageError(
                f"app {app.app_id!r} has hour_of_week {hour}, "
                f"but the maximum is {HOURS_PER_WEEK - 1}"
            )
        if hour in hours:
            raise InvalidMessageError(
                f"app {app.app_id!r} lists hour_of_week {hour} more than once"
            )
        hours.add(hour)
        if not 1 <= minutes <= MAX_MINUTES_PER_HOUR_OF_WEEK:
            raise InvalidMessageError(
                f"app {app.app_id!r} has minutes {minutes} in hour_of_week {hour}, "
                f"outside 1 to {MAX_MINUTES_PER_HOUR_OF_WEEK}"
            )


def _validate_bounds(message: Message) -> None:
    for descriptor, value in message.ListFields():
        if descriptor.is_repeated:
            limit = REPEATED_ITEM_LIMITS.get(descriptor.full_name, MAX_REPEATED_ITEMS)
            if len(value) > limit:
                raise InvalidMessageError(
                    f"{descriptor.full_name} has {len(value)} items, "
                    f"more than the maximum of {limit}"
                )
            items = value
        else:
            items = [value]
        for item in items:
            _validate_value(descriptor, item)


def _validate_value(descriptor: FieldDescriptor, value: object) -> None:
    if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        if isinstance(value, Timestamp):
            _validate_timestamp(descriptor.full_name, value)
        else:
            _validate_bounds(value)
    elif descriptor.type == FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        if len(value) > MAX_STRING_CHARS:
            raise InvalidMessageError(
                f"{descriptor.full_name} has {len(value)} characters, "
                f"more than the maximum of {MAX_STRING_CHARS}"
            )


def _validate_timestamp(name: str, timestamp: Timestamp) -> None:
    seconds = timestamp.seconds
    nanos = timestamp.nanos
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidMessageError(
            f"{name} has seconds {seconds}, outside the Timestamp range of "
            "0001-01-01 to 9999-12-31"
        )
    if not 0 <= nanos <= MAX_TIMESTAMP_NANOS:
        raise InvalidMessageError(
            f"{name} has nanos {nanos}, outside 0 to {MAX_TIMESTAMP_NANOS}"
        )


# Clock skew

DEFAULT_CLOCK_SKEW_LIMIT = timedelta(minutes=5)
# Older than any report that an agent's spool keeps.
DEFAULT_MAX_REPORT_AGE = timedelta(days=30)


@dataclass(frozen=True)
class ClockLimits:
    """Bounds beyond which a device's clock or a report's collect_time is skewed."""

    # Largest clock offset, either way, that still counts as a correct clock.
    skew_limit: timedelta = DEFAULT_CLOCK_SKEW_LIMIT
    # A collect_time this long before the receive time is not believed.
    max_report_age: timedelta = DEFAULT_MAX_REPORT_AGE

    def __post_init__(self) -> None:
        for name in ("skew_limit", "max_report_age"):
            span = getattr(self, name)
            if span <= timedelta(0):
                raise ValueError(f"{name} must be longer than 0, got {span}")


def clock_offset(hello: agent_pb2.Hello, received_time: datetime) -> timedelta | None:
    """Return the device's clock minus the collector's at the hello.

    received_time is the collector's clock when the hello arrived, so the
    offset also contains the network delay, which is negative. Returns None
    when the hello has no send_time (agents before the field existed). The
    hello must have passed validate_hello.
    """
    if not hello.HasField("send_time"):
        return None
    return hello.send_time.ToDatetime(tzinfo=UTC) - received_time


def is_offset_skewed(offset: timedelta | None, limits: ClockLimits) -> bool:
    """Return True if a known clock offset is beyond the skew limit either way."""
    return offset is not None and abs(offset) > limits.skew_limit


def clock_skew_reason(
    report: report_pb2.Report,
    received_time: datetime,
    offset: timedelta | None,
    limits: ClockLimits,
) -> str | None:
    """Return why the report's collect_time is not to be trusted, or None.

    A report is clock-skewed when the device's offset is beyond the limit, when
    its collect_time is later than the device's own clock at receipt
    (received_time + offset) plus the limit, or when it is more than
    max_report_age before received_time. An unknown offset counts as 0 for
    the second check. A report collected long ago by a correct clock and sent
    late is not skewed. The report must have passed validate_report.
    """
    if offset is not None and is_offset_skewed(offset, limits):
        return (
            f"the device's clock is {offset.total_seconds():+.1f} s off the "
            f"collector's, beyond the limit of {_seconds(limits.skew_limit)}"
        )
    if not report.HasField("collect_time"):
        return None
    collected = report.collect_time.ToDatetime(tzinfo=UTC)
    device_now = received_time + (offset or timedelta(0))
    if collected > device_now + limits.skew_limit:
        ahead = collected - device_now
        return (
            f"collect_time {collected.isoformat()} is {_seconds(ahead)} later "
            "than the device's own clock when the report arrived"
        )
    if collected < received_time - limits.max_report_age:
        age = received_time - collected
        return (
            f"collect_time {collected.isoformat()} is {_days(age)} before the "
            f"report arrived, more than the maximum age of "
            f"{_days(limits.max_report_age)}"
        )
    return None


def _seconds(span: timedelta) -> str:
    return f"{span.total_seconds():g} s"


def _days(span: timedelta) -> str:
    return f"{span / timedelta(days=1):.1f} days"
