"""The self-healing commands of ``fleetmend``: policy, rules, act, remediations.

Parses their arguments, builds their requests and prints their results.
collector.ops_cli adds these commands to its parser and runs them; it sets
GRPC_VERBOSITY before it imports this module, which imports grpc.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from collector._ops_render import (
    DURATION_TYPE,
    NO_FLEET_POLICY_TEXT,
    enum_label,
    print_json,
    render_commands,
    render_policy_toml,
    render_remediations,
    render_rule_state,
    render_rules_table,
    to_dict,
    to_dicts,
)
from collector._ops_transport import (
    CliError,
    OpsClient,
    _add_global_options,
    _device_reference,
    _positive_int,
    _utc_now,
)
from fleetmend.v1 import ops_pb2, remediation_pb2

DEFAULT_REMEDIATIONS_LIMIT = 50
# Width of the help text that the CLI wraps itself, as argparse's default for
# an 80-column terminal.
HELP_WIDTH = 78
# The collector's default time to live of a command and its range, as ops.proto
# states them.
DEFAULT_COMMAND_TTL = timedelta(hours=24)
MIN_COMMAND_TTL = timedelta(minutes=1)
MAX_COMMAND_TTL = timedelta(days=7)


def add_command(
    commands: Any, name: str, summary: str, description: str = ""
) -> argparse.ArgumentParser:
    """Add the subcommand name to commands, the result of add_subparsers.

    summary is its line in the parent's --help. Its own --help shows
    description, or else summary as a sentence.
    """
    text = description or f"{summary[0].upper()}{summary[1:]}."
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=text
    )
    return parser


def add_command_options(parser: argparse.ArgumentParser, *, lists: bool) -> None:
    """Add the global options to a subcommand's parser.

    Only commands that fetch pages (lists is true) take --page-size after
    the command. Before the command, the top-level parser takes it for all.
    """
    _add_global_options(parser, defaults=False)
    if lists:
        return
    # NOTE: _add_global_options adds --page-size to every parser, so it is
    # taken out again here, through argparse's private lists of actions.
    for action in list(parser._actions):
        if action.dest != "page_size":
            continue
        parser._remove_action(action)
        for option in action.option_strings:
            del parser._option_string_actions[option]
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)


def add_command_group(parser: argparse.ArgumentParser, dest: str) -> Any:
    """Add the subcommands' group to parser, named COMMAND in its --help."""
    return parser.add_subparsers(
        dest=dest,
        required=True,
        metavar="COMMAND",
        help="one of the commands below; add --help after one for its options",
    )


def _add_policy_parser(commands: Any) -> None:
    policy = add_command(commands, "policy", "set or show the fleet's policy")
    policy_commands = add_command_group(policy, "policy_command")
    setter = add_command(
        policy_commands,
        "set",
        "replace the fleet's policy with a TOML file (admin)",
        (
            "Replace the fleet's self-healing policy with the rules in a TOML "
            "file whose keys are the field names of fleetmend.v1.Policy, as in "
            "the agent's default_policy.toml. Durations take a span such as "
            '"90s", "10m", "1h" or "2d". The collector assigns the next version '
            "and sends the policy to every connected agent. A file without "
            "rules is rejected unless --allow-empty is given, because agents "
            "given an empty policy run no rules, not even their built-in ones."
        ),
    )
    add_command_options(setter, lists=False)
    setter.add_argument(
        "file",
        type=Path,
        metavar="FILE.toml",
        help="TOML file with the policy's [[rules]] tables",
    )
    setter.add_argument(
        "--allow-empty",
        action="store_true",
        help=(
            "set a policy without rules; agents then run no rules at all, not "
            "even their built-in default rules"
        ),
    )
    show = add_command(
        policy_commands,
        "show",
        "print the fleet's current policy as TOML",
        "Print the fleet's current policy as TOML that `fleetmend policy set` "
        "reads back, or say that no fleet policy is set.",
    )
    add_command_options(show, lists=False)


