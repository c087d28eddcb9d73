"""Output of the ``fleetmend`` CLI: tables and reports for people, and JSON.

The JSON output uses the protobuf JSON mapping with the field names of the
.proto files. The tables and reports print device- and operator-supplied
strings with their control characters escaped (see escape_controls), so that a
hostname cannot move the cursor, set the terminal title or forge a row. JSON
escapes them by itself.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from agent.text import (
    CONTROL_CHARACTERS,
    count_text,
    escape_controls,
    format_bytes,
)
from fleetmend.v1 import ops_pb2, remediation_pb2, report_pb2

# ATA attributes that predict failure or describe wear, shown by `device show`:
# reallocated, pending and uncorrectable sectors, power-on hours, temperature,
# reported uncorrectable errors, command timeouts, UDMA CRC errors.
KEY_ATA_ATTRIBUTES = (5, 9, 187, 188, 194, 197, 198, 199)
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
DURATION_TYPE = "google.protobuf.Duration"
DRY_RUN = remediation_pb2.REMEDIATION_OUTCOME_DRY_RUN

# JSON for scripts


def print_json(value: object, file: TextIO | None = None) -> None:
    """Print value as indented JSON on file (default: stdout)."""
    print(json.dumps(value, indent=2, sort_keys=False), file=file or sys.stdout)


def to_dict(message: Message) -> dict[str, Any]:
    """Return a message in the protobuf JSON mapping, with .proto field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def to_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Return each message as to_dict does."""
    return [to_dict(message) for message in messages]


# Rendering for people


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return rows under headers, in columns two spaces apart, one per line.

    Cells are printed with escape_controls, so every row stays on one line.
    """
    headers = [escape_controls(header) for header in headers]
    rows = [[escape_controls(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [
            max(width, len(cell)) for width, cell in zip(widths, row, strict=True)
        ]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def enum_label(enum: Any, value: int) -> str:
    """Return the lowercase enum name without its prefix, e.g. "disk_failing".

    enum is a generated enum class such as ops_pb2.Severity. A value unknown to
    this version prints as "unknown(7)".
    """
    try:
        name = enum.Name(value)
    except ValueError:
        return f"unknown({value})"
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower()


def format_time(timestamp: Timestamp) -> str:
    """Return a Timestamp as "2026-05-01 09:30 UTC", or "never" if unset."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return "never"
    moment = timestamp.ToDatetime(tzinfo=UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def format_age(timestamp: Timestamp, now: datetime) -> str:
    """Return how long ago timestamp was, e.g. "5m ago (2026-05-01 09:30 UTC)"."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return "never"
    seconds = (now - timestamp.ToDatetime(tzinfo=UTC)).total_seconds()
    return f"{format_duration(seconds)} ago ({format_time(timestamp)})"


def format_duration(seconds: float) -> str:
    """Return a span in its largest whole unit: "45s", "12m", "3h", "9d"."""
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def render_devices_table(devices: Sequence[ops_pb2.Device], now: datetime) -> str:
    """Return the table of the devices command."""
    rows = [
        [
            device.device_id,
            device.hostname or device.host.hostname or "-",
            _os_text(device.host) or "-",
            device.agent_version or "-",
            format_age(device.last_seen_time, now),
        ]
        for device in devices
    ]
    headers = ["DEVICE ID", "HOSTNAME", "OS", "AGENT", "LAST SEEN"]
    return render_table(headers, rows)


def render_findings_table(
    findings: Sequence[ops_pb2.Finding], *, show_device: bool = True
) -> str:
    """Return the table of the findings command.

    show_device adds the device id and hostname columns. Devices may share a
    hostname, so only the id identifies each.
    """
    if not findings:
        return "No findings.\n"
    headers = ["SEVERITY", "KIND", "SUBJECT", "DETAIL"]
    if show_device:
        headers[1:1] = ["DEVICE ID", "HOSTNAME"]
    rows = []
    for finding in findings:
        row = [
            enum_label(ops_pb2.Severity, finding.severity),
            enum_label(ops_pb2.FindingKind, finding.kind),
            finding.subject or "-",
            finding.detail,
        ]
        if show_device:
            row[1:1] = [finding.device_id, finding.hostname or "-"]
        rows.append(row)
    return render_table(headers, rows)


def _os_text(host: report_pb2.HostFacts) -> str:
    return " ".join(part for part in (host.os_name, host.os_version) if part)


def render_device(
    device: ops_pb2.Device,
    findings: Sequence[ops_pb2.Finding],
    now: datetime,
    policy: ops_pb2.GetPolicyResponse | None = None,
) -> str:
    """Return the report of the device show command.

    policy, the fleet's current policy, maps the generations in the device's
    policy status to the versions that SetPolicy assigned.
    """
    parts = [
        _render_summary(device, now, policy or ops_pb2.GetPolicyResponse()),
        _section("Host", device.HasField("host"), lambda: _render_host(device, now)),
        _section("Volumes", device.HasField("host"), lambda: _render_volumes(device)),
        _section("Disks", device.HasField("disks"), lambda: _render_disks(device)),
        _section(
            "Batteries", device.HasField("batteries"), lambda: _render_batteries(device)
        ),
        _section(
            "Accounts",
            device.HasField("credentials"),
            lambda: _render_accounts(device, now),
        ),
        _section("App usage", device.HasField("usage"), lambda: _render_usage(device)),
        _render_probe_errors(device),
        "Findings\n" + _indent(render_findings_table(findings, show_device=False)),
    ]
    return "\n".join(part for part in parts if part)


def _section(title: str, present: bool, render: Callable[[], str]) -> str:
    body = render() if present else "not reported yet\n"
    return f"{title}\n{_indent(body)}"


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" if line else "\n" for line in text.splitlines())


def _render_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in pairs)
    return "".join(
        f"{label.ljust(width)}  {escape_controls(value)}\n" for label, value in pairs
    )


def _render_summary(
    device: ops_pb2.Device, now: datetime, policy: ops_pb2.GetPolicyResponse
) -> str:
    name = device.hostname or device.host.hostname or "unknown hostname"
    pairs = [
        ("agent version", device.agent_version or "-"),
        ("first seen", format_age(device.first_seen_time, now)),
        ("last seen", format_age(device.last_seen_time, now)),
        ("last report", format_age(device.last_report_time, now)),
        ("committed sequence", str(device.committed_sequence)),
        ("dropped reports", str(device.dropped_reports)),
        ("clock", clock_text(device)),
        ("policy", policy_status_text(device, policy)),
        *refused_rule_pairs(device),
    ]
    title = escape_controls(f"Device {device.device_id} ({name})")
    return f"{title}\n" + _indent(_render_pairs(pairs))


def clock_text(device: ops_pb2.Device) -> str:
    """Return the device's clock offset in words, with a warning if it is skewed."""
    if device.HasField("clock_offset"):
        seconds = device.clock_offset.ToTimedelta().total_seconds()
        text = format_offset(seconds)
    else:
        text = "offset unknown"
    if device.clock_skewed:
        text += " (skewed: reports are dated by their receive time)"
    return text


def policy_status_text(
    device: ops_pb2.Device, policy: ops_pb2.GetPolicyResponse
) -> str:
    """Return the device's policy status in words, such as "applied version 3".

    Agents report effective policy generations. A generation equal to the
    current policy's is shown as that policy's version, an older one by the
    fleet version that the agent reported with it, or as "generation N". A
    rejection also names the policy that the device runs instead.
    """
    if not device.HasField("policy_status"):
        return "not reported yet"
    status = device.policy_status
    if status.rejected_version:
        rejected = _policy_version_text(
            status.rejected_version, status.rejected_fleet_version, policy
        )
        if status.applied_version:
            running = _policy_version_text(
                status.applied_version, status.applied_fleet_version, policy
            )
        else:
            running = "its built-in or local policy"
        reason = status.rejected_reason or "no reason given"
        return f"{rejected} rejected: {reason}; the device runs {running}"
    if status.applied_version == 0:
        return "built-in default (no fleet policy applied)"
    text = "applied " + _policy_version_text(
        status.applied_version, status.applied_fleet_version, policy
    )
    refused = len(status.refused_rules)
    if refused:
        rules = "1 rule" if refused == 1 else f"{refused} rules"
        text += f", {rules} refused by this device's allowlist"
    return text


def refused_rule_pairs(device: ops_pb2.Device) -> list[tuple[str, str]]:
    """Return a ("refused rule", "NAME: REASON") pair per rule the device refuses.

    These are rules of the applied policy that the device does not run because
    they name a service or cache set outside its allowlist.
    """
    return [
        ("refused rule", f"{rule.rule_name}: {rule.reason or 'no reason given'}")
        for rule in device.policy_status.refused_rules
    ]


def _policy_version_text(
    generation: int, fleet_version: int, policy: ops_pb2.GetPolicyResponse
) -> str:
    if policy.HasField("policy") and generation == policy.generation:
        return f"version {policy.policy.version}"
    if fleet_version:
        return f"version {fleet_version} (generation {generation}, not the current one)"
    return f"generation {generation} (not the current policy)"


def format_offset(seconds: float) -> str:
    """Return a clock offset in words: "12m ahead of the collector" or "behind"."""
    if abs(seconds) < 1:
        return "within 1 s of the collector"
    direction = "ahead of" if seconds > 0 else "behind"
    return f"{format_duration(abs(seconds))} {direction} the collector"


def _render_host(device: ops_pb2.Device, now: datetime) -> str:
    host = device.host
    hardware = " ".join(part for part in (host.manufacturer, host.model) if part)
    booted = "-"
    if host.HasField("boot_time"):
        uptime = (now - host.boot_time.ToDatetime(tzinfo=UTC)).total_seconds()
        booted = f"{format_time(host.boot_time)} (up {format_duration(uptime)})"
    pairs = [
        ("hostname", host.hostname or "-"),
        ("OS", _os_text(host) or "-"),
        ("kernel", host.kernel_version or "-"),
        ("architecture", host.architecture or "-"),
        ("hardware", hardware or "-"),
        ("serial number", host.serial_number or "not readable"),
        ("memory", format_bytes(host.memory_bytes) if host.memory_bytes else "-"),
        ("booted", booted),
    ]
    return _render_pairs(pairs)


def _render_volumes(device: ops_pb2.Device) -> str:
    volumes = device.host.volumes
    if not volumes:
        return "none\n"
    rows = [
        [
            volume.mount_point,
            volume.device or "-",
            volume.filesystem or "-",
            format_bytes(volume.free_bytes),
            format_bytes(volume.total_bytes),
            _percent(volume.free_bytes, volume.total_bytes),
        ]
        for volume in volumes
    ]
    headers = ["MOUNT", "DEVICE", "FILESYSTEM", "FREE", "TOTAL", "FREE %"]
    return render_table(headers, rows)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _render_disks(device: ops_pb2.Device) -> str:
    disks = device.disks.disks
    if not disks:
        return "none\n"
    rows = [
        [
            disk.name,
            disk.model or "-",
            disk.serial_number or "-",
            enum_label(report_pb2.DiskInterface, disk.interface),
            format_bytes(disk.capacity_bytes) if disk.capacity_bytes else "-",
            _smart_text(disk),
            _disk_readings(disk),
        ]
        for disk in disks
    ]
    headers = ["NAME", "MODEL", "SERIAL", "INTERFACE", "CAPACITY", "SMART", "READINGS"]
    return render_table(headers, rows)


def _smart_text(disk: report_pb2.Disk) -> str:
    if disk.smart_state != report_pb2.SMART_STATE_AVAILABLE:
        state = enum_label(report_pb2.SmartState, disk.smart_state)
        return (
            f"{state}: {disk.smart_state_reason}" if disk.smart_state_reason else state
        )
    if disk.self_assessment == report_pb2.SELF_ASSESSMENT_UNSPECIFIED:
        return "available"
    return enum_label(report_pb2.SelfAssessment, disk.self_assessment)


def _disk_readings(disk: report_pb2.Disk) -> str:
    if disk.HasField("nvme_health"):
        health = disk.nvme_health
        readings = [
            f"used {health.percentage_used}%",
            f"spare {health.available_spare_percent}%",
            f"media errors {health.media_errors}",
            f"critical warning 0x{health.critical_warning:02x}",
            f"{health.temperature_celsius} C",
            f"{health.power_on_hours} h on",
        ]
        return ", ".join(readings)
    readings = [
        f"{attribute.id} {attribute.name}={attribute.raw_text or attribute.raw}"
        + (f" (failed {attribute.when_failed})" if attribute.when_failed else "")
        for attribute in disk.ata_attributes
        if attribute.id in KEY_ATA_ATTRIBUTES or attribute.when_failed
    ]
    return ", ".join(readings) or "-"


def _render_batteries(device: ops_pb2.Device) -> str:
    batteries = device.batteries.batteries
    if not batteries:
        return "none\n"
    rows = [
        [
            battery.name,
            " ".join(part for part in (battery.manufacturer, battery.model) if part)
            or "-",
            f"{battery.health_percent:.0f}%"
            if battery.HasField("health_percent")
            else "unknown",
            str(battery.cycle_count) if battery.HasField("cycle_count") else "unknown",
            enum_label(report_pb2.BatteryStatus, battery.status),
        ]
        for battery in batteries
    ]
    return render_table(["NAME", "MODEL", "HEALTH", "CYCLES", "STATUS"], rows)


def _render_accounts(device: ops_pb2.Device, now: datetime) -> str:
    credentials = device.credentials.credentials
    if not credentials:
        return "none\n"
    rows = [
        [
            enum_label(report_pb2.CredentialKind, credential.kind),
            credential.account or "-",
            _expiry_text(credential, now),
            credential.source or "-",
        ]
        for credential in credentials
    ]
    return render_table(["KIND", "ACCOUNT", "EXPIRES", "SOURCE"], rows)


def _expiry_text(credential: report_pb2.Credential, now: datetime) -> str:
    if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_NEVER:
        return "never"
    if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW:
        return "must change at next login"
    if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_AT_TIME:
        expire = credential.expire_time
        seconds = (expire.ToDatetime(tzinfo=UTC) - now).total_seconds()
        if seconds < 0:
            return f"{format_time(expire)} (expired {format_duration(-seconds)} ago)"
        return f"{format_time(expire)} (in {format_duration(seconds)})"
    return enum_label(report_pb2.CredentialExpiry, credential.expiry)


def _render_usage(device: ops_pb2.Device) -> str:
    usage = device.usage
    if not usage.enabled:
        return "collection switched off\n"
    days = "1 day" if usage.window_days == 1 else f"{usage.window_days} days"
    if not usage.apps:
        return f"no catalogued application used in the last {days}\n"
    rows = []
    for app in usage.apps:
        total_minutes = sum(app.minutes)
        _, busiest = max(
            zip(app.minutes, app.hours_of_week, strict=True), default=(0, 0)
        )
        rows.append(
            [app.app_id, f"{total_minutes / 60:.1f}", _hour_of_week_text(busiest)]
        )
    title = f"over the last {days}\n"
    return title + render_table(["APP", "HOURS", "BUSIEST HOUR"], rows)


def _hour_of_week_text(hour_of_week: int) -> str:
    day, hour = divmod(hour_of_week, 24)
    if day >= len(DAY_NAMES):
        return f"hour {hour_of_week}"
    return f"{DAY_NAMES[day]} {hour:02d}:00"


def _render_probe_errors(device: ops_pb2.Device) -> str:
    sections: list[tuple[str, Sequence[report_pb2.ProbeError]]] = [
        ("host", device.host.errors),
        ("disks", device.disks.errors),
        ("batteries", device.batteries.errors),
        ("credentials", device.credentials.errors),
    ]
    rows = [
        [
            section,
            error.source or "-",
            enum_label(report_pb2.ProbeErrorKind, error.kind),
            error.reason,
        ]
        for section, errors in sections
        for error in errors
    ]
    if not rows:
        return ""
    headers = ["SECTION", "SOURCE", "KIND", "REASON"]
    return "Probe errors\n" + _indent(render_table(headers, rows))


def render_audit_table(events: Sequence[ops_pb2.AuditEvent]) -> str:
    """Return the table of the audit command."""
    if not events:
        return "No audit events.\n"
    rows = [
        [
            str(event.event_id),
            format_time(event.event_time),
            event.actor,
            _role_text(event.role),
            event.action,
            event.outcome,
            event.peer or "-",
            event.arguments_json or "-",
        ]
        for event in events
    ]
    headers = ["ID", "TIME", "ACTOR", "ROLE", "ACTION", "OUTCOME", "PEER", "ARGUMENTS"]
    return render_table(headers, rows)


def render_tokens_table(tokens: Sequence[ops_pb2.OperatorToken]) -> str:
    """Return the table of the token list command."""
    if not tokens:
        return "No operator tokens.\n"
    rows = [
        [
            token.name,
            _role_text(token.role),
            format_time(token.create_time),
            format_time(token.last_use_time),
            format_time(token.revoke_time) if token.HasField("revoke_time") else "-",
        ]
        for token in tokens
    ]
    return render_table(["NAME", "ROLE", "CREATED", "LAST USED", "REVOKED"], rows)


def render_outages_table(outages: Sequence[ops_pb2.Outage]) -> str:
    """Return the table of the outage list command, times in each outage's zone."""
    if not outages:
        return "No outages.\n"
    rows = [
        [
            str(outage.outage_id),
            outage.app_id,
            format_zoned_time(outage.start_time, outage.time_zone),
            format_zoned_time(outage.end_time, outage.time_zone),
            outage.time_zone or "UTC",
            outage.declared_by,
            str(len(outage.affected_device_ids)),
            outage.message or "-",
        ]
        for outage in outages
    ]
    headers = ["ID", "APP", "FROM", "TO", "TIME ZONE", "DECLARED BY", "DEVICES"]
    return render_table([*headers, "MESSAGE"], rows)


def render_outage(outage: ops_pb2.Outage) -> str:
    """Return the report of the outage declare command."""
    zone = escape_controls(outage.time_zone or "UTC")
    app_id = escape_controls(outage.app_id)
    start = format_zoned_time(outage.start_time, outage.time_zone)
    end = format_zoned_time(outage.end_time, outage.time_zone)
    count = len(outage.affected_device_ids)
    lines = [
        f"Outage {outage.outage_id} of {app_id} declared: {start} to {end} {zone}",
    ]
    if outage.message:
        lines.append(f"message: {escape_controls(outage.message)}")
    if count == 0:
        lines.append(f"No device's users usually use {app_id} then.")
    else:
        devices = "1 device" if count == 1 else f"{count} devices"
        lines.append(f"{devices} whose users usually use {app_id} then:")
        lines.extend(
            f"  {escape_controls(device_id)}"
            for device_id in outage.affected_device_ids
        )
    return "\n".join(lines) + "\n"


def render_device_revoked(
    device_id: str, response: ops_pb2.RevokeDeviceResponse
) -> str:
    """Return the report of the device revoke command."""
    device_id = escape_controls(device_id)
    if response.revoked_keys == 0:
        text = f"Device {device_id} had no valid node key; it was revoked already."
    else:
        keys = (
            "1 node key"
            if response.revoked_keys == 1
            else (f"{response.revoked_keys} node keys")
        )
        text = f"Revoked {keys} of device {device_id}."
    if response.stream_closed:
        text += " Its open stream was ended."
    return text + " It is rejected until it enrolls again.\n"


def format_zoned_time(timestamp: Timestamp, time_zone: str) -> str:
    """Return a Timestamp as "2026-05-04 09:00" in time_zone (empty: UTC).

    A zone unknown to this machine falls back to format_time, in UTC.
    """
    try:
        zone = ZoneInfo(time_zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return format_time(timestamp)
    moment = timestamp.ToDatetime(tzinfo=UTC).astimezone(zone)
    return moment.strftime("%Y-%m-%d %H:%M")


def _role_text(role: int) -> str:
    if role == ops_pb2.ROLE_UNSPECIFIED:
        return "-"
    return enum_label(ops_pb2.Role, role)


# Self-healing


def render_policy_toml(policy: remediation_pb2.Policy) -> str:
    """Return a policy as TOML that `fleetmend policy set` reads back unchanged.

    Keys are the .proto field names and durations are protobuf JSON strings
    such as "3600s", as in the agent's default policy file. The version is a
    comment, because the collector assigns it.
    """
    lines = [
        f"# Fleet policy version {policy.version}; `fleetmend policy set` ignores "
        "the version."
    ]
    for rule in policy.rules:
        lines.append("")
        lines.extend(_toml_table(rule, "rules", array=True))
    return "\n".join(lines) + "\n"


def _toml_table(message: Message, path: str, *, array: bool = False) -> list[str]:
    """Return the TOML lines of message as the table at path, then its subtables."""
    scalars: list[str] = []
    tables: list[str] = []
    for field, value in message.ListFields():
        child = f"{path}.{field.name}"
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_toml_scalar(field):
            if repeated:
                for item in value:
                    tables.extend(_toml_table(item, child, array=True))
            else:
                tables.extend(_toml_table(value, child))
            continue
        if repeated:
            items = ", ".join(_toml_value(field, item) for item in value)
            scalars.append(f"{field.name} = [{items}]")
        else:
            scalars.append(f"{field.name} = {_toml_value(field, value)}")
    # A table with only subtables needs no header of its own, except an empty
    # message such as DiskFailing, which must still appear to be set.
    if array:
        header = [f"[[{path}]]"]
    elif scalars or not tables:
        header = [f"[{path}]"]
    else:
        header = []
    return header + scalars + tables


def _is_toml_scalar(field: FieldDescriptor) -> bool:
    message_type = field.message_type
    return message_type is not None and message_type.full_name == DURATION_TYPE


def _toml_value(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _toml_string(value.ToJsonString())
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == FieldDescriptor.TYPE_STRING:
        return _toml_string(value)
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        return _toml_string(field.enum_type.values_by_number[value].name)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return repr(float(value))
    return str(value)


def _toml_string(text: str) -> str:
    """Return text as a TOML basic string, with every control character escaped."""
    escaped = []
    for character in text:
        if character in ('"', "\\"):
            escaped.append("\\" + character)
        elif character == "\n":
            escaped.append("\\n")
        elif character == "\t":
            escaped.append("\\t")
        elif CONTROL_CHARACTERS.fullmatch(character):
            escaped.append(f"\\u{ord(character):04x}")
        else:
            escaped.append(character)
    return '"' + "".join(escaped) + '"'


NO_FLEET_POLICY_TEXT = (
    "No fleet policy is set, so every agent runs its built-in or local rules.\n"
    "Set one with `fleetmend policy set FILE`.\n"
)


def render_rules_table(
    rules: Sequence[ops_pb2.RuleState],
    policy: ops_pb2.GetPolicyResponse,
    response: ops_pb2.ListRulesResponse | None = None,
) -> str:
    """Return the table of the rules command.

    policy, the GetPolicy response, gives each rule's daily budget and dry-run
    flag, and distinguishes an unset policy from one without rules. response, the
    ListRules response, adds a line with the devices that rejected the
    current policy. Each rule that devices refuse gets a line under the table
    with the count and an example reason.
    """
    if not policy.HasField("policy"):
        return NO_FLEET_POLICY_TEXT
    version = policy.policy.version
    rejections = _render_rejections(response, version)
    if not rules:
        return (
            f"Fleet policy version {version} has no rules, so agents run no rules "
            "at all, not even their built-in ones.\nSet a policy with rules with "
            "`fleetmend policy set FILE`.\n" + rejections
        )
    settings = {rule.name: rule for rule in policy.policy.rules}
    rows = []
    for rule in rules:
        setting = settings.get(rule.name, remediation_pb2.Rule())
        budget = setting.fleet.daily_budget
        rows.append(
            [
                rule.name,
                _stage_text(rule, dry_run=setting.dry_run),
                rule.reason or "-",
                str(rule.runs),
                str(rule.failures),
                success_rate_text(rule.runs - rule.failures, rule.runs),
                (
                    f"{rule.runs_today}/{budget}"
                    if budget
                    else f"{rule.runs_today} (no budget)"
                ),
            ]
        )
    headers = ["NAME", "STAGE", "REASON", "RUNS", "FAILURES", "SUCCESS", "TODAY"]
    notes = "".join(
        _render_empty_canary(rule) + _render_refusals(rule) for rule in rules
    )
    return render_table(headers, rows) + notes + rejections


def _stage_text(rule: ops_pb2.RuleState, *, dry_run: bool) -> str:
    stage = enum_label(ops_pb2.RuleStage, rule.stage)
    if rule.stage == ops_pb2.RULE_STAGE_CANARY:
        stage = f"canary ({count_text(rule.canary_devices, 'device')})"
    # RUNS does not count dry runs, so the stage shows why a dry-run rule has none.
    return f"{stage}, dry run" if dry_run else stage


def _has_empty_canary(rule: ops_pb2.RuleState) -> bool:
    return rule.stage == ops_pb2.RULE_STAGE_CANARY and rule.canary_devices == 0


def _empty_canary_advice(name: str) -> str:
    return (
        f"it gets no runs towards its promotion; `fleetmend rules promote {name}` "
        "gives it to the whole fleet, or raise fleet.canary_percent in the policy"
    )


def _render_empty_canary(rule: ops_pb2.RuleState) -> str:
    """Explain a canary rule whose canary set has no device, so no canary runs."""
    if not _has_empty_canary(rule):
        return ""
    name = escape_controls(rule.name)
    return f"{name} is in canary on no device, so {_empty_canary_advice(name)}\n"


def _render_refusals(rule: ops_pb2.RuleState) -> str:
    if rule.refusing_devices == 0:
        return ""
    devices = count_text(rule.refusing_devices, "device")
    verb = "runs" if rule.refusing_devices == 1 else "run"
    reason = escape_controls(rule.refused_reason_example or "no reason given")
    name = escape_controls(rule.name)
    return (
        f"{name} is refused on {devices}, which {verb} the policy's other rules; "
        f"for example: {reason}; `fleetmend remediations --rule {name} --outcome "
        "refused` lists them\n"
    )


def _render_rejections(
    response: ops_pb2.ListRulesResponse | None, policy_version: int
) -> str:
    if response is None or response.rejecting_devices == 0:
        return ""
    devices = count_text(response.rejecting_devices, "device")
    runs = "runs its" if response.rejecting_devices == 1 else "run their"
    reason = escape_controls(response.rejected_reason_example or "no reason given")
    return (
        f"{devices} rejected policy version {policy_version} and {runs} "
        f"previous policy instead; for example: {reason}\n"
    )


def success_rate_text(succeeded: int, runs: int) -> str:
    """Return succeeded / runs as a percentage, "-" without runs."""
    if runs == 0:
        return "-"
    return f"{100 * succeeded / runs:.0f}%"


def render_rule_state(
    rule: ops_pb2.RuleState, command: str = "", changed: bool = True
) -> str:
    """Return the report of the rules promote, pause and resume commands.

    command is the subcommand that ran. When changed is false, the report
    states that the rule already was in the requested state.
    """
    name = escape_controls(rule.name)
    if rule.stage == ops_pb2.RULE_STAGE_ACTIVE:
        text = f"Rule {name} is active on the whole fleet."
    elif rule.stage == ops_pb2.RULE_STAGE_CANARY:
        devices = count_text(rule.canary_devices, "device")
        text = f"Rule {name} is in canary on {devices}."
    else:
        label = enum_label(ops_pb2.RuleStage, rule.stage)
        text = f"Rule {name} is {label}."
    if rule.reason:
        text += f" Reason: {escape_controls(rule.reason)}."
    if _has_empty_canary(rule):
        text += f" No device is in its canary set, so {_empty_canary_advice(name)}."
    if not changed:
        expected = {"promote": "a canary", "resume": "paused"}.get(command)
        if expected is None:
            return f"Nothing changed. {text}\n"
        return f"Rule {name} is not {expected}, so nothing changed. {text}\n"
    return text + "\n"


def render_commands(action: str, commands: Sequence[ops_pb2.CommandStatus]) -> str:
    """Return the report of the act command."""
    if not commands:
        return (
            "No device received the command: the collector knows no device that "
            "is not revoked.\n"
        )
    sent = sum(1 for command in commands if command.sent)
    count = len(commands)
    name = escape_controls(action)
    devices = count_text(count, "device")
    if sent == count:
        connected = "it is" if count == 1 else "they are"
        summary = f"Sent {name} to {devices}; {connected} connected now."
    elif sent == 0:
        summary = (
            f"Queued {name} for {devices}, none connected now; each gets it when "
            "it connects before the command expires."
        )
    else:
        waiting = count - sent
        later = (
            "gets it when it connects" if waiting == 1 else ("get it when they connect")
        )
        summary = (
            f"Sent {name} to {devices}: {sent} connected now, {waiting} {later} "
            "before the command expires."
        )
    rows = [
        [
            command.command_id,
            command.device_id,
            format_time(command.expire_time),
            "sent" if command.sent else "waiting",
        ]
        for command in commands
    ]
    table = render_table(["COMMAND ID", "DEVICE ID", "EXPIRES", "STATUS"], rows)
    hint = "See what the devices did with `fleetmend remediations --rule command`.\n"
    return f"{summary}\n{table}{hint}"


POLICY_LEGEND = (
    "POLICY: vN is version N of the current fleet policy, older an earlier "
    "fleet policy or rule state, local the agent's built-in or local policy, "
    "- an operator command, which runs under no policy.\n"
)


def render_remediations(
    remediations: Sequence[ops_pb2.StoredRemediation],
    summaries: Sequence[ops_pb2.RuleSummary],
    policy: ops_pb2.GetPolicyResponse | None = None,
    *,
    more: bool = False,
) -> str:
    """Return the records and the per-rule summary of the remediations command.

    policy, the fleet's current policy, maps the records' effective policy
    versions to the versions that SetPolicy assigned. more adds a line saying
    that more records match than are listed.
    """
    if not remediations:
        return "No remediation records.\n"
    current = policy or ops_pb2.GetPolicyResponse()
    rows = []
    for stored in remediations:
        record = stored.record
        rows.append(
            [
                format_time(record.start_time),
                stored.device_id,
                stored.hostname or "-",
                _record_source(record),
                record.action.WhichOneof("kind") or "-",
                _outcome_text(record),
                _record_policy_text(record, current),
                change_text(record),
                record.reason or "-",
            ]
        )
    headers = ["TIME", "DEVICE ID", "HOSTNAME", "RULE", "ACTION", "OUTCOME"]
    records = render_table([*headers, "POLICY", "CHANGE", "REASON"], rows)
    if more:
        records += (
            f"Listed the newest {count_text(len(remediations), 'record')}; more "
            "match. Raise --limit or narrow the filters to see them.\n"
        )
    summary_rows = [
        [
            summary.rule,
            str(summary.runs),
            str(summary.succeeded),
            str(summary.failed),
            str(summary.skipped),
            str(summary.refused),
            str(summary.dry_runs),
            success_rate_text(summary.succeeded, summary.runs),
            str(summary.devices),
            str(summary.recurring_devices),
        ]
        for summary in summaries
    ]
    summary_headers = ["RULE", "RUNS", "SUCCEEDED", "FAILED", "SKIPPED", "REFUSED"]
    summary = render_table(
        [*summary_headers, "DRY RUN", "SUCCESS", "DEVICES", "RECURRING"], summary_rows
    )
    return (
        f"{records}{POLICY_LEGEND}\n"
        f"Summary per rule, over every matching record\n{_indent(summary)}"
    )


def _record_source(record: remediation_pb2.RemediationRecord) -> str:
    if record.rule:
        return record.rule
    # Records of operator commands have no rule name. An undone throttle of a
    # command has no command id either.
    return f"command {record.command_id}" if record.command_id else "command"


def _outcome_text(record: remediation_pb2.RemediationRecord) -> str:
    label = enum_label(remediation_pb2.RemediationOutcome, record.outcome)
    # A record whose repeat_count is above 1 counts that many repeats of one
    # outcome and reason, such as a skip in cooldown.
    if record.repeat_count > 1:
        return f"{label} x{record.repeat_count}"
    return label


def _record_policy_text(
    record: remediation_pb2.RemediationRecord, policy: ops_pb2.GetPolicyResponse
) -> str:
    # An operator command runs under no policy, whatever generation its
    # record carries.
    if not record.rule:
        return "-"
    return policy_version_label(record.policy_version, policy)


def policy_version_label(version: int, policy: ops_pb2.GetPolicyResponse) -> str:
    """Return the POLICY column of a record's policy_version: "v3", "older", "local".

    Records carry the effective policy generation that the collector sent,
    and only the current generation maps to a version of SetPolicy.
    """
    # NOTE: a record of the current version from before a rule state change
    # shows as "older", because GetPolicy returns the current generation only.
    if version == 0:
        return "local"
    if policy.HasField("policy") and version == policy.generation:
        return f"v{policy.policy.version}"
    return "older"


def _bytes_value(value: float) -> str:
    if not math.isfinite(value) or value < 0:
        return f"{value:g} bytes"
    return format_bytes(int(value))


def _cpu_value(value: float) -> str:
    return f"{value:.1f} %"


def _active_value(value: float) -> str:
    if value == 1:
        return "active"
    if value == 0:
        return "not active"
    return f"{value:g}"


def _seconds_left_value(value: float) -> str:
    if not math.isfinite(value):
        return f"{value:g} seconds left"
    if value <= 0:
        return "expired"
    return f"expires in {format_duration(value)}"


def _days_left_value(value: float) -> str:
    if not math.isfinite(value):
        return f"{value:g} days left"
    if value < 0:
        return "expired"
    if value == 0:
        return "expires today"
    return "expires in 1 day" if value == 1 else f"expires in {value:g} days"


def _ratio_value(value: float) -> str:
    return f"{value:.0%}" if math.isfinite(value) else f"{value:g}"


def _count_value(value: float) -> str:
    return f"{value:g}"


# The units that the agent's actions and conditions write into
# RemediationRecord.unit, each with the label and the value format that an
# operator reads. A {subject} in a label is the unit's named group, such as a
# mount point.
_VALUE_KINDS: tuple[tuple[re.Pattern[str], str, Callable[[float], str]], ...] = (
    (re.compile(r"bytes"), "free space", _bytes_value),
    (
        re.compile(r"free bytes of (?P<subject>.+)"),
        "free space on {subject}",
        _bytes_value,
    ),
    (re.compile(r"percent of one CPU"), "CPU", _cpu_value),
    (
        re.compile(r"percent of one CPU used by (?P<subject>.+)"),
        "{subject} CPU",
        _cpu_value,
    ),
    (re.compile(r"active"), "service", _active_value),
    (
        re.compile(r"service (?P<subject>.+) active \(1\) or not \(0\)"),
        "service {subject}",
        _active_value,
    ),
    (
        re.compile(r"seconds until the credential expires"),
        "credential",
        _seconds_left_value,
    ),
    (re.compile(r"days until expiry"), "password", _days_left_value),
    (
        re.compile(r"battery health \(full over design capacity\)"),
        "battery health",
        _ratio_value,
    ),
    (re.compile(r"failing disks"), "failing disks", _count_value),
)

# Units of actions that leave before and after at 0 when they measured
# nothing: clear_cache without a cache folder or when refused, and the
# throttle_process dry run of agents older than this collector.
# NOTE: a volume with no free byte left also reads 0 and 0 with "bytes", and
# is shown as not measured, because the record cannot tell the two apart.
_UNMEASURED_AT_ZERO = frozenset({"bytes", "percent of one CPU"})


def change_text(record: remediation_pb2.RemediationRecord) -> str:
    """Return the value a record tested, before and after, and the bytes freed.

    A value that did not change, as in skips and dry runs, is shown once. A
    dry run of clear_cache shows what it would free.
    """
    parts = [_reading_text(record), _freed_text(record)]
    return ", ".join(part for part in parts if part) or "-"


def _reading_text(record: remediation_pb2.RemediationRecord) -> str:
    unit = record.unit
    if not unit:
        return ""
    if unit in _UNMEASURED_AT_ZERO and record.before == 0 and record.after == 0:
        return ""
    label, value_text = _value_kind(unit)
    # A dry run changes nothing, so its after is a copy of before.
    if record.before == record.after or record.outcome == DRY_RUN:
        values = value_text(record.before)
    else:
        values = f"{value_text(record.before)} -> {value_text(record.after)}"
    return f"{label} {values}" if label else values


def _value_kind(unit: str) -> tuple[str, Callable[[float], str]]:
    for pattern, label, value_text in _VALUE_KINDS:
        match = pattern.fullmatch(unit)
        if match is not None:
            return label.format(**match.groupdict()), value_text

    def with_unit(value: float) -> str:
        return f"{value:g} {unit}"

    return "", with_unit


def _freed_text(record: remediation_pb2.RemediationRecord) -> str:
    if record.outcome == DRY_RUN and (
        record.bytes_freed or record.action.HasField("clear_cache")
    ):
        return f"would free {format_bytes(record.bytes_freed)}"
    if record.bytes_freed:
        return f"freed {format_bytes(record.bytes_freed)}"
    return ""
