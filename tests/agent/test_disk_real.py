"""read_disks on this machine's own /sys/block, with and without the real smartctl."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.probes.disk import (
    DiskInterface,
    DiskScan,
    SmartState,
    list_block_devices,
    read_disks,
)

SYS_ROOT = Path("/sys")

pytestmark = pytest.mark.skipif(
    not (SYS_ROOT / "block").is_dir(), reason="this OS has no /sys/block"
)


def sysfs_capacities() -> dict[str, int]:
    devices, _ = list_block_devices(SYS_ROOT)
    return {device.name: device.capacity_bytes for device in devices}


def capacities(scan: DiskScan) -> dict[str, int]:
    return {disk.name: disk.capacity_bytes for disk in scan.disks}


@pytest.mark.skipif(
    shutil.which("smartctl") is None,
    reason="smartctl is not installed (the smartmontools package provides it)",
)
def test_real_smartctl() -> None:
    scan = read_disks()

    assert capacities(scan) == sysfs_capacities()
    for disk in scan.disks:
        # Whatever the disk, real smartctl output must never be unparsed.
        assert disk.smart_state is not SmartState.UNPARSED, disk.smart_state_reason
        assert disk.smart_state is not SmartState.SMARTCTL_MISSING, disk.name
        if disk.interface is DiskInterface.VIRTIO:
            assert disk.smart_state is SmartState.NOT_SUPPORTED, disk.name


def test_real_sysfs_without_smartctl(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    scan = read_disks()

    assert capacities(scan) == sysfs_capacities()
    for disk in scan.disks:
        assert disk.smart_state is SmartState.SMARTCTL_MISSING, disk.name