def _add_rules_parser(commands: Any) -> None:
    rules = add_command(
        commands,
        "rules",
        "list the policy's rules with their fleet state, or change a state",
        "Without a command, list each rule of the current fleet policy with its "
        "stage (active, canary or paused, and why, and whether it is a dry run), "
        "its runs across the fleet and its runs today against the daily budget.",
    )
    add_command_options(rules, lists=False)
    rule_commands = rules.add_subparsers(
        dest="rules_command",
        metavar="COMMAND",
        help="optional: one of the commands below, which change a rule's state",
    )
    helps = {
        "promote": "give a canary rule to the whole fleet (operator)",
        "pause": "pause a rule on every device (operator)",
        "resume": "resume a paused rule (operator)",
    }
    for name, help_text in helps.items():
        change = add_command(rule_commands, name, help_text)
        add_command_options(change, lists=False)
        change.add_argument(
            "name", metavar="NAME", help="rule name, as `fleetmend rules` lists it"
        )
        change.add_argument(
            "--reason",
            default="",
            metavar="TEXT",
            help="why, shown in the rule's REASON column; at most 500 characters",
        )


def _add_act_parser(commands: Any) -> None:
    act = add_command(
        commands,
        "act",
        "ask devices to run an allowlisted action now (operator)",
        "Ask devices to run one of the agent's actions now. Each agent checks "
        "the request against its local policy and allowlist, and reports "
        "what it did, which `fleetmend remediations --rule command` lists. A "
        "device that does not connect within the time to live never runs the "
        "command.",
    )
    # The raw formatter keeps the epilog's one line per action, so the
    # description is wrapped here.
    act.formatter_class = argparse.RawDescriptionHelpFormatter
    act.description = textwrap.fill(act.description or "", HELP_WIDTH)
    act.epilog = action_parameters_help()
    add_command_options(act, lists=False)
    act.add_argument(
        "action",
        metavar="ACTION",
        help="action name: " + ", ".join(action_names()),
    )
    act.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "a field of the action's message; repeated fields take a comma list "
            "and durations a span such as 30s, 10m or 1h"
        ),
    )
    targets = act.add_mutually_exclusive_group(required=True)
    # One value per --device, so that the option cannot take ACTION as a
    # device when it comes first, as in `act --device vm notify`.
    targets.add_argument(
        "--device",
        dest="devices",
        action="append",
        type=_device_reference,
        metavar="ID-OR-HOSTNAME",
        help="device to run the action on; repeat for each device",
    )
    targets.add_argument(
        "--all",
        dest="all_devices",
        action="store_true",
        help="every device that is not revoked",
    )
    act.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_COMMAND_TTL,
        metavar="SPAN",
        help=(
            "time to live, such as 30m or 2d, from 1 minute to 7 days (default: 24h)"
        ),
    )


def _add_remediations_parser(commands: Any) -> None:
    remediations = add_command(
        commands,
        "remediations",
        "list remediation records, newest first, with a summary per rule",
        "List what the agents' rules and the operators' commands did, or why "
        "they did not act, newest first, then a summary per rule over every "
        "record that matches the filters. The records of operator commands "
        'are listed and summarized under the rule "command".',
    )
    add_command_options(remediations, lists=True)
    remediations.add_argument(
        "--device",
        type=_device_reference,
        metavar="ID-OR-HOSTNAME",
        help="only the records of this device",
    )
    remediations.add_argument(
        "--rule",
        default="",
        metavar="NAME",
        help='only the records of this rule; "command" lists those of operator '
        "commands (`fleetmend act`)",
    )
    remediations.add_argument(
        "--outcome",
        type=_outcome,
        default=0,
        metavar="NAME",
        help="only records with this outcome: " + ", ".join(outcome_names()),
    )
    remediations.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="TIME",
        help=(
            "only records that started at or after TIME: ISO 8601 such as "
            "2026-05-04T09:00 (UTC without an offset), or a span before now "
            "such as 24h or 7d"
        ),
    )
    remediations.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_REMEDIATIONS_LIMIT,
        metavar="N",
        help=(
            f"maximum number of records to list (default: {DEFAULT_REMEDIATIONS_LIMIT})"
        ),
    )


