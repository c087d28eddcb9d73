"""Control characters in device- and operator-supplied strings of the CLI output.

The strings are stored directly through collector.store, so these tests do
not depend on what the server accepts on the wire.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from collector import fleet
from collector._ops_render import (
    escape_controls,
    render_outage,
    render_policy_toml,
    render_table,
)
from collector.ops_cli import _print_error, main
from collector.server import ServerHandle, start_server_thread
from collector.store import IncomingReport, Store
from fleetmend.v1 import ops_pb2, remediation_pb2, report_pb2
from tests.trust import create_token, write_token_file

# Sets the terminal title, clears the screen, then starts a forged line.
HOSTILE = "\x1b]0;TITLE\x07\x1b[2J\r\nFAKE"
HOSTILE_ESCAPED = "\\x1b]0;TITLE\\x07\\x1b[2J\\r\\nFAKE"
# CSI as one C1 character, then a line separator that str.splitlines breaks on.
HOSTILE_C1 = "\x9b2J\u2028FAKE"
HOSTILE_C1_ESCAPED = "\\x9b2J\\u2028FAKE"
RULE = "clean-cache"
# C0, DEL, C1 and the line and paragraph separators.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class Collector:
    """A collector on 127.0.0.1 with a stored hostile device."""

    address: str
    ca_file: Path
    token_files: dict[str, Path]
    device_id: str

    def args(self, role: str, *args: str) -> list[str]:
        return [
            "--collector",
            self.address,
            "--ca-file",
            str(self.ca_file),
            "--token-file",
            str(self.token_files[role]),
            *args,
        ]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEETMEND_COLLECTOR", "FLEETMEND_CA_FILE", "FLEETMEND_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def hostile_report(now: datetime) -> report_pb2.Report:
    host = report_pb2.HostFacts(
        hostname=HOSTILE,
        os_name=HOSTILE,
        os_version=HOSTILE_C1,
        kernel_version=HOSTILE,
        manufacturer=HOSTILE,
        model=HOSTILE_C1,
        volumes=[
            report_pb2.Volume(
                mount_point=HOSTILE, total_bytes=100, free_bytes=10, device=HOSTILE
            )
        ],
    )
    disk = report_pb2.Disk(
        name="sda",
        model=HOSTILE,
        serial_number=HOSTILE_C1,
        smart_state=report_pb2.SMART_STATE_PERMISSION_DENIED,
        smart_state_reason=HOSTILE,
    )
    credential = report_pb2.Credential(
        kind=report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
        account=HOSTILE,
        expiry=report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW,
        source=HOSTILE,
    )
    record = remediation_pb2.RemediationRecord(
        rule=RULE,
        outcome=remediation_pb2.REMEDIATION_OUTCOME_FAILED,
        reason=HOSTILE,
        unit=HOSTILE_C1,
    )
    record.action.clear_cache.cache_sets.append("browser")
    record.start_time.FromDatetime(now - timedelta(minutes=5))
    return report_pb2.Report(
        sequence=1,
        full=True,
        collect_time=timestamp(now),
        host=host,
        disks=report_pb2.DiskSection(
            disks=[disk],
            errors=[
                report_pb2.ProbeError(
                    source=HOSTILE,
                    kind=report_pb2.PROBE_ERROR_KIND_UNREADABLE,
                    reason=HOSTILE_C1,
                )
            ],
        ),
        credentials=report_pb2.CredentialSection(credentials=[credential]),
        remediations=[record],
    )


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def hostile_policy() -> remediation_pb2.Policy:
    policy = remediation_pb2.Policy()
    rule = policy.rules.add(name=RULE)
    rule.condition.free_space_below.mount_point = "/"
    rule.condition.free_space_below.ratio = 0.1
    rule.action.clear_cache.cache_sets.append("browser")
    rule.fleet.daily_budget = 10
    return policy


@pytest.fixture
def collector(database_url: str, tls_dir: Path, tmp_path: Path) -> Iterator[Collector]:
    handle: ServerHandle = start_server_thread(database_url, tls_dir=tls_dir)
    token_files = {}
    for role in ("viewer", "admin"):
        folder = tmp_path / role
        folder.mkdir()
        token = create_token(database_url, role, f"{role}-token")
        token_files[role] = write_token_file(folder, token)
    now = datetime.now(UTC)
    device_id = str(uuid.uuid4())
    with Store.open(database_url) as store:
        store.record_hello(device_id, HOSTILE, now)
        store.ingest([IncomingReport(device_id, hostile_report(now), now)])
        store.add_outage(
            "sap-gui",
            now + timedelta(hours=1),
            now + timedelta(hours=2),
            "",
            HOSTILE,
            HOSTILE_C1,
            now,
            [device_id],
        )
        store.set_policy(hostile_policy(), "admin-token", now)
        store.set_rule_state(RULE, fleet.ACTIVE, HOSTILE, "admin-token", now)
    yield Collector(handle.address, tls_dir / "ca.pem", token_files, device_id)
    handle.stop()


def run(collector: Collector, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = main(collector.args("admin", *args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def assert_escaped(out: str) -> None:
    """Check that out has no control character but the newlines between lines."""
    for line in out.split("\n"):
        assert CONTROL_CHARACTER.search(line) is None, repr(line)
        assert not line.lstrip().startswith("FAKE"), repr(line)


# escape_controls


@pytest.mark.parametrize("code", [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029])
def test_escape_every_control(code: int) -> None:
    escaped = escape_controls(f"a{chr(code)}b")

    assert escaped.isprintable()
    assert escaped.startswith("a\\")
    assert escaped.endswith("b")


def test_escape_short_forms() -> None:
    assert escape_controls("a\tb\nc\rd") == "a\\tb\\nc\\rd"


def test_escape_keeps_printable_text() -> None:
    text = "C:\\Users\\Jürgen – 東京 ✓"

    assert escape_controls(text) == text


def test_escape_hostile_hostname() -> None:
    assert escape_controls(HOSTILE) == HOSTILE_ESCAPED
    assert escape_controls(HOSTILE_C1) == HOSTILE_C1_ESCAPED


def test_table_rows_one_line_each() -> None:
    out = render_table(["A", "B"], [[HOSTILE, "x"], ["y", HOSTILE_C1]])

    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith(HOSTILE_ESCAPED)
    assert lines[2].endswith(HOSTILE_C1_ESCAPED)


def test_table_aligns_escaped_cells() -> None:
    out = render_table(["A", "B"], [[HOSTILE, "x"], ["y", "z"]])

    lines = out.splitlines()
    assert lines[1].rindex("x") == lines[2].rindex("z")


def test_outage_report_escapes_message() -> None:
    outage = ops_pb2.Outage(
        outage_id=7,
        app_id="sap-gui",
        message=HOSTILE,
        start_time=timestamp(datetime(2026, 5, 4, 9, tzinfo=UTC)),
        end_time=timestamp(datetime(2026, 5, 4, 10, tzinfo=UTC)),
    )

    out = render_outage(outage)

    assert_escaped(out)
    assert f"message: {HOSTILE_ESCAPED}\n" in out


def test_policy_toml_escapes_c1() -> None:
    policy = hostile_policy()
    policy.rules[0].action.clear_cache.cache_sets.append(HOSTILE_C1)

    out = render_policy_toml(policy)

    assert_escaped(out)
    assert '"\\u009b2J\\u2028FAKE"' in out


def test_error_line_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    _print_error(f"device {HOSTILE} not found")

    err = capsys.readouterr().err
    assert err == f"fleetmend: error: device {HOSTILE_ESCAPED} not found\n"


# the CLI against a collector on 127.0.0.1


def test_devices_table_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "devices")

    assert_escaped(out)
    assert len(out.splitlines()) == 2
    assert HOSTILE_ESCAPED in out.splitlines()[1]


def test_device_show_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "device", "show", collector.device_id)

    assert_escaped(out)
    assert f"Device {collector.device_id} ({HOSTILE_ESCAPED})" in out
    assert f"agent version       {HOSTILE_ESCAPED}\n" in out
    assert f"hostname       {HOSTILE_ESCAPED}\n" in out
    assert HOSTILE_C1_ESCAPED in out


def test_findings_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "findings")

    assert_escaped(out)
    assert HOSTILE_ESCAPED in out


def test_outage_list_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "outage", "list")

    assert_escaped(out)
    assert len(out.splitlines()) == 2
    assert out.splitlines()[1].endswith(HOSTILE_ESCAPED)
    assert HOSTILE_C1_ESCAPED in out


def test_rules_reason_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "rules")

    assert_escaped(out)
    assert len(out.splitlines()) == 2
    assert HOSTILE_ESCAPED in out


def test_rule_change_reason_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    # Promoting an active rule changes nothing and returns its stored reason.
    out = run(collector, capsys, "rules", "promote", RULE)

    assert_escaped(out)
    assert f"Reason: {HOSTILE_ESCAPED}." in out


def test_remediations_escaped(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "remediations")

    assert_escaped(out)
    assert HOSTILE_ESCAPED in out
    assert HOSTILE_C1_ESCAPED in out


def test_json_keeps_original_strings(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(collector, capsys, "--json", "devices")

    assert_escaped(out)
    devices = json.loads(out)["devices"]
    assert devices[0]["hostname"] == HOSTILE
    assert devices[0]["agent_version"] == HOSTILE
