"""Disk health: the Linux block devices in sysfs and their SMART data.

Disks come from /sys/block rather than from ``smartctl --scan``. A disk that
smartctl cannot talk to (virtio, SD cards, USB bridges without SMART) is still
reported, with its capacity and a SMART state that gives the reason.
SMART data comes from pySMART over smartctl, always with ``-n standby`` so a
spun-down disk stays asleep.

Usage::

    scan = read_disks()
    for disk in scan.disks:
        print(disk.name, disk.smart_state, disk.self_assessment)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.probes import ProbeError, ProbeErrorKind
from agent.probes._disk_smart import (
    DEFAULT_TIMEOUT_SECONDS,
    AtaAttribute,
    NvmeHealth,
    SelfAssessment,
    SmartctlCall,
    SmartReading,
    SmartState,
    describe_exit_status,
    interpret_smartctl,
    parse_self_assessment,
    read_smart,
    smartctl_missing,
)
from agent.probes._disk_sysfs import (
    BlockDevice,
    DiskInterface,
    interface_from_path,
    is_skipped,
    list_block_devices,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AtaAttribute",
    "BlockDevice",
    "DiskInterface",
    "DiskReading",
    "DiskScan",
    "NvmeHealth",
    "SelfAssessment",
    "SmartState",
    "SmartctlCall",
    "describe_exit_status",
    "interface_from_path",
    "interpret_smartctl",
    "is_skipped",
    "list_block_devices",
    "parse_self_assessment",
    "read_disks",
]


@dataclass(frozen=True)
class DiskReading:
    """One whole disk: its sysfs identity and capacity, and its SMART data.

    model, serial_number and firmware_version come from smartctl when it read
    them, because sysfs truncates ATA models to 16 characters. Otherwise they
    come from sysfs, and they are "" where neither has them.
    """

    name: str
    capacity_bytes: int
    # None when sysfs has no readable queue/rotational.
    rotational: bool | None
    interface: DiskInterface
    model: str
    serial_number: str
    firmware_version: str
    smart_state: SmartState
    # Why smart_state is not AVAILABLE, in words, or "" when it is.
    smart_state_reason: str = ""
    self_assessment: SelfAssessment | None = None
    # Every attribute an ATA disk reports, in id order (empty for other disks).
    ata_attributes: tuple[AtaAttribute, ...] = ()
    nvme_health: NvmeHealth | None = None
    # Exit status of the smartctl call the SMART state comes from. Its bits 3 to 7
    # carry health findings, which describe_exit_status names.
    smartctl_exit_status: int | None = None


@dataclass
class DiskScan:
    """Every disk found, and what could not be read or parsed along the way."""

    disks: list[DiskReading] = field(default_factory=list)
    errors: list[ProbeError] = field(default_factory=list)


def read_disks(
    sys_root: Path = Path("/sys"),
    dev_root: Path = Path("/dev"),
    smartctl: str = "smartctl",
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> DiskScan:
    """List the disks under <sys_root>/block and read each one's SMART data.

    smartctl is a command name looked up on PATH, or a path. Each disk's node is
    <dev_root>/<name>, and timeout_seconds bounds each smartctl run. Every disk that
    sysfs lists (less the skipped kinds and empty ones) is in the result, with a
    SMART state even when reading it failed. Unparsed output, smartctl failures,
    permission problems and a missing smartctl also appear in errors.
    """
    devices, errors = list_block_devices(sys_root)
    for error in errors:
        logger.warning("cannot read %s: %s", error.source, error.reason)
    scan = DiskScan(errors=errors)
    smartctl_path = shutil.which(smartctl)
    if smartctl_path is None and devices:
        missing = smartctl_missing(smartctl)
        logger.warning("cannot read SMART data: %s", missing.reason)
        error = ProbeError(smartctl, ProbeErrorKind.UNREADABLE, missing.reason)
        scan.errors.append(error)

    for device in devices:
        if smartctl_path is None:
            smart = smartctl_missing(smartctl)
        else:
            smart = _read_smart_safely(device, dev_root, smartctl_path, timeout_seconds)
        if smart.error is not None:
            scan.errors.append(smart.error)
        scan.disks.append(_combine(device, smart))
    return scan


def _read_smart_safely(
    device: BlockDevice, dev_root: Path, smartctl_path: str, timeout_seconds: float
) -> SmartReading:
    try:
        smart = read_smart(
            device.name, device.interface, dev_root, smartctl_path, timeout_seconds
        )
    except Exception as exc:
        # A bug here must cost one disk's SMART data, not the whole scan.
        logger.exception("reading SMART data of %s failed", device.name)
        reason = f"reading SMART data failed: {type(exc).__name__}: {exc}"
        error = ProbeError(
            str(dev_root / device.name), ProbeErrorKind.UNREADABLE, reason
        )
        return SmartReading(SmartState.ERROR, reason, error=error)

    if smart.error is not None:
        logger.warning("SMART data of %s: %s", device.name, smart.reason)
    else:
        logger.debug("SMART data of %s: %s %s", device.name, smart.state, smart.reason)
    return smart


def _combine(device: BlockDevice, smart: SmartReading) -> DiskReading:
    return DiskReading(
        name=device.name,
        capacity_bytes=device.capacity_bytes,
        rotational=device.rotational,
        interface=device.interface,
        model=smart.model or device.model,
        serial_number=smart.serial_number or device.serial_number,
        firmware_version=smart.firmware_version or device.firmware_version,
        smart_state=smart.state,
        smart_state_reason=smart.reason,
        self_assessment=smart.self_assessment,
        ata_attributes=smart.ata_attributes,
        nvme_health=smart.nvme_health,
        smartctl_exit_status=smart.exit_status,
    )
