"""Findings: problems that a device's latest readings show.

compute_findings() is a pure function of one stored device and the current
time, so findings are computed when they are listed and never stored. Rules:

- disk failing (critical): ATA attribute 5, 187, 188, 197 or 198 with a raw
  value above 0, a FAILED SMART self-assessment, NVMe media errors, NVMe
  available spare below its threshold, or any NVMe critical warning bit. A
  disk gets one finding that lists every reason.
- disk worn (warning): NVMe percentage used of 100 or more.
- battery worn (warning): health (full-charge capacity over design capacity)
  below 80 %.
- password expired (critical): local or domain password whose expiry time has
  come, or that must be changed at the next login.
- password expiring (warning): local or domain password that expires within 14
  days.
- device silent (warning): last seen more than 3 days ago.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

# The agent's disk_failing condition tests the same attributes, so a device
# with this finding meets it.
from agent.healing.conditions import FAILURE_ATTRIBUTES
from fleetmend.v1 import ops_pb2, report_pb2

# Bits of the Critical Warning byte of the NVMe SMART / Health log, as libnvme's
# enum nvme_smart_crit defines them; bits 6 and 7 are reserved.
CRITICAL_WARNING_BITS = {
    0: "available spare below threshold",
    1: "temperature outside its thresholds",
    2: "NVM subsystem reliability degraded",
    3: "media placed in read-only mode",
    4: "volatile memory backup failed",
    5: "persistent memory region read-only or unreliable",
}

WORN_PERCENTAGE_USED = 100
WORN_BATTERY_HEALTH_PERCENT = 80.0
PASSWORD_WARNING_PERIOD = timedelta(days=14)
SILENT_AFTER = timedelta(days=3)

# NOTE: certificates and Kerberos tickets get no finding, because FindingKind
# has only password kinds. A Kerberos ticket also usually expires within a day.
PASSWORD_KINDS = (
    report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
    report_pb2.CREDENTIAL_KIND_DOMAIN_PASSWORD,
)

SortKey = tuple[int, str, int, str, str]


def compute_findings(device: ops_pb2.Device, now: datetime) -> list[ops_pb2.Finding]:
    """Return the findings of one device at time now, in sort_key order.

    now must be timezone-aware. Sections the device has not reported yield no
    findings. observe_time is the device's last report time, because a delta
    leaves out only unchanged sections, so every stored reading still held
    then. For a silent device it is the last-seen time.
    """
    if now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")

    findings = [
        *_disk_findings(device),
        *_battery_findings(device),
        *_password_findings(device, now),
        *_silence_findings(device, now),
    ]
    hostname = device.hostname or device.host.hostname
    for finding in findings:
        finding.device_id = device.device_id
        finding.hostname = hostname
        if finding.kind != ops_pb2.FINDING_KIND_DEVICE_SILENT and device.HasField(
            "last_report_time"
        ):
            finding.observe_time.CopyFrom(device.last_report_time)
    return sorted(findings, key=sort_key)


def sort_key(finding: ops_pb2.Finding) -> SortKey:
    """Return the key that orders findings, most severe first.

    Findings of equal severity are ordered by device id, kind and subject. The
    detail comes last, so that two findings that differ only in detail (a local
    and a domain account of the same name) still have a fixed order.
    """
    return (
        -finding.severity,
        finding.device_id,
        finding.kind,
        finding.subject,
        finding.detail,
    )


def _disk_findings(device: ops_pb2.Device) -> Iterator[ops_pb2.Finding]:
    for disk in device.disks.disks:
        subject = disk.name or disk.serial_number
        reasons = _disk_failure_reasons(disk)
        if reasons:
            yield ops_pb2.Finding(
                kind=ops_pb2.FINDING_KIND_DISK_FAILING,
                severity=ops_pb2.SEVERITY_CRITICAL,
                subject=subject,
                detail="; ".join(reasons),
            )

        if not disk.HasField("nvme_health"):
            continue
        used = disk.nvme_health.percentage_used
        if used >= WORN_PERCENTAGE_USED:
            yield ops_pb2.Finding(
                kind=ops_pb2.FINDING_KIND_DISK_WORN,
                severity=ops_pb2.SEVERITY_WARNING,
                subject=subject,
                detail=f"NVMe percentage used is {used} %",
            )


def _disk_failure_reasons(disk: report_pb2.Disk) -> list[str]:
    reasons: list[str] = []
    if disk.self_assessment == report_pb2.SELF_ASSESSMENT_FAILED:
        reasons.append("SMART overall-health self-assessment FAILED")

    for attribute in disk.ata_attributes:
        if attribute.id in FAILURE_ATTRIBUTES and attribute.raw > 0:
            name = attribute.name or FAILURE_ATTRIBUTES[attribute.id]
            reasons.append(
                f"ATA attribute {attribute.id} {name} raw value {attribute.raw}"
            )

    if disk.HasField("nvme_health"):
        reasons.extend(_nvme_failure_reasons(disk.nvme_health))
    return reasons


def _nvme_failure_reasons(health: report_pb2.NvmeHealth) -> list[str]:
    reasons: list[str] = []
    if health.critical_warning:
        bits = [
            CRITICAL_WARNING_BITS.get(bit, f"reserved bit {bit}")
            for bit in range(8)
            if health.critical_warning & (1 << bit)
        ]
        reasons.append(
            f"NVMe critical warning 0x{health.critical_warning:02x}: {', '.join(bits)}"
        )
    if health.media_errors > 0:
        reasons.append(f"NVMe media and data integrity errors: {health.media_errors}")
    spare = health.available_spare_percent
    threshold = health.available_spare_threshold_percent
    if spare < threshold:
        reasons.append(
            f"NVMe available spare {spare} % is below its threshold {threshold} %"
        )
    return reasons


def _battery_findings(device: ops_pb2.Device) -> Iterator[ops_pb2.Finding]:
    for battery in device.batteries.batteries:
        if not battery.HasField("health_percent"):
            continue
        health = battery.health_percent
        if health < WORN_BATTERY_HEALTH_PERCENT:
            yield ops_pb2.Finding(
                kind=ops_pb2.FINDING_KIND_BATTERY_WORN,
                severity=ops_pb2.SEVERITY_WARNING,
                subject=battery.name or battery.serial_number,
                detail=(
                    f"health is {_format_percent(health)} % of design capacity, "
                    f"below {WORN_BATTERY_HEALTH_PERCENT:g} %"
                ),
            )


def _format_percent(value: float) -> str:
    # Rounded down, so that 79.97 shows as 79.9 and not as the 80.0 threshold.
    return f"{math.floor(value * 10) / 10:.1f}"


def _password_findings(
    device: ops_pb2.Device, now: datetime
) -> Iterator[ops_pb2.Finding]:
    for credential in device.credentials.credentials:
        if credential.kind not in PASSWORD_KINDS:
            continue

        if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW:
            yield _password_finding(
                credential,
                ops_pb2.FINDING_KIND_PASSWORD_EXPIRED,
                "password must be changed at the next login",
            )
            continue
        if credential.expiry != report_pb2.CREDENTIAL_EXPIRY_AT_TIME:
            continue

        expire_time = _to_datetime(credential.expire_time)
        if expire_time is None:
            continue
        remaining = expire_time - now
        when = _format_time(expire_time)
        if remaining <= timedelta(0):
            yield _password_finding(
                credential,
                ops_pb2.FINDING_KIND_PASSWORD_EXPIRED,
                f"password expired at {when}, {_format_span(-remaining)} ago",
            )
        elif remaining <= PASSWORD_WARNING_PERIOD:
            yield _password_finding(
                credential,
                ops_pb2.FINDING_KIND_PASSWORD_EXPIRING,
                f"password expires at {when}, in {_format_span(remaining)}",
            )


def _password_finding(
    credential: report_pb2.Credential, kind: ops_pb2.FindingKind.ValueType, detail: str
) -> ops_pb2.Finding:
    if kind == ops_pb2.FINDING_KIND_PASSWORD_EXPIRED:
        severity = ops_pb2.SEVERITY_CRITICAL
    else:
        severity = ops_pb2.SEVERITY_WARNING
    return ops_pb2.Finding(
        kind=kind, severity=severity, subject=credential.account, detail=detail
    )


def _silence_findings(
    device: ops_pb2.Device, now: datetime
) -> Iterator[ops_pb2.Finding]:
    if not device.HasField("last_seen_time"):
        return
    last_seen = _to_datetime(device.last_seen_time)
    if last_seen is None:
        return
    silence = now - last_seen
    if silence > SILENT_AFTER:
        finding = ops_pb2.Finding(
            kind=ops_pb2.FINDING_KIND_DEVICE_SILENT,
            severity=ops_pb2.SEVERITY_WARNING,
            detail=(
                f"last seen at {_format_time(last_seen)}, {_format_span(silence)} ago"
            ),
        )
        finding.observe_time.CopyFrom(device.last_seen_time)
        yield finding


def _to_datetime(timestamp: Timestamp) -> datetime | None:
    """Convert a Timestamp, or return None when it is outside years 1 to 9999."""
    try:
        return timestamp.ToDatetime(tzinfo=UTC)
    except ValueError:
        return None


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _format_span(span: timedelta) -> str:
    """Format a duration as days and hours, or minutes when under an hour."""
    days = span.days
    hours, remainder = divmod(span.seconds, 3600)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h"
    return f"{remainder // 60} min"
