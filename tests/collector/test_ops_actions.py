"""The fleetmend commands for outages, revocation, tokens and the audit log."""

from __future__ import annotations

import gc
import json
import queue
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest

from collector.ops_cli import main
from collector.server import ServerHandle, start_server_thread
from collector.store import IncomingReport, Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, ops_pb2, ops_pb2_grpc, report_pb2
from tests.trust import bearer, channel_to, create_token, enroll, write_token_file

BERLIN = ZoneInfo("Europe/Berlin")


@dataclass(frozen=True)
class Collector:
    """A TLS collector and token files of each role for it."""

    address: str
    tls_dir: Path
    database_url: str
    tokens: dict[str, str]
    token_files: dict[str, Path]

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
    yield Collector(handle.address, tls_dir, database_url, tokens, token_files)
    handle.stop()


def run(
    collector: Collector, role: str, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    settle_output(capsys)
    code = main(collector.args(role, *args))
    captured = capsys.readouterr()
    for token in collector.tokens.values():
        assert token not in captured.out
        assert token not in captured.err
    return code, captured.out, captured.err


def settle_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Drop what earlier tests' stopped servers print, so checks see only this run.

    grpc prints a traceback on stderr when it collects the coroutine of a call
    that a stopped server left unfinished, at whatever time that happens.
    """
    gc.collect()
    capsys.readouterr()


def run_json(
    collector: Collector, role: str, capsys: pytest.CaptureFixture[str], *args: str
) -> object:
    code, out, err = run(collector, role, capsys, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def next_monday(zone: ZoneInfo) -> datetime:
    """Return 00:00 local time of the first Monday after this week, in zone."""
    today = datetime.now(zone).date()
    monday = today + timedelta(days=7 - today.weekday())
    return datetime(monday.year, monday.month, monday.day, tzinfo=zone)


def usage_report(
    minutes_by_hour: dict[int, int], app_id: str = "sap"
) -> report_pb2.Report:
    hours = sorted(minutes_by_hour)
    app = report_pb2.AppUsage(
        app_id=app_id,
        hours_of_week=hours,
        minutes=[minutes_by_hour[hour] for hour in hours],
    )
    usage = report_pb2.UsageSection(enabled=True, window_days=28, apps=[app])
    host = report_pb2.HostFacts(hostname="desk")
    return report_pb2.Report(sequence=1, full=True, host=host, usage=usage)


def store_reports(database_url: str, reports: dict[str, report_pb2.Report]) -> None:
    now = datetime.now(UTC)
    with Store.open(database_url) as store:
        store.ingest(
            [
                IncomingReport(device_id, report, now)
                for device_id, report in reports.items()
            ]
        )


# outage declare


@pytest.fixture
def usage_fleet(collector: Collector) -> dict[str, str]:
    """Devices by what their users do: SAP on Monday mornings, evenings, Teams."""
    devices = {name: str(uuid.uuid4()) for name in ("morning", "evening", "teams")}
    store_reports(
        collector.database_url,
        {
            devices["morning"]: usage_report({9: 120, 10: 30}),
            devices["evening"]: usage_report({19: 45}),
            devices["teams"]: usage_report({9: 200}, app_id="teams"),
        },
    )
    return devices


def test_declare_lists_affected(
    collector: Collector,
    usage_fleet: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monday = next_monday(BERLIN)
    start = f"{monday:%Y-%m-%d}T09:30"
    end = f"{monday:%Y-%m-%d}T11:00"

    code, out, err = run(
        collector,
        "operator",
        capsys,
        "outage",
        "declare",
        "sap",
        "--from",
        start,
        "--to",
        end,
        "--time-zone",
        "Europe/Berlin",
        "--message",
        "SAP is down until 11:00",
    )

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Outage ")
    assert (
        f"{monday:%Y-%m-%d} 09:30 to {monday:%Y-%m-%d} 11:00 Europe/Berlin" in lines[0]
    )
    assert "message: SAP is down until 11:00" in lines
    assert "1 device whose users usually use sap then:" in lines
    assert f"  {usage_fleet['morning']}" in lines
    assert usage_fleet["evening"] not in out
    assert usage_fleet["teams"] not in out


def test_declare_json_fields(
    collector: Collector,
    usage_fleet: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monday = next_monday(BERLIN)

    shown = run_json(
        collector,
        "operator",
        capsys,
        "outage",
        "declare",
        "sap",
        "--from",
        f"{monday:%Y-%m-%d}T18:00",
        "--to",
        f"{monday:%Y-%m-%d}T20:00",
        "--time-zone",
        "Europe/Berlin",
    )

    assert isinstance(shown, dict)
    outage = shown["outage"]
    start = (monday + timedelta(hours=18)).astimezone(UTC)
    assert outage["start_time"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert outage["time_zone"] == "Europe/Berlin"
    assert outage["declared_by"] == "operator-token"
    assert outage["affected_device_ids"] == [usage_fleet["evening"]]
    assert int(outage["outage_id"]) >= 1


def test_declare_with_offset_in_utc(
    collector: Collector,
    usage_fleet: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Times with an offset keep it, and the hours of use are matched in UTC
    # without --time-zone: 09:00+02:00 is 07:00 UTC, an hour without SAP use.
    monday = next_monday(BERLIN)

    shown = run_json(
        collector,
        "operator",
        capsys,
        "outage",
        "declare",
        "sap",
        "--from",
        f"{monday:%Y-%m-%d}T09:00+02:00",
        "--to",
        f"{monday:%Y-%m-%d}T10:00+02:00",
    )

    assert isinstance(shown, dict)
    outage = shown["outage"]
    assert outage["start_time"].endswith("T07:00:00Z")
    assert "time_zone" not in outage
    assert "affected_device_ids" not in outage


def test_declare_none_affected_text(
    collector: Collector,
    usage_fleet: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monday = next_monday(BERLIN)

    code, out, _ = run(
        collector,
        "operator",
        capsys,
        "outage",
        "declare",
        "sap",
        "--from",
        f"{monday:%Y-%m-%d}T03:00",
        "--to",
        f"{monday:%Y-%m-%d}T04:00",
    )

    assert code == 0
    assert "No device's users usually use sap then." in out


def test_viewer_cannot_declare(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        collector,
        "viewer",
        capsys,
        "outage",
        "declare",
        "sap",
        "--from",
        "2026-05-04T09:00",
        "--to",
        "2026-05-04T10:00",
    )

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "permission denied: " in err
    assert "viewer-token" in err


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (
            ["sap", "--from", "2026-05-04T10:00", "--to", "2026-05-04T09:00"],
            "is not after start_time",
        ),
        (
            ["sap", "--from", "2026-05-04T10:00", "--to", "2026-05-04T10:00"],
            "is not after start_time",
        ),
        (
            ["sap", "--from", "2026-05-04T10:00", "--to", "2026-05-11T10:01"],
            "longer than the maximum of 7 days",
        ),
        (
            ["SAP!", "--from", "2026-05-04T10:00", "--to", "2026-05-04T11:00"],
            "is not a catalog id",
        ),
        (
            [
                "sap",
                "--from",
                "2026-05-04T10:00",
                "--to",
                "2026-05-04T11:00",
                "--message",
                "x" * 501,
            ],
            "message has 501 characters, more than the maximum of 500",
        ),
    ],
)
def test_declare_invalid_rejected(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    reason: str,
) -> None:
    code, out, err = run(collector, "operator", capsys, "outage", "declare", *arguments)

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "the collector rejected DeclareOutage: " in err
    assert reason in err


def test_week_long_span_accepted(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        collector,
        "operator",
        capsys,
        "outage",
        "declare",
        "sap",
        "--from",
        "2026-05-04T10:00",
        "--to",
        "2026-05-11T10:00",
    )

    assert code == 0, err


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--time-zone", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("--from", "next monday", "invalid time 'next monday'"),
    ],
)
def test_declare_usage_errors(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    reason: str,
) -> None:
    times = {"--from": "2026-05-04T10:00", "--to": "2026-05-04T11:00", option: value}
    arguments = [item for pair in times.items() for item in pair]

    with pytest.raises(SystemExit) as raised:
        main(collector.args("operator", "outage", "declare", "sap", *arguments))

    assert raised.value.code == 2
    assert reason in capsys.readouterr().err


@pytest.mark.parametrize(
    ("time_zone", "accepted"),
    [
        ("", True),
        ("Asia/Kolkata", True),
        ("Mars/Olympus_Mons", False),
        ("../etc", False),
    ],
)
def test_server_checks_time_zone(
    collector: Collector, time_zone: str, accepted: bool
) -> None:
    start = datetime(2026, 5, 4, 9, tzinfo=UTC)
    request = ops_pb2.DeclareOutageRequest(app_id="sap", time_zone=time_zone)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(start + timedelta(hours=1))
    metadata = bearer(collector.tokens["operator"])

    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        if accepted:
            response = stub.DeclareOutage(request, metadata=metadata, timeout=10)
            assert response.outage.time_zone == time_zone
            return
        with pytest.raises(grpc.RpcError) as raised:
            stub.DeclareOutage(request, metadata=metadata, timeout=10)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown time zone" in (raised.value.details() or "")


def test_server_requires_span(collector: Collector) -> None:
    request = ops_pb2.DeclareOutageRequest(app_id="sap")
    request.end_time.FromDatetime(datetime(2026, 5, 4, 9, tzinfo=UTC))

    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.DeclareOutage(
                request, metadata=bearer(collector.tokens["operator"]), timeout=10
            )

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "start_time is required"


# outage list


def test_outage_list_current_only(
    collector: Collector,
    usage_fleet: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monday = next_monday(BERLIN)
    day = f"{monday:%Y-%m-%d}"
    declared = [
        ("sap", f"{day}T09:00", f"{day}T10:00"),
        ("teams", f"{day}T09:30", f"{day}T10:00"),
        # Ended a year ago, so not listed.
        ("sap", "2025-05-05T09:00", "2025-05-05T10:00"),
    ]
    for app_id, start, end in declared:
        code, _, err = run(
            collector,
            "operator",
            capsys,
            "outage",
            "declare",
            app_id,
            "--from",
            start,
            "--to",
            end,
            "--time-zone",
            "Europe/Berlin",
        )
        assert code == 0, err

    code, out, err = run(collector, "viewer", capsys, "outage", "list")
    listed = run_json(collector, "viewer", capsys, "outage", "list")

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "APP", "FROM", "TO"]
    assert len(lines) == 3
    # Latest start first.
    assert lines[1].split()[1:4] == ["teams", day, "09:30"]
    assert lines[2].split()[1:4] == ["sap", day, "09:00"]
    assert "Europe/Berlin" in lines[1]
    assert "operator-token" in lines[1]
    assert isinstance(listed, dict)
    assert [outage["app_id"] for outage in listed["outages"]] == ["teams", "sap"]
    assert listed["outages"][0]["affected_device_ids"] == [usage_fleet["teams"]]


def test_outage_list_empty(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(collector, "viewer", capsys, "outage", "list")

    assert code == 0
    assert out == "No outages.\n"


# device revoke


class OpenStream:
    """An agent's Connect stream that stays open until the collector ends it."""

    def __init__(self, channel: grpc.Channel, device_id: str, node_key: str) -> None:
        self._requests: queue.Queue[agent_pb2.ConnectRequest | None] = queue.Queue()
        hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
        self._requests.put(agent_pb2.ConnectRequest(hello=hello))
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        self._call = stub.Connect(
            iter(self._requests.get, None), metadata=bearer(node_key), timeout=30
        )
        self.welcome = next(self._call)

    def wait_for_end(self) -> grpc.RpcError:
        """Return the error with which the collector ended the stream."""
        try:
            for _ in self._call:
                pass
        except grpc.RpcError as error:
            return error
        finally:
            self._requests.put(None)
        raise AssertionError("the stream ended without an error")

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


def test_revoke_ends_stream(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, node_key = enroll(collector.address, collector.tls_dir, plaintext=False)
    with channel_to(collector.address, collector.tls_dir) as channel:
        stream = OpenStream(channel, device_id, node_key)
        try:
            code, out, err = run(
                collector, "admin", capsys, "device", "revoke", device_id
            )
            ended = stream.wait_for_end()
        finally:
            stream.close()

    assert code == 0, err
    assert out == (
        f"Revoked 1 node key of device {device_id}. Its open stream was ended. "
        "It is rejected until it enrolls again.\n"
    )
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ended.details() == "device revoked by an operator"


def test_revoked_key_rejected(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, node_key = enroll(collector.address, collector.tls_dir, plaintext=False)
    code, _, err = run(collector, "admin", capsys, "device", "revoke", device_id)
    assert code == 0, err

    with (
        channel_to(collector.address, collector.tls_dir) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        OpenStream(channel, device_id, node_key)

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoke_twice_json(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    first = run_json(collector, "admin", capsys, "device", "revoke", device_id)
    second = run_json(collector, "admin", capsys, "device", "revoke", device_id)
    code, out, _ = run(collector, "admin", capsys, "device", "revoke", device_id)

    assert first == {"device_id": device_id, "revoked_keys": 1, "stream_closed": False}
    assert second == {"device_id": device_id, "revoked_keys": 0, "stream_closed": False}
    assert code == 0
    assert "had no valid node key; it was revoked already" in out


def test_revoke_unknown_device(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = str(uuid.uuid4())

    code, out, err = run(collector, "admin", capsys, "device", "revoke", device_id)

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert f"unknown device {device_id}" in err


def test_revoke_needs_admin(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    code, _, err = run(collector, "operator", capsys, "device", "revoke", device_id)

    assert code == 1
    assert "permission denied: " in err
    assert "operator-token" in err


def test_revoke_rejects_hostname(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(collector.args("admin", "device", "revoke", "lab-01"))

    assert raised.value.code == 2
    assert "'lab-01' is not a device id" in capsys.readouterr().err


# token list and revoke


def test_token_list_table(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(collector, "admin", capsys, "token", "list")

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "CREATED", "LAST", "USED", "REVOKED"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:2] for row in rows] == [
        ["admin-token", "admin"],
        ["operator-token", "operator"],
        ["viewer-token", "viewer"],
    ]
    # The admin token was used by this call; the others never were.
    assert "never" not in lines[1]
    assert rows[1][-2:] == ["never", "-"]


def test_token_list_json_no_secret(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = run_json(collector, "admin", capsys, "token", "list")

    assert isinstance(listed, dict)
    tokens = listed["tokens"]
    assert [token["name"] for token in tokens] == [
        "admin-token",
        "operator-token",
        "viewer-token",
    ]
    assert {key for token in tokens for key in token} <= {
        "name",
        "role",
        "create_time",
        "revoke_time",
        "last_use_time",
    }
    assert tokens[2]["role"] == "ROLE_VIEWER"


def test_token_revoke_then_listed(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(collector, "admin", capsys, "token", "revoke", "viewer-token")
    again = run_json(collector, "admin", capsys, "token", "revoke", "viewer-token")
    listed = run_json(collector, "admin", capsys, "token", "list")

    assert code == 0, err
    assert out == (
        "Revoked token viewer-token; calls with it are rejected from now on.\n"
    )
    assert again == {"name": "viewer-token", "revoked": False}
    assert isinstance(listed, dict)
    revoked = {token["name"] for token in listed["tokens"] if "revoke_time" in token}
    assert revoked == {"viewer-token"}


def test_token_revoke_unknown(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(collector, "admin", capsys, "token", "revoke", "nobody")

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "unknown token 'nobody'" in err


# audit


def test_audit_records_actions(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    assert run(collector, "admin", capsys, "device", "revoke", device_id)[0] == 0
    # Refused: a viewer may not list tokens.
    assert run(collector, "viewer", capsys, "token", "list")[0] == 1
    # A query, which is not audited.
    assert run(collector, "viewer", capsys, "devices")[0] == 0

    # A call's own event is written after it ends, so the first listing
    # does not contain itself and the second one contains the first.
    listed = run_json(collector, "admin", capsys, "audit")
    code, out, err = run(collector, "admin", capsys, "audit")

    assert isinstance(listed, dict)
    events = listed["events"]
    assert [event["action"] for event in events] == ["ListTokens", "RevokeDevice"]
    assert [event["outcome"] for event in events] == ["PERMISSION_DENIED", "OK"]
    assert events[0]["actor"] == "viewer-token"
    assert events[0]["role"] == "ROLE_VIEWER"
    assert events[1]["actor"] == "admin-token"
    assert events[1]["role"] == "ROLE_ADMIN"
    assert json.loads(events[1]["arguments_json"]) == {"deviceId": device_id}
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "TIME", "ACTOR"]
    assert lines[1].split()[4:8] == ["admin-token", "admin", "ListAuditEvents", "OK"]
    assert "RevokeDevice" in lines[-1]
    assert device_id in lines[-1]


def test_audit_actor_and_limit(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("viewer-token", "nobody", "operator-token"):
        run(collector, "admin", capsys, "token", "revoke", name)

    by_actor = run_json(collector, "admin", capsys, "audit", "--actor", "admin-token")
    limited = run_json(
        collector, "admin", capsys, "--page-size", "1", "audit", "--limit", "3"
    )
    nobody = run_json(collector, "admin", capsys, "audit", "--actor", "someone")

    assert isinstance(by_actor, dict)
    assert isinstance(limited, dict)
    assert [event["action"] for event in by_actor["events"]] == ["RevokeToken"] * 3
    assert [event["outcome"] for event in by_actor["events"]] == [
        "OK",
        "NOT_FOUND",
        "OK",
    ]
    ids = [int(event["event_id"]) for event in limited["events"]]
    assert len(ids) == 3
    assert ids == sorted(ids, reverse=True)
    assert nobody == {"events": []}


def test_audit_needs_admin(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(collector, "operator", capsys, "audit")

    assert code == 1
    assert "permission denied: " in err


def test_audit_bad_page_token(collector: Collector) -> None:
    request = ops_pb2.ListAuditEventsRequest(page_token="a1.bm90LWEtbnVtYmVy")

    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListAuditEvents(
                request, metadata=bearer(collector.tokens["admin"]), timeout=10
            )

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an audit event position" in (raised.value.details() or "")


def test_audit_empty_table(collector: Collector) -> None:
    from collector._ops_render import render_audit_table

    assert render_audit_table([]) == "No audit events.\n"
