"""The fleetmend commands for self-healing: policy, rules, act, remediations."""

from __future__ import annotations

import gc
import json
import queue
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration

from collector import fleet
from collector._ops_cli_healing import build_action, parse_span
from collector.ops_cli import main
from collector.server import ServerHandle, start_server_thread
from collector.store import IncomingReport, Store
from fleetmend.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    ops_pb2,
    ops_pb2_grpc,
    remediation_pb2,
    report_pb2,
)
from tests.trust import bearer, channel_to, create_token, enroll, write_token_file

SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
FAILED = remediation_pb2.REMEDIATION_OUTCOME_FAILED
SKIPPED = remediation_pb2.REMEDIATION_OUTCOME_SKIPPED

POLICY_TOML = """\
# Two rules: one tried on a canary set first, one for the whole fleet.
[[rules]]
name = "clear-caches-low-space"
condition.free_space_below = { mount_point = "/", ratio = 0.10 }
action.clear_cache = { cache_sets = ["browser", "thumbnails"], older_than_days = 3 }
limits = { cooldown = "21600s", max_runs_per_day = 2 }
fleet = { canary_percent = 50, promote_after_runs = 20, max_failure_ratio = 0.2, \
breaker_window = 10, daily_budget = 10 }

[[rules]]
name = "failing-disk-notice"
condition.disk_failing = {}
action.notify = { title = "A disk is failing", body = "Back up your files \\"now\\"." }
limits = { cooldown = "86400s", quiet_hours = [{ start_hour = 22, end_hour = 7 }] }
"""


@dataclass(frozen=True)
class Collector:
    """A TLS collector and token files of each role for it."""

    address: str
    tls_dir: Path
    database_url: str
    tokens: dict[str, str]
    token_files: dict[str, Path]
    folder: Path

    def args(self, role: str, *args: str) -> list[str]:
        return [
            "--collector",
            self.address,
            "--ca-file",
            str(self.tls_dir / "ca.pem"),
            "--token-file",
            str(self.token_files[role]),
            *args,
        ]

    def write(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text, encoding="utf-8")
        return path


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


