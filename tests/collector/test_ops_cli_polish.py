"""How the self-healing commands of fleetmend read: values, versions, help.

Every test runs the real CLI against a real TLS collector on 127.0.0.1, with
records stored the way ingest stores an agent's reports.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from collector.ops_cli import build_parser, main
from collector.server import ServerHandle, start_server_thread
from fleetmend.v1 import ops_pb2, ops_pb2_grpc, remediation_pb2
from tests.collector.test_ops_healing import (
    Collector,
    OpenStream,
    run,
    run_json,
    set_policy,
    store_remediations,
)
from tests.trust import bearer, channel_to, create_token, enroll, write_token_file

Outcome = remediation_pb2.RemediationOutcome
SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
FAILED = remediation_pb2.REMEDIATION_OUTCOME_FAILED
SKIPPED = remediation_pb2.REMEDIATION_OUTCOME_SKIPPED
DRY_RUN = remediation_pb2.REMEDIATION_OUTCOME_DRY_RUN
REFUSED = remediation_pb2.REMEDIATION_OUTCOME_REFUSED

# Values as fleetmend-agent 0.1.0 on Debian 12 sent them to a collector in a
# manual run: a dry run of clear_cache on "user_temp", and the pending record
# of a notify rule held back by its cooldown for 20 evaluations.
RECORDED_FREE_BYTES = 85044649984.0
RECORDED_REPEAT_COUNT = 20
RECORDED_COOLDOWN_REASON = (
    "cooldown of 3600 s since the last run at 2026-12-04T21:04:50+00:00"
)

NOTICE_POLICY = """\
[[rules]]
name = "low-space-notice"
condition.free_space_below = { mount_point = "/", ratio = 0.10 }
action.notify = { title = "Disk almost full" }

[[rules]]
name = "preview-temp"
dry_run = true
condition.free_space_below = { mount_point = "/", ratio = 0.10 }
action.clear_cache = { cache_sets = ["user_temp"], older_than_days = 7 }
fleet = { daily_budget = 5 }
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEETMEND_COLLECTOR", "FLEETMEND_CA_FILE", "FLEETMEND_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def collector(database_url: str, tls_dir: Path, tmp_path: Path) -> Iterator[Collector]:
    handle: ServerHandle = start_server_thread(database_url, tls_dir=tls_dir)
    tokens = {}
    token_files = {}
    for role in ("viewer", "operator", "admin"):
        tokens[role] = create_token(database_url, role, f"{role}-token")
        folder = tmp_path / role
        folder.mkdir()
        token_files[role] = write_token_file(folder, tokens[role])
    files = tmp_path / "files"
    files.mkdir()
    yield Collector(handle.address, tls_dir, database_url, tokens, token_files, files)
    handle.stop()


def record(
    reason: str,
    outcome: Outcome.ValueType = SUCCEEDED,
    *,
    unit: str = "",
    before: float = 0.0,
    after: float = 0.0,
    bytes_freed: int = 0,
    rule: str = "some-rule",
    command_id: str = "",
    repeat_count: int = 0,
    policy_version: int = 0,
    start: datetime | None = None,
) -> remediation_pb2.RemediationRecord:
    """Return a record whose reason identifies its row in the table."""
    message = remediation_pb2.RemediationRecord(
        rule=rule,
        command_id=command_id,
        outcome=outcome,
        reason=reason,
        unit=unit,
        before=before,
        after=after,
        bytes_freed=bytes_freed,
        repeat_count=repeat_count,
        policy_version=policy_version,
    )
    message.action.notify.title = "t"
    message.start_time.FromDatetime(start or datetime.now(UTC))
    return message


def clear_cache_record(
    reason: str, outcome: Outcome.ValueType, **fields: object
) -> remediation_pb2.RemediationRecord:
    message = record(reason, outcome, **fields)  # type: ignore[arg-type]
    message.action.clear_cache.cache_sets.append("user_temp")
    return message


def row_of(out: str, reason: str) -> str:
    """Return the one table line that shows reason."""
    lines = [line for line in out.splitlines() if reason in line]
    assert len(lines) == 1, out
    return lines[0] + "  "


