"""Rules that devices refuse: ingest, `fleetmend rules`, `device show`, migration.

Reports travel over a real agent Connect stream to a real TLS collector on
127.0.0.1, and the real CLI reads them back.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from alembic import command
from sqlalchemy import create_engine

from collector.migrations import alembic_config
from collector.store import IncomingReport, Store
from collector.store._ingest import MAX_REFUSED_REASON_CHARS, MAX_REFUSED_RULES
from fleetmend.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    ops_pb2,
    ops_pb2_grpc,
    remediation_pb2,
    report_pb2,
)
from tests.collector.test_ops_healing import (
    Collector,
    clean_environment,
    collector,
    run,
    run_json,
    set_policy,
)
from tests.trust import bearer, channel_to, enroll

__all__ = ["clean_environment", "collector"]

REFUSED = remediation_pb2.REMEDIATION_OUTCOME_REFUSED

# A rule that restarts a service which laptops may not have in their
# healing.services allowlist, and one that every laptop runs.
POLICY = """\
[[rules]]
name = "restart-cups"
condition.service_not_running = { service = "cups.service" }
action.restart_service = { service = "cups.service" }

[[rules]]
name = "low-space-notice"
condition.free_space_below = { mount_point = "/", ratio = 0.10 }
action.notify = { title = "Disk almost full" }
"""

# The reason as fleetmend-agent words it for a service outside its allowlist.
CUPS_REASON = (
    "service cups.service is not in this laptop's healing.services; add it "
    "there to let this rule run"
)
OTHER_REASON = (
    "service cups.service is not in this laptop's healing.services; add it "
    "there to let this rule run (second laptop)"
)


class AgentStream:
    """An enrolled device's Connect stream, which sends reports as the agent does."""

    def __init__(self, collector: Collector, hostname: str) -> None:
        self.device_id, node_key = enroll(
            collector.address, collector.tls_dir, plaintext=False, hostname=hostname
        )
        self._channel = channel_to(collector.address, collector.tls_dir)
        self._requests: queue.Queue[agent_pb2.ConnectRequest | None] = queue.Queue()
        hello = agent_pb2.Hello(device_id=self.device_id, agent_version="test")
        self._requests.put(agent_pb2.ConnectRequest(hello=hello))
        stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._call = stub.Connect(
            iter(self._requests.get, None), metadata=bearer(node_key), timeout=30
        )
        welcome = next(self._call)
        assert welcome.HasField("welcome"), welcome
        self._sequence = 0

    def send_status(
        self, generation: int, refusals: dict[str, str] | None = None
    ) -> None:
        """Send a report whose policy status applied generation and refuses rules.

        As the agent does, the report also carries a REFUSED record per refused
        rule. Returns once the collector acknowledges the report.
        """
        status = remediation_pb2.PolicyStatus(applied_version=generation)
        report = self._next_report()
        for name, reason in (refusals or {}).items():
            status.refused_rules.add(rule_name=name, reason=reason)
            record = report.remediations.add(
                rule=name, outcome=REFUSED, reason=reason, policy_version=generation
            )
            record.action.restart_service.service = "cups.service"
            record.start_time.FromDatetime(datetime.now(UTC))
        report.policy_status.CopyFrom(status)
        self.send(report)

    def send(self, report: report_pb2.Report) -> None:
        """Send report and wait for its ack, skipping policies and commands."""
        self._requests.put(agent_pb2.ConnectRequest(report=report))
        for response in self._call:
            if response.HasField("ack") and report.sequence in response.ack.sequences:
                return
        raise AssertionError(f"the stream ended before the ack of {report.sequence}")

    def _next_report(self) -> report_pb2.Report:
        self._sequence += 1
        return report_pb2.Report(sequence=self._sequence, full=True)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()


@pytest.fixture
def agents(collector: Collector) -> Iterator[list[AgentStream]]:
    """Three connected devices, named laptop-1 to laptop-3."""
    streams = [AgentStream(collector, f"laptop-{number}") for number in (1, 2, 3)]
    yield streams
    for stream in streams:
        stream.close()


def generation_of(collector: Collector) -> int:
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        response = stub.GetPolicy(
            ops_pb2.GetPolicyRequest(),
            metadata=bearer(collector.tokens["viewer"]),
            timeout=10,
        )
    return int(response.generation)


def rules_by_name(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> dict[str, dict[str, str]]:
    shown = run_json(collector, "viewer", capsys, "rules")
    rules = shown["rules"]
    assert isinstance(rules, list)
    return {rule["name"]: rule for rule in rules}


def refusal_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if " is refused on " in line]


# fleetmend rules


