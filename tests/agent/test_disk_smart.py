"""read_disks through pySMART and a fake smartctl that replays real recordings."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.probes import ProbeErrorKind
from agent.probes.disk import (
    DiskInterface,
    DiskReading,
    DiskScan,
    SelfAssessment,
    SmartState,
    read_disks,
)
from tests.fakes.smartctl_replay import (
    FAKE_SMARTCTL,
    MIXED_CASES,
    RECORDINGS_DIR,
    ReplayedScan,
    build_sysfs_tree,
    load_sysfs_spec,
    scan_with_replay,
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> ReplayedScan:
    work_dir = tmp_path_factory.mktemp("mixed")
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), work_dir / "sys")
    return scan_with_replay(sys_root, MIXED_CASES, work_dir)


def disk_named(scan: DiskScan, name: str) -> DiskReading:
    matches = [disk for disk in scan.disks if disk.name == name]
    assert len(matches) == 1, f"{name} appears {len(matches)} times in the scan"
    return matches[0]


def attribute(disk: DiskReading, attribute_id: int):
    matches = [row for row in disk.ata_attributes if row.id == attribute_id]
    assert len(matches) == 1, (
        f"{disk.name} has {len(matches)} attributes {attribute_id}"
    )
    return matches[0]


def one_disk_tree(root: Path, name: str = "sda") -> Path:
    """A sysfs tree with one ATA disk, taken from the mixed spec."""
    spec = load_sysfs_spec("mixed")
    spec["disks"] = [disk for disk in spec["disks"] if disk["name"] == name]
    return build_sysfs_tree(spec, root)


# The calls pySMART made.


def test_calls_pass_nocheck_standby(mixed: ReplayedScan) -> None:
    for call in mixed.calls:
        assert call.argv[:2] == ("-n", "standby"), call.argv


def test_calls_run_in_c_locale(mixed: ReplayedScan) -> None:
    for call in mixed.calls:
        assert call.lc_all == "C", call.argv
        assert call.lang == "C", call.argv


def test_calls_have_recordings(mixed: ReplayedScan) -> None:
    unanswered = [call.argv for call in mixed.calls if not call.answered]

    assert unanswered == [("-n", "standby", "-d", "test", "/dev/mmcblk0")]


def test_calls_skip_phy_logs(mixed: ReplayedScan) -> None:
    for call in mixed.calls:
        assert "sataphy" not in call.argv
        assert "sasphy" not in call.argv


def test_calls_run_each_command_once(mixed: ReplayedScan) -> None:
    argvs = [call.argv for call in mixed.calls]

    assert len(argvs) == len(set(argvs))


def calls_for(mixed: ReplayedScan, device: str) -> list[tuple[str, ...]]:
    return [call.argv for call in mixed.calls if call.argv[-1] == device]


def test_calls_name_ata_type(mixed: ReplayedScan) -> None:
    # No autodetection for ATA disks: its commands may spin a disk up.
    assert calls_for(mixed, "/dev/sda") == [
        ("-n", "standby", "-d", "sat", "--all", "/dev/sda"),
    ]


def test_calls_name_nvme_type(mixed: ReplayedScan) -> None:
    assert calls_for(mixed, "/dev/nvme0n1") == [
        ("-n", "standby", "-d", "nvme", "--all", "/dev/nvme0n1"),
    ]


def test_calls_detect_scsi_type(mixed: ReplayedScan) -> None:
    # pySMART repeats --all for type scsi, and the runner returns the first result.
    assert calls_for(mixed, "/dev/sde") == [
        ("-n", "standby", "-d", "test", "/dev/sde"),
        ("-n", "standby", "-d", "scsi", "--all", "/dev/sde"),
    ]


# Which disks the scan lists.


def test_scan_lists_sysfs_disks(mixed: ReplayedScan) -> None:
    names = [disk.name for disk in mixed.scan.disks]

    assert names == [
        "mmcblk0",
        "nvme0n1",
        "nvme1n1",
        "nvme2n1",
        "sda",
        "sdb",
        "sdc",
        "sdd",
        "sde",
        "sdf",
        "sdg",
        "sdh",
        "sdi",
        "vda",
    ]


def test_scan_errors_name_failed_disks(mixed: ReplayedScan) -> None:
    sources = sorted(error.source.split()[-1] for error in mixed.scan.errors)

    assert sources == [
        "/dev/mmcblk0",
        "/dev/nvme2n1",
        "/dev/sdg",
        "/dev/sdh",
        "/dev/sdi",
    ]


def test_unrecorded_disk_still_reported(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "mmcblk0")

    assert disk.capacity_bytes == 62333952 * 512
    assert disk.interface is DiskInterface.MMC
    assert disk.model == "SD32G"
    assert disk.smart_state is SmartState.ERROR
    assert "no recording" in disk.smart_state_reason


# ATA disks.


def test_ata_ssd_healthy(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sda")

    assert disk.smart_state is SmartState.AVAILABLE
    assert disk.smart_state_reason == ""
    assert disk.self_assessment is SelfAssessment.PASSED
    assert disk.smartctl_exit_status == 0
    assert disk.interface is DiskInterface.ATA
    assert disk.capacity_bytes == 120_034_123_776
    assert disk.rotational is False
    assert disk.nvme_health is None


def test_ata_identity_from_smartctl(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sda")

    assert disk.model == "HS-SSD-C100 120G"
    assert disk.serial_number == "30087840294"
    assert disk.firmware_version == "SN11913"


def test_ata_ssd_keeps_all_attributes(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sda")
    ids = [row.id for row in disk.ata_attributes]

    assert len(ids) == 26
    assert ids == sorted(ids)
    assert {5, 9, 187, 194}.issubset(ids)


def test_ata_ssd_attribute_values(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sda")
    reallocated = attribute(disk, 5)
    temperature = attribute(disk, 194)

    assert reallocated.name == "Reallocated_Sector_Ct"
    assert reallocated.value == 100
    assert reallocated.worst == 100
    assert reallocated.threshold == 50
    assert reallocated.raw == 0
    assert reallocated.when_failed == ""
    assert temperature.raw == 32
    assert temperature.raw_text == "32 (Min/Max 27/35)"
    assert attribute(disk, 9).raw == 133
    assert attribute(disk, 187).worst == 0


def test_ata_hdd_reallocated(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdc")
    reallocated = attribute(disk, 5)

    assert disk.smart_state is SmartState.AVAILABLE
    assert disk.rotational is True
    assert reallocated.value == 2
    assert reallocated.worst == 2
    assert reallocated.threshold == 36
    assert reallocated.raw == 4049
    assert reallocated.when_failed == "now"
    assert attribute(disk, 187).raw == 208
    assert attribute(disk, 188).raw == 287_767_265_476
    assert attribute(disk, 197).raw == 0
    assert attribute(disk, 198).raw == 0
    assert attribute(disk, 199).raw == 0


def test_ata_hdd_pending(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdd")

    assert disk.smart_state is SmartState.AVAILABLE
    assert len(disk.ata_attributes) == 27
    assert attribute(disk, 197).raw == 499
    assert attribute(disk, 198).raw == 0
    assert attribute(disk, 5).raw == 0
    assert attribute(disk, 9).raw == 17328
    assert attribute(disk, 1).when_failed == "now"
    assert attribute(disk, 194).raw_text == "47 (Min/Max 12/57)"


def test_ata_failed_self_assessment(mixed: ReplayedScan) -> None:
    reallocated = disk_named(mixed.scan, "sdc")
    pending = disk_named(mixed.scan, "sdd")

    assert reallocated.self_assessment is SelfAssessment.FAILED
    assert reallocated.smartctl_exit_status == 216
    assert pending.self_assessment is SelfAssessment.FAILED
    assert pending.smartctl_exit_status == 24


# NVMe disks.


def test_nvme_healthy(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "nvme0n1")

    assert disk.smart_state is SmartState.AVAILABLE
    assert disk.self_assessment is SelfAssessment.PASSED
    assert disk.interface is DiskInterface.NVME
    assert disk.model == "KBG30ZMV256G TOSHIBA"
    assert disk.firmware_version == "ADHA0101"
    assert disk.ata_attributes == ()


def test_nvme_health_values(mixed: ReplayedScan) -> None:
    health = disk_named(mixed.scan, "nvme0n1").nvme_health

    assert health is not None
    assert health.critical_warning == 0
    assert health.temperature_celsius == 42
    assert health.available_spare_percent == 100
    assert health.available_spare_threshold_percent == 10
    assert health.percentage_used == 28
    assert health.media_errors == 0
    assert health.unsafe_shutdowns == 67
    assert health.power_on_hours == 5809
    assert health.power_cycles == 997
    assert health.error_log_entries == 1356


def test_nvme_critical_warning(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "nvme1n1")
    health = disk.nvme_health

    assert disk.smart_state is SmartState.AVAILABLE
    assert disk.self_assessment is SelfAssessment.FAILED
    assert disk.smartctl_exit_status == 8
    assert health is not None
    assert health.critical_warning == 0x04
    assert health.media_errors == 7


def test_nvme_unparsable_digits(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "nvme2n1")

    assert disk.smart_state is SmartState.UNPARSED
    assert "pySMART raised ValueError" in disk.smart_state_reason
    assert disk.capacity_bytes == 500_107_862_016
    assert disk.model == "KINGSTON SA2000M8500G"


# Disks without SMART data.


def test_usb_bridge_not_supported(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdb")

    assert disk.smart_state is SmartState.NOT_SUPPORTED
    assert "USB bridge [0x0781:0x558c (0x1012)]" in disk.smart_state_reason
    assert disk.interface is DiskInterface.USB
    assert disk.model == "SanDisk Extreme SSD"
    assert disk.capacity_bytes == 1_000_204_140_544


def test_virtual_disk_not_supported(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sde")

    assert disk.smart_state is SmartState.NOT_SUPPORTED
    assert disk.smart_state_reason == (
        "SMART support is: Unavailable - device lacks SMART capability."
    )
    assert disk.interface is DiskInterface.SCSI
    assert disk.self_assessment is None


def test_virtio_not_supported(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "vda")

    assert disk.smart_state is SmartState.NOT_SUPPORTED
    assert "virtio disks offer no SMART data" in disk.smart_state_reason
    assert disk.interface is DiskInterface.VIRTIO
    assert disk.serial_number == "overlayblk"
    assert disk.capacity_bytes == 536870912 * 512


def test_standby_not_woken(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdf")

    assert disk.smart_state is SmartState.IN_STANDBY
    assert "STANDBY" in disk.smart_state_reason
    assert disk.self_assessment is None
    assert disk.smartctl_exit_status == 2
    assert calls_for(mixed, "/dev/sdf") == [
        ("-n", "standby", "-d", "sat", "--all", "/dev/sdf"),
    ]


def test_permission_denied(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdg")
    errors = [e for e in mixed.scan.errors if e.source.endswith("/dev/sdg")]

    assert disk.smart_state is SmartState.PERMISSION_DENIED
    assert "failed: Permission denied" in disk.smart_state_reason
    assert [error.kind for error in errors] == [ProbeErrorKind.UNREADABLE]


def test_operation_not_permitted(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdh")

    assert disk.smart_state is SmartState.PERMISSION_DENIED
    assert "failed: Operation not permitted" in disk.smart_state_reason


def test_garbage_output_unparsed(mixed: ReplayedScan) -> None:
    disk = disk_named(mixed.scan, "sdi")
    errors = [e for e in mixed.scan.errors if e.source.endswith("/dev/sdi")]

    assert disk.smart_state is SmartState.UNPARSED
    assert "and its first line is '{'" in disk.smart_state_reason
    assert disk.ata_attributes == ()
    assert [error.kind for error in errors] == [ProbeErrorKind.UNPARSED]
    assert errors[0].reason == disk.smart_state_reason


# Scans with their own trees.


def test_smartctl_missing_from_path(tmp_path: Path, monkeypatch) -> None:
    sys_root = build_sysfs_tree(load_sysfs_spec("mixed"), tmp_path / "sys")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    scan = read_disks(sys_root=sys_root)

    assert len(scan.disks) == 14
    for disk in scan.disks:
        assert disk.smart_state is SmartState.SMARTCTL_MISSING, disk.name
        assert disk.smart_state_reason == (
            "smartctl was not found on PATH (install smartmontools)"
        )
    assert [error.source for error in scan.errors] == ["smartctl"]


def test_smartctl_missing_at_path(tmp_path: Path) -> None:
    sys_root = one_disk_tree(tmp_path / "sys")
    missing = str(tmp_path / "bin" / "smartctl")

    scan = read_disks(sys_root=sys_root, smartctl=missing)

    assert scan.disks[0].smart_state is SmartState.SMARTCTL_MISSING
    assert scan.disks[0].smart_state_reason == f"smartctl was not found at {missing}"


def test_smartctl_timeout(tmp_path: Path) -> None:
    sys_root = one_disk_tree(tmp_path / "sys")
    started = time.monotonic()

    replayed = scan_with_replay(
        sys_root, {"/dev/sda": "hung"}, tmp_path, timeout_seconds=1.0
    )

    disk = replayed.scan.disks[0]
    assert time.monotonic() - started < 20
    assert disk.smart_state is SmartState.ERROR
    assert disk.smart_state_reason == "smartctl did not finish within 1 s"
    assert disk.capacity_bytes == 120_034_123_776


def test_dev_root_names_node(tmp_path: Path) -> None:
    sys_root = one_disk_tree(tmp_path / "sys")
    dev_root = tmp_path / "dev"
    cases = {str(dev_root / "sda"): "ata_ssd_healthy"}

    replayed = scan_with_replay(sys_root, cases, tmp_path, dev_root=dev_root)

    assert replayed.scan.disks[0].smart_state is SmartState.AVAILABLE
    for call in replayed.calls:
        assert call.argv[-1] == str(dev_root / "sda")


def test_fake_rejects_unknown_argv(tmp_path: Path) -> None:
    # The fake must fail loudly, or a missing recording would pass unnoticed.
    cases = json.dumps({"/dev/sda": str(RECORDINGS_DIR / "ata_ssd_healthy")})
    completed = subprocess.run(
        [str(FAKE_SMARTCTL), "--scan-open"],
        capture_output=True,
        text=True,
        env={"FAKE_SMARTCTL_CASES": cases, "PATH": "/usr/bin:/bin"},
        check=False,
    )

    assert completed.returncode == 99
    assert "no recording for argv ['--scan-open']" in completed.stderr


def test_smartctl_not_startable(tmp_path: Path) -> None:
    sys_root = one_disk_tree(tmp_path / "sys")
    broken = tmp_path / "bin" / "smartctl"
    broken.parent.mkdir()
    broken.write_bytes(b"\x7fELF truncated")
    broken.chmod(0o755)

    scan = read_disks(sys_root=sys_root, smartctl=str(broken))

    disk = scan.disks[0]
    assert disk.smart_state is SmartState.ERROR
    assert disk.smart_state_reason == "smartctl could not be started: Exec format error"
    assert [error.source for error in scan.errors] == [str(broken)]
