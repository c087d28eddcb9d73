"""Battery probe on sysfs trees built from recorded power_supply dumps."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from agent.probes import ProbeErrorKind
from agent.probes.battery import (
    BatteryReading,
    BatteryScan,
    BatteryStatus,
    CapacityUnit,
    parse_battery,
    parse_uevent,
    read_batteries,
)
from agent.wire.battery import batteries_to_proto
from fleetmend.v1 import report_pb2

DATA = Path(__file__).parents[1] / "data" / "battery"

_UEVENT_LINE = re.compile(r"POWER_SUPPLY_[A-Z_]+=.*")
# tlp-stat prints "<sysfs path> = <value> [<unit>]" and divides µWh, µAh, µA and
# µW values by 1000 for its mWh, mAh, mA and mW units.
_TLP_LINE = re.compile(r"/sys/class/power_supply/\w+/(\w+)\s+=\s+(.*?)\s*")
_TLP_MILLI_UNITS = ("[mWh]", "[mAh]", "[mA]", "[mW]")
_CAT_PROMPT = re.compile(r"\$ cat /sys/class/power_supply/\w+/(\w+)\s*")
_LS_FILE = re.compile(r"-[-rwx]{9} .* (\w+)")


def recording(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def uevent_block(text: str) -> str:
    """Return the first run of POWER_SUPPLY_ lines in a recorded session."""
    block: list[str] = []
    for line in text.splitlines():
        if _UEVENT_LINE.fullmatch(line):
            block.append(line)
        elif block:
            break
    return "\n".join(block) + "\n"


def files_from_uevent(text: str) -> dict[str, str]:
    """Lay out a recorded uevent as sysfs does: the uevent and one file per key.

    Many recordings predate POWER_SUPPLY_TYPE in uevent, but every kernel has
    the type file, so a missing TYPE is written as type Battery.
    """
    uevent = uevent_block(text)
    files = {"uevent": uevent, **parse_uevent(uevent)}
    files.setdefault("type", "Battery")
    return files


def files_from_tlp_stat(text: str) -> dict[str, str]:
    """Turn the sysfs lines of a tlp-stat battery dump back into files.

    Values that tlp-stat marks "(not supported)" or "(not available)" have no
    readable file, so they are left out.
    """
    files = {"type": "Battery"}
    for line in text.splitlines():
        match = _TLP_LINE.fullmatch(line)
        if not match:
            continue
        attribute, value = match[1], match[2]
        if value.startswith("("):
            continue
        value = value.removesuffix("(or not supported)").strip()
        for unit in _TLP_MILLI_UNITS:
            if value.endswith(unit):
                value = str(int(value.removesuffix(unit)) * 1000)
        files[attribute] = value
    return files


def files_from_cat_session(text: str) -> dict[str, str]:
    """Collect the first value printed for each `cat` of a sysfs file."""
    files = {"type": "Battery"}
    lines = text.splitlines()
    for prompt, value in zip(lines, lines[1:], strict=False):
        match = _CAT_PROMPT.fullmatch(prompt)
        if match:
            files.setdefault(match[1], value.strip())
    return files


def files_listed(text: str) -> list[str]:
    """Return the regular files that an `ls -l` listing shows."""
    return [
        match[1] for line in text.splitlines() if (match := _LS_FILE.fullmatch(line))
    ]


def write_supply(root: Path, name: str, files: Mapping[str, str]) -> Path:
    supply = root / name
    supply.mkdir(parents=True)
    for attribute, value in files.items():
        (supply / attribute).write_text(value if value.endswith("\n") else value + "\n")
    return supply


def only_battery(scan: BatteryScan) -> BatteryReading:
    assert len(scan.batteries) == 1, scan
    return scan.batteries[0]


@pytest.fixture
def supplies(tmp_path: Path) -> Path:
    return tmp_path / "power_supply"


def test_energy_family_i3status186(supplies: Path) -> None:
    text = recording("thinkpad_energy_variant_status_unknown_i3status186.txt")
    write_supply(supplies, "BAT0", files_from_uevent(text))

    scan = read_batteries(supplies)
    battery = only_battery(scan)

    assert scan.errors == []
    assert battery.capacity_unit is CapacityUnit.MICROWATT_HOURS
    assert battery.design_capacity == 38920000
    assert battery.full_capacity == 25500000
    assert battery.remaining_capacity == 8300000
    assert battery.health_percent == pytest.approx(65.52, abs=0.01)
    assert battery.status is BatteryStatus.UNKNOWN
    assert battery.cycle_count is None
    assert battery.model == "42T4977"
    assert battery.manufacturer == "SMP"
    assert battery.serial_number == "973"
    assert battery.technology == "Li-poly"


def test_charge_family_worn_i3status288(supplies: Path) -> None:
    text = recording("thinkpad_charge_variant_worn_32pct_i3status288.txt")
    write_supply(supplies, "BAT0", files_from_uevent(text))

    battery = only_battery(read_batteries(supplies))

    assert battery.capacity_unit is CapacityUnit.MICROAMPERE_HOURS
    assert battery.design_capacity == 5600000
    assert battery.full_capacity == 1802000
    assert battery.remaining_capacity == 501000
    assert battery.health_percent == pytest.approx(32.18, abs=0.01)
    assert battery.status is BatteryStatus.CHARGING


@pytest.mark.parametrize(
    ("name", "health", "status"),
    [
        ("asus_c300_chromebook_charge_variant_battery8.txt", 83.92, BatteryStatus.FULL),
        ("dell_charge_variant_cycle0_fastfetch118.txt", 83.82, BatteryStatus.CHARGING),
        (
            "dell_sanyo_charge_variant_cycle0_batinfo4.txt",
            98.10,
            BatteryStatus.DISCHARGING,
        ),
        (
            "dell_xps15_9560_charge_variant_i3batterypopup4.txt",
            99.78,
            BatteryStatus.DISCHARGING,
        ),
    ],
)
def test_charge_family_cycle_count_zero(
    supplies: Path, name: str, health: float, status: BatteryStatus
) -> None:
    write_supply(supplies, "BAT0", files_from_uevent(recording(name)))

    scan = read_batteries(supplies)
    battery = only_battery(scan)

    assert scan.errors == []
    assert battery.capacity_unit is CapacityUnit.MICROAMPERE_HOURS
    assert battery.cycle_count is None
    assert battery.health_percent == pytest.approx(health, abs=0.01)
    assert battery.status is status


def test_serial_padding_stripped(supplies: Path) -> None:
    text = recording("dell_charge_variant_cycle0_fastfetch118.txt")
    write_supply(supplies, "BAT0", files_from_uevent(text))

    battery = only_battery(read_batteries(supplies))

    assert battery.serial_number == "2958"


def test_name_batc_brunch117(supplies: Path) -> None:
    text = recording("brunch_batc_fake_battery_brunch117.txt")
    write_supply(supplies, "BATC", files_from_uevent(text))

    battery = only_battery(read_batteries(supplies))

    assert battery.name == "BATC"
    assert battery.model == "SR Real Battery"
    assert battery.health_percent == pytest.approx(100.0)
    assert battery.status is BatteryStatus.DISCHARGING


def test_name_battery_axp81x(supplies: Path) -> None:
    """An ARM laptop's PMIC battery named "battery", without energy_full.

    The recording lists file names only, so the values are chosen by the test.
    """
    text = recording("olimex_teres_axp81x_no_energy_now_no_charge_now_diylaptop9.txt")
    chosen = {
        "type": "Battery",
        "present": "1",
        "status": "Discharging",
        "energy_full_design": "7400000",
    }
    listed = files_listed(text)
    write_supply(supplies, "battery", {name: chosen.get(name, "") for name in listed})

    scan = read_batteries(supplies)
    battery = only_battery(scan)

    assert "energy_full" not in listed
    assert battery.name == "battery"
    assert battery.capacity_unit is CapacityUnit.MICROWATT_HOURS
    assert battery.design_capacity == 7400000
    assert battery.full_capacity is None
    assert battery.health_percent is None
    assert scan.errors == []


def test_cycle_count_and_not_charging_x1(supplies: Path) -> None:
    text = recording(
        "thinkpad_x1_extreme_no_current_now_not_charging_battwattmetter1.txt"
    )
    write_supply(supplies, "BAT0", files_from_tlp_stat(text))

    battery = only_battery(read_batteries(supplies))

    assert battery.cycle_count == 326
    assert battery.status is BatteryStatus.NOT_CHARGING
    assert battery.health_percent == pytest.approx(86.12, abs=0.01)
    assert battery.manufacturer == "Celxpert"


@pytest.mark.parametrize(
    ("files", "health"),
    [
        (
            files_from_tlp_stat(recording("thinkpad_energy_full_gt_design_tlp330.txt")),
            100.96,
        ),
        (
            files_from_cat_session(
                recording("thinkpad_energy_full_gt_design_tpacpibat96.txt")
            ),
            102.89,
        ),
    ],
    ids=["tlp330", "tpacpibat96"],
)
def test_health_above_hundred_kept(
    supplies: Path, files: dict[str, str], health: float
) -> None:
    write_supply(supplies, "BAT0", files)

    battery = only_battery(read_batteries(supplies))

    assert battery.capacity_unit is CapacityUnit.MICROWATT_HOURS
    assert battery.health_percent == pytest.approx(health, abs=0.01)


def test_cycle_count_unsupported_tlp330(supplies: Path) -> None:
    files = files_from_tlp_stat(recording("thinkpad_energy_full_gt_design_tlp330.txt"))
    write_supply(supplies, "BAT0", files)

    battery = only_battery(read_batteries(supplies))

    assert "cycle_count" not in files
    assert battery.cycle_count is None
    assert battery.status is BatteryStatus.FULL


def test_design_unreadable_health_unknown(supplies: Path) -> None:
    """A design capacity file that exists but fails to read, as in the log.

    A regular file cannot return ENODEV, so the test makes the read fail with
    a directory in its place (EISDIR), which takes the same path.
    """
    log = recording("energy_full_design_read_ENODEV_laptopmodetools209.txt")
    failed = re.search(r"cat: /sys/class/power_supply/BAT0/(\w+): No such device", log)
    assert failed is not None
    text = recording(
        "thinkpad_x1_extreme_no_current_now_not_charging_battwattmetter1.txt"
    )
    files = files_from_tlp_stat(text)
    del files[failed[1]]
    supply = write_supply(supplies, "BAT0", files)
    (supply / failed[1]).mkdir()

    scan = read_batteries(supplies)
    battery = only_battery(scan)

    assert battery.design_capacity is None
    assert battery.full_capacity == 69240000
    assert battery.health_percent is None
    assert scan.errors == []


def test_unknown_status_unparsed_tlp621(supplies: Path) -> None:
    """The status "Idle" is outside the kernel's list of status texts."""
    text = recording("dell_bios_charge_limit_wrong_design_tlp621.txt")
    write_supply(supplies, "BAT0", files_from_tlp_stat(text))

    scan = read_batteries(supplies)
    battery = only_battery(scan)

    assert battery.status is BatteryStatus.UNKNOWN
    assert battery.capacity_unit is CapacityUnit.MICROAMPERE_HOURS
    assert battery.cycle_count is None
    assert len(scan.errors) == 1
    assert scan.errors[0].kind is ProbeErrorKind.UNPARSED
    assert scan.errors[0].source == str(supplies / "BAT0" / "status")
    assert "'Idle'" in scan.errors[0].reason


