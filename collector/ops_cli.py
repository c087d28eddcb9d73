"""``fleetmend``: the operators' CLI, a client of the collector's OpsService.

Tables are for people. ``--json`` prints JSON objects for scripts, with the
messages in the protobuf JSON mapping and field names as in the .proto files:
``devices`` prints {"devices": [Device]}, ``device show`` prints
{"device": Device, "findings": [Finding]}, and ``findings`` prints
{"findings": [Finding]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from collector import __version__
from collector._address import split_host_port
from fleetmend.v1 import ops_pb2, ops_pb2_grpc, report_pb2

PROG = "fleetmend"
COLLECTOR_ENV = "FLEETMEND_COLLECTOR"
DEFAULT_COLLECTOR = "127.0.0.1:50051"
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_PAGE_SIZE = 1000

# ATA attributes that predict failure or describe wear, shown by `device show`:
# reallocated, pending and uncorrectable sectors, power-on hours, temperature,
# reported uncorrectable errors, command timeouts, UDMA CRC errors.
KEY_ATA_ATTRIBUTES = (5, 9, 187, 188, 194, 197, 198, 199)
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class CliError(Exception):
    """A failure that the CLI reports in one line, exiting with exit_code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AmbiguousHostnameError(CliError):
    """A hostname that more than one device has."""

    def __init__(self, hostname: str, devices: list[ops_pb2.Device]) -> None:
        super().__init__(
            f"{len(devices)} devices have the hostname {hostname!r}; "
            "give one of the device ids above"
        )
        self.devices = devices


# Argument parsing


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of fleetmend.

    The global options are accepted before and after the command.
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Query the Fleetmend collector."
    )
    parser.add_argument("--version", action="version", version=__version__)
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devices = commands.add_parser("devices", help="list every device")
    _add_global_options(devices, defaults=False)

    device = commands.add_parser("device", help="show one device")
    device_commands = device.add_subparsers(
        dest="device_command", required=True, metavar="COMMAND"
    )
    show = device_commands.add_parser(
        "show", help="show a device's readings and findings"
    )
    _add_global_options(show, defaults=False)
    show.add_argument(
        "device",
        type=_device_reference,
        metavar="ID-OR-HOSTNAME",
        help="device id or hostname",
    )

    findings = commands.add_parser("findings", help="list findings of the fleet")
    _add_global_options(findings, defaults=False)
    findings.add_argument(
        "--device",
        type=_device_reference,
        metavar="ID-OR-HOSTNAME",
        help="only the findings of this device",
    )
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # A subcommand's copy of an option must not overwrite a value given before
    # the command, so only the top-level parser sets defaults. The help texts
    # state the defaults literally, because %(default)s fails on SUPPRESS.
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--collector",
        metavar="HOST:PORT",
        default=default(None),
        help=(
            f"collector address (default: ${COLLECTOR_ENV}, else {DEFAULT_COLLECTOR})"
        ),
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=default(False),
        help="connect in plaintext; required until TLS is available",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts instead of tables",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT_SECONDS),
        help=(
            f"deadline of each call, in seconds (default: {DEFAULT_TIMEOUT_SECONDS:g})"
        ),
    )
    parser.add_argument(
        "--page-size",
        type=_positive_int,
        metavar="N",
        default=default(DEFAULT_PAGE_SIZE),
        help=f"devices or findings fetched per call (default: {DEFAULT_PAGE_SIZE})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds greater than 0, got {text!r}"
        )
    return value


def _device_reference(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty; give a device id or a hostname"
        )
    return text


def collector_address(flag: str | None, environ: dict[str, str]) -> str:
    """Return the collector address: the flag, else the environment, else default.

    An empty environment variable counts as unset; an empty flag is returned
    as it is, so that the caller rejects it.
    """
    if flag is not None:
        return flag
    return environ.get(COLLECTOR_ENV) or DEFAULT_COLLECTOR


# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run fleetmend on argv (default: sys.argv[1:]) and return the exit code."""
    args = build_parser().parse_args(argv)
    address = collector_address(args.collector, dict(os.environ))
    try:
        split_host_port(address)
    except ValueError as error:
        source = "--collector" if args.collector is not None else COLLECTOR_ENV
        _print_error(f"invalid collector address in {source}: {error}")
        return 2
    if not args.insecure:
        _print_error(
            "TLS is not available yet; pass --insecure to connect in plaintext "
            "to a collector on loopback"
        )
        return 2
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ops_pb2_grpc.OpsServiceStub(channel)
            client = OpsClient(stub, address, args.timeout, args.page_size)
            _run_command(args, client)
    except AmbiguousHostnameError as error:
        _print_candidates(error.devices, as_json=args.json)
        _print_error(str(error))
        return error.exit_code
    except CliError as error:
        _print_error(str(error))
        return error.exit_code
    return 0