def test_rules_count_refusing_devices(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    first, second, third = sorted(agents, key=lambda agent: agent.device_id)
    first.send_status(generation, {"restart-cups": CUPS_REASON})
    second.send_status(generation, {"restart-cups": OTHER_REASON})
    third.send_status(generation)

    rules = rules_by_name(collector, capsys)
    code, out, err = run(collector, "viewer", capsys, "rules")

    cups = rules["restart-cups"]
    assert cups["refusing_devices"] == 2
    # The example is the reason of the device with the lowest device id.
    assert cups["refused_reason_example"] == CUPS_REASON
    assert "refusing_devices" not in rules["low-space-notice"]
    assert "refused_reason_example" not in rules["low-space-notice"]
    assert code == 0, err
    assert refusal_lines(out) == [
        "restart-cups is refused on 2 devices, which run the policy's other "
        f"rules; for example: {CUPS_REASON}; `fleetmend remediations --rule "
        "restart-cups --outcome refused` lists them"
    ]
    table = out.splitlines()
    assert table[0].split()[0] == "NAME"
    assert table[1].split()[0] == "restart-cups"
    assert table[2].split()[0] == "low-space-notice"


def test_rules_drop_device_without_refusal(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    first, second, _ = agents
    first.send_status(generation, {"restart-cups": CUPS_REASON})
    second.send_status(generation, {"restart-cups": CUPS_REASON})
    assert rules_by_name(collector, capsys)["restart-cups"]["refusing_devices"] == 2

    # The operator allowed the service on the first laptop, which now runs it.
    first.send_status(generation)

    rules = rules_by_name(collector, capsys)
    _, out, _ = run(collector, "viewer", capsys, "rules")
    assert rules["restart-cups"]["refusing_devices"] == 1
    assert refusal_lines(out) == [
        "restart-cups is refused on 1 device, which runs the policy's other "
        f"rules; for example: {CUPS_REASON}; `fleetmend remediations --rule "
        "restart-cups --outcome refused` lists them"
    ]

    second.send_status(generation)

    rules = rules_by_name(collector, capsys)
    _, out, _ = run(collector, "viewer", capsys, "rules")
    assert "refusing_devices" not in rules["restart-cups"]
    assert refusal_lines(out) == []


def test_rules_skip_older_generation(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    older = generation_of(collector)
    first, second, _ = agents
    first.send_status(older, {"restart-cups": OTHER_REASON})

    # Pausing a rule makes a new effective generation, which the first
    # laptop has not applied yet.
    code, _, err = run(collector, "operator", capsys, "rules", "pause", "restart-cups")
    assert code == 0, err
    current = generation_of(collector)
    assert current > older
    second.send_status(current, {"restart-cups": CUPS_REASON})

    rules = rules_by_name(collector, capsys)

    assert rules["restart-cups"]["refusing_devices"] == 1
    assert rules["restart-cups"]["refused_reason_example"] == CUPS_REASON


def test_rules_skip_revoked_device(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    first, second, _ = agents
    first.send_status(generation, {"restart-cups": CUPS_REASON})
    second.send_status(generation, {"restart-cups": CUPS_REASON})

    code, _, err = run(collector, "admin", capsys, "device", "revoke", first.device_id)
    assert code == 0, err

    rules = rules_by_name(collector, capsys)
    assert rules["restart-cups"]["refusing_devices"] == 1


# fleetmend device show


def test_device_show_lists_refused_rules(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    agent = agents[0]
    agent.send_status(
        generation,
        {"restart-cups": CUPS_REASON, "low-space-notice": "notify\x1b[2J refused"},
    )

    code, out, err = run(collector, "viewer", capsys, "device", "show", agent.device_id)
    shown = run_json(collector, "viewer", capsys, "device", "show", agent.device_id)

    assert code == 0, err
    lines = out.splitlines()
    assert (
        "  policy              applied version 1, 2 rules refused by this "
        "device's allowlist"
    ) in lines
    assert "  refused rule        low-space-notice: notify\\x1b[2J refused" in lines
    assert f"  refused rule        restart-cups: {CUPS_REASON}" in lines
    device = shown["device"]
    assert isinstance(device, dict)
    assert device["policy_status"]["refused_rules"] == [
        {"rule_name": "low-space-notice", "reason": "notify\x1b[2J refused"},
        {"rule_name": "restart-cups", "reason": CUPS_REASON},
    ]


def test_device_show_after_refusal_ends(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    agent = agents[0]
    agent.send_status(generation, {"restart-cups": CUPS_REASON})
    agent.send_status(generation)

    code, out, err = run(collector, "viewer", capsys, "device", "show", agent.device_id)
    shown = run_json(collector, "viewer", capsys, "device", "show", agent.device_id)

    assert code == 0, err
    assert "  policy              applied version 1\n" in out
    assert "refused rule" not in out
    device = shown["device"]
    assert isinstance(device, dict)
    assert "refused_rules" not in device["policy_status"]


def test_devices_list_carries_refused_rules(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    first, second, _ = agents
    first.send_status(generation, {"restart-cups": CUPS_REASON})
    second.send_status(generation)

    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        listed = stub.ListDevices(
            ops_pb2.ListDevicesRequest(),
            metadata=bearer(collector.tokens["viewer"]),
            timeout=10,
        )

    statuses = {device.device_id: device.policy_status for device in listed.devices}
    assert [rule.rule_name for rule in statuses[first.device_id].refused_rules] == [
        "restart-cups"
    ]
    assert list(statuses[second.device_id].refused_rules) == []


# Malformed refusals


def test_stream_rejects_invalid_rule_name(
    collector: Collector, agents: list[AgentStream]
) -> None:
    agent = agents[0]

    with pytest.raises(grpc.RpcError) as raised:
        agent.send_status(1, {"Restart CUPS": CUPS_REASON})

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "policy_status.refused_rules[0]" in details
    assert "'Restart CUPS'" in details


def status_report(sequence: int, refusals: list[tuple[str, str]]) -> report_pb2.Report:
    status = remediation_pb2.PolicyStatus(applied_version=1)
    for name, reason in refusals:
        status.refused_rules.add(rule_name=name, reason=reason)
    return report_pb2.Report(sequence=sequence, full=True, policy_status=status)


DEVICE = "5a1c2d3e-0000-4000-8000-00000000abcd"
NOW = datetime(2026, 12, 4, 21, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("refusals", "message"),
    [
        ([("", "r")], r"refused_rules\[0\] with the invalid rule_name ''"),
        ([("a" * 65, "r")], "invalid rule_name 'aaaa"),
        (
            [("restart-cups", "r"), ("restart-cups", "s")],
            r"refused_rules\[1\] with rule_name 'restart-cups' repeated",
        ),
        ([("restart-cups", "bad\x00reason")], "NUL character in its reason"),
        (
            [(f"rule-{index}", "r") for index in range(MAX_REFUSED_RULES + 1)],
            f"has {MAX_REFUSED_RULES + 1} refused rules in its policy status, "
            f"more than the maximum of {MAX_REFUSED_RULES}",
        ),
    ],
)
def test_ingest_rejects_malformed_refusal(
    store: Store, refusals: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.ingest([IncomingReport(DEVICE, status_report(1, refusals), NOW)])

    assert store.count_reports(DEVICE) == 0


def test_ingest_cuts_long_reason(store: Store) -> None:
    reason = "x" * (MAX_REFUSED_REASON_CHARS + 500)

    store.ingest([IncomingReport(DEVICE, status_report(1, [("r", reason)]), NOW)])

    status = store.device_policy_status(DEVICE)
    assert status is not None
    (stored,) = status.refused_rules
    assert len(stored.reason) == MAX_REFUSED_REASON_CHARS
    assert stored.reason.endswith(
        f" ... [truncated, {MAX_REFUSED_REASON_CHARS + 500} characters in all]"
    )
    assert stored.reason.startswith("xxxx")


def test_older_report_keeps_refusals(store: Store) -> None:
    newer = status_report(2, [("restart-cups", CUPS_REASON)])
    older = status_report(1, [])

    store.ingest([IncomingReport(DEVICE, newer, NOW)])
    store.ingest([IncomingReport(DEVICE, older, NOW + timedelta(seconds=1))])

    assert store.rule_refusals(1) == {"restart-cups": (1, CUPS_REASON)}


# Migration


def migrate_to(database_url: str, revision: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), revision)
    finally:
        engine.dispose()


def test_migrate_from_0004_keeps_status(store: Store, database_url: str) -> None:
    store.ingest([IncomingReport(DEVICE, status_report(1, []), NOW)])
    migrate_to(database_url, "0004")
    assert store.pending_migrations() == ["0005", "0006"]

    applied = store.migrate()
    store.ingest(
        [IncomingReport(DEVICE, status_report(2, [("restart-cups", CUPS_REASON)]), NOW)]
    )

    assert applied == ["0005", "0006"]
    assert store.count_reports(DEVICE) == 2
    assert store.rule_refusals(1) == {"restart-cups": (1, CUPS_REASON)}


def test_downgrade_0005_keeps_status(store: Store, database_url: str) -> None:
    report = status_report(1, [("restart-cups", CUPS_REASON)])
    store.ingest([IncomingReport(DEVICE, report, NOW)])

    migrate_to(database_url, "0004")

    assert store.pending_migrations() == ["0005", "0006"]
    assert store.count_reports(DEVICE) == 1
    assert store.migrate() == ["0005", "0006"]
    status = store.device_policy_status(DEVICE)
    assert status is not None
    assert status.applied_version == 1
    assert list(status.refused_rules) == []