def test_non_integer_capacity_unparsed(supplies: Path) -> None:
    files = files_from_uevent(
        recording("thinkpad_charge_variant_worn_32pct_i3status288.txt")
    )
    files["charge_full"] = "1802000 uAh"
    del files["uevent"]
    write_supply(supplies, "BAT0", files)

    scan = read_batteries(supplies)
    battery = only_battery(scan)

    assert battery.full_capacity is None
    assert battery.health_percent is None
    assert battery.design_capacity == 5600000
    assert [error.kind for error in scan.errors] == [ProbeErrorKind.UNPARSED]
    assert "'1802000 uAh'" in scan.errors[0].reason


def test_uevent_only_supply(supplies: Path) -> None:
    text = recording("dell_charge_variant_cycle0_fastfetch118.txt")
    write_supply(supplies, "BAT0", {"uevent": uevent_block(text)})

    battery = only_battery(read_batteries(supplies))

    assert battery.design_capacity == 4474000
    assert battery.full_capacity == 3750000
    assert battery.model == "DELL PN1VN08"


def test_mains_only_desktop_upower(supplies: Path) -> None:
    """The desktop in the upower dump has one supply, ACAD, a line power."""
    text = recording("upower_d_desktop_no_battery_jc.txt")
    native_paths = re.findall(r"native-path:\s+(\S+)", text)
    for name in native_paths:
        write_supply(supplies, name, {"type": "Mains", "online": "1"})

    scan = read_batteries(supplies)

    assert native_paths == ["ACAD"]
    assert scan.batteries == []
    assert scan.errors == []


