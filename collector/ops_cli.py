"""``fleetmend``: the operators' CLI, a client of the collector's OpsService.

Every call carries the operator token read from ``--token-file`` (or
``$FLEETMEND_TOKEN_FILE``) as ``authorization: Bearer <token>``. The channel is
TLS, verified against ``--ca-file`` (the collector's ca.pem); ``--insecure``
connects in plaintext and is allowed to loopback addresses only.

Tables are for people. ``--json`` prints JSON objects for scripts, with the
messages in the protobuf JSON mapping and field names as in the .proto files:
``devices`` prints {"devices": [Device]}, ``device show`` prints
{"device": Device, "findings": [Finding]}, ``findings`` prints
{"findings": [Finding]}, ``audit`` prints {"events": [AuditEvent]},
``token list`` prints {"tokens": [OperatorToken]}, ``outage declare`` prints
{"outage": Outage} and ``outage list`` prints {"outages": [Outage]}.
``device revoke`` prints {"device_id", "revoked_keys", "stream_closed"} and
``token revoke`` prints {"name", "revoked"}.

For self-healing, ``policy set`` prints {"version", "rules"} (the number of
rules), ``policy show`` prints {"policy": Policy}, null before the first
``policy set``, ``rules`` prints {"rules": [RuleState], "rejecting_devices",
"rejected_reason_example"} as in ListRulesResponse, ``rules promote``,
``pause`` and ``resume`` print {"rule": RuleState, "changed"}, ``act`` prints
{"commands": [CommandStatus]} and ``remediations`` prints
{"remediations": [StoredRemediation], "summaries": [RuleSummary]}.
"""

from __future__ import annotations

import os

# grpc core reads GRPC_VERBOSITY when it is imported. At its default it prints
# INFO lines about failed TLS handshakes on stderr, which would break the
# CLI's one-line errors, so the CLI shows ERROR and above unless the user sets
# the variable. This runs before the imports below, because
# collector._ops_transport imports grpc, and so does
# collector._ops_cli_healing through it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # noqa: E402

from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from collector import __version__  # noqa: E402
from collector._ops_cli_healing import (  # noqa: E402
    _add_act_parser,
    _add_policy_parser,
    _add_remediations_parser,
    _add_rules_parser,
    _run_act_command,
    _run_policy_command,
    _run_remediations_command,
    _run_rules_command,
    add_command,
    add_command_group,
    add_command_options,
)
from collector._ops_render import (  # noqa: E402
    escape_controls,
    print_json,
    render_audit_table,
    render_device,
    render_device_revoked,
    render_devices_table,
    render_findings_table,
    render_outage,
    render_outages_table,
    render_tokens_table,
    to_dict,
    to_dicts,
)
from collector._ops_transport import (  # noqa: E402
    PROG,
    AmbiguousHostnameError,
    CliError,
    OpsClient,
    _add_global_options,
    _device_reference,
    _positive_int,
    _utc_now,
    canonical_uuid,
    open_channel,
    redact_secrets,
    resolve_connection,
    transport_diagnosis,
)
from fleetmend.v1 import ops_pb2, ops_pb2_grpc  # noqa: E402

DEFAULT_AUDIT_LIMIT = 50
# Options that take a span, a time or seconds, whose value can start with "-"
# and a digit, such as --ttl -1h. argparse takes such a value for an option
# and fails with "expected one argument" before the option's type function
# can name the value, so _attach_dash_values rewrites it as --ttl=-1h.
DASH_VALUE_OPTIONS = frozenset({"--ttl", "--since", "--from", "--to", "--timeout"})
_DASH_DIGIT = re.compile(r"-\d")


