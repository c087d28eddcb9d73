"""SMART data through pySMART and smartctl, without waking a disk in standby.

pySMART 1.4.3 runs ``smartctl -d <type> --all <dev>`` for a ``Device`` and parses
its text into an ATA attribute table or an NVMe health log. Without a given type
it first runs ``smartctl -d test <dev>`` to let smartctl detect one. For the types
ata, scsi and megaraid it also reads the SATA or SAS PHY log (``-l sataphy``,
``-l sasphy``) and may repeat ``--all`` to refine the type name. Its
``Smartctl(options=...)`` reaches only the ``--info`` and ``--all`` calls, and its
``all()`` returns stdout without the exit status.

``SmartctlRunner`` overrides ``Smartctl.generic_call``, through which every one of
those calls goes. It puts ``-n standby`` into every call, runs smartctl with
LC_ALL=C and a timeout, and records each call's exit status and output. A
repeated identical call gets the first result again, and the PHY log reads are
skipped because the probe takes the interface from sysfs instead.

smartctl(8) warns that the commands of its type autodetection may spin a disk up
even under ``-n``. ATA and NVMe disks therefore get their type named up front, so
pySMART runs only ``--all`` for them.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

# NOTE: importing pySMART sets os.environ["LANG"] = "C" for the whole process and
# installs its own logger class with logging.setLoggerClass (pySMART 1.4.3). The
# agent runs this probe in a child process (agent.sections), so both stay there.
from pySMART import Device
from pySMART.interface import AtaAttributes, NvmeAttributes
from pySMART.smartctl import Smartctl

from agent.probes import ProbeError, ProbeErrorKind
from agent.probes._disk_sysfs import DiskInterface

logger = logging.getLogger(__name__)

# smartctl --nocheck=standby: skip the disk when it is in STANDBY or SLEEP mode
# instead of spinning it up, and exit with status 2.
NOCHECK_STANDBY = ("-n", "standby")

DEFAULT_TIMEOUT_SECONDS = 60.0

# smartctl exit status bits, from the EXIT STATUS section of smartctl(8) 7.3.
EXIT_COMMAND_LINE = 0x01
EXIT_OPEN_FAILED = 0x02
EXIT_COMMAND_FAILED = 0x04
EXIT_DISK_FAILING = 0x08
EXIT_PREFAIL_AT_THRESHOLD = 0x10
EXIT_AT_THRESHOLD_IN_PAST = 0x20
EXIT_ERROR_LOG = 0x40
EXIT_SELF_TEST_LOG = 0x80

_EXIT_BIT_MEANINGS = (
    (EXIT_COMMAND_LINE, "the command line did not parse"),
    (
        EXIT_OPEN_FAILED,
        "the device open failed, the device did not identify itself,"
        " or the device is in a low-power mode",
    ),
    (
        EXIT_COMMAND_FAILED,
        "a SMART or other command to the disk failed,"
        " or a SMART data structure has a checksum error",
    ),
    (EXIT_DISK_FAILING, "the SMART status check returned DISK FAILING"),
    (EXIT_PREFAIL_AT_THRESHOLD, "prefail attributes are at or below threshold"),
    (
        EXIT_AT_THRESHOLD_IN_PAST,
        "the SMART status is OK, but attributes were at or below threshold in the past",
    ),
    (EXIT_ERROR_LOG, "the device error log contains records of errors"),
    (EXIT_SELF_TEST_LOG, "the device self-test log contains records of errors"),
)

# pySMART's Device._classify reads these logs only to refine the type name.
_PHY_LOGS = ("sataphy", "sasphy")
_SKIPPED_CALL_STATUS = 1

# The smartctl device type that smartctl's own autodetection picks on Linux:
# libata presents ATA disks as SCSI disks with SCSI/ATA Translation.
# NOTE: USB, SCSI, virtio and MMC disks keep smartctl's autodetection, because
# sysfs does not show which type a USB bridge needs.
SMARTCTL_TYPES = {DiskInterface.ATA: "sat", DiskInterface.NVME: "nvme"}

_LOW_POWER = re.compile(r"^Device is in (?P<mode>.+?) mode", re.MULTILINE)
_OPEN_FAILED = re.compile(r"^Smartctl open device: .+$", re.MULTILINE)
_UNKNOWN_USB_BRIDGE = re.compile(r"Unknown USB bridge \[(?P<bridge>[^\]]+)\]")
_PERMISSION_MESSAGES = ("Permission denied", "Operation not permitted")
_ASSESSMENT = re.compile(
    r"^SMART overall-health self-assessment test result:\s*(?P<result>\S+)",
    re.MULTILINE,
)
_SCSI_HEALTH = re.compile(r"^SMART Health Status:\s*(?P<result>.+?)\s*$", re.MULTILINE)
_SMART_SUPPORT = re.compile(r"^SMART support is:\s*(?P<value>.+?)\s*$", re.MULTILINE)

# smartctl's text output prints the keys in the WHEN_FAILED column, and its JSON
# output prints the values.
_WHEN_FAILED = {"-": "", "FAILING_NOW": "now", "In_the_past": "past"}


class SmartState(Enum):
    AVAILABLE = "available"
    NOT_SUPPORTED = "not supported"
    PERMISSION_DENIED = "permission denied"
    IN_STANDBY = "in standby"
    SMARTCTL_MISSING = "smartctl missing"
    UNPARSED = "unparsed"
    ERROR = "error"


class SelfAssessment(Enum):
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class AtaAttribute:
    """One row of the ATA SMART attribute table."""

    id: int
    name: str
    value: int
    worst: int
    # None where smartctl prints "---" (the disk reports no threshold).
    threshold: int | None
    # The first number of the raw column, or None when it contains no digits.
    raw: int | None
    raw_text: str
    # "" (never failed), "now" or "past". Other WHEN_FAILED text stays as printed.
    when_failed: str


@dataclass(frozen=True)
class NvmeHealth:
    """The NVMe SMART / Health Information log (log page 0x02).

    A value is None when the log has no line for it.
    """

    critical_warning: int | None
    temperature_celsius: int | None
    available_spare_percent: int | None
    available_spare_threshold_percent: int | None
    percentage_used: int | None
    media_errors: int | None
    unsafe_shutdowns: int | None
    power_on_hours: int | None
    power_cycles: int | None
    error_log_entries: int | None


@dataclass(frozen=True)
class SmartctlCall:
    """One smartctl run: its argv, exit status and output."""

    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def short_command(self) -> str:
        """The command line with the executable's name instead of its path."""
        return shlex.join((os.path.basename(self.argv[0]), *self.argv[1:]))