def _span(text: str) -> timedelta:
    try:
        return parse_span(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ttl(text: str) -> timedelta:
    # argparse prefixes these messages with "argument --ttl:".
    span = _span(text)
    if not MIN_COMMAND_TTL <= span <= MAX_COMMAND_TTL:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside 1 minute to 7 days; give a span such as 30m, "
            "24h or 7d"
        )
    return span


def _outcome(text: str) -> int:
    try:
        return parse_outcome(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _since(text: str) -> datetime:
    stripped = text.strip()
    if SPAN_PATTERN.fullmatch(stripped):
        try:
            return _utc_now() - parse_span(stripped)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        except OverflowError:
            raise argparse.ArgumentTypeError(
                f"span {text!r} reaches back before the year 1; give a shorter span"
            ) from None
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}; give ISO 8601 such as 2026-05-04T09:00, or a "
            "span before now such as 24h or 7d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# Self-healing input: policy files, action parameters, spans

# Largest policy file that `policy set` reads. 200 rules, the agents' maximum,
# take well under this, and the collector's default message limit is 4 MiB.
MAX_POLICY_FILE_BYTES = 1024 * 1024


def load_policy_file(path: Path, allow_empty: bool = False) -> remediation_pb2.Policy:
    """Read a policy TOML file into a Policy; raise CliError (exit 2).

    Duration fields take a span such as 90s, 10m, 1h or 2d. The message of an
    error names the file, the rule and the field that is wrong. A policy
    without rules is rejected unless allow_empty is true.
    """
    try:
        with path.open("rb") as file:
            # Reading one byte more than the limit distinguishes a file at the
            # limit from a larger one, and stops early in an endless file such
            # as /dev/zero.
            raw = file.read(MAX_POLICY_FILE_BYTES + 1)
    except OSError as error:
        raise CliError(
            f"cannot read the policy file {path}: {error.strerror or error}", 2
        ) from None
    if len(raw) > MAX_POLICY_FILE_BYTES:
        raise CliError(
            f"the policy file {path} is larger than {MAX_POLICY_FILE_BYTES} bytes; "
            "a policy has at most 200 rules, so give it fewer or shorter rules",
            2,
        )
    try:
        # utf-8-sig drops the byte order mark that some Windows editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CliError(
            f"the policy file {path} is not UTF-8 text (invalid byte at offset "
            f"{error.start}); save it as UTF-8",
            2,
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CliError(
            f"the policy file {path} is not valid TOML: {error}", 2
        ) from None
    try:
        checked = _check_fields(data, remediation_pb2.Policy.DESCRIPTOR, "")
        policy = json_format.ParseDict(checked, remediation_pb2.Policy())
    except ValueError as error:
        message = _name_rule(str(error), data)
        raise CliError(f"invalid policy file {path}: {message}", 2) from None
    except json_format.ParseError as error:
        message = _name_rule(_parse_error_text(error), data)
        raise CliError(f"invalid policy file {path}: {message}", 2) from None
    if not policy.rules and not allow_empty:
        raise CliError(
            f"the policy file {path} has no rules, so agents given it would run "
            "no rules at all, not even their built-in ones. Add [[rules]] tables, "
            "or pass --allow-empty to set it anyway",
            2,
        )
    return policy


def _name_rule(message: str, data: object) -> str:
    """Add the rule's name to a message that starts with a path such as rules[2]."""
    match = re.match(r"rules\[(\d+)\]", message)
    if match is None or not isinstance(data, dict):
        return message
    rules = data.get("rules")
    index = int(match.group(1))
    if not isinstance(rules, list) or index >= len(rules):
        return message
    rule = rules[index]
    name = rule.get("name") if isinstance(rule, dict) else None
    if not isinstance(name, str) or not name:
        return message
    return f"rule {name!r}: {message}"


