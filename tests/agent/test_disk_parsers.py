"""The pure parts of the disk probe, on the text of real smartctl recordings."""

from __future__ import annotations

import pytest

from agent.probes import ProbeErrorKind
from agent.probes.disk import (
    DiskInterface,
    SelfAssessment,
    SmartctlCall,
    SmartState,
    describe_exit_status,
    interpret_smartctl,
    parse_self_assessment,
)
from tests.fakes.smartctl_replay import RECORDINGS_DIR


def recorded(relative: str, lines: tuple[int, int] | None = None) -> str:
    """Return a recording without its "# " header lines, or only lines first..last."""
    text = (RECORDINGS_DIR / relative).read_text(encoding="utf-8", errors="replace")
    all_lines = text.splitlines(keepends=True)
    if lines is not None:
        return "".join(all_lines[lines[0] - 1 : lines[1]])
    return "".join(line for line in all_lines if not line.startswith("# "))


@pytest.mark.parametrize(
    ("relative", "exit_status", "expected"),
    [
        (
            "ata_ssd_healthy/sat_ssd_0_issue_65___-d_sat_--all__dev_sda.txt",
            0,
            SelfAssessment.PASSED,
        ),
        (
            "ata_hdd_reallocated/st3250318as_reallocated_4049_FAILING_NOW_smartctl5.39.txt",
            216,
            SelfAssessment.FAILED,
        ),
        (
            "nvme_critical_warning/nvme_0___-d_nvme_--all__dev_nvme0_critical_warning.txt",
            8,
            SelfAssessment.FAILED,
        ),
        (
            "parser_inputs/sas_hdd_0_issue_51___-d_scsi_--all__dev_sdc.txt",
            0,
            SelfAssessment.PASSED,
        ),
        ("standby/sda___-n_standby_--all.txt", 2, None),
        # Bit 3 (DISK FAILING) decides when the output has no verdict line.
        ("standby/sda___-n_standby_--all.txt", 8, SelfAssessment.FAILED),
    ],
)
def test_self_assessment(
    relative: str, exit_status: int, expected: SelfAssessment | None
) -> None:
    assert parse_self_assessment(recorded(relative), exit_status) is expected


def test_exit_status_bits() -> None:
    assert describe_exit_status(216) == (
        "the SMART status check returned DISK FAILING",
        "prefail attributes are at or below threshold",
        "the device error log contains records of errors",
        "the device self-test log contains records of errors",
    )


def test_exit_status_zero() -> None:
    assert describe_exit_status(0) == ()


def test_exit_status_signal() -> None:
    assert describe_exit_status(-9) == ("smartctl was killed by signal 9",)


def test_smart_disabled() -> None:
    # The "smartctl -a /dev/sdc -d ata" block of a Windows card reader capture.
    output = recorded(
        "parser_inputs/usb_card_reader_unknown_bridge_no_admin_zabbixminiipmi12.txt",
        (13, 29),
    )
    call = SmartctlCall(
        argv=("smartctl", "-n", "standby", "-d", "ata", "--all", "/dev/sdc"),
        exit_status=0,
        stdout=output,
        stderr="",
    )

    reading = interpret_smartctl([call], None, None, DiskInterface.USB, "/dev/sdc")

    assert reading.state is SmartState.ERROR
    assert reading.reason == (
        "SMART is disabled on the disk, and smartctl -s on would enable it"
    )
    assert reading.error is not None
    assert reading.error.kind is ProbeErrorKind.UNREADABLE


@pytest.mark.parametrize(
    ("interface", "reason"),
    [
        (
            DiskInterface.VIRTIO,
            "smartctl cannot detect a device type for /dev/vda,"
            " and virtio disks offer no SMART data",
        ),
        (DiskInterface.SCSI, "smartctl cannot detect a device type for /dev/vda"),
    ],
)
def test_undetected_type(interface: DiskInterface, reason: str) -> None:
    call = SmartctlCall(
        argv=("smartctl", "-n", "standby", "-d", "test", "/dev/vda"),
        exit_status=1,
        stdout=recorded("virtio_disk/vda___-n_standby_-d_test.txt"),
        stderr="",
    )

    reading = interpret_smartctl([call], None, None, interface, "/dev/vda")

    assert reading.state is SmartState.NOT_SUPPORTED
    assert reading.reason == reason
    assert reading.error is None


def test_no_calls() -> None:
    failure = ValueError("bad interface")

    reading = interpret_smartctl([], None, failure, DiskInterface.ATA, "/dev/sda")

    assert reading.state is SmartState.ERROR
    assert reading.reason == (
        "pySMART ran no smartctl command and raised ValueError: bad interface"
    )


def test_killed_by_signal() -> None:
    call = SmartctlCall(
        argv=("smartctl", "-n", "standby", "-d", "sat", "--all", "/dev/sda"),
        exit_status=-9,
        stdout="",
        stderr="",
    )

    reading = interpret_smartctl([call], None, None, DiskInterface.ATA, "/dev/sda")

    assert reading.state is SmartState.ERROR
    assert reading.reason.startswith("smartctl was killed by signal 9")