def summary_rows(out: str) -> dict[str, list[str]]:
    _, summary = out.split("\nSummary per rule, over every matching record\n")
    rows = [line.split() for line in summary.splitlines()]
    assert rows[0][0] == "RULE"
    return {row[0]: row[1:] for row in rows[1:]}


def current_generation(collector: Collector) -> int:
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        response = stub.GetPolicy(
            ops_pb2.GetPolicyRequest(),
            metadata=bearer(collector.tokens["viewer"]),
            timeout=10,
        )
    return int(response.generation)


# The CHANGE column


# Each case: the record's reason, outcome and value fields, and its CHANGE cell.
CHANGE_CASES: list[tuple[str, Outcome.ValueType, dict[str, object], str]] = [
    (
        "cleared caches",
        SUCCEEDED,
        {
            "unit": "bytes",
            "before": 1_000_000_000,
            "after": 3_000_000_000,
            "bytes_freed": 2_000_000_000,
        },
        "free space 953.7 MiB -> 2.8 GiB, freed 1.9 GiB",
    ),
    (
        "previewed caches",
        DRY_RUN,
        {
            "unit": "bytes",
            "before": RECORDED_FREE_BYTES,
            "after": RECORDED_FREE_BYTES,
            "bytes_freed": 123_456_789,
        },
        "free space 79.2 GiB, would free 117.7 MiB",
    ),
    (
        "previewed nothing",
        DRY_RUN,
        {
            "unit": "bytes",
            "before": RECORDED_FREE_BYTES,
            "after": RECORDED_FREE_BYTES,
        },
        "free space 79.2 GiB, would free 0 B",
    ),
    ("refused caches", REFUSED, {"unit": "bytes"}, "-"),
    (
        "free space held",
        SKIPPED,
        {
            "unit": "free bytes of /",
            "before": RECORDED_FREE_BYTES,
            "after": RECORDED_FREE_BYTES,
        },
        "free space on / 79.2 GiB",
    ),
    (
        "throttled onedrive",
        SUCCEEDED,
        {"unit": "percent of one CPU", "before": 93.4321, "after": 12.04},
        "CPU 93.4 % -> 12.0 %",
    ),
    ("throttle previewed", DRY_RUN, {"unit": "percent of one CPU"}, "-"),
    (
        "cpu still high",
        SKIPPED,
        {
            "unit": "percent of one CPU used by onedrive",
            "before": 93.4321,
            "after": 93.4321,
        },
        "onedrive CPU 93.4 %",
    ),
    (
        "restarted cups",
        SUCCEEDED,
        {"unit": "active", "before": 0, "after": 1},
        "service not active -> active",
    ),
    (
        "cups down",
        SKIPPED,
        {"unit": "service cups active (1) or not (0)"},
        "service cups not active",
    ),
    (
        "credential soon",
        SKIPPED,
        {
            "unit": "seconds until the credential expires",
            "before": 3 * 86400 + 5,
            "after": 3 * 86400 + 5,
        },
        "credential expires in 3d",
    ),
    (
        "credential gone",
        SKIPPED,
        {"unit": "seconds until the credential expires"},
        "credential expired",
    ),
    (
        "password prompt",
        SUCCEEDED,
        {"unit": "days until expiry", "before": 5, "after": 5},
        "password expires in 5 days",
    ),
    (
        "battery worn",
        SUCCEEDED,
        {
            "unit": "battery health (full over design capacity)",
            "before": 0.62,
            "after": 0.62,
        },
        "battery health 62%",
    ),
    (
        "disk failing",
        SUCCEEDED,
        {"unit": "failing disks", "before": 1, "after": 1},
        "failing disks 1",
    ),
    (
        "other unit",
        SUCCEEDED,
        {"unit": "widgets", "before": 3, "after": 5},
        "3 widgets -> 5 widgets",
    ),
    ("no unit", SUCCEEDED, {}, "-"),
]


