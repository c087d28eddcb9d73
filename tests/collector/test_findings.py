"""Tests of collector.findings on devices built from real smartctl and sysfs values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from collector.findings import compute_findings, sort_key
from fleetmend.v1 import ops_pb2, report_pb2

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
DEVICE = "5f0c7d2e-8a41-4c3b-9e0d-2b6f1a7c9d31"

Kind = ops_pb2.FindingKind
CRITICAL = ops_pb2.SEVERITY_CRITICAL
WARNING = ops_pb2.SEVERITY_WARNING


def make_device(
    *,
    disks: list[report_pb2.Disk] | None = None,
    batteries: list[report_pb2.Battery] | None = None,
    credentials: list[report_pb2.Credential] | None = None,
    last_seen: datetime = NOW - timedelta(minutes=5),
    device_id: str = DEVICE,
) -> ops_pb2.Device:
    device = ops_pb2.Device(
        device_id=device_id, hostname="pc-ops-017", committed_sequence=12
    )
    device.last_seen_time.FromDatetime(last_seen)
    device.last_report_time.FromDatetime(NOW - timedelta(minutes=6))
    device.host.hostname = "pc-ops-017"
    if disks is not None:
        device.disks.disks.extend(disks)
    if batteries is not None:
        device.batteries.batteries.extend(batteries)
    if credentials is not None:
        device.credentials.credentials.extend(credentials)
    return device


def ata_attribute(
    attribute_id: int,
    name: str,
    value: int,
    threshold: int,
    raw: int,
    raw_text: str = "",
) -> report_pb2.AtaAttribute:
    return report_pb2.AtaAttribute(
        id=attribute_id,
        name=name,
        value=value,
        worst=value,
        threshold=threshold,
        raw=raw,
        raw_text=raw_text or str(raw),
    )


def failing_seagate() -> report_pb2.Disk:
    """Return a ST3250318AS as smartctl 5.39.1 read it: FAILED, 4049 reallocated."""
    return report_pb2.Disk(
        name="sda",
        model="ST3250318AS",
        serial_number="9VY1LMLV",
        interface=report_pb2.DISK_INTERFACE_ATA,
        capacity_bytes=250_059_350_016,
        rotational=True,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        self_assessment=report_pb2.SELF_ASSESSMENT_FAILED,
        ata_attributes=[
            ata_attribute(1, "Raw_Read_Error_Rate", 104, 6, 37_857_001),
            ata_attribute(5, "Reallocated_Sector_Ct", 2, 36, 4049),
            ata_attribute(9, "Power_On_Hours", 95, 0, 4804),
            ata_attribute(187, "Reported_Uncorrect", 1, 0, 208),
            ata_attribute(188, "Command_Timeout", 100, 0, 287_767_265_476),
            ata_attribute(194, "Temperature_Celsius", 38, 0, 38, "38 (0 21 0 0)"),
            ata_attribute(197, "Current_Pending_Sector", 100, 0, 0),
            ata_attribute(198, "Offline_Uncorrectable", 100, 0, 0),
        ],
    )


def passing_seagate_with_bad_sectors() -> report_pb2.Disk:
    """Return a ST3000DM001 as smartctl read it: PASSED, 1640 pending sectors."""
    return report_pb2.Disk(
        name="sdb",
        model="ST3000DM001-1ER166",
        serial_number="Z501MAQ5",
        interface=report_pb2.DISK_INTERFACE_ATA,
        capacity_bytes=3_000_592_982_016,
        rotational=True,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        self_assessment=report_pb2.SELF_ASSESSMENT_PASSED,
        ata_attributes=[
            ata_attribute(5, "Reallocated_Sector_Ct", 100, 10, 8),
            ata_attribute(183, "Runtime_Bad_Block", 99, 0, 1),
            ata_attribute(187, "Reported_Uncorrect", 11, 0, 89),
            ata_attribute(188, "Command_Timeout", 100, 0, 5, "0 0 5"),
            ata_attribute(197, "Current_Pending_Sector", 90, 0, 1640),
            ata_attribute(198, "Offline_Uncorrectable", 90, 0, 1640),
            ata_attribute(199, "UDMA_CRC_Error_Count", 200, 0, 0),
        ],
    )


def healthy_ata_disk(reallocated_raw: int = 0) -> report_pb2.Disk:
    return report_pb2.Disk(
        name="sdc",
        model="Crucial_CT500MX500SSD1",
        interface=report_pb2.DISK_INTERFACE_ATA,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        self_assessment=report_pb2.SELF_ASSESSMENT_PASSED,
        ata_attributes=[
            ata_attribute(5, "Reallocated_Sector_Ct", 100, 10, reallocated_raw),
            ata_attribute(197, "Current_Pending_Sector", 100, 0, 0),
        ],
    )


def toshiba_nvme(**health: int) -> report_pb2.Disk:
    """Return a KBG30ZMV256G with the health log smartctl 7.2 read, overridden."""
    values = {
        "critical_warning": 0,
        "temperature_celsius": 42,
        "available_spare_percent": 100,
        "available_spare_threshold_percent": 10,
        "percentage_used": 28,
        "media_errors": 0,
        "unsafe_shutdowns": 67,
        "power_on_hours": 5809,
        "power_cycles": 997,
    }
    values.update(health)
    return report_pb2.Disk(
        name="nvme0n1",
        model="KBG30ZMV256G TOSHIBA",
        interface=report_pb2.DISK_INTERFACE_NVME,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        self_assessment=report_pb2.SELF_ASSESSMENT_PASSED,
        nvme_health=report_pb2.NvmeHealth(**values),
    )


def battery(health_percent: float | None, name: str = "BAT0") -> report_pb2.Battery:
    result = report_pb2.Battery(
        name=name,
        manufacturer="LGC",
        model="42T4865",
        capacity_unit=report_pb2.CAPACITY_UNIT_MICROAMPERE_HOURS,
        design_capacity=5_600_000,
        status=report_pb2.BATTERY_STATUS_DISCHARGING,
    )
    if health_percent is not None:
        result.health_percent = health_percent
        result.full_capacity = round(5_600_000 * health_percent / 100)
    return result


def password(
    account: str = "alice",
    *,
    expire_time: datetime | None = None,
    expiry: report_pb2.CredentialExpiry.ValueType = (
        report_pb2.CREDENTIAL_EXPIRY_AT_TIME
    ),
    kind: report_pb2.CredentialKind.ValueType = (
        report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD
    ),
) -> report_pb2.Credential:
    credential = report_pb2.Credential(
        kind=kind, account=account, expiry=expiry, source=f"chage -l {account}"
    )
    if expire_time is not None:
        credential.expire_time.FromDatetime(expire_time)
    return credential


def kinds(findings: list[ops_pb2.Finding]) -> list[int]:
    return [finding.kind for finding in findings]


# Disk failing


def test_disk_failing_ata_failed() -> None:
    (finding,) = compute_findings(make_device(disks=[failing_seagate()]), NOW)

    assert finding.kind == Kind.FINDING_KIND_DISK_FAILING
    assert finding.severity == CRITICAL
    assert finding.subject == "sda"
    assert finding.detail == (
        "SMART overall-health self-assessment FAILED; "
        "ATA attribute 5 Reallocated_Sector_Ct raw value 4049; "
        "ATA attribute 187 Reported_Uncorrect raw value 208; "
        "ATA attribute 188 Command_Timeout raw value 287767265476"
    )


def test_disk_failing_despite_passed() -> None:
    disk = passing_seagate_with_bad_sectors()

    (finding,) = compute_findings(make_device(disks=[disk]), NOW)

    assert finding.kind == Kind.FINDING_KIND_DISK_FAILING
    assert "FAILED" not in finding.detail
    assert "attribute 5 Reallocated_Sector_Ct raw value 8" in finding.detail
    assert "attribute 187 Reported_Uncorrect raw value 89" in finding.detail
    assert "attribute 197 Current_Pending_Sector raw value 1640" in finding.detail
    assert "attribute 198 Offline_Uncorrectable raw value 1640" in finding.detail
    assert "attribute 188 Command_Timeout raw value 5" in finding.detail
    assert "Runtime_Bad_Block" not in finding.detail


def test_disk_failing_raw_edge() -> None:
    assert compute_findings(make_device(disks=[healthy_ata_disk(0)]), NOW) == []

    (finding,) = compute_findings(make_device(disks=[healthy_ata_disk(1)]), NOW)

    assert finding.detail == "ATA attribute 5 Reallocated_Sector_Ct raw value 1"


def test_disk_failing_attribute_without_name() -> None:
    disk = healthy_ata_disk()
    disk.ata_attributes.append(report_pb2.AtaAttribute(id=198, raw=3))

    (finding,) = compute_findings(make_device(disks=[disk]), NOW)

    assert finding.detail == "ATA attribute 198 Offline_Uncorrectable raw value 3"


def test_disk_failing_other_attributes_ignored() -> None:
    disk = healthy_ata_disk()
    disk.ata_attributes.append(ata_attribute(1, "Raw_Read_Error_Rate", 1, 51, 9))
    disk.ata_attributes.append(ata_attribute(199, "UDMA_CRC_Error_Count", 200, 0, 4))

    assert compute_findings(make_device(disks=[disk]), NOW) == []


def test_disk_failing_media_errors() -> None:
    assert compute_findings(make_device(disks=[toshiba_nvme()]), NOW) == []

    (finding,) = compute_findings(
        make_device(disks=[toshiba_nvme(media_errors=1)]), NOW
    )

    assert finding.kind == Kind.FINDING_KIND_DISK_FAILING
    assert finding.severity == CRITICAL
    assert finding.subject == "nvme0n1"
    assert finding.detail == "NVMe media and data integrity errors: 1"


def test_disk_failing_spare_edge() -> None:
    at_threshold = toshiba_nvme(available_spare_percent=10)
    below = toshiba_nvme(available_spare_percent=9)

    assert compute_findings(make_device(disks=[at_threshold]), NOW) == []
    (finding,) = compute_findings(make_device(disks=[below]), NOW)

    assert finding.kind == Kind.FINDING_KIND_DISK_FAILING
    assert finding.detail == "NVMe available spare 9 % is below its threshold 10 %"


@pytest.mark.parametrize(
    ("critical_warning", "detail"),
    [
        (0x04, "NVMe critical warning 0x04: NVM subsystem reliability degraded"),
        (
            0x09,
            "NVMe critical warning 0x09: available spare below threshold, "
            "media placed in read-only mode",
        ),
        (0x02, "NVMe critical warning 0x02: temperature outside its thresholds"),
        (0x10, "NVMe critical warning 0x10: volatile memory backup failed"),
        (
            0x20,
            "NVMe critical warning 0x20: persistent memory region read-only or "
            "unreliable",
        ),
        (0x40, "NVMe critical warning 0x40: reserved bit 6"),
    ],
)
def test_disk_failing_critical_warning(critical_warning: int, detail: str) -> None:
    disk = toshiba_nvme(critical_warning=critical_warning)

    (finding,) = compute_findings(make_device(disks=[disk]), NOW)

    assert finding.kind == Kind.FINDING_KIND_DISK_FAILING
    assert finding.severity == CRITICAL
    assert finding.detail == detail


def test_disk_failing_one_per_disk() -> None:
    disk = toshiba_nvme(critical_warning=0x04, media_errors=12)

    (finding,) = compute_findings(make_device(disks=[disk]), NOW)

    assert finding.detail == (
        "NVMe critical warning 0x04: NVM subsystem reliability degraded; "
        "NVMe media and data integrity errors: 12"
    )


def test_disk_without_smart() -> None:
    disk = report_pb2.Disk(
        name="vda",
        interface=report_pb2.DISK_INTERFACE_VIRTIO,
        smart_state=report_pb2.SMART_STATE_NOT_SUPPORTED,
        smart_state_reason="virtual disk",
    )

    assert compute_findings(make_device(disks=[disk]), NOW) == []


# Disk worn


def test_disk_worn_edge() -> None:
    assert (
        compute_findings(make_device(disks=[toshiba_nvme(percentage_used=99)]), NOW)
        == []
    )

    (finding,) = compute_findings(
        make_device(disks=[toshiba_nvme(percentage_used=100)]), NOW
    )

    assert finding.kind == Kind.FINDING_KIND_DISK_WORN
    assert finding.severity == WARNING
    assert finding.subject == "nvme0n1"
    assert finding.detail == "NVMe percentage used is 100 %"


def test_disk_worn_and_failing() -> None:
    disk = toshiba_nvme(percentage_used=255, available_spare_percent=0)

    findings = compute_findings(make_device(disks=[disk]), NOW)

    assert kinds(findings) == [
        Kind.FINDING_KIND_DISK_FAILING,
        Kind.FINDING_KIND_DISK_WORN,
    ]
    assert findings[1].detail == "NVMe percentage used is 255 %"


# Battery worn


def test_battery_worn_edge() -> None:
    assert compute_findings(make_device(batteries=[battery(80.0)]), NOW) == []

    (finding,) = compute_findings(make_device(batteries=[battery(79.9)]), NOW)

    assert finding.kind == Kind.FINDING_KIND_BATTERY_WORN
    assert finding.severity == WARNING
    assert finding.subject == "BAT0"
    assert finding.detail == "health is 79.9 % of design capacity, below 80 %"


def test_battery_worn_rounds_down() -> None:
    (finding,) = compute_findings(make_device(batteries=[battery(79.97)]), NOW)

    assert finding.detail.startswith("health is 79.9 %")


def test_battery_worn_thinkpad() -> None:
    # 1802000 of 5600000 uAh design, from a ThinkPad 42T4865 pack.
    worn = battery(1_802_000 / 5_600_000 * 100)

    (finding,) = compute_findings(make_device(batteries=[worn]), NOW)

    assert finding.detail == "health is 32.1 % of design capacity, below 80 %"


def test_battery_without_health() -> None:
    assert compute_findings(make_device(batteries=[battery(None)]), NOW) == []


def test_battery_above_design() -> None:
    # Some packs report a full-charge capacity above their design capacity.
    assert compute_findings(make_device(batteries=[battery(101.0)]), NOW) == []


# Passwords


def test_password_expired_at_now() -> None:
    (finding,) = compute_findings(
        make_device(credentials=[password(expire_time=NOW)]), NOW
    )

    assert finding.kind == Kind.FINDING_KIND_PASSWORD_EXPIRED
    assert finding.severity == CRITICAL
    assert finding.subject == "alice"
    assert finding.detail == "password expired at 2026-03-02 12:00 UTC, 0 min ago"


def test_password_expired_days_ago() -> None:
    expired = password(expire_time=NOW - timedelta(days=3, hours=4))

    (finding,) = compute_findings(make_device(credentials=[expired]), NOW)

    assert finding.kind == Kind.FINDING_KIND_PASSWORD_EXPIRED
    assert finding.detail == "password expired at 2026-02-27 08:00 UTC, 3 d 4 h ago"


def test_password_must_change_now() -> None:
    credential = password(
        "CORP\\bob",
        expiry=report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW,
        kind=report_pb2.CREDENTIAL_KIND_DOMAIN_PASSWORD,
    )

    (finding,) = compute_findings(make_device(credentials=[credential]), NOW)

    assert finding.kind == Kind.FINDING_KIND_PASSWORD_EXPIRED
    assert finding.severity == CRITICAL
    assert finding.subject == "CORP\\bob"
    assert finding.detail == "password must be changed at the next login"


def test_password_expiring_soon() -> None:
    expiring = password(expire_time=NOW + timedelta(seconds=1))

    (finding,) = compute_findings(make_device(credentials=[expiring]), NOW)

    assert finding.kind == Kind.FINDING_KIND_PASSWORD_EXPIRING
    assert finding.severity == WARNING


def test_password_expiring_edge() -> None:
    at_edge = password(expire_time=NOW + timedelta(days=14))
    past_edge = password(expire_time=NOW + timedelta(days=14, seconds=1))

    (finding,) = compute_findings(make_device(credentials=[at_edge]), NOW)

    assert finding.kind == Kind.FINDING_KIND_PASSWORD_EXPIRING
    assert finding.detail == "password expires at 2026-03-16 12:00 UTC, in 14 d 0 h"
    assert compute_findings(make_device(credentials=[past_edge]), NOW) == []


def test_password_never_expires() -> None:
    never = password(expiry=report_pb2.CREDENTIAL_EXPIRY_NEVER)

    assert compute_findings(make_device(credentials=[never]), NOW) == []


def test_password_invalid_expire_time() -> None:
    credential = password()
    # Past 9999-12-31, which a Timestamp cannot represent as a datetime.
    credential.expire_time.seconds = 253_402_300_800

    assert compute_findings(make_device(credentials=[credential]), NOW) == []


def test_password_other_credentials_ignored() -> None:
    ticket = password(
        "alice@CORP.EXAMPLE.COM",
        expire_time=NOW + timedelta(hours=2),
        kind=report_pb2.CREDENTIAL_KIND_KERBEROS_TICKET,
    )
    certificate = password(
        "CN=alice",
        expire_time=NOW - timedelta(days=1),
        kind=report_pb2.CREDENTIAL_KIND_CERTIFICATE,
    )

    assert compute_findings(make_device(credentials=[ticket, certificate]), NOW) == []


# Device silent


def test_device_silent_edge() -> None:
    at_edge = make_device(last_seen=NOW - timedelta(days=3))
    past_edge = make_device(last_seen=NOW - timedelta(days=3, seconds=1))

    assert compute_findings(at_edge, NOW) == []
    (finding,) = compute_findings(past_edge, NOW)

    assert finding.kind == Kind.FINDING_KIND_DEVICE_SILENT
    assert finding.severity == WARNING
    assert finding.subject == ""
    assert finding.detail == "last seen at 2026-02-27 11:59 UTC, 3 d 0 h ago"
    assert finding.observe_time == past_edge.last_seen_time


def test_device_never_seen() -> None:
    device = ops_pb2.Device(device_id=DEVICE)

    assert compute_findings(device, NOW) == []


# Common fields and order


def test_finding_fields() -> None:
    device = make_device(batteries=[battery(70.0)])

    (finding,) = compute_findings(device, NOW)

    assert finding.device_id == DEVICE
    assert finding.hostname == "pc-ops-017"
    assert finding.observe_time == device.last_report_time


def test_finding_hostname_from_host() -> None:
    device = make_device(batteries=[battery(70.0)])
    device.hostname = ""
    device.host.hostname = "lab-laptop-3"

    (finding,) = compute_findings(device, NOW)

    assert finding.hostname == "lab-laptop-3"


def test_findings_order() -> None:
    device = make_device(
        disks=[toshiba_nvme(percentage_used=100), failing_seagate()],
        batteries=[battery(60.0, "BAT1"), battery(75.0, "BAT0")],
        credentials=[
            password("zoe", expire_time=NOW + timedelta(days=2)),
            password("bob", expire_time=NOW - timedelta(days=1)),
        ],
        last_seen=NOW - timedelta(days=4),
    )

    findings = compute_findings(device, NOW)

    assert [(finding.kind, finding.subject) for finding in findings] == [
        (Kind.FINDING_KIND_DISK_FAILING, "sda"),
        (Kind.FINDING_KIND_PASSWORD_EXPIRED, "bob"),
        (Kind.FINDING_KIND_DISK_WORN, "nvme0n1"),
        (Kind.FINDING_KIND_BATTERY_WORN, "BAT0"),
        (Kind.FINDING_KIND_BATTERY_WORN, "BAT1"),
        (Kind.FINDING_KIND_PASSWORD_EXPIRING, "zoe"),
        (Kind.FINDING_KIND_DEVICE_SILENT, ""),
    ]


def test_sort_key_across_devices() -> None:
    first = compute_findings(
        make_device(device_id="b-device", batteries=[battery(50.0)]), NOW
    )
    second = compute_findings(
        make_device(device_id="a-device", batteries=[battery(50.0)]), NOW
    )
    third = compute_findings(
        make_device(device_id="c-device", disks=[failing_seagate()]), NOW
    )

    merged = sorted([*first, *second, *third], key=sort_key)

    assert [finding.device_id for finding in merged] == [
        "c-device",
        "a-device",
        "b-device",
    ]


def test_sort_key_fields() -> None:
    finding = ops_pb2.Finding(
        device_id=DEVICE,
        kind=Kind.FINDING_KIND_PASSWORD_EXPIRING,
        severity=WARNING,
        subject="alice",
        detail="password expires at 2026-03-10 12:00 UTC, in 8 d 0 h",
    )

    assert sort_key(finding) == (
        -WARNING,
        DEVICE,
        Kind.FINDING_KIND_PASSWORD_EXPIRING,
        "alice",
        "password expires at 2026-03-10 12:00 UTC, in 8 d 0 h",
    )


def test_healthy_device() -> None:
    device = make_device(
        disks=[toshiba_nvme(), healthy_ata_disk()],
        batteries=[battery(86.1)],
        credentials=[password(expire_time=NOW + timedelta(days=90))],
    )

    assert compute_findings(device, NOW) == []


def test_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        compute_findings(make_device(), NOW.replace(tzinfo=None))