def _run_command(args: argparse.Namespace, client: OpsClient) -> None:
    now = _utc_now()
    if args.command == "devices":
        _print_devices(list(client.iter_devices()), as_json=args.json, now=now)
    elif args.command == "device":
        device = client.resolve_device(args.device)
        findings = list(client.iter_findings(device.device_id))
        if args.json:
            _print_json({"device": _to_dict(device), "findings": _dicts(findings)})
        else:
            print(render_device(device, findings, now), end="")
    elif args.command == "findings":
        device_id = client.resolve_device(args.device).device_id if args.device else ""
        findings = list(client.iter_findings(device_id))
        if args.json:
            _print_json({"findings": _dicts(findings)})
        else:
            print(render_findings_table(findings), end="")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _print_devices(
    devices: list[ops_pb2.Device], *, as_json: bool, now: datetime
) -> None:
    if as_json:
        _print_json({"devices": _dicts(devices)})
    else:
        print(render_devices_table(devices, now), end="")


def _print_candidates(devices: list[ops_pb2.Device], *, as_json: bool) -> None:
    # JSON goes to stderr, so that a script reading stdout never takes the
    # list of candidates for the device it asked for.
    if as_json:
        _print_json({"devices": _dicts(devices)}, file=sys.stderr)
    else:
        print(render_devices_table(devices, _utc_now()), end="")


def _print_json(value: object, file: TextIO | None = None) -> None:
    print(json.dumps(value, indent=2, sort_keys=False), file=file or sys.stdout)


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [_to_dict(message) for message in messages]


# Calls to the collector


