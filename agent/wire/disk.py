"""Convert a disk scan to its wire message."""

from __future__ import annotations

from agent.probes.disk import (
    AtaAttribute,
    DiskInterface,
    DiskReading,
    DiskScan,
    NvmeHealth,
    SelfAssessment,
    SmartState,
)
from agent.wire import probe_error_to_proto
from fleetmend.v1 import report_pb2

_INT64_MAX = 2**63 - 1

_INTERFACES = {
    DiskInterface.ATA: report_pb2.DISK_INTERFACE_ATA,
    DiskInterface.NVME: report_pb2.DISK_INTERFACE_NVME,
    DiskInterface.SCSI: report_pb2.DISK_INTERFACE_SCSI,
    DiskInterface.USB: report_pb2.DISK_INTERFACE_USB,
    DiskInterface.VIRTIO: report_pb2.DISK_INTERFACE_VIRTIO,
    DiskInterface.MMC: report_pb2.DISK_INTERFACE_MMC,
}

_SMART_STATES = {
    SmartState.AVAILABLE: report_pb2.SMART_STATE_AVAILABLE,
    SmartState.NOT_SUPPORTED: report_pb2.SMART_STATE_NOT_SUPPORTED,
    SmartState.PERMISSION_DENIED: report_pb2.SMART_STATE_PERMISSION_DENIED,
    SmartState.IN_STANDBY: report_pb2.SMART_STATE_IN_STANDBY,
    SmartState.SMARTCTL_MISSING: report_pb2.SMART_STATE_SMARTCTL_MISSING,
    SmartState.UNPARSED: report_pb2.SMART_STATE_UNPARSED,
    SmartState.ERROR: report_pb2.SMART_STATE_ERROR,
}

_SELF_ASSESSMENTS = {
    SelfAssessment.PASSED: report_pb2.SELF_ASSESSMENT_PASSED,
    SelfAssessment.FAILED: report_pb2.SELF_ASSESSMENT_FAILED,
}


def disks_to_proto(scan: DiskScan) -> report_pb2.DiskSection:
    """Build the disk section with every disk and every error of the scan."""
    section = report_pb2.DiskSection()
    for disk in scan.disks:
        section.disks.append(disk_to_proto(disk))
    for error in scan.errors:
        section.errors.append(probe_error_to_proto(error))
    return section


def disk_to_proto(disk: DiskReading) -> report_pb2.Disk:
    """Build one Disk message; values the reading lacks stay at their defaults."""
    message = report_pb2.Disk(
        name=disk.name,
        model=disk.model,
        serial_number=disk.serial_number,
        firmware_version=disk.firmware_version,
        interface=_INTERFACES[disk.interface],
        capacity_bytes=disk.capacity_bytes,
        rotational=bool(disk.rotational),
        smart_state=_SMART_STATES[disk.smart_state],
        smart_state_reason=disk.smart_state_reason,
    )
    if disk.self_assessment is not None:
        message.self_assessment = _SELF_ASSESSMENTS[disk.self_assessment]
    for attribute in disk.ata_attributes:
        message.ata_attributes.append(ata_attribute_to_proto(attribute))
    if disk.nvme_health is not None:
        message.nvme_health.CopyFrom(nvme_health_to_proto(disk.nvme_health))
    return message


def ata_attribute_to_proto(attribute: AtaAttribute) -> report_pb2.AtaAttribute:
    """Build one AtaAttribute message.

    A missing threshold (smartctl prints "---") becomes 0. A raw value beyond
    int64 stays 0, and raw_text keeps it.
    """
    message = report_pb2.AtaAttribute(
        id=attribute.id,
        name=attribute.name,
        value=attribute.value,
        worst=attribute.worst,
        threshold=attribute.threshold or 0,
        raw_text=attribute.raw_text,
        when_failed=attribute.when_failed,
    )
    if attribute.raw is not None and attribute.raw <= _INT64_MAX:
        message.raw = attribute.raw
    return message


def nvme_health_to_proto(health: NvmeHealth) -> report_pb2.NvmeHealth:
    """Build the NvmeHealth message; absent values stay 0."""
    values = {
        "critical_warning": health.critical_warning,
        "temperature_celsius": health.temperature_celsius,
        "available_spare_percent": health.available_spare_percent,
        "available_spare_threshold_percent": health.available_spare_threshold_percent,
        "percentage_used": health.percentage_used,
        "media_errors": health.media_errors,
        "unsafe_shutdowns": health.unsafe_shutdowns,
        "power_on_hours": health.power_on_hours,
        "power_cycles": health.power_cycles,
        "error_log_entries": health.error_log_entries,
    }
    present = {name: value for name, value in values.items() if value is not None}
    return report_pb2.NvmeHealth(**present)
