"""Whole-disk block devices as Linux sysfs lists them under /sys/block.

Each entry of <sys_root>/block is a whole disk (partitions live below it). The
``size`` file counts 512-byte sectors whatever the logical block size, and
``queue/rotational`` is 1 for spinning media. ``device`` links to the parent
device, which contains the identity files. SCSI and ATA disks have ``vendor``,
``model`` and ``rev``. NVMe controllers have ``model``, ``serial`` and
``firmware_rev``, and MMC cards have ``name``, ``serial`` and ``fwrev``. Virtio
disks keep their ``serial`` in the block folder itself.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from agent.probes import ProbeError, ProbeErrorKind

logger = logging.getLogger(__name__)

SECTOR_BYTES = 512

# Block devices that are not disks (loop, RAM, compressed swap, device mapper,
# software RAID, optical, floppy, network block devices).
SKIPPED_PREFIXES = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd")

# eMMC hardware boot partitions appear as separate block devices next to the card
# they belong to (mmcblk0boot0, mmcblk0boot1).
_MMC_BOOT_PARTITION = re.compile(r"mmcblk\d+boot\d+")

# SCSI INQUIRY vendor that libata reports for every ATA disk.
_LIBATA_VENDOR = "ATA"


class DiskInterface(Enum):
    ATA = "ata"
    NVME = "nvme"
    SCSI = "scsi"
    USB = "usb"
    VIRTIO = "virtio"
    MMC = "mmc"


@dataclass(frozen=True)
class BlockDevice:
    """A whole disk as sysfs describes it; empty strings where sysfs has no file."""

    name: str
    capacity_bytes: int
    # None when queue/rotational is missing or unreadable.
    rotational: bool | None
    interface: DiskInterface
    model: str
    serial_number: str
    firmware_version: str


def is_skipped(name: str) -> bool:
    """Return True for block devices that are not disks worth probing."""
    return name.startswith(SKIPPED_PREFIXES) or bool(
        _MMC_BOOT_PARTITION.fullmatch(name)
    )


def interface_from_path(parts: tuple[str, ...]) -> DiskInterface:
    """Classify a disk by the components of its resolved sysfs device path.

    The first match wins in this order: an NVMe controller, a USB bus (so a SATA
    disk in a USB enclosure counts as USB), virtio, an MMC host, an ATA port.
    Anything else (SAS, RAID controllers, iSCSI) is SCSI.
    """
    if any(part.startswith("nvme") for part in parts):
        return DiskInterface.NVME
    if any(re.fullmatch(r"usb\d+", part) for part in parts):
        return DiskInterface.USB
    if any(part.startswith("virtio") for part in parts):
        return DiskInterface.VIRTIO
    if any(part.startswith("mmc") for part in parts):
        return DiskInterface.MMC
    if any(re.fullmatch(r"ata\d+", part) for part in parts):
        return DiskInterface.ATA
    return DiskInterface.SCSI


def list_block_devices(sys_root: Path) -> tuple[list[BlockDevice], list[ProbeError]]:
    """Read every disk under <sys_root>/block, sorted by name.

    Skipped names and disks of size 0 (card readers without a card) are left
    out. A disk whose size cannot be read is left out with an error, because it
    may well be empty.
    """
    block_dir = sys_root / "block"
    try:
        names = sorted(entry.name for entry in block_dir.iterdir())
    except OSError as exc:
        reason = f"cannot list block devices: {_os_reason(exc)}"
        return [], [ProbeError(str(block_dir), ProbeErrorKind.UNREADABLE, reason)]

    devices: list[BlockDevice] = []
    errors: list[ProbeError] = []
    for name in names:
        if is_skipped(name):
            continue
        device, read_error = read_block_device(sys_root, name)
        if read_error is not None:
            errors.append(read_error)
        if device is not None and device.capacity_bytes > 0:
            devices.append(device)
    return devices, errors


def read_block_device(
    sys_root: Path, name: str
) -> tuple[BlockDevice | None, ProbeError | None]:
    """Read one disk's folder, or return the error that kept it from being read."""
    disk_dir = sys_root / "block" / name
    size_path = disk_dir / "size"
    try:
        size_text = size_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        reason = f"cannot read the disk size: {_os_reason(exc)}"
        return None, ProbeError(str(size_path), ProbeErrorKind.UNREADABLE, reason)
    if not (size_text.isascii() and size_text.isdigit()):
        reason = f"expected a sector count, found {size_text!r}"
        return None, ProbeError(str(size_path), ProbeErrorKind.UNPARSED, reason)

    device_dir = disk_dir / "device"
    interface = interface_from_path(_resolved_parts(sys_root, disk_dir))
    device = BlockDevice(
        name=name,
        capacity_bytes=int(size_text) * SECTOR_BYTES,
        rotational=_read_rotational(disk_dir / "queue" / "rotational"),
        interface=interface,
        model=_read_model(device_dir, interface),
        serial_number=_first_value(device_dir / "serial", disk_dir / "serial"),
        firmware_version=_first_value(
            device_dir / "firmware_rev", device_dir / "rev", device_dir / "fwrev"
        ),
    )
    return device, None


def _resolved_parts(sys_root: Path, disk_dir: Path) -> tuple[str, ...]:
    # The parent device link names the bus chain. A disk without one (a virtual
    # device) still has its own folder, which resolves into /sys/devices.
    device_link = disk_dir / "device"
    target = device_link if device_link.exists() else disk_dir
    resolved = Path(os.path.realpath(target))
    root = Path(os.path.realpath(sys_root))
    if resolved.is_relative_to(root):
        return resolved.relative_to(root).parts
    return resolved.parts


def _read_rotational(path: Path) -> bool | None:
    text = _read_value(path)
    if text == "1":
        return True
    if text == "0":
        return False
    return None


def _read_model(device_dir: Path, interface: DiskInterface) -> str:
    model = _first_value(device_dir / "model", device_dir / "name")
    vendor = _read_value(device_dir / "vendor")
    # Only SCSI INQUIRY vendors name the maker. A virtio "vendor" is a PCI id.
    named_vendor = interface in (DiskInterface.SCSI, DiskInterface.USB)
    if not (named_vendor and vendor and model) or vendor == _LIBATA_VENDOR:
        return model
    return model if model.startswith(vendor) else f"{vendor} {model}"


def _first_value(*paths: Path) -> str:
    for path in paths:
        value = _read_value(path)
        if value:
            return value
    return ""


def _read_value(path: Path) -> str:
    # SCSI INQUIRY strings are space-padded to a fixed width.
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
