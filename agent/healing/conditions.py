"""Evaluate a rule's Condition on the latest readings of this computer.

The readings are the sections that the report builder holds (host volumes,
disks, batteries, credentials). Two kinds read the system at evaluation time:
service_not_running asks the service manager (agent.healing.services), and
process_cpu_above samples the catalogued application's CPU use
(agent.healing.processes) and keeps the time since it went above the
threshold here, per rule.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent.healing.policy import duration_seconds
from agent.text import format_bytes
from fleetmend.v1 import remediation_pb2, report_pb2

if TYPE_CHECKING:
    from agent.usage.catalog import Catalog

log = logging.getLogger(__name__)

# ATA attribute when_failed value of an attribute that is below its threshold
# now, as smartctl's JSON output writes it.
FAILING_NOW = "FAILING_NOW"

# ATA attributes whose raw value counts reallocated or pending sectors,
# uncorrectable errors or command timeouts: a raw value above 0 marks the disk
# as failing. The collector's "disk failing" finding imports this list.
FAILURE_ATTRIBUTES = {
    5: "Reallocated_Sector_Ct",
    187: "Reported_Uncorrect",
    188: "Command_Timeout",
    197: "Current_Pending_Sector",
    198: "Offline_Uncorrectable",
}

_SMART_STATE_WORDS = {
    report_pb2.SMART_STATE_NOT_SUPPORTED: "SMART not supported",
    report_pb2.SMART_STATE_PERMISSION_DENIED: "SMART permission denied",
    report_pb2.SMART_STATE_IN_STANDBY: "in standby, SMART not read",
    report_pb2.SMART_STATE_SMARTCTL_MISSING: "smartctl missing",
    report_pb2.SMART_STATE_UNPARSED: "SMART output not parsed",
    report_pb2.SMART_STATE_ERROR: "SMART read failed",
}


@dataclass(frozen=True)
class ConditionResult:
    """Whether a condition holds, the tested value in unit, and a detail in words.

    value is None when nothing was read, such as a service whose status is
    unknown; a record then carries no before, after or unit.
    """

    holds: bool
    value: float | None = None
    unit: str = ""
    detail: str = ""


@dataclass
class Readings:
    """The latest readings that conditions test; None for a section not read yet."""

    host: report_pb2.HostFacts | None = None
    disks: report_pb2.DiskSection | None = None
    batteries: report_pb2.BatterySection | None = None
    credentials: report_pb2.CredentialSection | None = None


class ServiceStatusReader(Protocol):
    """The part of agent.healing.services.ServiceBackend that conditions use."""

    def status(self, name: str) -> Any: ...


class CpuSampleReader(Protocol):
    """The part of agent.healing.processes.CpuSampler that conditions use."""

    def sample(self, app_id: str, catalog: Catalog) -> float: ...


def _free_space_live(mount_point: str) -> tuple[int, int] | None:
    try:
        usage = shutil.disk_usage(mount_point)
    except OSError:
        return None
    return usage.total, usage.free


def free_space(
    mount_point: str, readings: Readings, live: bool = False
) -> tuple[int, int] | None:
    """Return (total, free) bytes of a volume: from the readings, or read now when live.

    Without a reading of the volume the size is read from the file system.
    None means the mount point is not a volume here.
    """
    if not live and readings.host is not None:
        for volume in readings.host.volumes:
            if volume.mount_point == mount_point and volume.total_bytes:
                return volume.total_bytes, volume.free_bytes
    return _free_space_live(mount_point)


def _format_span(seconds: float) -> str:
    """Return a span as "3d 4h", "5h 12m", "7m" or, below a minute, "40s"."""
    if 0 < seconds < 60:
        return f"{seconds:.0f}s"
    minutes = max(0, int(seconds // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


@dataclass
class _CpuTracking:
    """When a rule's application went above its CPU threshold (monotonic seconds)."""

    above_since: float | None = None