@dataclass(frozen=True)
class SmartReading:
    """The SMART state and data of one disk; identity strings are "" if unknown."""

    state: SmartState
    # Why state is not AVAILABLE, in words.
    reason: str = ""
    self_assessment: SelfAssessment | None = None
    model: str = ""
    serial_number: str = ""
    firmware_version: str = ""
    ata_attributes: tuple[AtaAttribute, ...] = ()
    nvme_health: NvmeHealth | None = None
    # Exit status of the smartctl call the reading comes from.
    exit_status: int | None = None
    # Set for the states the scan also lists as errors (unparsed, error,
    # permission denied).
    error: ProbeError | None = None


class SmartctlRunner(Smartctl):
    """pySMART's smartctl wrapper with -n standby everywhere and every call kept."""

    def __init__(self, smartctl_path: str, timeout_seconds: float) -> None:
        super().__init__(smartctl_path=smartctl_path, options=list(NOCHECK_STANDBY))
        self.timeout_seconds = timeout_seconds
        self.calls: list[SmartctlCall] = []
        self._results: dict[tuple[str, ...], tuple[list[str], int]] = {}

    def generic_call(
        self, params: list[str], pass_options: bool = False
    ) -> tuple[list[str], int]:
        """Run smartctl with the options and params.

        pass_options is ignored because the options go into every call.
        """
        if _reads_phy_log(params):
            return [], _SKIPPED_CALL_STATUS

        argv = (str(self.smartctl_path), *self.options, *params)
        if argv not in self._results:
            call = run_smartctl(argv, self.timeout_seconds)
            self.calls.append(call)
            self._results[argv] = (call.stdout.splitlines(), call.exit_status)
        lines, exit_status = self._results[argv]
        return list(lines), exit_status