def _check_fields(value: object, descriptor: Descriptor, where: str) -> dict[str, Any]:
    """Check value's keys and values against a message type, field by field.

    Returns a copy of value with the spans of Duration fields converted to the
    seconds form that json_format parses, such as "3600s" for "1h". Raises
    ValueError naming the field's path, such as rules[0].fleet.canary_percent,
    so that a mistake deep in a policy file is found without reading
    json_format's nested messages.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{where or 'the file'} must be a table, not {value!r}")
    fields = {field.name: field for field in descriptor.fields}
    fields.update({field.json_name: field for field in descriptor.fields})
    checked: dict[str, Any] = {}
    oneof_fields: dict[str, str] = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            choices = ", ".join(field.name for field in descriptor.fields)
            raise ValueError(
                f"unknown field {key!r} in {where or 'the policy'}; valid fields: "
                f"{choices}"
            )
        path = f"{where}.{key}" if where else key
        oneof = field.containing_oneof
        if oneof is not None:
            other = oneof_fields.get(oneof.name)
            if other is not None:
                raise ValueError(
                    f"{where or 'the policy'} sets both {other} and {field.name}, "
                    f"but {descriptor.name} takes only one of "
                    f"{', '.join(choice.name for choice in oneof.fields)}; "
                    f"give one per {descriptor.name.lower()}, or write another rule"
                )
            oneof_fields[oneof.name] = field.name
        if field.is_repeated:
            if not isinstance(item, list):
                raise ValueError(f"{path} must be an array, not {item!r}")
            checked[key] = [
                _check_field_value(descriptor, field, element, f"{path}[{index}]")
                for index, element in enumerate(item)
            ]
        else:
            checked[key] = _check_field_value(descriptor, field, item, path)
    return checked


def _check_field_value(
    container: Descriptor, field: FieldDescriptor, value: object, path: str
) -> object:
    message_type = field.message_type
    if message_type is not None and message_type.full_name == DURATION_TYPE:
        return _duration_json(value, path)
    if message_type is not None and not _is_well_known(message_type):
        return _check_fields(value, message_type, path)
    # A scalar or another well-known type: let json_format parse the value
    # alone, so its error names this field.
    item = [value] if field.is_repeated else value
    try:
        json_format.ParseDict(
            {field.name: item}, message_factory.GetMessageClass(container)()
        )
    except (json_format.ParseError, OverflowError) as error:
        # json_format (protobuf 7.36) lets OverflowError through for an
        # integer too large for a double, such as a TOML integer of 400 digits.
        raise ValueError(f"{path}: {_parse_error_text(error, field, value)}") from None
    return value


def _duration_json(value: object, path: str) -> str:
    """Return a span such as "1h" or "1h30m" as a Duration's JSON, "5400s".

    A value that is no span but valid Duration JSON, such as "-60s", is
    returned unchanged for the collector to check.
    """
    text = value.strip() if isinstance(value, str) else ""
    if SPAN_PATTERN.fullmatch(text):
        try:
            span = parse_span(text)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        duration = Duration()
        duration.FromTimedelta(span)
        return duration.ToJsonString()
    try:
        Duration().FromJsonString(text)
    except ValueError:
        raise ValueError(
            f"{path}: invalid span {value!r}; give a quoted number with a unit of "
            's, m, h or d, such as "90s", "10m", "1h", "2d" or "1h30m"'
        ) from None
    return text


def _is_well_known(message_type: Descriptor) -> bool:
    return message_type.full_name.startswith("google.protobuf.")


def _parse_error_text(
    error: Exception, field: FieldDescriptor | None = None, value: object = None
) -> str:
    """Return json_format's error as one line, without its field path.

    Given the field and the value that json_format rejected, the text also
    names what the field takes, such as a whole number from 0 to 4294967295 for
    a uint32, and how to write it. json_format's own text, such as "Couldn't
    parse float: ten percent", gives neither.
    """
    text = " ".join(str(error).split())
    text = re.sub(r"^(Failed to parse \w+ field: )+", "", text)
    text = re.sub(r"\s+at \S+$", "", text).rstrip(".")
    if field is None or field.message_type is not None:
        return text
    # The value as TOML writes it: booleans in lower case, dates as ISO 8601.
    if isinstance(value, bool):
        value_text = str(value).lower()
    elif isinstance(value, str):
        value_text = repr(value)
    else:
        value_text = str(value)
    if field.type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[field.type]
        expected = f"give a whole number from {low} to {high}"
        # json_format's text, such as "Value out of range: -1", names the value.
        if text.startswith("Value out of range"):
            return f"{text}; {expected}"
        return f"invalid whole number {value_text}; {expected}"
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        expected = "give a number such as 0.25"
        # json_format rejects TOML's inf and nan, and integers beyond a double.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{value_text} is not a finite number; {expected}"
        return f"invalid number {value_text}; {expected}"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return f"invalid boolean {value_text}; give true or false without quotes"
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"invalid string {value_text}; give the text in double quotes"
    return text


def action_names() -> list[str]:
    """Return the names of the actions, the fields of Action's "kind" oneof."""
    oneof = remediation_pb2.Action.DESCRIPTOR.oneofs_by_name["kind"]
    return [field.name for field in oneof.fields]