@dataclass
class ConditionEvaluator:
    """Evaluate conditions and keep the sustained time of process_cpu_above rules."""

    services: ServiceStatusReader | None = None
    cpu_sampler: CpuSampleReader | None = None
    catalog: Callable[[], Catalog | None] = lambda: None
    _cpu: dict[str, _CpuTracking] = field(default_factory=dict)
    # Service name -> the last status error logged, so that each distinct
    # error is logged once and not at every evaluation.
    _service_errors: dict[str, str] = field(default_factory=dict)

    def evaluate(
        self,
        rule_name: str,
        condition: remediation_pb2.Condition,
        readings: Readings,
        now: datetime,
        monotonic: float,
        live: bool = False,
    ) -> ConditionResult:
        """Evaluate one condition of rule_name at now (aware) and monotonic seconds.

        live reads free space from the file system instead of the readings, for
        the precheck right before an action.
        """
        kind = condition.WhichOneof("kind")
        if kind == "free_space_below":
            return self._free_space(condition.free_space_below, readings, live)
        if kind == "service_not_running":
            return self._service(condition.service_not_running)
        if kind == "process_cpu_above":
            return self._cpu_above(rule_name, condition.process_cpu_above, monotonic)
        if kind == "credential_expiring_within":
            return _credentials(condition.credential_expiring_within, readings, now)
        if kind == "battery_health_below":
            return _battery(condition.battery_health_below, readings)
        if kind == "disk_failing":
            return _disks(readings)
        return ConditionResult(False, detail="no condition set")

    def start_cpu_samples(self, rules: Iterable[remediation_pb2.Rule]) -> list[str]:
        """Take a first CPU reading of each process_cpu_above rule's application.

        CPU use is measured between two readings, so the first evaluate() of
        such a rule returns 0 %. A one-shot evaluation calls this, waits, and
        then evaluates. Returns the app ids read, empty without a sampler or
        catalog.
        """
        catalog = self.catalog()
        if self.cpu_sampler is None or catalog is None:
            return []
        app_ids = []
        for rule in rules:
            if rule.condition.WhichOneof("kind") != "process_cpu_above":
                continue
            app_id = rule.condition.process_cpu_above.app_id
            if app_id in app_ids:
                continue
            try:
                self.cpu_sampler.sample(app_id, catalog)
            except Exception as exc:  # noqa: BLE001 - evaluate() reports it again
                log.debug("first CPU reading of %s failed: %s", app_id, exc)
                continue
            app_ids.append(app_id)
        return app_ids

    @staticmethod
    def _free_space(
        free: remediation_pb2.FreeSpaceBelow, readings: Readings, live: bool
    ) -> ConditionResult:
        unit = f"free bytes of {free.mount_point}"
        sizes = free_space(free.mount_point, readings, live)
        if sizes is None:
            return ConditionResult(
                False, unit=unit, detail=f"{free.mount_point} is not a volume here"
            )
        total, available = sizes
        ratio = available / total if total else 0.0
        below_ratio = free.ratio > 0 and ratio < free.ratio
        below_bytes = free.bytes > 0 and available < free.bytes
        limits = []
        if free.ratio > 0:
            limits.append(f"{free.ratio:.0%}")
        if free.bytes > 0:
            limits.append(format_bytes(free.bytes))
        detail = (
            f"{free.mount_point} has {format_bytes(available)} free of "
            f"{format_bytes(total)} ({ratio:.1%}); the rule acts below "
            f"{' or '.join(limits)}"
        )
        return ConditionResult(
            below_ratio or below_bytes, float(available), unit, detail
        )

    def _service(self, condition: remediation_pb2.ServiceNotRunning) -> ConditionResult:
        unit = f"service {condition.service} active (1) or not (0)"
        if self.services is None:
            return ConditionResult(False, unit=unit, detail="no service manager here")
        name = condition.service
        try:
            status = self.services.status(name)
        except Exception as exc:  # noqa: BLE001 - any backend error means "unknown"
            error = str(exc) or type(exc).__name__
            if self._service_errors.get(name) != error:
                self._service_errors[name] = error
                log.warning(
                    "service %s: status unknown: %s; rules that test it do not act "
                    "until it can be read",
                    name,
                    error,
                )
            return ConditionResult(
                False, unit=unit, detail=f"service {name}: status unknown: {error}"
            )
        if self._service_errors.pop(name, None) is not None:
            log.info("service %s: status can be read again", name)
        active = bool(status.active)
        detail = f"service {condition.service} is {status.state}"
        if status.detail:
            detail += f" ({status.detail})"
        return ConditionResult(not active, 1.0 if active else 0.0, unit, detail)

    def _cpu_above(
        self,
        rule_name: str,
        condition: remediation_pb2.ProcessCpuAbove,
        monotonic: float,
    ) -> ConditionResult:
        unit = f"percent of one CPU used by {condition.app_id}"
        catalog = self.catalog()
        if self.cpu_sampler is None or catalog is None:
            return ConditionResult(False, unit=unit, detail="no process catalog here")
        try:
            percent = self.cpu_sampler.sample(condition.app_id, catalog)
        except Exception as exc:  # noqa: BLE001 - a failed sample means "unknown"
            return ConditionResult(
                False, unit=unit, detail=f"CPU of {condition.app_id} unknown: {exc}"
            )
        tracking = self._cpu.setdefault(rule_name, _CpuTracking())
        if percent <= condition.percent:
            tracking.above_since = None
            return ConditionResult(
                False,
                percent,
                unit,
                f"{condition.app_id} uses {percent:.0f} % of one CPU, not above "
                f"{condition.percent:g} %",
            )
        if tracking.above_since is None:
            tracking.above_since = monotonic
        above_for = monotonic - tracking.above_since
        sustained = duration_seconds(condition.sustained)
        detail = (
            f"{condition.app_id} uses {percent:.0f} % of one CPU, above "
            f"{condition.percent:g} %"
        )
        if above_for >= 60:
            detail += f" for {_format_span(above_for)}"
        if sustained > 0:
            detail += f"; the rule acts once that lasts {_format_span(sustained)}"
        return ConditionResult(above_for >= sustained, percent, unit, detail)