def test_skips_mains_usb_and_device_scope(supplies: Path) -> None:
    """A laptop with a charger, a USB-C port and a wireless mouse.

    The mouse and port values are chosen by the test: no recording has them.
    """
    text = recording("thinkpad_energy_variant_status_unknown_i3status186.txt")
    write_supply(supplies, "BAT0", files_from_uevent(text))
    write_supply(supplies, "AC", {"type": "Mains", "online": "1"})
    write_supply(supplies, "ucsi-source-psy-USBC000:001", {"type": "USB"})
    write_supply(
        supplies,
        "hidpp_battery_0",
        {"type": "Battery", "scope": "Device", "status": "Discharging"},
    )

    scan = read_batteries(supplies)

    assert [battery.name for battery in scan.batteries] == ["BAT0"]


def test_empty_bay_skipped(supplies: Path) -> None:
    text = recording("thinkpad_energy_variant_status_unknown_i3status186.txt")
    write_supply(supplies, "BAT0", files_from_uevent(text))
    write_supply(supplies, "BAT1", {"type": "Battery", "present": "0"})

    scan = read_batteries(supplies)

    assert [battery.name for battery in scan.batteries] == ["BAT0"]


def test_no_power_supply_folder(tmp_path: Path) -> None:
    scan = read_batteries(tmp_path / "absent")

    assert scan.batteries == []
    assert scan.errors == []


