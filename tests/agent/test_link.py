"""The agent's Connect stream client against a real collector on 127.0.0.1."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.link import Link
from collector.server import ServerHandle, start_server_thread
from collector.store import Store
from fleetmend.v1 import agent_pb2, report_pb2
from tests.conftest import free_port


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def report(sequence: int) -> report_pb2.Report:
    message = report_pb2.Report(sequence=sequence, full=sequence == 1)
    message.collect_time.GetCurrentTime()
    message.host.hostname = "link-test"
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
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'collector.db'}"


@pytest.fixture
def device_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def connected_calls() -> list[int]:
    return []


@pytest.fixture
def make_link(
    device_id: str, connected_calls: list[int]
) -> Iterator[Callable[[str], RunningLink]]:
    running: list[RunningLink] = []

    def factory(address: str) -> RunningLink:
        hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
        link = Link(address, hello, insecure=True, on_connected=connected_calls.append)
        running.append(RunningLink(link))
        return running[-1]

    yield factory
    for item in running:
        item.close()


def stored(database_url: str, device_id: str) -> tuple[int, int]:
    store = Store.open(database_url)
    try:
        return store.count_reports(device_id), store.committed_sequence(device_id)
    finally:
        store.close()


def test_reports_acked_and_dropped(
    database_url: str, device_id: str, make_link: Callable[[str], RunningLink]
) -> None:
    server = start_server_thread(database_url, insecure=True)
    try:
        running = make_link(server.address)
        for sequence in range(1, 6):
            running.link.submit(report(sequence))

        assert running.link.wait_drained(timeout=30)
        assert running.link.committed_sequence == 5
        assert stored(database_url, device_id) == (5, 5)
    finally:
        server.stop()


def test_collector_down_at_start(
    database_url: str,
    device_id: str,
    make_link: Callable[[str], RunningLink],
    connected_calls: list[int],
) -> None:
    port = free_port()
    running = make_link(f"127.0.0.1:{port}")
    running.link.submit(report(1))
    running.link.submit(report(2))
    time.sleep(1.5)
    assert running.link.pending == 2
    assert not running.link.connected

    server = start_server_thread(
        database_url, listen=f"127.0.0.1:{port}", insecure=True
    )
    try:
        assert running.link.wait_drained(timeout=90)
        assert connected_calls == [0]
        assert stored(database_url, device_id) == (2, 2)
    finally:
        server.stop()


def test_collector_restart_resends_pending(
    database_url: str,
    device_id: str,
    make_link: Callable[[str], RunningLink],
    connected_calls: list[int],
) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    server: ServerHandle = start_server_thread(
        database_url, listen=listen, insecure=True
    )
    running = make_link(listen)
    running.link.submit(report(1))
    assert running.link.wait_drained(timeout=30)
    server.stop()

    running.link.submit(report(2))
    running.link.submit(report(3))
    assert wait_for(lambda: not running.link.connected)
    server = start_server_thread(database_url, listen=listen, insecure=True)
    try:
        assert running.link.wait_drained(timeout=90)
        assert connected_calls[0] == 0
        assert connected_calls[-1] == 1
        assert stored(database_url, device_id) == (3, 3)
    finally:
        server.stop()


def test_welcome_drops_committed_reports(
    database_url: str, device_id: str, make_link: Callable[[str], RunningLink]
) -> None:
    server = start_server_thread(database_url, insecure=True)
    try:
        first = make_link(server.address)
        first.link.submit(report(1))
        assert first.link.wait_drained(timeout=30)
        first.close()

        # A second link with the same identity still holds report 1, as an
        # agent does that stopped before it saw the ack; the welcome says 1 is
        # committed, so only report 2 goes out.
        second = make_link(server.address)
        second.link.submit(report(1))
        second.link.submit(report(2))

        assert second.link.wait_drained(timeout=30)
        assert stored(database_url, device_id) == (2, 2)
    finally:
        server.stop()


def test_pending_queue_is_capped(device_id: str) -> None:
    hello = agent_pb2.Hello(device_id=device_id)
    link = Link(f"127.0.0.1:{free_port()}", hello, insecure=True, max_pending=3)

    for sequence in range(1, 6):
        link.submit(report(sequence))

    assert link.pending == 3
    assert link.dropped_reports == 2


def test_plaintext_needs_insecure(device_id: str) -> None:
    with pytest.raises(Exception, match="--insecure"):
        Link("127.0.0.1:1", agent_pb2.Hello(device_id=device_id), insecure=False)
