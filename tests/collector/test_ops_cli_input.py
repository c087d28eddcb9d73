"""Errors of the fleetmend CLI for negative spans and policy field values."""

from __future__ import annotations

import argparse

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from collector._ops_cli_healing import _parse_error_text
from collector._ops_transport import PROG
from collector.ops_cli import DASH_VALUE_OPTIONS, build_parser, main
from fleetmend.v1 import ops_pb2, report_pb2
from tests.collector.test_ops_healing import (
    Collector,
    clean_environment,
    collector,
    run,
    run_json,
)

# clean_environment is autouse, so importing it clears the FLEETMEND_
# variables for every test here.
__all__ = ["clean_environment", "collector"]

# Negative values given after a space


def run_parse_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run fleetmend on argv, which must fail in argparse, and return stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    ("argv", "option", "value", "message"),
    [
        (
            ["act", "notify", "--param", "title=x", "--all", "--ttl", "-1h"],
            "--ttl",
            "-1h",
            "argument --ttl: invalid span '-1h'; give a number with a unit of "
            "s, m, h or d, such as 30s, 10m or 1h",
        ),
        (
            ["act", "--ttl", "-30m", "notify", "--all", "--param", "title=x"],
            "--ttl",
            "-30m",
            "argument --ttl: invalid span '-30m'",
        ),
        (
            ["remediations", "--since", "-5h"],
            "--since",
            "-5h",
            "argument --since: invalid time '-5h'; give ISO 8601 such as "
            "2026-05-04T09:00, or a span before now such as 24h or 7d",
        ),
        (
            ["outage", "declare", "app", "--from", "-1", "--to", "2026-05-04T10:00"],
            "--from",
            "-1",
            "argument --from: invalid time '-1'; give ISO 8601",
        ),
        (
            [
                "outage",
                "declare",
                "app",
                "--from",
                "2026-05-04T09:00",
                "--to",
                "-2026-05-04T10:00",
            ],
            "--to",
            "-2026-05-04T10:00",
            "argument --to: invalid time '-2026-05-04T10:00'; give ISO 8601",
        ),
        (
            ["--timeout", "-5s", "devices"],
            "--timeout",
            "-5s",
            "argument --timeout: expected a number of seconds greater than 0, "
            "got '-5s'",
        ),
        (
            ["devices", "--timeout", "-1e3"],
            "--timeout",
            "-1e3",
            "argument --timeout: expected a number of seconds greater than 0, "
            "got '-1e3'",
        ),
    ],
    ids=[
        "ttl-last",
        "ttl-before-action",
        "since",
        "from",
        "to",
        "timeout-before-command",
        "timeout-after-command",
    ],
)
def test_negative_value_after_space(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    option: str,
    value: str,
    message: str,
) -> None:
    joined = list(argv)
    position = joined.index(option)
    joined[position : position + 2] = [f"{option}={value}"]

    err = run_parse_error(capsys, argv)
    joined_err = run_parse_error(capsys, joined)

    # argparse prints the usage first, then the error on the last line.
    assert message in err.splitlines()[-1]
    assert "expected one argument" not in err
    assert err == joined_err


def test_negative_value_after_double_dash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = run_parse_error(capsys, ["remediations", "--", "--since", "-5h"])

    assert "unrecognized arguments: -- --since -5h" in err


def test_dash_value_options_cover_parser() -> None:
    # An option added later with a SPAN, TIME or SECONDS value must be added
    # to DASH_VALUE_OPTIONS too.
    parsers = [build_parser()]
    found = set()
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.metavar in ("SPAN", "TIME", "SECONDS"):
                found.update(action.option_strings)

    assert found == DASH_VALUE_OPTIONS


# Policy field values that json_format rejects

RULE = '[[rules]]\nname = "r"\n'
NOTIFY = 'condition.disk_failing = {}\naction.notify = { title = "t" }\n'
HUGE = "9" * 400


HUGE_SPAN_MESSAGE = (
    "span '99999999999999999999d' is longer than the maximum of 315576000000 s "
    "(about 10,000 years); give a shorter span"
)


