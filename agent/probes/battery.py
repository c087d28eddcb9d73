"""Battery wear from the Linux power_supply class in sysfs.

Each supply is a folder under /sys/class/power_supply with one file per property
(``type``, ``status``, ``energy_full`` ...) and a ``uevent`` file that lists the same
properties as ``POWER_SUPPLY_<NAME>=<value>`` lines. Firmware reports capacities in
one of two unit families: ``energy_*`` in µWh or ``charge_*`` in µAh.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from agent.probes import ProbeError, ProbeErrorKind

logger = logging.getLogger(__name__)

__all__ = [
    "BatteryReading",
    "BatteryScan",
    "BatteryStatus",
    "CapacityUnit",
    "is_system_battery",
    "parse_battery",
    "parse_uevent",
    "read_batteries",
    "read_supply_attributes",
]

POWER_SUPPLY_DIR = Path("/sys/class/power_supply")

# Property files read from each supply folder. The uevent file fills in any that
# are absent or unreadable.
ATTRIBUTE_NAMES = (
    "type",
    "scope",
    "present",
    "status",
    "manufacturer",
    "model_name",
    "serial_number",
    "technology",
    "cycle_count",
    "energy_full_design",
    "energy_full",
    "energy_now",
    "charge_full_design",
    "charge_full",
    "charge_now",
)

_UEVENT_PREFIX = "POWER_SUPPLY_"


class CapacityUnit(Enum):
    MICROWATT_HOURS = "µWh"
    MICROAMPERE_HOURS = "µAh"


class BatteryStatus(Enum):
    CHARGING = "Charging"
    DISCHARGING = "Discharging"
    FULL = "Full"
    NOT_CHARGING = "Not charging"
    UNKNOWN = "Unknown"


@dataclass(frozen=True)
class BatteryReading:
    """Capacities and wear of one battery, in the unit its firmware reports."""

    name: str
    manufacturer: str
    model: str
    serial_number: str
    technology: str
    # None when the supply has neither energy_* nor charge_* properties.
    capacity_unit: CapacityUnit | None
    design_capacity: int | None
    full_capacity: int | None
    remaining_capacity: int | None
    # None where the firmware reports 0, which means unknown.
    cycle_count: int | None
    # full_capacity / design_capacity in percent. New packs and firmware that
    # re-learns its capacity can give more than 100, which is kept.
    health_percent: float | None
    status: BatteryStatus


@dataclass
class BatteryScan:
    batteries: list[BatteryReading] = field(default_factory=list)
    errors: list[ProbeError] = field(default_factory=list)


def parse_uevent(text: str) -> dict[str, str]:
    """Parse ``POWER_SUPPLY_<NAME>=<value>`` lines into property file names.

    ``POWER_SUPPLY_CHARGE_FULL=3558000`` becomes ``{"charge_full": "3558000"}``.
    Lines of any other shape are ignored, because the kernel adds other uevent
    variables (DEVTYPE, OF_NAME ...) beside the power supply ones.
    """
    attributes: dict[str, str] = {}
    for line in text.splitlines():
        key, separator, value = line.partition("=")
        if not separator or not key.startswith(_UEVENT_PREFIX):
            continue
        name = key.removeprefix(_UEVENT_PREFIX).lower()
        attributes[name] = value.strip()
    return attributes


def is_system_battery(attributes: Mapping[str, str]) -> bool:
    """Return whether a supply is a battery that powers this computer.

    Mains and USB supplies are chargers. A battery with scope Device powers a
    peripheral such as a wireless mouse, and a battery with present 0 is an empty
    bay.
    """
    if attributes.get("type") != "Battery":
        return False
    if attributes.get("scope") == "Device":
        return False
    return attributes.get("present") != "0"


def parse_battery(
    name: str, attributes: Mapping[str, str], source: str
) -> tuple[BatteryReading, list[ProbeError]]:
    """Build a reading from a battery's properties, with an error per bad value.

    ``attributes`` maps property file names to their stripped content. ``source``
    is the supply folder, named in the errors. A value that is not an integer, or
    a status the kernel does not define, leaves that value unknown and adds an
    unparsed error. The reading itself is always returned.
    """
    errors: list[ProbeError] = []
    unit, prefix = _capacity_family(attributes)

    def number(attribute: str) -> int | None:
        return _parse_count(attributes, attribute, source, errors)

    design = number(f"{prefix}_full_design") if prefix else None
    full = number(f"{prefix}_full") if prefix else None
    remaining = number(f"{prefix}_now") if prefix else None
    cycle_count = number("cycle_count")

    reading = BatteryReading(
        name=name,
        manufacturer=attributes.get("manufacturer", ""),
        model=attributes.get("model_name", ""),
        serial_number=attributes.get("serial_number", ""),
        technology=attributes.get("technology", ""),
        capacity_unit=unit,
        design_capacity=design,
        full_capacity=full,
        remaining_capacity=remaining,
        cycle_count=cycle_count or None,
        health_percent=_health_percent(full, design),
        status=_parse_status(attributes.get("status"), source, errors),
    )
    return reading, errors


def read_supply_attributes(supply_dir: Path) -> dict[str, str]:
    """Read a supply's property files, filling gaps from its uevent file.

    A property whose file is missing or fails to read is left out. Reads fail
    for real: energy_full_design can return ENODEV on a battery that is present.
    """
    attributes: dict[str, str] = {}
    for attribute in ATTRIBUTE_NAMES:
        value = _read_property(supply_dir / attribute)
        if value is not None:
            attributes[attribute] = value

    uevent = _read_property(supply_dir / "uevent")
    if uevent is not None:
        for attribute, value in parse_uevent(uevent).items():
            attributes.setdefault(attribute, value)
    return attributes


def read_batteries(power_supply_dir: Path = POWER_SUPPLY_DIR) -> BatteryScan:
    """Read every system battery under ``power_supply_dir``, whatever its name.

    A missing folder means the computer has no battery and yields an empty scan.
    """
    scan = BatteryScan()
    try:
        supply_dirs = sorted(power_supply_dir.iterdir())
    except FileNotFoundError:
        logger.debug("no power supply folder at %s", power_supply_dir)
        return scan
    except OSError as error:
        scan.errors.append(
            ProbeError(
                source=str(power_supply_dir),
                kind=ProbeErrorKind.UNREADABLE,
                reason=f"cannot list the power supplies: {error.strerror}",
            )
        )
        return scan

    for supply_dir in supply_dirs:
        attributes = read_supply_attributes(supply_dir)
        if not is_system_battery(attributes):
            logger.debug("skipping power supply %s: %s", supply_dir.name, attributes)
            continue
        reading, errors = parse_battery(supply_dir.name, attributes, str(supply_dir))
        scan.batteries.append(reading)
        scan.errors.extend(errors)
    return scan


def _capacity_family(
    attributes: Mapping[str, str],
) -> tuple[CapacityUnit | None, str | None]:
    for unit, prefix in (
        (CapacityUnit.MICROWATT_HOURS, "energy"),
        (CapacityUnit.MICROAMPERE_HOURS, "charge"),
    ):
        if any(
            f"{prefix}_{suffix}" in attributes
            for suffix in ("full_design", "full", "now")
        ):
            return unit, prefix
    return None, None


def _parse_count(
    attributes: Mapping[str, str],
    attribute: str,
    source: str,
    errors: list[ProbeError],
) -> int | None:
    text = attributes.get(attribute)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        errors.append(
            ProbeError(
                source=f"{source}/{attribute}",
                kind=ProbeErrorKind.UNPARSED,
                reason=f"expected a non-negative integer, got {text!r}",
            )
        )
        return None
    return value


def _health_percent(full: int | None, design: int | None) -> float | None:
    if full is None or not design:
        return None
    return full / design * 100


def _parse_status(
    text: str | None, source: str, errors: list[ProbeError]
) -> BatteryStatus:
    if text is None:
        return BatteryStatus.UNKNOWN
    try:
        return BatteryStatus(text)
    except ValueError:
        errors.append(
            ProbeError(
                source=f"{source}/status",
                kind=ProbeErrorKind.UNPARSED,
                reason=f"unknown battery status {text!r}",
            )
        )
        return BatteryStatus.UNKNOWN


def _read_property(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as error:
        # Missing files are normal, because each driver exposes its own set.
        if not isinstance(error, FileNotFoundError):
            logger.debug("cannot read %s: %s", path, error)
        return None