def _credential_kind_name(kind: int) -> str:
    return report_pb2.CredentialKind.Name(kind).removeprefix("CREDENTIAL_KIND_").lower()  # type: ignore[arg-type]


def _credentials(
    condition: remediation_pb2.CredentialExpiringWithin,
    readings: Readings,
    now: datetime,
) -> ConditionResult:
    unit = "seconds until the credential expires"
    if readings.credentials is None:
        return ConditionResult(False, unit=unit, detail="credentials not read yet")
    within = duration_seconds(condition.within)
    soonest: tuple[float, report_pb2.Credential] | None = None
    for credential in readings.credentials.credentials:
        if condition.kind and _credential_kind_name(credential.kind) != condition.kind:
            continue
        if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW:
            left = 0.0
        elif credential.expiry == report_pb2.CREDENTIAL_EXPIRY_AT_TIME:
            left = (credential.expire_time.ToDatetime(now.tzinfo) - now).total_seconds()
        else:
            continue
        if soonest is None or left < soonest[0]:
            soonest = (left, credential)
    if soonest is None:
        return ConditionResult(False, unit=unit, detail="no credential expires")
    left, credential = soonest
    kind = _credential_kind_name(credential.kind).replace("_", " ")
    what = f"{kind} of {credential.account}"
    if left <= 0:
        detail = f"{what} has expired or must be changed now"
    else:
        detail = f"{what} expires in {_format_span(left)}"
    detail += f"; the rule acts within {_format_span(within)}"
    return ConditionResult(left <= within, max(0.0, left), unit, detail)


def battery_health(battery: report_pb2.Battery) -> float | None:
    """Return full-charge over design capacity (0 to 1), or None when unknown."""
    if (
        battery.HasField("design_capacity")
        and battery.HasField("full_capacity")
        and battery.design_capacity > 0
    ):
        return battery.full_capacity / battery.design_capacity
    if battery.HasField("health_percent"):
        return battery.health_percent / 100.0
    return None