def run(
    collector: Collector, role: str, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    # grpc prints a traceback on stderr when it collects the coroutine of a
    # call that an earlier test's stopped server left unfinished, so that
    # output is dropped first.
    gc.collect()
    capsys.readouterr()
    code = main(collector.args(role, *args))
    captured = capsys.readouterr()
    for token in collector.tokens.values():
        assert token not in captured.out
        assert token not in captured.err
    return code, captured.out, captured.err


def run_json(
    collector: Collector, role: str, capsys: pytest.CaptureFixture[str], *args: str
) -> dict[str, object]:
    code, out, err = run(collector, role, capsys, "--json", *args)
    assert code == 0, err
    shown = json.loads(out)
    assert isinstance(shown, dict)
    return shown


def usage_error(
    collector: Collector, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    """Run a command that argparse rejects; return its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(collector.args("admin", *args))
    assert raised.value.code == 2
    return capsys.readouterr().err


def set_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str], text: str = POLICY_TOML
) -> None:
    path = collector.write("policy.toml", text)
    code, _, err = run(collector, "admin", capsys, "policy", "set", str(path))
    assert code == 0, err


def audit_events(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> list[dict[str, str]]:
    shown = run_json(collector, "admin", capsys, "audit")
    events = shown["events"]
    assert isinstance(events, list)
    return events


class OpenStream:
    """An agent's Connect stream that stays open until the test closes it."""

    def __init__(
        self, channel: grpc.Channel, device_id: str, node_key: str, version: int = 0
    ) -> None:
        self._requests: queue.Queue[agent_pb2.ConnectRequest | None] = queue.Queue()
        hello = agent_pb2.Hello(
            device_id=device_id, agent_version="test", policy_version=version
        )
        self._requests.put(agent_pb2.ConnectRequest(hello=hello))
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        self._call = stub.Connect(
            iter(self._requests.get, None), metadata=bearer(node_key), timeout=30
        )
        self.welcome = next(self._call)

    def next_of(self, kind: str) -> agent_pb2.ConnectResponse:
        """Return the next response that carries kind, skipping acks."""
        for response in self._call:
            if response.WhichOneof("message") == kind:
                return response
        raise AssertionError(f"the stream ended before a {kind}")

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


def remediation(
    rule: str,
    outcome: remediation_pb2.RemediationOutcome.ValueType,
    start: datetime,
    *,
    command_id: str = "",
    reason: str = "",
) -> remediation_pb2.RemediationRecord:
    record = remediation_pb2.RemediationRecord(
        rule=rule,
        command_id=command_id,
        outcome=outcome,
        reason=reason,
        before=1_000_000_000,
        after=3_000_000_000,
        unit="free bytes of /",
        bytes_freed=2_000_000_000,
    )
    record.action.clear_cache.cache_sets.append("browser")
    record.start_time.FromDatetime(start)
    record.duration.FromTimedelta(timedelta(seconds=2))
    return record


def store_remediations(
    database_url: str,
    device_id: str,
    records: list[remediation_pb2.RemediationRecord],
    *,
    hostname: str = "desk",
    sequence: int = 1,
) -> None:
    """Store records in one report of the device, as the agent sends them."""
    report = report_pb2.Report(
        sequence=sequence,
        full=True,
        host=report_pb2.HostFacts(hostname=hostname),
        remediations=records,
    )
    with Store.open(database_url) as store:
        store.ingest([IncomingReport(device_id, report, datetime.now(UTC))])


# policy set and show


def test_policy_set_then_show(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.write("policy.toml", POLICY_TOML)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))
    shown = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 0, err
    assert out == (
        f"Set policy version 1 with 2 rules from {path}; connected agents get it "
        "now, the others when they connect.\n"
    )
    policy = shown["policy"]
    assert isinstance(policy, dict)
    assert policy["version"] == "1"
    rules = policy["rules"]
    assert [rule["name"] for rule in rules] == [
        "clear-caches-low-space",
        "failing-disk-notice",
    ]
    assert rules[0]["action"] == {
        "clear_cache": {"cache_sets": ["browser", "thumbnails"], "older_than_days": 3}
    }
    assert rules[0]["fleet"]["canary_percent"] == 50
    assert rules[1]["condition"] == {"disk_failing": {}}
    assert rules[1]["limits"]["cooldown"] == "86400s"


def test_policy_show_round_trips(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)

    code, shown_toml, err = run(collector, "viewer", capsys, "policy", "show")
    path = collector.write("shown.toml", shown_toml)
    set_again = run_json(collector, "admin", capsys, "policy", "set", str(path))
    first = json_format.ParseDict(tomllib.loads(POLICY_TOML), remediation_pb2.Policy())
    second = run_json(collector, "viewer", capsys, "policy", "show")["policy"]

    assert code == 0, err
    assert shown_toml.startswith("# Fleet policy version 1;")
    assert 'body = "Back up your files \\"now\\"."' in shown_toml
    assert "[rules.condition.disk_failing]" in shown_toml
    assert "[[rules.limits.quiet_hours]]" in shown_toml
    assert set_again == {"version": 2, "rules": 2}
    assert isinstance(second, dict)
    del second["version"]
    assert json_format.ParseDict(second, remediation_pb2.Policy()) == first


def test_policy_show_without_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(collector, "viewer", capsys, "policy", "show")
    shown = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 0, err
    assert out == (
        "No fleet policy is set, so every agent runs its built-in or local rules.\n"
        "Set one with `fleetmend policy set FILE`.\n"
    )
    assert shown == {"policy": None}


def test_policy_reaches_connected_agent(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, node_key = enroll(collector.address, collector.tls_dir, plaintext=False)
    with channel_to(collector.address, collector.tls_dir) as channel:
        stream = OpenStream(channel, device_id, node_key)
        try:
            set_policy(collector, capsys)
            pushed = stream.next_of("policy").policy
        finally:
            stream.close()

    names = [rule.name for rule in pushed.rules]
    assert names == ["clear-caches-low-space", "failing-disk-notice"]
    assert pushed.version > 0
    # The canary rule is paused on a device outside its canary set.
    canary = pushed.rules[0]
    in_canary = fleet.in_canary(device_id, canary.name, 50)
    assert canary.paused is not in_canary


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rules]]\nnme = "x"\n', "unknown field 'nme' in rules[0]; valid fields: "),
        (
            '[[rules]]\nname = "x"\nlimits = { cooldown = "an hour" }\n',
            "rules[0].limits.cooldown: ",
        ),
        (
            '[[rules]]\nname = "x"\nfleet = { canary_percent = -1 }\n',
            "rules[0].fleet.canary_percent: Value out of range: -1",
        ),
        (
            '[[rules]]\nname = "x"\naction.clear_cache = { cache_sets = "web" }\n',
            "rules[0].action.clear_cache.cache_sets must be an array",
        ),
        ("rules = 3\n", "rules must be an array, not 3"),
        ('[[rules]]\nname = "x\n', "is not valid TOML"),
    ],
)
def test_policy_file_errors(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    path = collector.write("bad.toml", text)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert str(path) in err
    assert message in err


def test_policy_file_missing(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.folder / "absent.toml"

    code, _, err = run(collector, "admin", capsys, "policy", "set", str(path))

    assert code == 2
    assert f"cannot read the policy file {path}: No such file or directory" in err


RULE_HEAD = '[[rules]]\nname = "r"\ncondition.disk_failing = {}\n'
ACTION = 'action.notify = { title = "t" }\n'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[[rules]]\ncondition.disk_failing = {}\n" + ACTION, "rules[0] has no name"),
        (
            '[[rules]]\nname = "Bad Name"\ncondition.disk_failing = {}\n' + ACTION,
            "rules[0] has the invalid name 'Bad Name'",
        ),
        ('[[rules]]\nname = "r"\n' + ACTION, "rule 'r' has no condition; set one of"),
        (RULE_HEAD, "rule 'r' has no action; set one of clear_cache, restart_service"),
        (RULE_HEAD + ACTION + RULE_HEAD + ACTION, "rule name 'r' is used twice"),
        (
            RULE_HEAD + ACTION + "fleet = { canary_percent = 150 }\n",
            "fleet.canary_percent 150; give 0 to 100",
        ),
        (
            RULE_HEAD + ACTION + "fleet = { max_failure_ratio = 1.5 }\n",
            "fleet.max_failure_ratio 1.5; give a ratio from 0 to 1",
        ),
        (
            RULE_HEAD + ACTION + "fleet = { breaker_window = 5000 }\n",
            "fleet.breaker_window 5000, more than the maximum of 1000 runs",
        ),
        (
            RULE_HEAD + ACTION + "paused = true\n",
            "only the collector's fleet limits set",
        ),
        (
            RULE_HEAD + ACTION + 'limits = { cooldown = "-60s" }\n',
            "rule 'r' limits.cooldown is negative",
        ),
        (
            RULE_HEAD
            + ACTION
            + "limits = { quiet_hours = [{ start_hour = 25, end_hour = 7 }] }\n",
            "limits.quiet_hours[0].start_hour 25; give 0 to 23",
        ),
        (
            '[[rules]]\nname = "r"\n'
            'condition.free_space_below = { mount_point = "/", ratio = 2.0 }\n'
            + ACTION,
            "condition.free_space_below.ratio is 2.0; give a ratio from 0 to 1",
        ),
    ],
)
def test_policy_rejected_by_collector(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    text: str,
    reason: str,
) -> None:
    path = collector.write("policy.toml", text)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))
    shown = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "the collector rejected SetPolicy: " in err
    assert reason in err
    assert shown == {"policy": None}


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_policy_set_needs_admin(
    collector: Collector, capsys: pytest.CaptureFixture[str], role: str
) -> None:
    path = collector.write("policy.toml", POLICY_TOML)

    code, out, err = run(collector, role, capsys, "policy", "set", str(path))

    assert code == 1
    assert out == ""
    assert "permission denied: " in err
    assert f"{role}-token" in err