def outcome_names() -> list[str]:
    """Return the RemediationOutcome labels that --outcome takes."""
    return [
        enum_label(remediation_pb2.RemediationOutcome, value)
        for value in remediation_pb2.RemediationOutcome.values()
        if value != remediation_pb2.REMEDIATION_OUTCOME_UNSPECIFIED
    ]


def parse_outcome(text: str) -> int:
    """Return the RemediationOutcome value of a label such as "failed"."""
    label = text.strip().lower()
    for value in remediation_pb2.RemediationOutcome.values():
        if value and enum_label(remediation_pb2.RemediationOutcome, value) == label:
            return value
    raise ValueError(
        f"unknown outcome {text!r}; choose one of {', '.join(outcome_names())}"
    )


# Parameters without which every agent refuses an action, whatever its local
# allowlist, because the agents' validate functions reject them empty. The
# collector's SendCommand checks them too (collector._ops_healing).
REQUIRED_ACTION_PARAMETERS = {
    "clear_cache": ("cache_sets",),
    "restart_service": ("service",),
    "throttle_process": ("app_id",),
    "notify": ("title",),
    "prompt_password_change": ("self_service_url",),
}


def check_required_parameters(action: remediation_pb2.Action) -> None:
    """Raise ValueError naming the required parameters that action leaves empty.

    A blank string counts as empty. Checks that need an agent's allowlist,
    such as whether a service may be restarted, are left to the agent.
    """
    name = action.WhichOneof("kind")
    if name is None:
        return
    params = getattr(action, name)
    missing = []
    for field_name in REQUIRED_ACTION_PARAMETERS.get(name, ()):
        value = getattr(params, field_name)
        if isinstance(value, str):
            empty = not value.strip()
        else:
            empty = not any(str(item).strip() for item in value)
        if empty:
            missing.append(field_name)
    if missing:
        options = " ".join(f"--param {field}=VALUE" for field in missing)
        pronoun = "it" if len(missing) == 1 else "them"
        raise ValueError(
            f"{name} needs {', '.join(missing)}, which every agent refuses "
            f"empty; set {pronoun}, for example with "
            f"`fleetmend act {name} {options}`"
        )


def build_action(name: str, params: Sequence[str]) -> remediation_pb2.Action:
    """Return the Action named name, its fields set from KEY=VALUE params.

    Values are converted by their field's type: numbers, booleans, strings,
    comma lists for repeated fields and spans such as 30s for durations.
    Raises CliError (exit 2) naming an unknown action or field and the valid ones.
    """
    if name not in action_names():
        raise CliError(
            f"unknown action {name!r}; choose one of {', '.join(action_names())}", 2
        )
    action = remediation_pb2.Action()
    message = getattr(action, name)
    message.SetInParent()
    seen_keys: set[str] = set()
    for param in params:
        key, separator, text = param.partition("=")
        key = key.strip()
        field = message.DESCRIPTOR.fields_by_name.get(key)
        if not separator or not key:
            raise CliError(
                f"invalid --param {param!r}; give KEY=VALUE, such as "
                f"{_example_param(message.DESCRIPTOR)}",
                2,
            )
        if field is None:
            choices = ", ".join(field.name for field in message.DESCRIPTOR.fields)
            raise CliError(
                f"unknown parameter {key!r} of {name}; valid parameters: {choices}", 2
            )
        if key in seen_keys:
            raise CliError(f"--param {key} is given twice; give it once", 2)
        seen_keys.add(key)
        try:
            _set_param(message, field, text)
        except ValueError as error:
            raise CliError(f"invalid --param {key}={text!r}: {error}", 2) from None
    try:
        check_required_parameters(action)
    except ValueError as error:
        raise CliError(str(error), 2) from None
    return action