def _battery(
    condition: remediation_pb2.BatteryHealthBelow, readings: Readings
) -> ConditionResult:
    unit = "battery health (full over design capacity)"
    if readings.batteries is None:
        return ConditionResult(False, unit=unit, detail="batteries not read yet")
    worst: tuple[float, str] | None = None
    for battery in readings.batteries.batteries:
        health = battery_health(battery)
        if health is not None and (worst is None or health < worst[0]):
            worst = (health, battery.name)
    if worst is None:
        return ConditionResult(
            False, unit=unit, detail="no battery with a known health"
        )
    health, name = worst
    detail = (
        f"battery {name} holds {health:.0%} of its design capacity; the rule acts "
        f"below {condition.ratio:.0%}"
    )
    return ConditionResult(health < condition.ratio, health, unit, detail)


def disk_failure(disk: report_pb2.Disk) -> str:
    """Return why a disk counts as failing, empty when it does not.

    The checks are those of the collector's "disk failing" finding, plus an
    ATA attribute below its threshold now, so that a device with that
    critical finding also meets disk_failing.
    """
    reasons: list[str] = []
    if disk.self_assessment == report_pb2.SELF_ASSESSMENT_FAILED:
        reasons.append("SMART self-assessment failed")
    for attribute in disk.ata_attributes:
        name = attribute.name or FAILURE_ATTRIBUTES.get(attribute.id, "")
        if attribute.when_failed == FAILING_NOW:
            reasons.append(f"attribute {attribute.id} {name} is below its threshold")
        elif attribute.id in FAILURE_ATTRIBUTES and attribute.raw > 0:
            reasons.append(f"attribute {attribute.id} {name} raw value {attribute.raw}")
    if disk.HasField("nvme_health"):
        health = disk.nvme_health
        if health.critical_warning:
            reasons.append(f"NVMe critical warning 0x{health.critical_warning:02x}")
        if health.media_errors > 0:
            reasons.append(f"NVMe media errors {health.media_errors}")
        if health.available_spare_percent < health.available_spare_threshold_percent:
            reasons.append(
                f"NVMe available spare {health.available_spare_percent} % below "
                f"its threshold {health.available_spare_threshold_percent} %"
            )
    return "; ".join(reasons)


def _reports_health(disk: report_pb2.Disk) -> bool:
    return disk.smart_state == report_pb2.SMART_STATE_AVAILABLE


def _no_health_text(disk: report_pb2.Disk) -> str:
    words = _SMART_STATE_WORDS.get(disk.smart_state, "no SMART state")
    return f"{disk.name or disk.serial_number or 'unnamed disk'}: {words}"


def _disks(readings: Readings) -> ConditionResult:
    unit = "failing disks"
    if readings.disks is None:
        return ConditionResult(False, unit=unit, detail="disks not read yet")
    disks = list(readings.disks.disks)
    if not disks:
        return ConditionResult(False, unit=unit, detail="no disk found")
    failing = [
        f"{disk.name} ({reason})" for disk in disks if (reason := disk_failure(disk))
    ]
    if failing:
        detail = "failing: " + ", ".join(failing)
        return ConditionResult(True, float(len(failing)), unit, detail)
    silent = [_no_health_text(disk) for disk in disks if not _reports_health(disk)]
    if len(silent) == len(disks):
        # Nothing was measured, so the result has no value.
        detail = f"no disk reports health data ({', '.join(silent)})"
        return ConditionResult(False, unit=unit, detail=detail)
    healthy = len(disks) - len(silent)
    if healthy == 1:
        detail = "the one disk that reports health data is not failing"
    else:
        detail = f"none of the {healthy} disks that report health data is failing"
    if silent:
        detail += f"; no health data from {', '.join(silent)}"
    return ConditionResult(False, 0.0, unit, detail)
