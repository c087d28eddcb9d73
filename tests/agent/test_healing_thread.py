"""Self-healing on its own thread: a long action holds up neither reports nor shutdown.

A real Agent reports to a real gRPC servicer on 127.0.0.1 and restarts
cups.service through the fake systemctl on PATH, which replays recorded
outputs (tests/fakes/systemctl, tests/data/services).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from agent.config import load_config
from agent.healing.actions import restart_service
from agent.runtime import Agent
from agent.sections import SectionSource, usage_source
from agent.spool import SPOOL_FILE, Spool
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, remediation_pb2, report_pb2
from tests.agent import test_services
from tests.agent.test_services import FakeServices

Outcome = remediation_pb2.RemediationOutcome

# The fixture that puts the fake service tools first on PATH.
fake_services = test_services.fake_services

UNIT = "cups.service"
# Bounds that only keep a broken test from hanging, so nothing here is timed.
WAIT_SECONDS = 30.0
UNCHECKED_KEY = "node-key-not-checked-by-this-servicer"

# The maximum settle time, far longer than any wait of this test.
RESTART_POLICY = f"""
[[rules]]
name = "restart-cups"
condition.service_not_running = {{ service = "{UNIT}" }}
action.restart_service = {{ service = "{UNIT}", settle = "600s" }}
"""

# A rule whose condition never holds, because no battery is read.
IDLE_POLICY = """
[[rules]]
name = "worn-battery"
condition.battery_health_below = { ratio = 0.5 }
action.notify = { title = "Battery worn", body = "Ask IT for a new one." }
"""


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class RecordingServicer(agent_pb2_grpc.AgentServiceServicer):
    """Acknowledge every report, keep it, and send queued responses after an ack."""

    def __init__(self) -> None:
        self.received: list[report_pb2.Report] = []
        self.outbox: queue.Queue[agent_pb2.ConnectResponse] = queue.Queue()
        self._lock = threading.Lock()

    def reports(self) -> list[report_pb2.Report]:
        with self._lock:
            return list(self.received)

    def Enroll(  # noqa: N802 - generated method name
        self, request: agent_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this servicer does not enroll")
        raise AssertionError("context.abort raises")

    def Connect(  # noqa: N802 - generated method name
        self,
        request_iterator: Iterator[agent_pb2.ConnectRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[agent_pb2.ConnectResponse]:
        next(request_iterator)
        yield agent_pb2.ConnectResponse(welcome=agent_pb2.Welcome())
        for request in request_iterator:
            with self._lock:
                self.received.append(request.report)
            sequence = request.report.sequence
            yield agent_pb2.ConnectResponse(
                ack=agent_pb2.Ack(committed_sequence=sequence, sequences=[sequence])
            )
            while True:
                try:
                    yield self.outbox.get_nowait()
                except queue.Empty:
                    break


@pytest.fixture
def servicer() -> Iterator[tuple[RecordingServicer, str]]:
    recording = RecordingServicer()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(recording, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield recording, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


class HostProbe:
    """A host section source that counts its reads in memory_bytes."""

    def __init__(self) -> None:
        self.reads = 0
        self._lock = threading.Lock()

    def read(self) -> report_pb2.HostFacts:
        with self._lock:
            self.reads += 1
            return report_pb2.HostFacts(hostname="laptop-1", memory_bytes=self.reads)

    def count(self) -> int:
        with self._lock:
            return self.reads


@contextlib.contextmanager
def running_agent(
    tmp_path: Path, address: str, policy: str, healing_interval: int
) -> Iterator[tuple[Agent, HostProbe, threading.Event, threading.Thread]]:
    """Run an Agent on a thread, and stop it at the end if the test did not."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy, encoding="utf-8")
    config = load_config(
        flags={
            "state_dir": str(tmp_path / "agent-state"),
            "usage.enabled": False,
            "healing.services": [UNIT],
            "healing.policy_file": str(policy_file),
            "intervals.host": 1,
            "intervals.report_min": 1,
            "intervals.healing": healing_interval,
        },
        environ={},
        privileged=False,
    )
    probe = HostProbe()
    agent = Agent(
        config,
        [SectionSource("host", "host", probe.read)],
        usage_source(config),
        target=address,
        node_key=UNCHECKED_KEY,
        root_certificates=None,
        insecure=True,
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield agent, probe, stop, thread
    finally:
        stop.set()
        thread.join(timeout=WAIT_SECONDS)


def restart_calls(fakes: FakeServices) -> int:
    return sum(1 for _, argv in fakes.calls() if argv[0] == "restart")


def remediations(
    servicer: RecordingServicer, spool_path: Path
) -> list[remediation_pb2.RemediationRecord]:
    """Return the records the servicer received and those still in the spool."""
    records = [r for report in servicer.reports() for r in report.remediations]
    spool = Spool(spool_path)
    try:
        for item in spool.pending(kind="remediation", limit=1000):
            records.extend(report_pb2.Report.FromString(item.body).remediations)
    finally:
        spool.close()
    return records


def test_settle_wait_leaves_reports_running(
    tmp_path: Path,
    fake_services: FakeServices,
    servicer: tuple[RecordingServicer, str],
) -> None:
    recording, address = servicer
    fake_services.set(
        UNIT,
        status=["systemd-show-failed"],
        after_restart=["systemd-show-active-running"],
    )
    with running_agent(tmp_path, address, RESTART_POLICY, healing_interval=1) as (
        agent,
        probe,
        stop,
        thread,
    ):
        assert wait_for(lambda: restart_calls(fake_services) == 1)
        # The restart is done and its 600 s settle wait has begun.
        reads_at_restart = probe.count()

        def host_reported_since() -> bool:
            return any(
                report.host.memory_bytes > reads_at_restart + 1
                for report in recording.reports()
            )

        assert wait_for(host_reported_since)
        assert probe.count() >= reads_at_restart + 2
        assert all(not report.remediations for report in recording.reports())

        stop.set()
        thread.join(timeout=WAIT_SECONDS)

        assert not thread.is_alive()

    records = remediations(recording, tmp_path / "agent-state" / SPOOL_FILE)
    assert [(r.rule, r.outcome) for r in records] == [
        ("restart-cups", Outcome.REMEDIATION_OUTCOME_FAILED)
    ]
    assert records[0].reason == (
        f"the settle wait for service {UNIT} was interrupted by shutdown "
        "(not counted as a failed restart)"
    )
    assert restart_calls(fake_services) == 1
    # Nothing was counted toward max_failures, so the failure log was never written.
    assert not (tmp_path / "agent-state" / restart_service.STATE_FILE).exists()


def test_command_runs_during_long_interval(
    tmp_path: Path,
    fake_services: FakeServices,
    servicer: tuple[RecordingServicer, str],
) -> None:
    recording, address = servicer
    state_file = tmp_path / "agent-state" / "healing.json"
    with running_agent(tmp_path, address, IDLE_POLICY, healing_interval=3600) as (
        agent,
        _probe,
        stop,
        thread,
    ):
        # The first evaluation saves healing.json; the next is an hour away.
        assert wait_for(state_file.exists)
        command = remediation_pb2.Command(command_id="c-notify")
        command.action.notify.title = "SAP is down"
        command.action.notify.body = "Back at 15:00."
        command.expire_time.FromDatetime(datetime.now(UTC).replace(year=2100))
        recording.outbox.put(agent_pb2.ConnectResponse(command=command))

        def command_reported() -> bool:
            return any(
                record.command_id == "c-notify"
                for report in recording.reports()
                for record in report.remediations
            )

        assert wait_for(command_reported)
        stop.set()
        thread.join(timeout=WAIT_SECONDS)

        assert not thread.is_alive()

    records = [
        r
        for report in recording.reports()
        for r in report.remediations
        if r.command_id == "c-notify"
    ]
    assert [r.outcome for r in records] == [Outcome.REMEDIATION_OUTCOME_SUCCEEDED]
    assert (tmp_path / "agent-state" / "notices.json").exists()
