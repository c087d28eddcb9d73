"""Convert a battery scan to its wire message."""

from __future__ import annotations

from agent.probes.battery import (
    BatteryReading,
    BatteryScan,
    BatteryStatus,
    CapacityUnit,
)
from agent.wire import probe_error_to_proto
from fleetmend.v1 import report_pb2

__all__ = ["batteries_to_proto"]

_UNITS = {
    CapacityUnit.MICROWATT_HOURS: report_pb2.CAPACITY_UNIT_MICROWATT_HOURS,
    CapacityUnit.MICROAMPERE_HOURS: report_pb2.CAPACITY_UNIT_MICROAMPERE_HOURS,
}
_STATUSES = {
    BatteryStatus.CHARGING: report_pb2.BATTERY_STATUS_CHARGING,
    BatteryStatus.DISCHARGING: report_pb2.BATTERY_STATUS_DISCHARGING,
    BatteryStatus.FULL: report_pb2.BATTERY_STATUS_FULL,
    BatteryStatus.NOT_CHARGING: report_pb2.BATTERY_STATUS_NOT_CHARGING,
    BatteryStatus.UNKNOWN: report_pb2.BATTERY_STATUS_UNKNOWN,
}


def batteries_to_proto(scan: BatteryScan) -> report_pb2.BatterySection:
    """Build the battery section. Unknown capacities and counts are left unset."""
    return report_pb2.BatterySection(
        batteries=[_battery_to_proto(battery) for battery in scan.batteries],
        errors=[probe_error_to_proto(error) for error in scan.errors],
    )


def _battery_to_proto(battery: BatteryReading) -> report_pb2.Battery:
    message = report_pb2.Battery(
        name=battery.name,
        manufacturer=battery.manufacturer,
        model=battery.model,
        serial_number=battery.serial_number,
        technology=battery.technology,
        status=_STATUSES[battery.status],
    )
    if battery.capacity_unit is not None:
        message.capacity_unit = _UNITS[battery.capacity_unit]
    if battery.design_capacity is not None:
        message.design_capacity = battery.design_capacity
    if battery.full_capacity is not None:
        message.full_capacity = battery.full_capacity
    if battery.remaining_capacity is not None:
        message.remaining_capacity = battery.remaining_capacity
    if battery.cycle_count is not None:
        message.cycle_count = battery.cycle_count
    if battery.health_percent is not None:
        message.health_percent = battery.health_percent
    return message