def action_parameters_help() -> str:
    """Return the act command's list of each action's parameters and their types."""
    lines = [
        "parameters of each action for --param KEY=VALUE, * marking required ones:"
    ]
    oneof = remediation_pb2.Action.DESCRIPTOR.oneofs_by_name["kind"]
    for action_field in oneof.fields:
        required = REQUIRED_ACTION_PARAMETERS.get(action_field.name, ())
        params_type = action_field.message_type
        assert params_type is not None, "every field of Action.kind is a message"
        params = [
            f"{field.name}{'*' if field.name in required else ''} "
            f"({_param_type_text(field)})"
            for field in params_type.fields
        ]
        lines.append(
            textwrap.fill(
                f"{action_field.name}: {', '.join(params)}",
                HELP_WIDTH,
                initial_indent="  ",
                subsequent_indent="    ",
            )
        )
    note = (
        "Each agent checks the values against its allowlist, such as the "
        "services and cache sets that it permits."
    )
    lines.append(textwrap.fill(note, HELP_WIDTH))
    return "\n".join(lines)


def _param_type_text(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        if field.message_type.full_name == DURATION_TYPE:
            return "span"
        return "not settable"
    if field.type == FieldDescriptor.TYPE_STRING:
        kind = "text"
    elif field.type == FieldDescriptor.TYPE_BOOL:
        kind = "true or false"
    elif field.type in _INTEGER_RANGES:
        kind = "whole number"
    else:
        kind = "number"
    return f"comma list of {kind}" if field.is_repeated else kind


def _example_param(descriptor: Descriptor) -> str:
    field = descriptor.fields[0]
    return f"{field.name}=VALUE"


def _set_param(message: Message, field: FieldDescriptor, text: str) -> None:
    if field.is_repeated:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if field.message_type is not None:
            raise ValueError(f"{field.name} cannot be set with --param")
        getattr(message, field.name).extend(
            _scalar_value(field, item) for item in items
        )
        return
    if field.message_type is not None:
        if field.message_type.full_name != DURATION_TYPE:
            raise ValueError(f"{field.name} cannot be set with --param")
        getattr(message, field.name).FromTimedelta(parse_span(text.strip()))
        return
    setattr(message, field.name, _scalar_value(field, text.strip()))


_INTEGER_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_BOOLEANS = {
    "true": True,
    "yes": True,
    "1": True,
    "false": False,
    "no": False,
    "0": False,
}


def _scalar_value(field: FieldDescriptor, text: str) -> object:
    if field.type == FieldDescriptor.TYPE_STRING:
        return text
    if field.type == FieldDescriptor.TYPE_BOOL:
        if text.lower() not in _BOOLEANS:
            raise ValueError("expected true or false")
        return _BOOLEANS[text.lower()]
    if field.type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[field.type]
        try:
            value = int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError("expected a number")
        return number
    raise ValueError(f"{field.name} cannot be set with --param")


# A span: one or more numbers, each with a unit of s, m, h or d, such as 1h30m.
SPAN_PATTERN = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")
# The largest span a google.protobuf.Duration holds, in seconds.
MAX_SPAN_SECONDS = 315_576_000_000
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_span(text: str) -> timedelta:
    """Parse a span such as 30s, 10m, 1h, 2d or 1h30m; raise ValueError.

    A span longer than a protobuf Duration can hold, about 10,000 years, is
    rejected too, since every span ends up in one.
    """
    if not SPAN_PATTERN.fullmatch(text):
        raise ValueError(
            f"invalid span {text!r}; give a number with a unit of s, m, h or d, "
            "such as 30s, 10m or 1h"
        )
    # A number of hundreds of digits becomes inf here, not an OverflowError.
    seconds = sum(
        float(number) * _SPAN_UNITS[unit] for number, unit in _SPAN_PART.findall(text)
    )
    if seconds > MAX_SPAN_SECONDS:
        raise ValueError(
            f"span {text!r} is longer than the maximum of {MAX_SPAN_SECONDS} s "
            "(about 10,000 years); give a shorter span"
        )
    return timedelta(seconds=seconds)


def _run_policy_command(args: argparse.Namespace, client: OpsClient) -> None:
    if args.policy_command == "show":
        response = client.call("GetPolicy", ops_pb2.GetPolicyRequest())
        has_policy = response.HasField("policy")
        if args.json:
            print_json({"policy": to_dict(response.policy) if has_policy else None})
        elif has_policy:
            print(render_policy_toml(response.policy), end="")
        else:
            print(NO_FLEET_POLICY_TEXT, end="")
        return
    policy = load_policy_file(args.file, allow_empty=args.allow_empty)
    request = ops_pb2.SetPolicyRequest(policy=policy)
    version = client.call("SetPolicy", request).version
    if args.json:
        print_json({"version": version, "rules": len(policy.rules)})
        return
    rules = "1 rule" if len(policy.rules) == 1 else f"{len(policy.rules)} rules"
    print(
        f"Set policy version {version} with {rules} from {args.file}; connected "
        "agents get it now, the others when they connect."
    )


def _run_rules_command(args: argparse.Namespace, client: OpsClient) -> None:
    if args.rules_command is None:
        response = client.call("ListRules", ops_pb2.ListRulesRequest())
        if args.json:
            # rejecting_devices is a uint64, which the protobuf JSON mapping
            # prints as a string, so it is printed as a number here, like the
            # uint32 refusing_devices of each rule.
            print_json(
                {
                    "rules": to_dicts(response.rules),
                    "rejecting_devices": response.rejecting_devices,
                    "rejected_reason_example": response.rejected_reason_example,
                }
            )
            return
        policy = client.call("GetPolicy", ops_pb2.GetPolicyRequest())
        print(render_rules_table(response.rules, policy, response), end="")
        return
    change = _RULE_CHANGES[args.rules_command]
    request = ops_pb2.ChangeRuleStateRequest(
        name=args.name, change=change, reason=args.reason
    )
    response = client.call("ChangeRuleState", request)
    if args.json:
        print_json({"rule": to_dict(response.rule), "changed": response.changed})
    else:
        text = render_rule_state(response.rule, args.rules_command, response.changed)
        print(text, end="")


_RULE_CHANGES = {
    "promote": ops_pb2.RULE_CHANGE_PROMOTE,
    "pause": ops_pb2.RULE_CHANGE_PAUSE,
    "resume": ops_pb2.RULE_CHANGE_RESUME,
}


def _run_act_command(args: argparse.Namespace, client: OpsClient) -> None:
    action = build_action(args.action, args.params)
    request = ops_pb2.SendCommandRequest(action=action, all_devices=args.all_devices)
    for reference in args.devices or ():
        device_id = client.resolve_device_id(reference)
        request.device_ids.append(device_id)
    request.time_to_live.FromTimedelta(args.ttl)
    commands = client.call("SendCommand", request).commands
    if args.json:
        print_json({"commands": to_dicts(commands)})
    else:
        print(render_commands(args.action, commands), end="")


def _run_remediations_command(args: argparse.Namespace, client: OpsClient) -> None:
    device_id = client.resolve_device_id(args.device) if args.device else ""
    request = ops_pb2.ListRemediationsRequest(
        device_id=device_id, rule=args.rule, outcome=args.outcome
    )
    if args.since is not None:
        request.start_after_time.FromDatetime(args.since)
    # A record past the limit, if the collector returns one, means more match.
    remediations, summaries = client.list_remediations(request, args.limit + 1)
    more = len(remediations) > args.limit
    remediations = remediations[: args.limit]
    if args.json:
        print_json(
            {"remediations": to_dicts(remediations), "summaries": to_dicts(summaries)}
        )
        return
    policy = client.call("GetPolicy", ops_pb2.GetPolicyRequest())
    print(render_remediations(remediations, summaries, policy, more=more), end="")