class OpsClient:
    """OpsService calls that follow every page and translate errors to CliError."""

    def __init__(
        self,
        stub: ops_pb2_grpc.OpsServiceStub,
        address: str,
        timeout: float,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self._stub = stub
        self._address = address
        self._timeout = timeout
        self._page_size = page_size

    def iter_devices(self, hostname: str = "") -> Iterator[ops_pb2.Device]:
        """Yield every device (with this hostname, if given), following pages."""
        token = ""
        while True:
            request = ops_pb2.ListDevicesRequest(
                page_size=self._page_size, page_token=token, hostname=hostname
            )
            response = self.call("ListDevices", request)
            yield from response.devices
            token = response.next_page_token
            if not token:
                return

    def iter_findings(self, device_id: str = "") -> Iterator[ops_pb2.Finding]:
        """Yield the findings of the fleet or of one device, following pages."""
        token = ""
        while True:
            request = ops_pb2.ListFindingsRequest(
                page_size=self._page_size, page_token=token, device_id=device_id
            )
            response = self.call("ListFindings", request)
            yield from response.findings
            token = response.next_page_token
            if not token:
                return

    def get_device(self, device_id: str) -> ops_pb2.Device:
        """Return a device with every section, raising CliError for an unknown id."""
        request = ops_pb2.GetDeviceRequest(device_id=device_id)
        response = self.call("GetDevice", request)
        return response.device

    def resolve_device(self, id_or_hostname: str) -> ops_pb2.Device:
        """Return the full device with this id, or the only one with this hostname.

        Raises CliError for no match and AmbiguousHostnameError for several.
        """
        device_id = _canonical_uuid(id_or_hostname)
        if device_id:
            return self.get_device(device_id)
        matches = list(self.iter_devices(hostname=id_or_hostname))
        if not matches:
            raise CliError(
                f"unknown device {id_or_hostname!r}: no device has that id or hostname"
            )
        if len(matches) > 1:
            raise AmbiguousHostnameError(id_or_hostname, matches)
        return self.get_device(matches[0].device_id)

    def call(self, method: str, request: Message) -> Any:
        """Call an OpsService method by name, raising CliError if it fails."""
        function = getattr(self._stub, method)
        try:
            return function(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise self._translate(method, request, error) from error

    def _translate(
        self, method: str, request: Message, error: grpc.RpcError
    ) -> CliError:
        code = error.code()
        details = error.details() or "no details"
        if code == grpc.StatusCode.UNAVAILABLE and _is_resolve_failure(details):
            return CliError(
                f"cannot resolve the host of the collector at {self._address} "
                f"({details}); check the host name or use an IP address"
            )
        if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
            return CliError(
                f"cannot reach the collector at {self._address} ({details}); "
                f"set its address with --collector HOST:PORT or {COLLECTOR_ENV}"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(
                f"the collector at {self._address} did not respond to {method} within "
                f"{self._timeout:g} s; retry or raise --timeout"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            device_id = getattr(request, "device_id", "")
            return CliError(f"unknown device {device_id}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return CliError(f"the collector rejected {method}: {details}")
        return CliError(f"{method} failed: {code.name}: {details}")


def _is_connect_failure(details: str) -> bool:
    # grpc core's wording for a refused address, for example
    # "failed to connect to all addresses; last error: ... Connection refused".
    return "failed to connect" in details.lower()


def _is_resolve_failure(details: str) -> bool:
    # grpc core's wording for a host name it cannot resolve: "errors resolving
    # HOST:PORT: ..." from the EventEngine resolver, "DNS resolution failed for
    # HOST:PORT: ..." from older ones.
    lowered = details.lower()
    return "errors resolving" in lowered or "dns resolution failed" in lowered


def _canonical_uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return ""


# Rendering for people


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return rows under headers, in columns two spaces apart, one per line."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [
            max(width, len(cell)) for width, cell in zip(widths, row, strict=True)
        ]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def enum_label(enum: Any, value: int) -> str:
    """Return the lowercase enum name without its prefix, e.g. "disk_failing".

    enum is a generated enum class such as ops_pb2.Severity. A value unknown to
    this version prints as "unknown(7)".
    """
    try:
        name = enum.Name(value)
    except ValueError:
        return f"unknown({value})"
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower()


def format_time(timestamp: Timestamp) -> str:
    """Return a Timestamp as "2026-05-01 09:30 UTC", or "never" if unset."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return "never"
    moment = timestamp.ToDatetime(tzinfo=UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def format_age(timestamp: Timestamp, now: datetime) -> str:
    """Return how long ago timestamp was, e.g. "5m ago (2026-05-01 09:30 UTC)"."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return "never"
    seconds = (now - timestamp.ToDatetime(tzinfo=UTC)).total_seconds()
    return f"{format_duration(seconds)} ago ({format_time(timestamp)})"


def format_duration(seconds: float) -> str:
    """Return a span in its largest whole unit: "45s", "12m", "3h", "9d"."""
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_bytes(count: int) -> str:
    """Return a byte count in IEC units, e.g. "465.8 GiB"."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_devices_table(devices: Sequence[ops_pb2.Device], now: datetime) -> str:
    """Return the table of the devices command."""
    rows = [
        [
            device.device_id,
            device.hostname or device.host.hostname or "-",
            _os_text(device.host) or "-",
            device.agent_version or "-",
            format_age(device.last_seen_time, now),
        ]
        for device in devices
    ]
    headers = ["DEVICE ID", "HOSTNAME", "OS", "AGENT", "LAST SEEN"]
    return render_table(headers, rows)


def render_findings_table(
    findings: Sequence[ops_pb2.Finding], *, show_device: bool = True
) -> str:
    """Return the table of the findings command.

    show_device adds the device id and hostname columns. Devices may share a
    hostname, so only the id identifies each.
    """
    if not findings:
        return "No findings.\n"
    headers = ["SEVERITY", "KIND", "SUBJECT", "DETAIL"]
    if show_device:
        headers[1:1] = ["DEVICE ID", "HOSTNAME"]
    rows = []
    for finding in findings:
        row = [
            enum_label(ops_pb2.Severity, finding.severity),
            enum_label(ops_pb2.FindingKind, finding.kind),
            finding.subject or "-",
            finding.detail,
        ]
        if show_device:
            row[1:1] = [finding.device_id, finding.hostname or "-"]
        rows.append(row)
    return render_table(headers, rows)


def _os_text(host: report_pb2.HostFacts) -> str:
    return " ".join(part for part in (host.os_name, host.os_version) if part)


def render_device(
    device: ops_pb2.Device, findings: Sequence[ops_pb2.Finding], now: datetime
) -> str:
    """Return the report of the device show command."""
    parts = [
        _render_summary(device, now),
        _section("Host", device.HasField("host"), lambda: _render_host(device, now)),
        _section("Volumes", device.HasField("host"), lambda: _render_volumes(device)),
        _section("Disks", device.HasField("disks"), lambda: _render_disks(device)),
        _section(
            "Batteries", device.HasField("batteries"), lambda: _render_batteries(device)
        ),
        _section(
            "Accounts",
            device.HasField("credentials"),
            lambda: _render_accounts(device, now),
        ),
        _section("App usage", device.HasField("usage"), lambda: _render_usage(device)),
        _render_probe_errors(device),
        "Findings\n" + _indent(render_findings_table(findings, show_device=False)),
    ]
    return "\n".join(part for part in parts if part)


def _section(title: str, present: bool, render: Callable[[], str]) -> str:
    body = render() if present else "not reported yet\n"
    return f"{title}\n{_indent(body)}"


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" if line else "\n" for line in text.splitlines())


def _render_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in pairs)
    return "".join(f"{label.ljust(width)}  {value}\n" for label, value in pairs)


def _render_summary(device: ops_pb2.Device, now: datetime) -> str:
    name = device.hostname or device.host.hostname or "unknown hostname"
    pairs = [
        ("agent version", device.agent_version or "-"),
        ("first seen", format_age(device.first_seen_time, now)),
        ("last seen", format_age(device.last_seen_time, now)),
        ("last report", format_age(device.last_report_time, now)),
        ("committed sequence", str(device.committed_sequence)),
        ("dropped reports", str(device.dropped_reports)),
        ("clock", clock_text(device)),
    ]
    return f"Device {device.device_id} ({name})\n" + _indent(_render_pairs(pairs))


def clock_text(device: ops_pb2.Device) -> str:
    """Return the device's clock offset in words, with a warning if it is skewed."""
    if device.HasField("clock_offset"):
        seconds = device.clock_offset.ToTimedelta().total_seconds()
        text = format_offset(seconds)
    else:
        text = "offset unknown"
    if device.clock_skewed:
        text += " (skewed: reports are dated by their receive time)"
    return text


def format_offset(seconds: float) -> str:
    """Return a clock offset in words: "12m ahead of the collector" or "behind"."""
    if abs(seconds) < 1:
        return "within 1 s of the collector"
    direction = "ahead of" if seconds > 0 else "behind"
    return f"{format_duration(abs(seconds))} {direction} the collector"


def _render_host(device: ops_pb2.Device, now: datetime) -> str:
    host = device.host
    hardware = " ".join(part for part in (host.manufacturer, host.model) if part)
    booted = "-"
    if host.HasField("boot_time"):
        uptime = (now - host.boot_time.ToDatetime(tzinfo=UTC)).total_seconds()
        booted = f"{format_time(host.boot_time)} (up {format_duration(uptime)})"
    pairs = [
        ("hostname", host.hostname or "-"),
        ("OS", _os_text(host) or "-"),
        ("kernel", host.kernel_version or "-"),
        ("architecture", host.architecture or "-"),
        ("hardware", hardware or "-"),
        ("serial number", host.serial_number or "not readable"),
        ("memory", format_bytes(host.memory_bytes) if host.memory_bytes else "-"),
        ("booted", booted),
    ]
    return _render_pairs(pairs)


def _render_volumes(device: ops_pb2.Device) -> str:
    volumes = device.host.volumes
    if not volumes:
        return "none\n"
    rows = [
        [
            volume.mount_point,
            volume.device or "-",
            volume.filesystem or "-",
            format_bytes(volume.free_bytes),
            format_bytes(volume.total_bytes),
            _percent(volume.free_bytes, volume.total_bytes),
        ]
        for volume in volumes
    ]
    headers = ["MOUNT", "DEVICE", "FILESYSTEM", "FREE", "TOTAL", "FREE %"]
    return render_table(headers, rows)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _render_disks(device: ops_pb2.Device) -> str:
    disks = device.disks.disks
    if not disks:
        return "none\n"
    rows = [
        [
            disk.name,
            disk.model or "-",
            disk.serial_number or "-",
            enum_label(report_pb2.DiskInterface, disk.interface),
            format_bytes(disk.capacity_bytes) if disk.capacity_bytes else "-",
            _smart_text(disk),
            _disk_readings(disk),
        ]
        for disk in disks
    ]
    headers = ["NAME", "MODEL", "SERIAL", "INTERFACE", "CAPACITY", "SMART", "READINGS"]
    return render_table(headers, rows)


def _smart_text(disk: report_pb2.Disk) -> str:
    if disk.smart_state != report_pb2.SMART_STATE_AVAILABLE:
        state = enum_label(report_pb2.SmartState, disk.smart_state)
        return (
            f"{state}: {disk.smart_state_reason}" if disk.smart_state_reason else state
        )
    if disk.self_assessment == report_pb2.SELF_ASSESSMENT_UNSPECIFIED:
        return "available"
    return enum_label(report_pb2.SelfAssessment, disk.self_assessment)


def _disk_readings(disk: report_pb2.Disk) -> str:
    if disk.HasField("nvme_health"):
        health = disk.nvme_health
        readings = [
            f"used {health.percentage_used}%",
            f"spare {health.available_spare_percent}%",
            f"media errors {health.media_errors}",
            f"critical warning 0x{health.critical_warning:02x}",
            f"{health.temperature_celsius} C",
            f"{health.power_on_hours} h on",
        ]
        return ", ".join(readings)
    readings = [
        f"{attribute.id} {attribute.name}={attribute.raw_text or attribute.raw}"
        + (f" (failed {attribute.when_failed})" if attribute.when_failed else "")
        for attribute in disk.ata_attributes
        if attribute.id in KEY_ATA_ATTRIBUTES or attribute.when_failed
    ]
    return ", ".join(readings) or "-"


def _render_batteries(device: ops_pb2.Device) -> str:
    batteries = device.batteries.batteries
    if not batteries:
        return "none\n"
    rows = [
        [
            battery.name,
            " ".join(part for part in (battery.manufacturer, battery.model) if part)
            or "-",
            f"{battery.health_percent:.0f}%"
            if battery.HasField("health_percent")
            else "unknown",
            str(battery.cycle_count) if battery.HasField("cycle_count") else "unknown",
            enum_label(report_pb2.BatteryStatus, battery.status),
        ]
        for battery in batteries
    ]
    return render_table(["NAME", "MODEL", "HEALTH", "CYCLES", "STATUS"], rows)


def _render_accounts(device: ops_pb2.Device, now: datetime) -> str:
    credentials = device.credentials.credentials
    if not credentials:
        return "none\n"
    rows = [
        [
            enum_label(report_pb2.CredentialKind, credential.kind),
            credential.account or "-",
            _expiry_text(credential, now),
            credential.source or "-",
        ]
        for credential in credentials
    ]
    return render_table(["KIND", "ACCOUNT", "EXPIRES", "SOURCE"], rows)


def _expiry_text(credential: report_pb2.Credential, now: datetime) -> str:
    if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_NEVER:
        return "never"
    if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW:
        return "must change at next login"
    if credential.expiry == report_pb2.CREDENTIAL_EXPIRY_AT_TIME:
        expire = credential.expire_time
        seconds = (expire.ToDatetime(tzinfo=UTC) - now).total_seconds()
        if seconds < 0:
            return f"{format_time(expire)} (expired {format_duration(-seconds)} ago)"
        return f"{format_time(expire)} (in {format_duration(seconds)})"
    return enum_label(report_pb2.CredentialExpiry, credential.expiry)


def _render_usage(device: ops_pb2.Device) -> str:
    usage = device.usage
    if not usage.enabled:
        return "collection switched off\n"
    days = "1 day" if usage.window_days == 1 else f"{usage.window_days} days"
    if not usage.apps:
        return f"no catalogued application used in the last {days}\n"
    rows = []
    for app in usage.apps:
        total_minutes = sum(app.minutes)
        _, busiest = max(
            zip(app.minutes, app.hours_of_week, strict=True), default=(0, 0)
        )
        rows.append(
            [app.app_id, f"{total_minutes / 60:.1f}", _hour_of_week_text(busiest)]
        )
    title = f"over the last {days}\n"
    return title + render_table(["APP", "HOURS", "BUSIEST HOUR"], rows)


def _hour_of_week_text(hour_of_week: int) -> str:
    day, hour = divmod(hour_of_week, 24)
    if day >= len(DAY_NAMES):
        return f"hour {hour_of_week}"
    return f"{DAY_NAMES[day]} {hour:02d}:00"


def _render_probe_errors(device: ops_pb2.Device) -> str:
    sections: list[tuple[str, Sequence[report_pb2.ProbeError]]] = [
        ("host", device.host.errors),
        ("disks", device.disks.errors),
        ("batteries", device.batteries.errors),
        ("credentials", device.credentials.errors),
    ]
    rows = [
        [
            section,
            error.source or "-",
            enum_label(report_pb2.ProbeErrorKind, error.kind),
            error.reason,
        ]
        for section, errors in sections
        for error in errors
    ]
    if not rows:
        return ""
    headers = ["SECTION", "SOURCE", "KIND", "REASON"]
    return "Probe errors\n" + _indent(render_table(headers, rows))