def test_policy_set_audited(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    path = collector.write("policy.toml", POLICY_TOML)
    assert run(collector, "viewer", capsys, "policy", "set", str(path))[0] == 1

    events = audit_events(collector, capsys)

    assert [event["action"] for event in events] == ["SetPolicy", "SetPolicy"]
    assert [event["outcome"] for event in events] == ["PERMISSION_DENIED", "OK"]
    assert events[1]["actor"] == "admin-token"
    arguments = json.loads(events[1]["arguments_json"])
    assert arguments["policy"]["rules"][0]["name"] == "clear-caches-low-space"


# rules


def test_rules_table_and_states(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_ids = [
        enroll(collector.address, collector.tls_dir, plaintext=False)[0]
        for _ in range(6)
    ]
    set_policy(collector, capsys)
    now = datetime.now(UTC)
    outcomes = [SUCCEEDED, SUCCEEDED, FAILED, SKIPPED]
    store_remediations(
        collector.database_url,
        device_ids[0],
        [remediation("clear-caches-low-space", outcome, now) for outcome in outcomes],
    )
    expected_canary = sum(
        1
        for device_id in device_ids
        if fleet.in_canary(device_id, "clear-caches-low-space", 50)
    )

    listed = run_json(collector, "viewer", capsys, "rules")
    code, out, err = run(collector, "viewer", capsys, "rules")

    rules = listed["rules"]
    assert isinstance(rules, list)
    assert [rule["name"] for rule in rules] == [
        "clear-caches-low-space",
        "failing-disk-notice",
    ]
    canary = rules[0]
    assert canary["stage"] == "RULE_STAGE_CANARY"
    assert canary["runs"] == "3"
    assert canary["failures"] == "1"
    assert canary["runs_today"] == "3"
    assert int(canary.get("canary_devices", "0")) == expected_canary
    assert rules[1]["stage"] == "RULE_STAGE_ACTIVE"
    assert "runs" not in rules[1]
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STAGE",
        "REASON",
        "RUNS",
        "FAILURES",
        "SUCCESS",
        "TODAY",
    ]
    devices = "1 device" if expected_canary == 1 else f"{expected_canary} devices"
    assert f"canary ({devices})" in lines[1]
    assert lines[1].split()[-4:] == ["3", "1", "67%", "3/10"]
    disk_row = [
        "failing-disk-notice",
        "active",
        "-",
        "0",
        "0",
        "-",
        "0",
        "(no",
        "budget)",
    ]
    assert lines[2].split() == disk_row


def test_rules_without_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(collector, "viewer", capsys, "rules")

    assert code == 0
    assert out == (
        "No fleet policy is set, so every agent runs its built-in or local rules.\n"
        "Set one with `fleetmend policy set FILE`.\n"
    )
    assert run_json(collector, "viewer", capsys, "rules") == {
        "rules": [],
        "rejecting_devices": 0,
        "rejected_reason_example": "",
    }


def test_rules_pause_resume_promote(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    name = "clear-caches-low-space"

    code, paused_out, err = run(
        collector, "operator", capsys, "rules", "pause", name, "--reason", "flaky"
    )
    paused = run_json(collector, "viewer", capsys, "rules")["rules"]
    refused = run(collector, "operator", capsys, "rules", "promote", name)
    resumed = run_json(collector, "operator", capsys, "rules", "resume", name)
    promoted = run_json(collector, "operator", capsys, "rules", "promote", name)
    again = run_json(collector, "operator", capsys, "rules", "promote", name)

    assert code == 0, err
    assert paused_out == (
        f"Rule {name} is paused. Reason: paused by operator-token: flaky.\n"
    )
    assert isinstance(paused, list)
    assert paused[0]["stage"] == "RULE_STAGE_PAUSED"
    assert paused[0]["reason"] == "paused by operator-token: flaky"
    assert refused[0] == 1
    assert "the collector rejected ChangeRuleState: " in refused[2]
    assert f"resume it with `fleetmend rules resume {name}`" in refused[2]
    # Without canary runs yet, the rule resumes on its canary set.
    resumed_rule = resumed["rule"]
    assert isinstance(resumed_rule, dict)
    assert resumed_rule["stage"] == "RULE_STAGE_CANARY"
    assert resumed_rule["reason"] == "resumed by operator-token"
    promoted_rule = promoted["rule"]
    assert isinstance(promoted_rule, dict)
    assert promoted_rule["stage"] == "RULE_STAGE_ACTIVE"
    assert promoted_rule["reason"] == "promoted by operator-token"
    assert again["rule"] == promoted["rule"]
    assert promoted["changed"] is True
    assert again["changed"] is False


def test_paused_rule_reaches_agent(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    device_id, node_key = enroll(collector.address, collector.tls_dir, plaintext=False)
    with channel_to(collector.address, collector.tls_dir) as channel:
        stream = OpenStream(channel, device_id, node_key)
        try:
            first = stream.next_of("policy").policy
            code, _, err = run(
                collector, "operator", capsys, "rules", "pause", "failing-disk-notice"
            )
            second = stream.next_of("policy").policy
        finally:
            stream.close()

    assert code == 0, err
    assert first.rules[1].paused is False
    assert second.rules[1].paused is True
    assert second.rules[1].paused_reason == "paused by operator-token"
    assert second.version != first.version


def test_policy_set_agent_check_keeps_previous(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    bad = POLICY_TOML.replace('"browser", "thumbnails"', '"/etc"')
    path = collector.write("bad-policy.toml", bad)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))
    shown = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 1
    assert out == ""
    assert "agents would reject this policy: " in err
    assert "rule 'clear-caches-low-space': action: clear_cache: unknown " in err
    assert "cache set '/etc'" in err
    policy = shown["policy"]
    assert isinstance(policy, dict)
    assert policy["version"] == "1"


def test_policy_file_byte_order_mark(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.write("notepad.toml", "")
    path.write_bytes(b"\xef\xbb\xbf" + POLICY_TOML.encode("utf-8"))

    code, _, err = run(collector, "admin", capsys, "policy", "set", str(path))

    assert code == 0, err


def test_policy_file_not_utf8(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.write("latin1.toml", "")
    path.write_bytes(POLICY_TOML.encode("utf-8") + b"# caf\xe9\n")

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))

    assert code == 2
    assert out == ""
    assert f"the policy file {path} is not UTF-8 text" in err
    assert "save it as UTF-8" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("source", ["large", "/dev/zero"])
def test_policy_file_too_large(
    collector: Collector, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    if source == "large":
        path = collector.write("large.toml", "# padding\n" * 120_000)
    else:
        path = Path(source)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))

    assert code == 2
    assert out == ""
    assert f"the policy file {path} is larger than 1048576 bytes" in err


def test_rules_empty_canary_advice(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    # No device is enrolled, so the canary set of clear-caches-low-space is empty.
    set_policy(collector, capsys)

    code, out, err = run(collector, "viewer", capsys, "rules")
    paused = run(
        collector, "operator", capsys, "rules", "pause", "clear-caches-low-space"
    )
    resumed = run(
        collector, "operator", capsys, "rules", "resume", "clear-caches-low-space"
    )

    assert code == 0, err
    assert (
        "clear-caches-low-space is in canary on no device, so it gets no runs "
        "towards its promotion; `fleetmend rules promote clear-caches-low-space` "
        "gives it to the whole fleet, or raise fleet.canary_percent in the policy\n"
    ) in out
    assert "failing-disk-notice is in canary" not in out
    assert paused[0] == 0, paused[2]
    assert "No device is in its canary set" not in paused[1]
    assert resumed[0] == 0, resumed[2]
    assert resumed[1].startswith(
        "Rule clear-caches-low-space is in canary on 0 devices."
    )
    assert (
        " No device is in its canary set, so it gets no runs towards its "
        in (resumed[1])
    )


def test_rules_change_unknown_rule(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)

    code, out, err = run(collector, "operator", capsys, "rules", "pause", "nope")

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "unknown rule 'nope': " in err
    assert "see `fleetmend rules`" in err


def test_viewer_cannot_pause(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)

    code, _, err = run(
        collector, "viewer", capsys, "rules", "pause", "failing-disk-notice"
    )
    listed = run_json(collector, "viewer", capsys, "rules")["rules"]
    events = audit_events(collector, capsys)

    assert code == 1
    assert "permission denied: " in err
    assert isinstance(listed, list)
    assert listed[1]["stage"] == "RULE_STAGE_ACTIVE"
    assert events[0]["action"] == "ChangeRuleState"
    assert events[0]["outcome"] == "PERMISSION_DENIED"


def test_change_rule_state_server_checks(collector: Collector) -> None:
    metadata = bearer(collector.tokens["operator"])
    requests = [
        (ops_pb2.ChangeRuleStateRequest(change=ops_pb2.RULE_CHANGE_PAUSE), "name"),
        (ops_pb2.ChangeRuleStateRequest(name="r"), "is not one of promote"),
        (
            ops_pb2.ChangeRuleStateRequest(
                name="r", change=ops_pb2.RULE_CHANGE_PAUSE, reason="x" * 501
            ),
            "more than the maximum of 500",
        ),
        (
            ops_pb2.ChangeRuleStateRequest(
                name="r", change=ops_pb2.RULE_CHANGE_PAUSE, reason="bad\x1b[31mred"
            ),
            "reason contains a control or line break character",
        ),
    ]
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        for request, reason in requests:
            with pytest.raises(grpc.RpcError) as raised:
                stub.ChangeRuleState(request, metadata=metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in (raised.value.details() or "")


# act


def test_act_sends_to_connected_device(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, node_key = enroll(collector.address, collector.tls_dir, plaintext=False)
    with channel_to(collector.address, collector.tls_dir) as channel:
        stream = OpenStream(channel, device_id, node_key)
        try:
            code, out, err = run(
                collector,
                "operator",
                capsys,
                "act",
                "clear_cache",
                "--param",
                "cache_sets=browser, thumbnails",
                "--param",
                "older_than_days=7",
                "--device",
                device_id,
            )
            command = stream.next_of("command").command
        finally:
            stream.close()

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Sent clear_cache to 1 device; it is connected now."
    assert lines[1].split()[:3] == ["COMMAND", "ID", "DEVICE"]
    assert lines[2].split()[0] == command.command_id
    assert lines[2].split()[1] == device_id
    assert lines[2].split()[-1] == "sent"
    assert lines[3] == (
        "See what the devices did with `fleetmend remediations --rule command`."
    )
    assert list(command.action.clear_cache.cache_sets) == ["browser", "thumbnails"]
    assert command.action.clear_cache.older_than_days == 7


def test_act_durations_and_ttl(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    before = datetime.now(UTC)

    shown = run_json(
        collector,
        "operator",
        capsys,
        "act",
        "restart_service",
        "--param",
        "service=cups",
        "--param",
        "settle=30s",
        "--param",
        "failure_window=1h30m",
        "--param",
        "max_failures=2",
        "--device",
        device_id,
        "--ttl",
        "10m",
    )
    with Store.open(collector.database_url) as store:
        pending = store.pending_commands(device_id, datetime.now(UTC))

    commands = shown["commands"]
    assert isinstance(commands, list)
    assert len(commands) == 1
    assert commands[0]["device_id"] == device_id
    # No stream was open, so the command waits; JSON leaves out false.
    assert "sent" not in commands[0]
    expire = datetime.fromisoformat(commands[0]["expire_time"])
    assert before + timedelta(minutes=10) <= expire
    assert expire <= datetime.now(UTC) + timedelta(minutes=10)
    assert [command.command_id for command in pending] == [commands[0]["command_id"]]
    restart = pending[0].action.restart_service
    assert restart.service == "cups"
    assert restart.settle.ToTimedelta() == timedelta(seconds=30)
    assert restart.failure_window.ToTimedelta() == timedelta(minutes=90)
    assert restart.max_failures == 2


def test_act_all_skips_revoked(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    kept, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    revoked, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    assert run(collector, "admin", capsys, "device", "revoke", revoked)[0] == 0

    shown = run_json(
        collector,
        "operator",
        capsys,
        "act",
        "notify",
        "--param",
        "title=Restart today",
        "--all",
    )
    code, _, err = run(
        collector,
        "operator",
        capsys,
        "act",
        "notify",
        "--param",
        "title=Restart today",
        "--device",
        revoked,
    )

    commands = shown["commands"]
    assert isinstance(commands, list)
    assert [command["device_id"] for command in commands] == [kept]
    assert code == 1
    assert err.count("\n") == 1
    assert f"device {revoked} is revoked" in err


def test_act_all_without_devices(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        collector, "operator", capsys, "act", "notify", "--param", "title=t", "--all"
    )

    assert code == 0, err
    assert out == (
        "No device received the command: the collector knows no device that is "
        "not revoked.\n"
    )


def test_act_by_hostname(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(
        collector.address, collector.tls_dir, plaintext=False, hostname="lab-07"
    )

    shown = run_json(
        collector,
        "operator",
        capsys,
        "act",
        "notify",
        "--param",
        "title=t",
        "--device",
        "lab-07",
    )

    commands = shown["commands"]
    assert isinstance(commands, list)
    assert [command["device_id"] for command in commands] == [device_id]


def test_act_unknown_device(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    known, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    unknown = str(uuid.uuid4())

    code, out, err = run(
        collector,
        "operator",
        capsys,
        "act",
        "notify",
        "--param",
        "title=t",
        "--device",
        known,
        "--device",
        unknown,
    )
    with Store.open(collector.database_url) as store:
        pending = store.pending_commands(known, datetime.now(UTC))

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert f"unknown device ids: {unknown}" in err
    assert pending == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run_script", "--all"],
            "unknown action 'run_script'; choose one of clear_cache, "
            "restart_service, throttle_process, notify, prompt_password_change",
        ),
        (
            ["clear_cache", "--param", "path=/etc", "--all"],
            "unknown parameter 'path' of clear_cache; valid parameters: "
            "cache_sets, older_than_days",
        ),
        (
            ["clear_cache", "--param", "older_than_days=-1", "--all"],
            "invalid --param older_than_days='-1': expected a whole number from 0",
        ),
        (
            ["clear_cache", "--param", "older_than_days=soon", "--all"],
            "expected a whole number",
        ),
        (
            ["restart_service", "--param", "settle=10", "--all"],
            "invalid span '10'; give a number with a unit of s, m, h or d",
        ),
        (["notify", "--param", "title", "--all"], "invalid --param 'title'; give"),
        (
            ["notify", "--param", "title=a", "--param", "title=b", "--all"],
            "--param title is given twice",
        ),
    ],
)
def test_act_bad_parameters(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = run(collector, "operator", capsys, "act", *args)

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize("ttl", ["1m", "7d"])
def test_act_ttl_range(
    collector: Collector, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    code, _, err = run(
        collector,
        "operator",
        capsys,
        "act",
        "notify",
        "--param",
        "title=t",
        "--device",
        device_id,
        "--ttl",
        ttl,
    )

    assert code == 0, err


@pytest.mark.parametrize("ttl", ["30s", "8d", "7d1s"])
def test_act_ttl_out_of_range(
    collector: Collector, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    err = usage_error(
        collector, capsys, "act", "notify", "--device", device_id, "--ttl", ttl
    )

    assert f"argument --ttl: {ttl!r} is outside 1 minute to 7 days" in err
    assert "time_to_live" not in err


def test_act_needs_a_target(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(collector, capsys, "act", "notify")

    assert "one of the arguments --device --all is required" in err


def test_viewer_cannot_act(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    code, out, err = run(
        collector,
        "viewer",
        capsys,
        "act",
        "notify",
        "--param",
        "title=t",
        "--device",
        device_id,
    )
    events = audit_events(collector, capsys)

    assert code == 1
    assert out == ""
    assert "permission denied: " in err
    assert events[0]["action"] == "SendCommand"
    assert events[0]["outcome"] == "PERMISSION_DENIED"
    assert events[0]["actor"] == "viewer-token"


def test_send_command_server_checks(collector: Collector) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    notify = remediation_pb2.Action(notify=remediation_pb2.Notify(title="t"))
    requests = [
        (ops_pb2.SendCommandRequest(device_ids=[device_id]), "has no action"),
        (ops_pb2.SendCommandRequest(action=notify), "no devices"),
        (
            ops_pb2.SendCommandRequest(
                action=notify, device_ids=[device_id], all_devices=True
            ),
            "not both",
        ),
        (
            ops_pb2.SendCommandRequest(action=notify, device_ids=["lab-07"]),
            "is not a UUID in canonical form",
        ),
        (
            ops_pb2.SendCommandRequest(
                action=notify,
                device_ids=[device_id],
                time_to_live=Duration(seconds=8 * 86400),
            ),
            "is outside 1 minute to 7 days",
        ),
    ]
    metadata = bearer(collector.tokens["operator"])
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        for request, reason in requests:
            with pytest.raises(grpc.RpcError) as raised:
                stub.SendCommand(request, metadata=metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in (raised.value.details() or "")


def test_send_command_agent_checks(collector: Collector) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    long_title = remediation_pb2.Action(
        notify=remediation_pb2.Notify(title="Disk full " * 10)
    )
    outside_root = remediation_pb2.Action(
        clear_cache=remediation_pb2.ClearCache(cache_sets=["/etc"])
    )
    not_a_service = remediation_pb2.Action(
        restart_service=remediation_pb2.RestartService(service="-H evil")
    )
    requests = [
        (long_title, "notify: title has 100 characters, more than the maximum 80"),
        (outside_root, "clear_cache: unknown cache set '/etc'"),
        (not_a_service, "restart_service: service '-H evil' is not a service name"),
    ]
    metadata = bearer(collector.tokens["operator"])
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        for action, reason in requests:
            request = ops_pb2.SendCommandRequest(action=action, device_ids=[device_id])
            with pytest.raises(grpc.RpcError) as raised:
                stub.SendCommand(request, metadata=metadata, timeout=10)
            details = raised.value.details() or ""
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details.startswith("agents would refuse this command: ")
            assert reason in details


def test_build_action_types() -> None:
    action = build_action("throttle_process", ["app_id=onedrive", "restore_after=2h"])

    assert action.WhichOneof("kind") == "throttle_process"
    assert action.throttle_process.app_id == "onedrive"
    assert action.throttle_process.restore_after.seconds == 7200
    assert build_action("notify", ["title=t"]).HasField("notify")
    assert parse_span("1d12h") == timedelta(hours=36)
    assert parse_span("0.5m") == timedelta(seconds=30)


# remediations


@pytest.fixture
def history(collector: Collector) -> dict[str, str]:
    """Records of two rules and a command on two devices, the newest last."""
    desk = str(uuid.uuid4())
    lab = str(uuid.uuid4())
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    store_remediations(
        collector.database_url,
        desk,
        [
            remediation("clear-caches-low-space", SUCCEEDED, start),
            remediation("clear-caches-low-space", SUCCEEDED, start + timedelta(days=1)),
            remediation("failing-disk-notice", SKIPPED, start + timedelta(days=1)),
        ],
        hostname="desk",
    )
    store_remediations(
        collector.database_url,
        lab,
        [
            remediation(
                "clear-caches-low-space",
                FAILED,
                start + timedelta(days=2),
                reason="free space did not rise",
            ),
            remediation(
                "", SUCCEEDED, start + timedelta(days=2, hours=1), command_id="cmd-1"
            ),
        ],
        hostname="lab",
    )
    return {"desk": desk, "lab": lab, "start": start.isoformat()}


def test_remediations_records_and_summary(
    collector: Collector,
    history: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    records, summary = out.split("\nSummary per rule, over every matching record\n")
    lines = records.splitlines()
    assert lines[0].split()[:5] == ["TIME", "DEVICE", "ID", "HOSTNAME", "RULE"]
    assert len(lines) == 7
    assert lines[6].startswith("POLICY: vN is version N of the current fleet policy")
    # Newest first: the command, then the failure on lab.
    assert "command cmd-1" in lines[1]
    assert history["lab"] in lines[2]
    assert "failed" in lines[2]
    assert "free space did not rise" in lines[2]
    assert "free space on / 953.7 MiB -> 2.8 GiB, freed 1.9 GiB" in lines[2]
    rows = [line.split() for line in summary.splitlines()]
    assert rows[0] == [
        "RULE",
        "RUNS",
        "SUCCEEDED",
        "FAILED",
        "SKIPPED",
        "REFUSED",
        "DRY",
        "RUN",
        "SUCCESS",
        "DEVICES",
        "RECURRING",
    ]
    by_rule = {row[0]: row[1:] for row in rows[1:]}
    assert by_rule["clear-caches-low-space"] == [
        "3",
        "2",
        "1",
        "0",
        "0",
        "0",
        "67%",
        "2",
        "1",
    ]
    assert by_rule["failing-disk-notice"] == [
        "0",
        "0",
        "0",
        "1",
        "0",
        "0",
        "-",
        "1",
        "0",
    ]
    assert by_rule["command"] == ["1", "1", "0", "0", "0", "0", "100%", "1", "0"]
    assert len(rows) == 4


def test_remediations_json_and_filters(
    collector: Collector,
    history: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    everything = run_json(collector, "viewer", capsys, "remediations")
    by_device = run_json(
        collector, "viewer", capsys, "remediations", "--device", history["desk"]
    )
    by_hostname = run_json(
        collector, "viewer", capsys, "remediations", "--device", "lab"
    )
    failed = run_json(
        collector, "viewer", capsys, "remediations", "--outcome", "failed"
    )
    by_rule = run_json(
        collector, "viewer", capsys, "remediations", "--rule", "failing-disk-notice"
    )
    since = datetime.fromisoformat(history["start"]) + timedelta(days=2)
    recent = run_json(
        collector, "viewer", capsys, "remediations", "--since", since.isoformat()
    )
    recent_span = run_json(collector, "viewer", capsys, "remediations", "--since", "2d")

    def devices(shown: dict[str, object]) -> list[str]:
        records = shown["remediations"]
        assert isinstance(records, list)
        return [record["device_id"] for record in records]

    records = everything["remediations"]
    assert isinstance(records, list)
    assert set(records[0]) == {"device_id", "hostname", "record", "receive_time"}
    assert records[0]["hostname"] == "lab"
    assert records[0]["record"]["command_id"] == "cmd-1"
    assert len(records) == 5
    assert devices(by_device) == [history["desk"]] * 3
    assert devices(by_hostname) == [history["lab"]] * 2
    assert devices(failed) == [history["lab"]]
    failed_summaries = failed["summaries"]
    assert isinstance(failed_summaries, list)
    assert [summary["rule"] for summary in failed_summaries] == [
        "clear-caches-low-space"
    ]
    assert devices(by_rule) == [history["desk"]]
    assert devices(recent) == [history["lab"]] * 2
    assert devices(recent_span) == [history["lab"]] * 2


def test_remediations_limit_follows_pages(
    collector: Collector,
    history: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    everything = run_json(collector, "viewer", capsys, "remediations")
    limited = run_json(
        collector, "viewer", capsys, "--page-size", "1", "remediations", "--limit", "3"
    )

    all_records = everything["remediations"]
    records = limited["remediations"]
    assert isinstance(all_records, list)
    assert isinstance(records, list)
    assert records == all_records[:3]
    assert limited["summaries"] == everything["summaries"]


def test_remediations_empty(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(collector, "viewer", capsys, "remediations")

    assert code == 0
    assert out == "No remediation records.\n"
    assert run_json(collector, "viewer", capsys, "remediations") == {
        "remediations": [],
        "summaries": [],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--outcome", "broken"],
            "unknown outcome 'broken'; choose one of succeeded, failed, skipped",
        ),
        (["--since", "last week"], "invalid time 'last week'"),
        (["--limit", "0"], "must be at least 1"),
    ],
)
def test_remediations_usage_errors(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    err = usage_error(collector, capsys, "remediations", *args)

    assert message in err


def test_remediations_bad_page_token(collector: Collector) -> None:
    metadata = bearer(collector.tokens["viewer"])
    requests = [
        (ops_pb2.ListRemediationsRequest(page_token="r1.bm90LWpzb24="), "position"),
        (ops_pb2.ListRemediationsRequest(page_token="d1.YQ=="), "not issued"),
        (ops_pb2.ListRemediationsRequest(device_id="lab"), "not a UUID"),
        (
            ops_pb2.ListRemediationsRequest(outcome=99),  # type: ignore[arg-type]
            "not a RemediationOutcome",
        ),
    ]
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        for request, reason in requests:
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListRemediations(request, metadata=metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in (raised.value.details() or "")


def test_policy_toml_escapes_text() -> None:
    from collector._ops_render import render_policy_toml

    title = 'quote " backslash \\ tab \t newline \n control \x01 delete \x7f é 😀'
    policy = remediation_pb2.Policy(version=4)
    rule = policy.rules.add(name="tricky", dry_run=True)
    rule.condition.free_space_below.ratio = 1e-05
    rule.condition.free_space_below.bytes = 2**63
    rule.action.notify.title = title
    rule.limits.cooldown.FromTimedelta(timedelta(milliseconds=1500))

    parsed = json_format.ParseDict(
        tomllib.loads(render_policy_toml(policy)), remediation_pb2.Policy()
    )

    policy.version = 0
    assert parsed == policy
    assert parsed.rules[0].action.notify.title == title