# Argument parsing


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of fleetmend.

    The global options are accepted before and after the command.
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Query the Fleetmend collector and act on the fleet."
    )
    parser.add_argument("--version", action="version", version=__version__)
    _add_global_options(parser, defaults=True)
    commands = add_command_group(parser, "command")

    devices = add_command(
        commands,
        "devices",
        "list every device",
        "List every device that the collector knows, with its hostname, OS, "
        "agent version and when it was last seen.",
    )
    add_command_options(devices, lists=True)

    _add_device_parser(commands)

    findings = add_command(
        commands,
        "findings",
        "list findings of the fleet",
        "List the findings of the fleet, or of one device, with their "
        "severity: failing or worn disks, worn batteries, expired or expiring "
        "passwords, and devices that went silent.",
    )
    add_command_options(findings, lists=True)
    findings.add_argument(
        "--device",
        type=_device_reference,
        metavar="ID-OR-HOSTNAME",
        help="only the findings of this device",
    )

    audit = add_command(
        commands,
        "audit",
        "list the audit log, newest first (admin)",
        "List the audit log of operator calls, newest first: who called what, "
        "with which arguments, and the outcome.",
    )
    add_command_options(audit, lists=True)
    audit.add_argument(
        "--actor", default="", metavar="NAME", help="only events of this token name"
    )
    audit.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_AUDIT_LIMIT,
        metavar="N",
        help=f"maximum number of events to list (default: {DEFAULT_AUDIT_LIMIT})",
    )

    _add_token_parser(commands)
    _add_outage_parser(commands)
    _add_policy_parser(commands)
    _add_rules_parser(commands)
    _add_act_parser(commands)
    _add_remediations_parser(commands)
    return parser


def _add_device_parser(commands: Any) -> None:
    device = add_command(commands, "device", "show or revoke one device")
    device_commands = add_command_group(device, "device_command")
    show = add_command(
        device_commands,
        "show",
        "show a device's readings and findings",
        "Show a device's latest readings (host, volumes, disks, batteries, "
        "accounts, app usage), its probe errors, its policy status and its "
        "findings.",
    )
    add_command_options(show, lists=True)
    show.add_argument(
        "device",
        type=_device_reference,
        metavar="ID-OR-HOSTNAME",
        help="device id or hostname",
    )
    revoke = add_command(
        device_commands,
        "revoke",
        "revoke a device's node keys and end its stream (admin)",
        "Revoke every node key of a device and end its open stream. The "
        "device is rejected until it enrolls again.",
    )
    add_command_options(revoke, lists=False)
    revoke.add_argument(
        "device_id",
        type=_device_id,
        metavar="ID",
        help="device id, as `fleetmend devices` lists it",
    )


def _add_token_parser(commands: Any) -> None:
    token = add_command(commands, "token", "list or revoke operator tokens (admin)")
    token_commands = add_command_group(token, "token_command")
    listing = add_command(
        token_commands,
        "list",
        "list operator tokens, without their secrets",
        "List the operator tokens with their role and when each was created, "
        "last used and revoked. The secrets are stored hashed and never shown.",
    )
    add_command_options(listing, lists=False)
    revoke = add_command(
        token_commands,
        "revoke",
        "revoke an operator token; calls with it fail from then on",
    )
    add_command_options(revoke, lists=False)
    revoke.add_argument(
        "name",
        type=_token_name,
        metavar="NAME",
        help="token name, as `fleetmend token list` lists it",
    )


