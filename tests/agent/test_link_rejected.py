"""Reports that the collector rejects as invalid go to the spool's quarantine.

The end-to-end tests run the link against a real TLS collector on 127.0.0.1,
with a report that the collector's validation rejects (an NVMe temperature
outside its range) spooled between good ones. Where a test needs a collector
that ends a stream with INVALID_ARGUMENT without naming a report, or naming one
that was not sent, a small AgentService on 127.0.0.1 plays that part.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.link import REJECTED_SEQUENCE_KEY, Link
from agent.render import render_spool
from agent.spool import Spool, describe, read_stats
from collector.server import ServerHandle, start_server_thread
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2
from tests.trust import enroll


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def good_report(sequence: int, full: bool = False) -> report_pb2.Report:
    message = report_pb2.Report(sequence=sequence, full=full)
    message.collect_time.GetCurrentTime()
    message.host.hostname = "rejected-test"
    return message


def hot_disk_report(sequence: int, full: bool = False) -> report_pb2.Report:
    """Return a report that the collector rejects: 9000 °C is out of range."""
    message = good_report(sequence, full)
    disk = message.disks.disks.add(name="nvme0n1")
    disk.nvme_health.temperature_celsius = 9000
    return message


class RunningLink:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.stop = threading.Event()
        self.thread = threading.Thread(target=link.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.link.close()
        self.thread.join(timeout=10)


@pytest.fixture
def device_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'collector.db'}"


@pytest.fixture
def collector(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(database_url, tls_dir=tls_dir)
    yield handle
    handle.stop()


@pytest.fixture
def links() -> Iterator[list[RunningLink]]:
    running: list[RunningLink] = []
    yield running
    for item in running:
        item.close()


def start_tls_link(
    links: list[RunningLink],
    collector: ServerHandle,
    tls_dir: Path,
    device_id: str,
    spool: Spool,
    on_connected: Callable[[int], report_pb2.Report | None] | None = None,
) -> RunningLink:
    enrolled_id, node_key = enroll(
        collector.address, tls_dir, device_id, plaintext=False
    )
    assert enrolled_id == device_id
    hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
    options: dict[str, object] = {}
    if on_connected is not None:
        options["on_connected"] = on_connected
    link = Link(
        collector.address,
        hello,
        spool,
        node_key=node_key,
        root_certificates=(tls_dir / "ca.pem").read_bytes(),
        **options,  # type: ignore[arg-type]
    )
    links.append(RunningLink(link))
    return links[-1]


def stored_sequences(database_url: str, device_id: str) -> tuple[int, int]:
    """Return the count of stored reports of device_id and its committed sequence."""
    with Store.open(database_url) as store:
        return store.count_reports(device_id), store.committed_sequence(device_id)


def error_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "agent.link"
        and record.levelno == logging.ERROR
        and text in record.getMessage()
    ]


# -- against the real collector ---------------------------------------------------


def test_rejected_report_quarantined_rest_stored(
    tmp_path: Path,
    database_url: str,
    device_id: str,
    tls_dir: Path,
    collector: ServerHandle,
    links: list[RunningLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.link")
    spool = Spool(tmp_path / "spool.db")
    spool.put(good_report(1))
    spool.put(hot_disk_report(2))
    spool.put(good_report(3))
    spool.put(good_report(4))

    running = start_tls_link(links, collector, tls_dir, device_id, spool)

    assert running.link.wait_drained(timeout=60)
    assert stored_sequences(database_url, device_id) == (3, 4)
    quarantined = spool.quarantined()
    assert [record.sequence for record in quarantined] == [2]
    assert "temperature_celsius 9000" in quarantined[0].reason
    assert quarantined[0].report().disks.disks[0].name == "nvme0n1"
    assert spool.stats().quarantined == 1
    assert spool.stats().pending_reports == 0
    assert running.link.quarantined_reports == 1
    errors = error_lines(caplog, "rejected report 2 as invalid")
    assert len(errors) == 1
    assert "temperature_celsius 9000" in errors[0]
    assert "reconnecting in 0.0 s" in errors[0]


def test_stream_continues_after_rejection(
    tmp_path: Path,
    database_url: str,
    device_id: str,
    tls_dir: Path,
    collector: ServerHandle,
    links: list[RunningLink],
) -> None:
    spool = Spool(tmp_path / "spool.db")
    running = start_tls_link(links, collector, tls_dir, device_id, spool)
    running.link.submit(good_report(1))
    assert running.link.wait_drained(timeout=60)

    running.link.submit(hot_disk_report(2))
    running.link.submit(good_report(3))
    assert running.link.wait_drained(timeout=60)
    running.link.submit(good_report(4))
    running.link.submit(hot_disk_report(5))
    running.link.submit(good_report(6))

    assert running.link.wait_drained(timeout=60)
    assert stored_sequences(database_url, device_id) == (4, 6)
    assert [record.sequence for record in spool.quarantined()] == [2, 5]
    assert running.link.connects >= 3


def test_rejected_full_report_quarantined(
    tmp_path: Path,
    database_url: str,
    device_id: str,
    tls_dir: Path,
    collector: ServerHandle,
    links: list[RunningLink],
) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.put(good_report(1))
    spool.put(good_report(2))
    fresh_reports: list[int] = []

    def connected(committed: int) -> report_pb2.Report:
        # As the runtime does: spool a fresh full report and send it first.
        # The first one is invalid, the later ones are good.
        sequence = 100 + len(fresh_reports)
        make = hot_disk_report if not fresh_reports else good_report
        message = make(sequence, full=True)
        fresh_reports.append(sequence)
        spool.put(message)
        return message

    running = start_tls_link(links, collector, tls_dir, device_id, spool, connected)

    assert running.link.wait_drained(timeout=60)
    assert [record.sequence for record in spool.quarantined()] == [100]
    count, committed = stored_sequences(database_url, device_id)
    assert count == 3
    assert committed == 101


def test_dropped_count_moves_back_on_quarantine(
    tmp_path: Path,
    database_url: str,
    device_id: str,
    tls_dir: Path,
    collector: ServerHandle,
    links: list[RunningLink],
) -> None:
    spool = Spool(tmp_path / "spool.db")
    with sqlite3.connect(spool.path) as connection:
        connection.execute(
            "UPDATE counters SET value = 3 WHERE name = 'dropped_pending'"
        )
    connection.close()
    spool.put(hot_disk_report(1), carry_dropped=True)
    assert spool.dropped_pending() == 0

    running = start_tls_link(links, collector, tls_dir, device_id, spool)

    assert wait_for(lambda: spool.stats().quarantined == 1)
    assert spool.dropped_pending() == 3
    running.link.submit(good_report(2))
    spool.put(good_report(3), carry_dropped=True)
    running.link.wake()
    assert running.link.wait_drained(timeout=60)
    with Store.open(database_url) as store:
        device = store.get_device(device_id)
    assert device is not None
    assert device.dropped_reports == 3
    assert spool.dropped_pending() == 0


# -- collectors that name no report, or one that was not sent ------------------------


class RejectingServicer(agent_pb2_grpc.AgentServiceServicer):
    """Ends the first stream with INVALID_ARGUMENT once it has a report, then acks."""

    def __init__(self, trailing: tuple[tuple[str, str], ...]) -> None:
        self.trailing = trailing
        self.streams = 0
        self.received: list[int] = []
        self._lock = threading.Lock()

    def Enroll(  # noqa: N802 - generated method name
        self, request: agent_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this test server enrolls none")
        raise AssertionError("context.abort returned")

    def Connect(  # noqa: N802 - generated method name
        self,
        request_iterator: Iterator[agent_pb2.ConnectRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[agent_pb2.ConnectResponse]:
        with self._lock:
            self.streams += 1
            first_stream = self.streams == 1
        next(request_iterator)
        yield agent_pb2.ConnectResponse(welcome=agent_pb2.Welcome())
        for request in request_iterator:
            sequence = request.report.sequence
            if first_stream:
                context.abort_with_status(_Status(self.trailing))
            self.received.append(sequence)
            ack = agent_pb2.Ack(committed_sequence=sequence, sequences=[sequence])
            yield agent_pb2.ConnectResponse(ack=ack)


class _Status(grpc.Status):
    def __init__(self, trailing: tuple[tuple[str, str], ...]) -> None:
        self.code = grpc.StatusCode.INVALID_ARGUMENT
        self.details = "this report is invalid"
        self.trailing_metadata = trailing


def start_rejecting(
    trailing: tuple[tuple[str, str], ...],
) -> tuple[grpc.Server, RejectingServicer, str]:
    servicer = RejectingServicer(trailing)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    "trailing",
    [
        pytest.param((), id="no-key"),
        pytest.param(((REJECTED_SEQUENCE_KEY, "99"),), id="not-in-flight"),
        pytest.param(((REJECTED_SEQUENCE_KEY, "two"),), id="not-a-number"),
        pytest.param(((REJECTED_SEQUENCE_KEY, "0"),), id="zero"),
    ],
)
def test_unnamed_rejection_keeps_reports(
    tmp_path: Path,
    device_id: str,
    links: list[RunningLink],
    trailing: tuple[tuple[str, str], ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.link")
    server, servicer, address = start_rejecting(trailing)
    try:
        spool = Spool(tmp_path / "spool.db")
        for sequence in (1, 2, 3):
            spool.put(good_report(sequence))
        hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
        link = Link(
            address,
            hello,
            spool,
            node_key="test-node-key",
            root_certificates=None,
            insecure=True,
        )
        links.append(RunningLink(link))

        assert link.wait_drained(timeout=60)
    finally:
        server.stop(grace=None)

    assert servicer.streams >= 2
    assert sorted(set(servicer.received)) == [1, 2, 3]
    assert spool.quarantined() == []
    assert link.quarantined_reports == 0
    assert len(error_lines(caplog, "rejected the stream")) >= 1
    assert error_lines(caplog, "as invalid") == []


# -- the quarantine in the spool file ------------------------------------------------


def test_quarantine_cap_drops_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", quarantine_max_records=2)
    for sequence in range(1, 6):
        spool.put(good_report(sequence))

    moved = [spool.quarantine(sequence, "invalid") for sequence in (1, 2, 3)]

    assert moved == [True, True, True]
    assert [record.sequence for record in spool.quarantined()] == [2, 3]
    assert [record.sequence for record in spool.pending()] == [4, 5]
    stats = spool.stats()
    assert stats.quarantined == 2
    assert stats.quarantine_dropped == 1
    assert stats.dropped_reports == 0


def test_quarantine_byte_cap(tmp_path: Path) -> None:
    size = len(good_report(1).SerializeToString(deterministic=True))
    spool = Spool(tmp_path / "spool.db", quarantine_max_bytes=size * 2)
    for sequence in range(1, 4):
        spool.put(good_report(sequence))

    for sequence in range(1, 4):
        spool.quarantine(sequence, "invalid")

    assert [record.sequence for record in spool.quarantined()] == [2, 3]
    assert spool.stats().quarantine_dropped == 1


def test_quarantine_unknown_sequence(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.put(good_report(1))

    assert spool.quarantine(7, "invalid") is False
    assert spool.quarantined() == []
    assert [record.sequence for record in spool.pending()] == [1]


def test_quarantine_keeps_reason_short(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.put(good_report(1))

    spool.quarantine(1, "x" * 5000)

    assert len(spool.quarantined()[0].reason) == 1000


def test_quarantine_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path)
    first.put(good_report(1))
    first.quarantine(1, "invalid")
    first.close()

    second = Spool(path)

    assert [record.sequence for record in second.quarantined()] == [1]
    assert second.pending() == []


def test_read_stats_counts_quarantine(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, quarantine_max_records=1)
    spool.put(good_report(1))
    spool.put(good_report(2))
    spool.quarantine(1, "invalid")
    spool.quarantine(2, "invalid")

    stats = read_stats(path, 1 << 20)

    assert stats is not None
    assert stats.quarantined == 1
    assert stats.quarantine_dropped == 1
    line = describe(stats)
    assert "1 report quarantined because the collector rejected it" in line
    assert "1 more dropped by the quarantine cap" in line


def test_read_stats_spool_without_quarantine(tmp_path: Path) -> None:
    # The tables of a spool that an agent without the quarantine created.
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(
            "CREATE TABLE outbox (sequence INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
            "body BLOB NOT NULL, size_bytes INTEGER NOT NULL, "
            "carried_dropped INTEGER NOT NULL DEFAULT 0);"
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT INTO counters VALUES ('dropped_pending', 0);"
        )
    connection.close()

    stats = read_stats(path, 1 << 20)

    assert stats is not None
    assert stats.quarantined == 0
    assert stats.quarantine_dropped == 0
    assert "quarantined" not in describe(stats)


def test_describe_without_quarantine(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")

    assert "quarantined" not in describe(spool.stats())


def test_show_tells_of_quarantined_reports(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.put(good_report(1))
    spool.quarantine(1, "invalid")
    stats = read_stats(path, 1 << 20)

    text = " ".join(render_spool(stats, path, 1 << 20))

    assert "1 report that the collector rejected as invalid is kept aside" in text