@pytest.mark.parametrize(
    "argv",
    [
        [
            "act",
            "notify",
            "--param",
            "title=x",
            "--all",
            "--ttl",
            "99999999999999999999d",
        ],
        ["remediations", "--since", "99999999999999999999d"],
    ],
    ids=["ttl", "since"],
)
def test_huge_span_option_rejected(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    err = run_parse_error(capsys, argv)

    assert f"argument {argv[-2]}: {HUGE_SPAN_MESSAGE}\n" in err
    assert "Traceback" not in err


def test_since_before_year_one_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    # 3,000,000 days is about 8,200 years: a valid span, but not before now.
    err = run_parse_error(capsys, ["remediations", "--since", "3000000d"])

    assert (
        "argument --since: span '3000000d' reaches back before the year 1; give a "
        "shorter span\n"
    ) in err


def test_huge_span_param_rejected(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        collector,
        "operator",
        capsys,
        "act",
        "restart_service",
        "--param",
        "service=cron.service",
        "--param",
        "settle=99999999999999999999d",
        "--all",
    )

    assert code == 2
    assert out == ""
    assert err == (
        f"{PROG}: error: invalid --param settle='99999999999999999999d': "
        f"{HUGE_SPAN_MESSAGE}\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            RULE + NOTIFY + 'limits = { cooldown = "99999999999999999999d" }\n',
            f"rule 'r': rules[0].limits.cooldown: {HUGE_SPAN_MESSAGE}",
        ),
        (
            RULE + NOTIFY + "limits = { max_runs_per_day = -1 }\n",
            "rule 'r': rules[0].limits.max_runs_per_day: Value out of range: -1; "
            "give a whole number from 0 to 4294967295",
        ),
        (
            RULE + "condition.disk_failing = {}\n"
            'action.restart_service = { service = "s", max_failures = -3 }\n',
            "rule 'r': rules[0].action.restart_service.max_failures: Value out of "
            "range: -3; give a whole number from 0 to 4294967295",
        ),
        (
            RULE + 'condition.free_space_below = { mount_point = "/", bytes = -5 }\n'
            'action.notify = { title = "t" }\n',
            "rule 'r': rules[0].condition.free_space_below.bytes: Value out of "
            "range: -5; give a whole number from 0 to 18446744073709551615",
        ),
        (
            RULE + "condition.free_space_below = "
            '{ mount_point = "/", ratio = "ten percent" }\n'
            'action.notify = { title = "t" }\n',
            "rule 'r': rules[0].condition.free_space_below.ratio: invalid number "
            "'ten percent'; give a number such as 0.25",
        ),
        (
            RULE + "condition.battery_health_below = { ratio = nan }\n"
            'action.notify = { title = "t" }\n',
            "rule 'r': rules[0].condition.battery_health_below.ratio: nan is not "
            "a finite number; give a number such as 0.25",
        ),
        (
            RULE + f"condition.battery_health_below = {{ ratio = {HUGE} }}\n"
            'action.notify = { title = "t" }\n',
            f"rule 'r': rules[0].condition.battery_health_below.ratio: {HUGE} is "
            "not a finite number; give a number such as 0.25",
        ),
        (
            RULE + NOTIFY + "limits = { max_runs_per_day = 1.5 }\n",
            "rule 'r': rules[0].limits.max_runs_per_day: invalid whole number 1.5; "
            "give a whole number from 0 to 4294967295",
        ),
        (
            RULE + NOTIFY + "limits = { max_runs_per_day = true }\n",
            "rule 'r': rules[0].limits.max_runs_per_day: invalid whole number "
            "true; give a whole number from 0 to 4294967295",
        ),
        (
            RULE + NOTIFY + "limits = { quiet_hours = [{ start_hour = -2 }] }\n",
            "rule 'r': rules[0].limits.quiet_hours[0].start_hour: Value out of "
            "range: -2; give a whole number from 0 to 4294967295",
        ),
        (
            RULE + NOTIFY + "dry_run = 1\n",
            "rule 'r': rules[0].dry_run: invalid boolean 1; give true or false "
            "without quotes",
        ),
        (
            "[[rules]]\nname = 5\n" + NOTIFY,
            "rules[0].name: invalid string 5; give the text in double quotes",
        ),
        (
            RULE + "condition.disk_failing = {}\n"
            "action.clear_cache = { cache_sets = [1] }\n",
            "rule 'r': rules[0].action.clear_cache.cache_sets[0]: invalid string "
            "1; give the text in double quotes",
        ),
        (
            "version = -1\n" + RULE + NOTIFY,
            "version: Value out of range: -1; give a whole number from 0 to "
            "18446744073709551615",
        ),
    ],
    ids=[
        "cooldown-huge",
        "max-runs-per-day-negative",
        "max-failures-negative",
        "bytes-negative",
        "ratio-text",
        "ratio-nan",
        "ratio-huge",
        "max-runs-per-day-fraction",
        "max-runs-per-day-boolean",
        "start-hour-negative",
        "dry-run-number",
        "name-number",
        "cache-set-number",
        "version-negative",
    ],
)
def test_policy_value_errors(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    path = collector.write("bad.toml", text)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))
    policy_json = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 2
    assert out == ""
    assert err == f"{PROG}: error: invalid policy file {path}: {message}\n"
    assert policy_json == {"policy": None}


@pytest.mark.parametrize(
    ("message", "field_name", "value", "expected"),
    [
        (
            report_pb2.NvmeHealth(),
            "temperature_celsius",
            2**31,
            "Value out of range: 2147483648; give a whole number from "
            "-2147483648 to 2147483647",
        ),
        (
            ops_pb2.Outage(),
            "outage_id",
            2**63,
            "Value out of range: 9223372036854775808; give a whole number from "
            "-9223372036854775808 to 9223372036854775807",
        ),
    ],
    ids=["int32", "int64"],
)
def test_parse_error_signed_ranges(
    message: Message, field_name: str, value: int, expected: str
) -> None:
    # No policy field is signed, so the int32 and int64 ranges are checked on
    # fields of other messages.
    field = message.DESCRIPTOR.fields_by_name[field_name]
    with pytest.raises(json_format.ParseError) as error_info:
        json_format.ParseDict({field_name: value}, message)

    assert _parse_error_text(error_info.value, field, value) == expected