def _add_outage_parser(commands: Any) -> None:
    outage = add_command(commands, "outage", "declare or list outages")
    outage_commands = add_command_group(outage, "outage_command")
    declare = add_command(
        outage_commands,
        "declare",
        "declare that an application is down for a span of time (operator)",
        (
            "Declare that a catalogued application is unavailable from --from to "
            "--to, and list the devices whose users usually use it then. The "
            "collector has no catalog of its own and accepts any id of 1 to 64 "
            "of a-z, 0-9, '_' and '-'; a device matches only if its agent's "
            "catalog has an app with that id."
        ),
    )
    add_command_options(declare, lists=False)
    declare.add_argument(
        "app_id",
        type=_app_id,
        metavar="APP",
        help=(
            'app id in the agents\' catalog, such as "sap-gui" in the built-in '
            "catalog; an id that no agent uses matches no device"
        ),
    )
    declare.add_argument(
        "--from",
        dest="start",
        required=True,
        type=_local_time,
        metavar="TIME",
        help=(
            "start, as ISO 8601 such as 2026-05-04T09:00; without an offset it is "
            "a time in --time-zone"
        ),
    )
    declare.add_argument(
        "--to",
        dest="end",
        required=True,
        type=_local_time,
        metavar="TIME",
        help="end, in the same format as --from",
    )
    declare.add_argument(
        "--time-zone",
        type=_time_zone,
        default="",
        metavar="TZ",
        help=(
            "IANA time zone, such as Europe/Berlin, of times without an offset and "
            "of the devices' hours of use (default: UTC)"
        ),
    )
    declare.add_argument(
        "--message",
        default="",
        metavar="TEXT",
        help="text shown to users, such as 'SAP is down until 15:00'",
    )
    listing = add_command(
        outage_commands,
        "list",
        "list outages that have not ended yet",
        "List the declared outages that have not ended yet, with the number of "
        "devices whose users usually use the application then.",
    )
    add_command_options(listing, lists=False)


def _device_id(text: str) -> str:
    device_id = canonical_uuid(text.strip())
    if not device_id:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device id; give an id as `fleetmend devices` lists it"
        )
    return device_id


def _token_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty; give a name as `fleetmend token list` lists it"
        )
    return text


