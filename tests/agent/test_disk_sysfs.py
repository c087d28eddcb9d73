"""The /sys/block listing of the disk probe, on sysfs trees built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.probes import ProbeErrorKind
from agent.probes.disk import (
    BlockDevice,
    DiskInterface,
    interface_from_path,
    is_skipped,
    list_block_devices,
)
from tests.fakes.smartctl_replay import build_sysfs_tree, load_sysfs_spec


@pytest.fixture
def mixed_root(tmp_path: Path) -> Path:
    return build_sysfs_tree(load_sysfs_spec("mixed"), tmp_path / "sys")


def device_named(devices: list[BlockDevice], name: str) -> BlockDevice:
    matches = [device for device in devices if device.name == name]
    assert len(matches) == 1, f"{name} appears {len(matches)} times"
    return matches[0]


def plain_disk(root: Path, name: str, files: dict[str, str]) -> Path:
    """A block/<name> folder without links, as some test trees and chroots have."""
    disk_dir = root / "block" / name
    for relative, content in files.items():
        path = disk_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def test_listing_skips_non_disks(mixed_root: Path) -> None:
    devices, errors = list_block_devices(mixed_root)

    names = [device.name for device in devices]
    for skipped in ("loop0", "zram0", "dm-0", "md127", "ram0", "nbd0", "fd0", "sr0"):
        assert skipped not in names
    assert "mmcblk0boot0" not in names
    assert errors == []


def test_listing_skips_empty_disk(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)

    # sdk is a USB card reader without a card: size 0.
    assert "sdk" not in [device.name for device in devices]


def test_listing_is_sorted(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    names = [device.name for device in devices]

    assert names == sorted(names)
    assert len(names) == 14


def test_nvme_identity(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    nvme = device_named(devices, "nvme0n1")

    assert nvme.interface is DiskInterface.NVME
    assert nvme.capacity_bytes == 500118192 * 512
    assert nvme.rotational is False
    assert nvme.model == "KBG30ZMV256G TOSHIBA"
    assert nvme.serial_number == "XXXXXXXXXXXX"
    assert nvme.firmware_version == "ADHA0101"


def test_ata_identity(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    ata = device_named(devices, "sdc")

    assert ata.interface is DiskInterface.ATA
    assert ata.rotational is True
    # libata's SCSI vendor "ATA" is no maker's name and is left out.
    assert ata.model == "ST3250318AS"
    assert ata.firmware_version == "CC35"
    assert ata.serial_number == ""


def test_usb_identity(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    usb = device_named(devices, "sdb")

    assert usb.interface is DiskInterface.USB
    assert usb.model == "SanDisk Extreme SSD"


def test_scsi_identity(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    raid = device_named(devices, "sde")

    assert raid.interface is DiskInterface.SCSI
    assert raid.model == "Intel RS3DC080"
    assert raid.firmware_version == "4.23"


def test_virtio_identity(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    virtio = device_named(devices, "vda")

    assert virtio.interface is DiskInterface.VIRTIO
    # The virtio "vendor" file contains a PCI vendor id, not a name.
    assert virtio.model == ""
    assert virtio.serial_number == "overlayblk"


def test_mmc_identity(mixed_root: Path) -> None:
    devices, _ = list_block_devices(mixed_root)
    card = device_named(devices, "mmcblk0")

    assert card.interface is DiskInterface.MMC
    assert card.model == "SD32G"
    assert card.serial_number == "0x1234abcd"
    assert card.firmware_version == "0x0"


def test_missing_block_dir(tmp_path: Path) -> None:
    devices, errors = list_block_devices(tmp_path)

    assert devices == []
    assert len(errors) == 1
    assert errors[0].source == str(tmp_path / "block")
    assert errors[0].kind is ProbeErrorKind.UNREADABLE
    assert errors[0].reason.startswith("cannot list block devices:")


def test_plain_disk_folder(tmp_path: Path) -> None:
    root = plain_disk(tmp_path, "sda", {"size": "2048\n", "queue/rotational": "1\n"})

    devices, errors = list_block_devices(root)

    assert errors == []
    assert devices == [
        BlockDevice(
            name="sda",
            capacity_bytes=2048 * 512,
            rotational=True,
            interface=DiskInterface.SCSI,
            model="",
            serial_number="",
            firmware_version="",
        )
    ]


def test_missing_rotational(tmp_path: Path) -> None:
    root = plain_disk(tmp_path, "sda", {"size": "2048\n"})

    devices, _ = list_block_devices(root)

    assert devices[0].rotational is None


def test_unreadable_size(tmp_path: Path) -> None:
    root = plain_disk(tmp_path, "sda", {"queue/rotational": "0\n"})

    devices, errors = list_block_devices(root)

    assert devices == []
    assert [error.source for error in errors] == [str(root / "block/sda/size")]
    assert errors[0].kind is ProbeErrorKind.UNREADABLE


def test_unparsed_size(tmp_path: Path) -> None:
    root = plain_disk(tmp_path, "sda", {"size": "lots\n"})

    devices, errors = list_block_devices(root)

    assert devices == []
    assert errors[0].kind is ProbeErrorKind.UNPARSED
    assert errors[0].reason == "expected a sector count, found 'lots'"


@pytest.mark.parametrize(
    ("path", "interface"),
    [
        ("devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0", DiskInterface.NVME),
        ("devices/virtual/nvme-subsystem/nvme-subsys0", DiskInterface.NVME),
        (
            "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0",
            DiskInterface.USB,
        ),
        ("devices/pci0000:00/0000:00:02.0/virtio1", DiskInterface.VIRTIO),
        ("devices/pci0000:00/0000:00:14.5/mmc_host/mmc0/mmc0:aaaa", DiskInterface.MMC),
        (
            "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0",
            DiskInterface.ATA,
        ),
        (
            "devices/pci0000:00/0000:00:01.0/0000:01:00.0/host7/target7:2:0/7:2:0:0",
            DiskInterface.SCSI,
        ),
        # "data1" only looks like an ATA port name.
        ("devices/platform/data1/host0/target0:0:0/0:0:0:0", DiskInterface.SCSI),
    ],
)
def test_interface_from_path(path: str, interface: DiskInterface) -> None:
    assert interface_from_path(tuple(path.split("/"))) is interface


@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        ("loop7", True),
        ("ram15", True),
        ("zram0", True),
        ("dm-3", True),
        ("md0", True),
        ("sr0", True),
        ("fd0", True),
        ("nbd12", True),
        ("mmcblk0boot1", True),
        ("mmcblk0", False),
        ("nvme0n1", False),
        ("sda", False),
        ("vda", False),
    ],
)
def test_skipped_names(name: str, skipped: bool) -> None:
    assert is_skipped(name) is skipped
