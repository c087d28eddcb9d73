"""disks_to_proto on scans of replayed smartctl recordings."""

from __future__ import annotations

import pytest

from agent.probes.disk import AtaAttribute
from agent.wire.disk import ata_attribute_to_proto, disks_to_proto
from fleetmend.v1 import report_pb2
from tests.fakes.smartctl_replay import (
    MIXED_CASES,
    build_sysfs_tree,
    load_sysfs_spec,
    scan_with_replay,
)


@pytest.fixture(scope="module")
def section(tmp_path_factory: pytest.TempPathFactory) -> report_pb2.DiskSection:
    work_dir = tmp_path_factory.mktemp("wire")
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), work_dir / "sys")
    replayed = scan_with_replay(sys_root, MIXED_CASES, work_dir)
    return disks_to_proto(replayed.scan)


def disk_message(section: report_pb2.DiskSection, name: str) -> report_pb2.Disk:
    matches = [disk for disk in section.disks if disk.name == name]
    assert len(matches) == 1, f"{name} appears {len(matches)} times"
    return matches[0]


def attribute_message(disk: report_pb2.Disk, attribute_id: int):
    matches = [row for row in disk.ata_attributes if row.id == attribute_id]
    assert len(matches) == 1, (
        f"{disk.name} has {len(matches)} attributes {attribute_id}"
    )
    return matches[0]


def test_section_lists_every_disk(section: report_pb2.DiskSection) -> None:
    assert len(section.disks) == 14


def test_section_round_trips(section: report_pb2.DiskSection) -> None:
    parsed = report_pb2.DiskSection.FromString(section.SerializeToString())

    assert parsed == section


def test_ata_disk_fields(section: report_pb2.DiskSection) -> None:
    disk = disk_message(section, "sdc")

    assert disk.model == "ST3250318AS"
    assert disk.serial_number == "9VY1LMLV"
    assert disk.firmware_version == "CC35"
    assert disk.interface == report_pb2.DISK_INTERFACE_ATA
    assert disk.capacity_bytes == 250_059_350_016
    assert disk.rotational is True
    assert disk.smart_state == report_pb2.SMART_STATE_AVAILABLE
    assert disk.smart_state_reason == ""
    assert disk.self_assessment == report_pb2.SELF_ASSESSMENT_FAILED
    assert len(disk.ata_attributes) == 22
    assert not disk.HasField("nvme_health")


def test_ata_attribute_fields(section: report_pb2.DiskSection) -> None:
    reallocated = attribute_message(disk_message(section, "sdc"), 5)

    assert reallocated.name == "Reallocated_Sector_Ct"
    assert reallocated.value == 2
    assert reallocated.worst == 2
    assert reallocated.threshold == 36
    assert reallocated.raw == 4049
    assert reallocated.raw_text == "4049"
    assert reallocated.when_failed == "now"


def test_ata_attribute_raw_text(section: report_pb2.DiskSection) -> None:
    temperature = attribute_message(disk_message(section, "sdd"), 194)

    assert temperature.raw == 47
    assert temperature.raw_text == "47 (Min/Max 12/57)"
    assert temperature.when_failed == ""


def test_nvme_health_fields(section: report_pb2.DiskSection) -> None:
    disk = disk_message(section, "nvme1n1")
    health = disk.nvme_health

    assert disk.interface == report_pb2.DISK_INTERFACE_NVME
    assert disk.self_assessment == report_pb2.SELF_ASSESSMENT_FAILED
    assert len(disk.ata_attributes) == 0
    assert health.critical_warning == 4
    assert health.temperature_celsius == 42
    assert health.available_spare_percent == 100
    assert health.available_spare_threshold_percent == 10
    assert health.percentage_used == 28
    assert health.media_errors == 7
    assert health.unsafe_shutdowns == 67
    assert health.power_on_hours == 5809
    assert health.power_cycles == 997
    assert health.error_log_entries == 1356


@pytest.mark.parametrize(
    ("name", "state", "interface"),
    [
        ("sdb", report_pb2.SMART_STATE_NOT_SUPPORTED, report_pb2.DISK_INTERFACE_USB),
        ("sde", report_pb2.SMART_STATE_NOT_SUPPORTED, report_pb2.DISK_INTERFACE_SCSI),
        ("vda", report_pb2.SMART_STATE_NOT_SUPPORTED, report_pb2.DISK_INTERFACE_VIRTIO),
        ("sdf", report_pb2.SMART_STATE_IN_STANDBY, report_pb2.DISK_INTERFACE_ATA),
        (
            "sdg",
            report_pb2.SMART_STATE_PERMISSION_DENIED,
            report_pb2.DISK_INTERFACE_ATA,
        ),
        ("sdi", report_pb2.SMART_STATE_UNPARSED, report_pb2.DISK_INTERFACE_ATA),
        ("nvme2n1", report_pb2.SMART_STATE_UNPARSED, report_pb2.DISK_INTERFACE_NVME),
        ("mmcblk0", report_pb2.SMART_STATE_ERROR, report_pb2.DISK_INTERFACE_MMC),
    ],
)
def test_states_without_data(
    section: report_pb2.DiskSection, name: str, state: int, interface: int
) -> None:
    disk = disk_message(section, name)

    assert disk.smart_state == state
    assert disk.interface == interface
    assert disk.smart_state_reason != ""
    assert disk.self_assessment == report_pb2.SELF_ASSESSMENT_UNSPECIFIED
    assert len(disk.ata_attributes) == 0
    assert not disk.HasField("nvme_health")
    assert disk.capacity_bytes > 0


def test_errors_land_in_section(section: report_pb2.DiskSection) -> None:
    kinds = {error.source.split()[-1]: error.kind for error in section.errors}

    assert kinds == {
        "/dev/mmcblk0": report_pb2.PROBE_ERROR_KIND_UNREADABLE,
        "/dev/nvme2n1": report_pb2.PROBE_ERROR_KIND_UNPARSED,
        "/dev/sdg": report_pb2.PROBE_ERROR_KIND_UNREADABLE,
        "/dev/sdh": report_pb2.PROBE_ERROR_KIND_UNREADABLE,
        "/dev/sdi": report_pb2.PROBE_ERROR_KIND_UNPARSED,
    }
    for error in section.errors:
        assert error.reason != "", error.source


def test_attribute_without_threshold() -> None:
    # smartctl prints "---" where the disk reports no threshold for an attribute.
    row = AtaAttribute(
        id=170,
        name="Unknown_Attribute",
        value=100,
        worst=100,
        threshold=None,
        raw=0,
        raw_text="0",
        when_failed="",
    )

    assert ata_attribute_to_proto(row).threshold == 0


def test_attribute_raw_beyond_int64() -> None:
    raw_text = "99999999999999999999"
    row = AtaAttribute(
        id=241,
        name="Total_LBAs_Written",
        value=100,
        worst=100,
        threshold=0,
        raw=int(raw_text),
        raw_text=raw_text,
        when_failed="",
    )

    message = ata_attribute_to_proto(row)

    assert message.raw == 0
    assert message.raw_text == raw_text