def _app_id(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; give a catalog id")
    return text


def _local_time(text: str) -> datetime:
    """Parse an ISO 8601 time; a naive result is later placed in --time-zone."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}; give ISO 8601 such as 2026-05-04T09:00 or "
            "2026-05-04T09:00+02:00"
        ) from None


def _time_zone(text: str) -> str:
    if not text:
        return ""
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise argparse.ArgumentTypeError(
            f"unknown time zone {text!r}; give an IANA name such as Europe/Berlin"
        ) from None
    return text


def _attach_dash_values(argv: Sequence[str]) -> list[str]:
    """Rewrite "--ttl -1h" in argv as "--ttl=-1h", for DASH_VALUE_OPTIONS only.

    Only a value that starts with "-" and a digit is attached, and nothing
    after "--", which ends the options. The option's type function then
    rejects the value with its own message, as it does for --ttl=-1h.
    """
    # NOTE: an abbreviated option, such as --tt -1h, is not rewritten, so
    # argparse still reports "expected one argument" for it.
    rewritten: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--":
            rewritten.extend(argv[index:])
            break
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if argument in DASH_VALUE_OPTIONS and _DASH_DIGIT.match(following):
            rewritten.append(f"{argument}={following}")
            index += 2
            continue
        rewritten.append(argument)
        index += 1
    return rewritten


# Entry point


# Exit status of a command whose standard output was closed early, as a shell
# reports a process ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run fleetmend on argv (default: sys.argv[1:]) and return the exit code.

    Returns EXIT_BROKEN_PIPE without a traceback when the reader of standard
    output, such as head, closes it early.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's flush at exit
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_attach_dash_values(arguments))
    try:
        connection = resolve_connection(args, os.environ)
    except CliError as error:
        _print_error(str(error))
        return error.exit_code
    try:
        with open_channel(connection) as channel:
            client = OpsClient(
                ops_pb2_grpc.OpsServiceStub(channel),
                connection.address,
                args.timeout,
                args.page_size,
                metadata=connection.metadata,
                diagnose=transport_diagnosis(connection, args.timeout),
            )
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
    elif args.command == "device" and args.device_command == "revoke":
        _revoke_device(args, client)
    elif args.command == "device":
        device = client.resolve_device(args.device)
        findings = list(client.iter_findings(device.device_id))
        if args.json:
            print_json({"device": to_dict(device), "findings": to_dicts(findings)})
        else:
            policy = client.call("GetPolicy", ops_pb2.GetPolicyRequest())
            print(render_device(device, findings, now, policy), end="")
    elif args.command == "findings":
        device_id = client.resolve_device(args.device).device_id if args.device else ""
        findings = list(client.iter_findings(device_id))
        if args.json:
            print_json({"findings": to_dicts(findings)})
        else:
            print(render_findings_table(findings), end="")
    elif args.command == "audit":
        events = list(client.iter_audit_events(args.actor, args.limit))
        if args.json:
            print_json({"events": to_dicts(events)})
        else:
            print(render_audit_table(events), end="")
    elif args.command == "token":
        _run_token_command(args, client)
    elif args.command == "outage":
        _run_outage_command(args, client, now)
    elif args.command == "policy":
        _run_policy_command(args, client)
    elif args.command == "rules":
        _run_rules_command(args, client)
    elif args.command == "act":
        _run_act_command(args, client)
    elif args.command == "remediations":
        _run_remediations_command(args, client)


def _revoke_device(args: argparse.Namespace, client: OpsClient) -> None:
    request = ops_pb2.RevokeDeviceRequest(device_id=args.device_id)
    response = client.call("RevokeDevice", request)
    if args.json:
        print_json(
            {
                "device_id": args.device_id,
                "revoked_keys": response.revoked_keys,
                "stream_closed": response.stream_closed,
            }
        )
        return
    print(render_device_revoked(args.device_id, response), end="")


def _run_token_command(args: argparse.Namespace, client: OpsClient) -> None:
    if args.token_command == "list":  # noqa: S105 - a subcommand name
        response = client.call("ListTokens", ops_pb2.ListTokensRequest())
        if args.json:
            print_json({"tokens": to_dicts(response.tokens)})
        else:
            print(render_tokens_table(response.tokens), end="")
        return
    request = ops_pb2.RevokeTokenRequest(name=args.name)
    revoked = client.call("RevokeToken", request).revoked
    if args.json:
        print_json({"name": args.name, "revoked": revoked})
    elif revoked:
        name = escape_controls(args.name)
        print(f"Revoked token {name}; calls with it are rejected from now on.")
    else:
        print(f"Token {escape_controls(args.name)} was revoked already.")


def _run_outage_command(
    args: argparse.Namespace, client: OpsClient, now: datetime
) -> None:
    if args.outage_command == "list":
        request = ops_pb2.ListOutagesRequest(end_after_time=_timestamp(now))
        outages = client.call("ListOutages", request).outages
        if args.json:
            print_json({"outages": to_dicts(outages)})
        else:
            print(render_outages_table(outages), end="")
        return
    zone = ZoneInfo(args.time_zone or "UTC")
    declare = ops_pb2.DeclareOutageRequest(
        app_id=args.app_id,
        start_time=_timestamp(_in_zone(args.start, zone)),
        end_time=_timestamp(_in_zone(args.end, zone)),
        time_zone=args.time_zone,
        message=args.message,
    )
    outage = client.call("DeclareOutage", declare).outage
    if args.json:
        print_json({"outage": to_dict(outage)})
    else:
        print(render_outage(outage), end="")


def _in_zone(moment: datetime, zone: ZoneInfo) -> datetime:
    # NOTE: a naive time in a daylight saving gap (such as 02:30 on the night
    # clocks go forward) is taken with the offset before the gap, as zoneinfo
    # does for fold=0.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _print_error(message: str) -> None:
    # The message can contain status details from the collector, so it is
    # printed with its control characters escaped, on one line.
    text = escape_controls(redact_secrets(message))
    print(f"{PROG}: error: {text}", file=sys.stderr)


def _print_devices(
    devices: list[ops_pb2.Device], *, as_json: bool, now: datetime
) -> None:
    if as_json:
        print_json({"devices": to_dicts(devices)})
    else:
        print(render_devices_table(devices, now), end="")


def _print_candidates(devices: list[ops_pb2.Device], *, as_json: bool) -> None:
    # JSON goes to stderr, so that a script reading stdout never takes the
    # list of candidates for the device it asked for.
    if as_json:
        print_json({"devices": to_dicts(devices)}, file=sys.stderr)
    else:
        print(render_devices_table(devices, _utc_now()), end="")