class _DeviceUnder(Device):
    """A pySMART Device whose node lives under dev_root instead of /dev."""

    def __init__(
        self,
        name: str,
        dev_root: Path,
        smartctl: SmartctlRunner,
        smartctl_type: str | None,
    ) -> None:
        self._dev_root = dev_root
        super().__init__(name, interface=smartctl_type, smartctl=smartctl)

    @property
    def dev_reference(self) -> str:
        return str(self._dev_root / self.name)


def run_smartctl(argv: Sequence[str], timeout_seconds: float) -> SmartctlCall:
    """Run one smartctl command in the C locale.

    Raises FileNotFoundError when the executable is gone, other OSError when it
    cannot be started, and subprocess.TimeoutExpired after timeout_seconds.
    """
    env = dict(os.environ, LC_ALL="C", LANG="C")
    completed = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=timeout_seconds,
        check=False,
    )
    return SmartctlCall(
        argv=tuple(argv),
        exit_status=completed.returncode,
        stdout=completed.stdout.decode("utf-8", errors="replace"),
        stderr=completed.stderr.decode("utf-8", errors="replace"),
    )


def read_smart(
    name: str,
    interface: DiskInterface,
    dev_root: Path,
    smartctl_path: str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> SmartReading:
    """Read one disk's SMART data through pySMART.

    smartctl and pySMART failures become a state with a reason, not an exception.
    """
    runner = SmartctlRunner(smartctl_path, timeout_seconds)
    device_path = str(dev_root / name)
    try:
        with warnings.catch_warnings():
            # pySMART warns "Device ... does not exist!" whenever smartctl -d test
            # prints nothing. The returned state gives the reason instead.
            warnings.simplefilter("ignore", UserWarning)
            smartctl_type = SMARTCTL_TYPES.get(interface)
            device = _DeviceUnder(name, dev_root, runner, smartctl_type)
    except FileNotFoundError:
        return smartctl_missing(smartctl_path)
    except subprocess.TimeoutExpired as exc:
        command = shlex.join(str(arg) for arg in exc.cmd)
        reason = f"smartctl did not finish within {exc.timeout:g} s"
        return _failed(SmartState.ERROR, reason, command, ProbeErrorKind.UNREADABLE)
    except OSError as exc:
        reason = f"smartctl could not be started: {exc.strerror or exc}"
        return _failed(SmartState.ERROR, reason, smartctl_path)
    except Exception as exc:
        # pySMART's text parsers index and convert fields without checks, so
        # output they have never seen ends up here (ValueError, IndexError ...).
        return interpret_smartctl(runner.calls, None, exc, interface, device_path)
    return interpret_smartctl(runner.calls, device, None, interface, device_path)


def smartctl_missing(smartctl: str) -> SmartReading:
    """Return the reading of every disk when smartctl cannot be found."""
    if os.path.dirname(smartctl):
        reason = f"smartctl was not found at {smartctl}"
    else:
        reason = f"{smartctl} was not found on PATH (install smartmontools)"
    return SmartReading(SmartState.SMARTCTL_MISSING, reason)


def interpret_smartctl(
    calls: Sequence[SmartctlCall],
    device: Any,
    failure: Exception | None,
    interface: DiskInterface,
    device_path: str,
) -> SmartReading:
    """Turn the recorded smartctl calls and pySMART's parse of them into a reading.

    device is the pySMART Device, or None when building it raised failure. A call
    that smartctl rejected (exit status bit 0 or 1) decides the state before any
    parsed data does.
    """
    if not calls:
        reason = "pySMART ran no smartctl command"
        if failure is not None:
            reason += f" and raised {type(failure).__name__}: {failure}"
        return _failed(SmartState.ERROR, reason, device_path)

    for call in calls:
        rejected = _rejected(call, interface, device_path)
        if rejected is not None:
            return rejected

    report = _report_call(calls)
    if report is None:
        return _unparsed(calls[-1], "it names no device type that pySMART can use")
    if failure is not None:
        detail = f"pySMART raised {type(failure).__name__}: {failure}"
        return _unparsed(report, detail)
    return _interpret_report(report, device)


def parse_self_assessment(output: str, exit_status: int) -> SelfAssessment | None:
    """Read the disk's own health verdict from smartctl --all output.

    ATA and NVMe print "SMART overall-health self-assessment test result:
    PASSED" (or "FAILED!"), SCSI prints "SMART Health Status: OK". Exit status
    bit 3 (DISK FAILING) means FAILED even when the line is missing.
    """
    verdict: SelfAssessment | None = None
    assessment = _ASSESSMENT.search(output)
    scsi_health = _SCSI_HEALTH.search(output)
    if assessment is not None:
        result = assessment.group("result")
        if result == "PASSED":
            verdict = SelfAssessment.PASSED
        elif result.startswith("FAILED"):
            verdict = SelfAssessment.FAILED
    elif scsi_health is not None:
        passed = scsi_health.group("result") == "OK"
        verdict = SelfAssessment.PASSED if passed else SelfAssessment.FAILED

    if exit_status >= 0 and exit_status & EXIT_DISK_FAILING:
        return SelfAssessment.FAILED
    return verdict


def describe_exit_status(exit_status: int) -> tuple[str, ...]:
    """Name the smartctl exit status bits that are set, in words."""
    if exit_status < 0:
        return (f"smartctl was killed by signal {-exit_status}",)
    return tuple(text for bit, text in _EXIT_BIT_MEANINGS if exit_status & bit)


def _reads_phy_log(params: Sequence[str]) -> bool:
    return any(
        flag == "-l" and value in _PHY_LOGS
        for flag, value in zip(params, params[1:], strict=False)
    )


def _rejected(
    call: SmartctlCall, interface: DiskInterface, device_path: str
) -> SmartReading | None:
    # smartctl prints its messages on stdout. stderr has those of a wrapper or
    # of the dynamic loader.
    if call.exit_status < 0:
        reason = describe_exit_status(call.exit_status)[0] + f": {call.command}"
        return _failed(SmartState.ERROR, reason, call.command)
    if not call.exit_status & (EXIT_COMMAND_LINE | EXIT_OPEN_FAILED):
        return None

    text = f"{call.stdout}\n{call.stderr}"
    low_power = _LOW_POWER.search(text)
    if low_power is not None:
        mode = low_power.group("mode")
        reason = f"the disk is in {mode} mode, and smartctl -n standby left it asleep"
        return SmartReading(SmartState.IN_STANDBY, reason, exit_status=call.exit_status)

    open_failed = _OPEN_FAILED.search(text)
    if open_failed is not None and any(
        m in open_failed[0] for m in _PERMISSION_MESSAGES
    ):
        reason = f"{open_failed[0]} (SMART needs root and access to the disk node)"
        return _failed(SmartState.PERMISSION_DENIED, reason, call.command, call=call)

    bridge = _UNKNOWN_USB_BRIDGE.search(text)
    if bridge is not None:
        reason = (
            f"smartctl does not know the USB bridge [{bridge.group('bridge')}],"
            " so it cannot pass SMART commands to the disk behind it"
        )
        return SmartReading(
            SmartState.NOT_SUPPORTED, reason, exit_status=call.exit_status
        )

    if "Unable to detect device type" in text:
        reason = f"smartctl cannot detect a device type for {device_path}"
        if interface in (DiskInterface.VIRTIO, DiskInterface.MMC):
            reason += f", and {interface.value} disks offer no SMART data"
        return SmartReading(
            SmartState.NOT_SUPPORTED, reason, exit_status=call.exit_status
        )

    if open_failed is not None:
        return _failed(SmartState.ERROR, open_failed[0], call.command, call=call)
    message = _last_line(call.stderr) or _last_line(call.stdout)
    reason = f"smartctl exit status {call.exit_status}: {message}"
    return _failed(SmartState.ERROR, reason, call.command, call=call)


def _report_call(calls: Sequence[SmartctlCall]) -> SmartctlCall | None:
    for call in reversed(calls):
        if "--all" in call.argv:
            return call
    return None


def _interpret_report(report: SmartctlCall, device: Any) -> SmartReading:
    support = [match.group("value") for match in _SMART_SUPPORT.finditer(report.stdout)]
    if any(value.startswith("Unavailable") for value in support):
        reason = f"SMART support is: {support[0]}"
        return SmartReading(
            SmartState.NOT_SUPPORTED, reason, exit_status=report.exit_status
        )
    if "Disabled" in support and "Enabled" not in support:
        reason = "SMART is disabled on the disk, and smartctl -s on would enable it"
        return _failed(SmartState.ERROR, reason, report.command, call=report)

    try:
        ata_attributes = _ata_attributes(device.if_attributes)
    except ValueError as exc:
        return _unparsed(report, str(exc))
    nvme_health = _nvme_health(device.if_attributes)
    self_assessment = parse_self_assessment(report.stdout, report.exit_status)

    if not ata_attributes and nvme_health is None and self_assessment is None:
        if report.exit_status & EXIT_COMMAND_FAILED:
            failures = [line for line in report.stdout.splitlines() if "failed" in line]
            detail = "; ".join(failures) or _last_line(report.stdout)
            reason = f"a SMART command failed: {detail}"
            return _failed(SmartState.ERROR, reason, report.command, call=report)
        first_line = _first_report_line(report.stdout)
        detail = (
            "it has no self-assessment, attribute table or NVMe health log,"
            f" and its first line is {first_line!r}"
        )
        return _unparsed(report, detail)

    return SmartReading(
        SmartState.AVAILABLE,
        self_assessment=self_assessment,
        model=device.model or "",
        serial_number=device.serial or "",
        firmware_version=device.firmware or "",
        ata_attributes=ata_attributes,
        nvme_health=nvme_health,
        exit_status=report.exit_status,
    )


def _ata_attributes(if_attributes: Any) -> tuple[AtaAttribute, ...]:
    if not isinstance(if_attributes, AtaAttributes):
        return ()
    rows = []
    for attribute in if_attributes.legacyAttributes:
        if attribute is None:
            continue
        try:
            threshold = attribute.thresh
        except ValueError:
            raise ValueError(
                f"attribute {attribute.num} has the threshold {attribute._thresh!r}"
            ) from None
        raw_text = attribute.raw.strip()
        rows.append(
            AtaAttribute(
                id=attribute.num,
                name=attribute.name,
                value=int(attribute.value_str),
                worst=attribute.worst,
                threshold=threshold,
                raw=attribute.raw_int,
                raw_text=raw_text,
                when_failed=_WHEN_FAILED.get(
                    attribute.when_failed, attribute.when_failed
                ),
            )
        )
    return tuple(rows)


def _nvme_health(if_attributes: Any) -> NvmeHealth | None:
    # pySMART leaves criticalWarning, the first line of the health log, at None
    # when the "SMART/Health Information" section is missing.
    if not isinstance(if_attributes, NvmeAttributes):
        return None
    if if_attributes.criticalWarning is None:
        return None
    return NvmeHealth(
        critical_warning=if_attributes.criticalWarning,
        temperature_celsius=if_attributes.temperature,
        available_spare_percent=if_attributes.availableSpare,
        available_spare_threshold_percent=if_attributes.availableSpareThreshold,
        percentage_used=if_attributes.percentageUsed,
        media_errors=if_attributes.integrityErrors,
        unsafe_shutdowns=if_attributes.unsafeShutdowns,
        power_on_hours=if_attributes.powerOnHours,
        power_cycles=if_attributes.powerCycles,
        error_log_entries=if_attributes.errorEntries,
    )


def _unparsed(call: SmartctlCall, detail: str) -> SmartReading:
    reason = f"the output of {call.short_command} could not be parsed: {detail}"
    return _failed(
        SmartState.UNPARSED, reason, call.command, ProbeErrorKind.UNPARSED, call
    )


def _failed(
    state: SmartState,
    reason: str,
    source: str,
    kind: ProbeErrorKind = ProbeErrorKind.UNREADABLE,
    call: SmartctlCall | None = None,
) -> SmartReading:
    exit_status = call.exit_status if call is not None else None
    error = ProbeError(source=source, kind=kind, reason=reason)
    return SmartReading(state, reason, exit_status=exit_status, error=error)


def _first_report_line(output: str) -> str:
    # smartctl's text output opens with a two-line banner: version, copyright.
    lines = output.splitlines()
    if lines and lines[0].startswith("smartctl "):
        lines = lines[2:]
    return next((line.strip() for line in lines if line.strip()), "")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