def test_default_path_this_machine() -> None:
    """Every battery found on this machine is a supply whose type is Battery."""
    scan = read_batteries()

    assert scan.errors == []
    for battery in scan.batteries:
        type_file = Path("/sys/class/power_supply") / battery.name / "type"
        assert type_file.read_text().strip() == "Battery"


def test_parse_battery_no_capacities() -> None:
    reading, errors = parse_battery("BAT0", {"type": "Battery"}, "/sys/BAT0")

    assert reading.capacity_unit is None
    assert reading.design_capacity is None
    assert reading.health_percent is None
    assert reading.status is BatteryStatus.UNKNOWN
    assert errors == []


def test_wire_known_values(supplies: Path) -> None:
    text = recording(
        "thinkpad_x1_extreme_no_current_now_not_charging_battwattmetter1.txt"
    )
    write_supply(supplies, "BAT0", files_from_tlp_stat(text))

    section = batteries_to_proto(read_batteries(supplies))
    message = section.batteries[0]

    assert message.name == "BAT0"
    assert message.capacity_unit == report_pb2.CAPACITY_UNIT_MICROWATT_HOURS
    assert message.design_capacity == 80400000
    assert message.full_capacity == 69240000
    assert message.remaining_capacity == 65440000
    assert message.cycle_count == 326
    assert message.health_percent == pytest.approx(86.12, abs=0.01)
    assert message.status == report_pb2.BATTERY_STATUS_NOT_CHARGING
    assert message.model == "5B10V98091"


def test_wire_unknown_values_unset(supplies: Path) -> None:
    files = files_from_tlp_stat(
        recording("dell_bios_charge_limit_wrong_design_tlp621.txt")
    )
    del files["charge_full_design"]
    write_supply(supplies, "BAT0", files)

    section = batteries_to_proto(read_batteries(supplies))
    message = section.batteries[0]

    assert message.capacity_unit == report_pb2.CAPACITY_UNIT_MICROAMPERE_HOURS
    assert not message.HasField("design_capacity")
    assert not message.HasField("health_percent")
    assert not message.HasField("cycle_count")
    assert message.HasField("full_capacity")
    assert message.status == report_pb2.BATTERY_STATUS_UNKNOWN
    assert [error.kind for error in section.errors] == [
        report_pb2.PROBE_ERROR_KIND_UNPARSED
    ]


def test_wire_empty_scan() -> None:
    section = batteries_to_proto(BatteryScan())

    assert len(section.batteries) == 0
    assert len(section.errors) == 0