def test_change_column_per_value_kind(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = str(uuid.uuid4())
    records = []
    for reason, outcome, fields, _ in CHANGE_CASES:
        make = clear_cache_record if fields.get("unit") == "bytes" else record
        records.append(make(reason, outcome, **fields))  # type: ignore[arg-type]
    store_remediations(collector.database_url, device_id, records)

    code, out, err = run(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    for reason, _, _, change in CHANGE_CASES:
        assert f"  {change}  " in row_of(out, reason), reason
    assert "(bytes)" not in out
    assert "0 B -> 0 B" not in out


def test_json_keeps_raw_values(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = str(uuid.uuid4())
    preview = clear_cache_record(
        "previewed caches",
        DRY_RUN,
        unit="bytes",
        before=RECORDED_FREE_BYTES,
        after=RECORDED_FREE_BYTES,
        bytes_freed=123_456_789,
    )
    throttle = record(
        "throttled", unit="percent of one CPU", before=93.4321, after=12.04
    )
    store_remediations(collector.database_url, device_id, [preview, throttle])

    json_output = run_json(collector, "viewer", capsys, "remediations")

    records = json_output["remediations"]
    assert isinstance(records, list)
    by_reason = {item["record"]["reason"]: item["record"] for item in records}
    assert by_reason["previewed caches"]["before"] == RECORDED_FREE_BYTES
    assert by_reason["previewed caches"]["unit"] == "bytes"
    assert by_reason["previewed caches"]["bytes_freed"] == "123456789"
    assert by_reason["throttled"]["before"] == 93.4321
    assert by_reason["throttled"]["after"] == 12.04


# Repeated skips


def test_repeated_skip_shows_count(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = str(uuid.uuid4())
    start = datetime.now(UTC) - timedelta(minutes=5)
    first = record(
        "first skip",
        SKIPPED,
        rule="local-notice",
        unit="free bytes of /",
        before=RECORDED_FREE_BYTES,
        after=RECORDED_FREE_BYTES,
        start=start,
    )
    repeats = record(
        RECORDED_COOLDOWN_REASON,
        SKIPPED,
        rule="local-notice",
        unit="free bytes of /",
        before=RECORDED_FREE_BYTES,
        after=RECORDED_FREE_BYTES,
        repeat_count=RECORDED_REPEAT_COUNT,
        start=start + timedelta(minutes=1),
    )
    single = record(
        "one repeat",
        SKIPPED,
        rule="local-notice",
        repeat_count=1,
        start=start + timedelta(minutes=2),
    )
    store_remediations(collector.database_url, device_id, [first, repeats, single])

    code, out, err = run(collector, "viewer", capsys, "remediations")
    json_output = run_json(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    assert "  skipped x20  " in row_of(out, RECORDED_COOLDOWN_REASON)
    assert "  skipped  " in row_of(out, "first skip")
    assert "  skipped  " in row_of(out, "one repeat")
    # SKIPPED counts skips: 1 + 20 + 1.
    assert summary_rows(out)["local-notice"] == [
        "0",
        "0",
        "0",
        "22",
        "0",
        "0",
        "-",
        "1",
        "0",
    ]
    summaries = json_output["summaries"]
    assert isinstance(summaries, list)
    assert summaries[0]["skipped"] == "22"
    records = json_output["remediations"]
    assert isinstance(records, list)
    counts = [item["record"].get("repeat_count", 0) for item in records]
    assert counts == [1, RECORDED_REPEAT_COUNT, 0]


# The POLICY column


def test_policy_column_maps_versions(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)
    set_policy(collector, capsys, NOTICE_POLICY)
    generation = current_generation(collector)
    device_id = str(uuid.uuid4())
    store_remediations(
        collector.database_url,
        device_id,
        [
            record("under the current policy", policy_version=generation),
            record("under an older policy", policy_version=generation - 1),
            record("under the local policy", policy_version=0),
        ],
    )

    code, out, err = run(collector, "viewer", capsys, "remediations")
    json_output = run_json(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    assert "  POLICY  " in out.splitlines()[0]
    assert "  v2  " in row_of(out, "under the current policy")
    assert "  older  " in row_of(out, "under an older policy")
    assert "  local  " in row_of(out, "under the local policy")
    assert (
        "POLICY: vN is version N of the current fleet policy, older an earlier "
        "fleet policy or rule state, local the agent's built-in or local policy, "
        "- an operator command, which runs under no policy.\n"
    ) in out
    records = json_output["remediations"]
    assert isinstance(records, list)
    versions = {
        item["record"]["reason"]: item["record"].get("policy_version", "0")
        for item in records
    }
    assert versions["under the current policy"] == str(generation)
    assert versions["under the local policy"] == "0"


def test_policy_column_after_rule_pause(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)
    generation = current_generation(collector)
    store_remediations(
        collector.database_url,
        str(uuid.uuid4()),
        [record("before the pause", policy_version=generation)],
    )
    before_pause = run(collector, "viewer", capsys, "remediations")[1]

    code, _, err = run(collector, "operator", capsys, "rules", "pause", "preview-temp")
    after_pause = run(collector, "viewer", capsys, "remediations")[1]

    assert code == 0, err
    assert "  v1  " in row_of(before_pause, "before the pause")
    # A pause changes the effective policy that agents receive.
    assert "  older  " in row_of(after_pause, "before the pause")


def test_policy_column_without_fleet_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    store_remediations(
        collector.database_url,
        str(uuid.uuid4()),
        [
            record("local rule ran", policy_version=0),
            record("unknown version", policy_version=1_796_418_312_452_810),
        ],
    )

    code, out, err = run(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    assert "  local  " in row_of(out, "local rule ran")
    assert "  older  " in row_of(out, "unknown version")


# --rule command and the summary of commands


def test_rule_command_lists_command_records(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = str(uuid.uuid4())
    start = datetime.now(UTC) - timedelta(hours=3)
    store_remediations(
        collector.database_url,
        device_id,
        [
            record("rule ran", rule="low-space-notice", start=start),
            record(
                "first command",
                rule="",
                command_id="cmd-1",
                start=start + timedelta(hours=1),
            ),
            record(
                "second command",
                rule="",
                command_id="cmd-2",
                start=start + timedelta(hours=2),
            ),
        ],
    )

    code, out, err = run(
        collector, "viewer", capsys, "remediations", "--rule", "command"
    )
    json_output = run_json(
        collector, "viewer", capsys, "remediations", "--rule", "command"
    )

    assert code == 0, err
    assert "  command cmd-2  " in row_of(out, "second command")
    assert "  command cmd-1  " in row_of(out, "first command")
    assert "rule ran" not in out
    # Commands have no condition, so two on one device do not recur.
    assert summary_rows(out) == {
        "command": ["2", "2", "0", "0", "0", "0", "100%", "1", "0"]
    }
    records = json_output["remediations"]
    assert isinstance(records, list)
    assert [item["record"]["command_id"] for item in records] == ["cmd-2", "cmd-1"]
    summaries = json_output["summaries"]
    assert isinstance(summaries, list)
    assert [summary["rule"] for summary in summaries] == ["command"]


def test_rule_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["remediations", "--help"])
    out = " ".join(capsys.readouterr().out.split())

    assert raised.value.code == 0
    assert (
        'only the records of this rule; "command" lists those of operator '
        "commands (`fleetmend act`)"
    ) in out


def test_policy_rejects_rule_named_command(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.write(
        "policy.toml",
        '[[rules]]\nname = "command"\ncondition.disk_failing = {}\n'
        'action.notify = { title = "t" }\n',
    )

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))
    json_output = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 1
    assert out == ""
    assert "the collector rejected SetPolicy: rules[0] is named 'command'" in err
    assert "give the rule another name" in err
    assert json_output == {"policy": None}


# rules and policy show


def test_rules_without_fleet_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = (
        "No fleet policy is set, so every agent runs its built-in or local rules.\n"
        "Set one with `fleetmend policy set FILE`.\n"
    )

    rules = run(collector, "viewer", capsys, "rules")
    policy = run(collector, "viewer", capsys, "policy", "show")

    assert rules == (0, expected, "")
    assert policy == (0, expected, "")


def test_rules_with_empty_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.write("empty.toml", "rules = []\n")
    code, _, err = run(
        collector, "admin", capsys, "policy", "set", str(path), "--allow-empty"
    )

    rules = run(collector, "viewer", capsys, "rules")

    assert code == 0, err
    assert rules == (
        0,
        "Fleet policy version 1 has no rules, so agents run no rules at all, not "
        "even their built-in ones.\nSet a policy with rules with `fleetmend policy "
        "set FILE`.\n",
        "",
    )


def test_rules_show_dry_run(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)

    code, out, err = run(collector, "viewer", capsys, "rules")

    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split() == [
        "low-space-notice",
        "active",
        "-",
        "0",
        "0",
        "-",
        "0",
        "(no",
        "budget)",
    ]
    assert lines[2].split() == [
        "preview-temp",
        "active,",
        "dry",
        "run",
        "-",
        "0",
        "0",
        "-",
        "0/5",
    ]


# More records than --limit


def test_remediations_more_records_notice(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    store_remediations(
        collector.database_url,
        str(uuid.uuid4()),
        [record(f"run {n}", start=start + timedelta(minutes=n)) for n in range(3)],
    )

    _, limited, _ = run(collector, "viewer", capsys, "remediations", "--limit", "2")
    _, exact, _ = run(collector, "viewer", capsys, "remediations", "--limit", "3")
    json_output = run_json(collector, "viewer", capsys, "remediations", "--limit", "2")

    assert (
        "Listed the newest 2 records; more match. Raise --limit or narrow the "
        "filters to see them.\n"
    ) in limited
    assert "run 0" not in limited
    assert "more match" not in exact
    assert "run 0" in exact
    records = json_output["remediations"]
    assert isinstance(records, list)
    assert [item["record"]["reason"] for item in records] == ["run 2", "run 1"]
    assert summary_rows(limited)["some-rule"][0] == "3"


# act


def test_act_waiting_and_mixed_devices(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    connected_id, node_key = enroll(
        collector.address, collector.tls_dir, plaintext=False
    )
    offline_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    args = ("act", "notify", "--param", "title=Hello")

    waiting = run(collector, "operator", capsys, *args, "--device", offline_id)
    with channel_to(collector.address, collector.tls_dir) as channel:
        stream = OpenStream(channel, connected_id, node_key)
        try:
            mixed = run(
                collector,
                "operator",
                capsys,
                *args,
                "--device",
                connected_id,
                "--device",
                offline_id,
            )
        finally:
            stream.close()

    assert waiting[0] == 0, waiting[2]
    assert waiting[1].splitlines()[0] == (
        "Queued notify for 1 device, none connected now; each gets it when it "
        "connects before the command expires."
    )
    assert mixed[0] == 0, mixed[2]
    assert mixed[1].splitlines()[0] == (
        "Sent notify to 2 devices: 1 connected now, 1 gets it when it connects "
        "before the command expires."
    )
    assert mixed[1].splitlines()[-1] == (
        "See what the devices did with `fleetmend remediations --rule command`."
    )


# Help


def command_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Yield every parser of the command tree with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from command_parsers(child, (*path, name))


def test_every_command_and_option_has_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parsers = list(command_parsers(build_parser()))

    assert len(parsers) > 20
    for path, parser in parsers:
        command = " ".join(path) or "fleetmend"
        assert parser.description, f"{command} has no description"
        for action in parser._actions:
            assert action.help, f"{command}: {action.dest} has no help"
            assert action.help != argparse.SUPPRESS, f"{command}: {action.dest}"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{command} {choice.dest} has no help"

        with pytest.raises(SystemExit) as raised:
            main([*path, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert raised.value.code == 0, command
        assert " ".join(parser.description.split()) in out, command


# Values that cannot be stored


@pytest.mark.parametrize("field", ["before", "after"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_record_value_not_finite_rejected(
    collector: Collector, capsys: pytest.CaptureFixture[str], field: str, value: float
) -> None:
    device_id = str(uuid.uuid4())
    bad = record("not a number", SKIPPED, unit="free bytes of /")
    setattr(bad, field, value)

    with pytest.raises(ValueError) as raised:
        store_remediations(collector.database_url, device_id, [bad], sequence=7)
    listed = run(collector, "viewer", capsys, "remediations")

    assert str(raised.value) == (
        f"remediation record 0 of report 7 of device {device_id} has {field} "
        f"{value}; expected a finite number"
    )
    assert listed == (0, "No remediation records.\n", "")
