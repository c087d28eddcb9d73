"""The agent's Connect stream client against real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.link import Link
from agent.spool import Spool
from collector.server import ServerHandle, start_server_thread
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2
from tests.conftest import BIN_DIR, free_port


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def report(sequence: int, full: bool = False) -> report_pb2.Report:
    message = report_pb2.Report(sequence=sequence, full=full)
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
def make_link(tmp_path: Path, device_id: str) -> Iterator[Callable[..., RunningLink]]:
    running: list[RunningLink] = []

    def factory(
        address: str,
        on_connected: Callable[[int], report_pb2.Report | None] | None = None,
        backlog: int = 0,
        **options: float,
    ) -> RunningLink:
        spool = Spool(tmp_path / f"spool-{len(running)}.db", 1 << 20)
        for sequence in range(1, backlog + 1):
            spool.put(report(sequence))
        hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
        kwargs: dict[str, object] = dict(options)
        if on_connected is not None:
            kwargs["on_connected"] = on_connected
        link = Link(address, hello, spool, insecure=True, **kwargs)  # type: ignore[arg-type]
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


# -- a recording AgentService for checks of send order and status handling ----


class RecordingServicer(agent_pb2_grpc.AgentServiceServicer):
    """Record every report in arrival order; ack each one unless held."""

    def __init__(self) -> None:
        self.received: list[report_pb2.Report] = []
        self.hold_acks = threading.Event()
        self.release = threading.Event()
        self.reject_first_with: grpc.StatusCode | None = None
        # Ack only a sequence above every one acked on the stream so far, as a
        # collector does that acks the highest committed sequence.
        self.highest_only = False
        # Name each committed report in Ack.sequences, beside the highest one.
        self.named = False
        self.streams = 0

    def Connect(  # noqa: N802 - generated method name
        self,
        request_iterator: Iterator[agent_pb2.ConnectRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[agent_pb2.ConnectResponse]:
        self.streams += 1
        next(request_iterator)
        if self.reject_first_with is not None and self.streams == 1:
            context.abort(self.reject_first_with, "too many reports from this device")
        yield agent_pb2.ConnectResponse(welcome=agent_pb2.Welcome())
        arrived: queue.Queue[int | None] = queue.Queue()

        def read() -> None:
            try:
                for request in request_iterator:
                    self.received.append(request.report)
                    arrived.put(request.report.sequence)
            except grpc.RpcError:
                pass  # the stream was aborted or cancelled
            arrived.put(None)

        threading.Thread(target=read, daemon=True).start()
        highest = 0
        while (sequence := arrived.get()) is not None:
            if self.hold_acks.is_set() and not self.release.wait(timeout=30):
                return
            if self.highest_only and sequence <= highest:
                continue
            highest = max(highest, sequence)
            if self.named:
                ack = agent_pb2.Ack(committed_sequence=highest, sequences=[sequence])
            else:
                ack = agent_pb2.Ack(committed_sequence=sequence)
            yield agent_pb2.ConnectResponse(ack=ack)


@pytest.fixture
def recording() -> Iterator[tuple[RecordingServicer, str]]:
    servicer = RecordingServicer()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(grace=None)


# -- against the real collector -------------------------------------------------


def test_acked_reports_leave_spool(
    database_url: str, device_id: str, make_link: Callable[..., RunningLink]
) -> None:
    server = start_server_thread(database_url, insecure=True)
    try:
        running = make_link(server.address)
        for sequence in range(1, 6):
            running.link.submit(report(sequence))

        assert running.link.wait_drained(timeout=30)
        assert running.link.committed_sequence == 5
        assert running.link.spool.stats().pending_reports == 0
        assert stored(database_url, device_id) == (5, 5)
    finally:
        server.stop()


def test_collector_down_at_start(
    database_url: str, device_id: str, make_link: Callable[..., RunningLink]
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
        assert stored(database_url, device_id) == (2, 2)
    finally:
        server.stop()


def test_collector_restart_resends_pending(
    database_url: str, device_id: str, make_link: Callable[..., RunningLink]
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
        assert stored(database_url, device_id) == (3, 3)
    finally:
        server.stop()


# -- send order, window and status handling ---------------------------------------


def test_full_report_first_then_backlog(
    recording: tuple[RecordingServicer, str], make_link: Callable[..., RunningLink]
) -> None:
    servicer, address = recording

    def connected(committed: int) -> report_pb2.Report:
        # As the runtime does: spool a fresh full report and send it first.
        message = report(100, full=True)
        running.link.spool.put(message)
        return message

    servicer.hold_acks.set()
    running = make_link(address, on_connected=connected, backlog=10, max_in_flight=4)
    spool = running.link.spool

    assert wait_for(lambda: len(servicer.received) >= 4)
    time.sleep(0.5)
    first_window = [r.sequence for r in servicer.received]
    servicer.release.set()

    assert first_window == [100, 1, 2, 3]
    assert servicer.received[0].full
    assert wait_for(lambda: spool.stats().pending_reports == 0)
    assert [r.sequence for r in servicer.received] == [100, *range(1, 11)]


def test_rate_limit_keeps_reports(
    recording: tuple[RecordingServicer, str], make_link: Callable[..., RunningLink]
) -> None:
    servicer, address = recording
    servicer.reject_first_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    running = make_link(address)
    for sequence in range(1, 4):
        running.link.submit(report(sequence))

    assert running.link.wait_drained(timeout=60)
    assert servicer.streams >= 2
    assert [r.sequence for r in servicer.received] == [1, 2, 3]


def test_watchdog_replaces_silent_stream(
    recording: tuple[RecordingServicer, str], make_link: Callable[..., RunningLink]
) -> None:
    servicer, address = recording
    servicer.hold_acks.set()
    running = make_link(address, ack_timeout=2.0)
    running.link.submit(report(1))

    assert wait_for(lambda: running.link.watchdog_cancels >= 1, timeout=30)
    assert wait_for(lambda: servicer.streams >= 2, timeout=30)
    servicer.release.set()
    assert running.link.wait_drained(timeout=60)
    assert {r.sequence for r in servicer.received} == {1}


def test_highest_only_acks_drain(
    recording: tuple[RecordingServicer, str], make_link: Callable[..., RunningLink]
) -> None:
    servicer, address = recording
    servicer.highest_only = True

    def connected(committed: int) -> report_pb2.Report:
        message = report(100 + servicer.streams, full=True)
        running.link.spool.put(message)
        return message

    running = make_link(address, on_connected=connected, backlog=5, ack_timeout=2.0)

    assert running.link.wait_drained(timeout=60)
    assert running.link.watchdog_cancels >= 1
    assert servicer.received[0].sequence == 101
    assert {r.sequence for r in servicer.received} >= {1, 2, 3, 4, 5, 101}


def test_named_acks_drain_backlog(
    recording: tuple[RecordingServicer, str], make_link: Callable[..., RunningLink]
) -> None:
    servicer, address = recording
    servicer.named = True

    def connected(committed: int) -> report_pb2.Report:
        message = report(100, full=True)
        running.link.spool.put(message)
        return message

    running = make_link(address, on_connected=connected, backlog=5, ack_timeout=2.0)

    assert running.link.wait_drained(timeout=30)
    assert running.link.watchdog_cancels == 0
    assert [r.sequence for r in servicer.received] == [100, 1, 2, 3, 4, 5]


def test_backoff_full_jitter_capped() -> None:
    samples = {
        failures: [Link._backoff(failures) for _ in range(200)]
        for failures in (1, 3, 20, 5000)
    }

    assert all(0 <= s <= 1.0 for s in samples[1])
    assert all(0 <= s <= 4.0 for s in samples[3])
    assert max(samples[3]) > 2.0
    assert all(0 <= s <= 60.0 for s in samples[20])
    assert max(samples[20]) > 30.0
    assert min(samples[20]) < 30.0
    assert all(0 <= s <= 60.0 for s in samples[5000])


def test_plaintext_needs_insecure(tmp_path: Path, device_id: str) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    with pytest.raises(Exception, match="--insecure"):
        Link("127.0.0.1:1", agent_pb2.Hello(device_id=device_id), spool, insecure=False)


# -- a TCP forwarder that can blackhole, and an HTTP CONNECT proxy -------------------


class Forwarder:
    """Forward TCP connections to a target; blackhole() stops moving bytes."""

    def __init__(self, target_port: int, connect_proxy: bool = False) -> None:
        self.target_port = target_port
        self.connect_proxy = connect_proxy
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.connect_lines: list[bytes] = []
        self.blackholed: set[int] = set()
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        """Stop forwarding on every open connection without closing it."""
        self.blackholed = set(range(self.accepted))

    def close(self) -> None:
        self._closing.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            number = self.accepted
            self.accepted += 1
            threading.Thread(
                target=self._serve, args=(client, number), daemon=True
            ).start()

    def _serve(self, client: socket.socket, number: int) -> None:
        if self.connect_proxy:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(4096)
                if not chunk:
                    return
                request += chunk
            self.connect_lines.append(request.split(b"\r\n")[0])
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        sockets = [client, upstream]
        while not self._closing.is_set():
            readable, _, _ = select.select(sockets, [], [], 0.2)
            if number in self.blackholed:
                # Hold both sockets open and read nothing: a half-open link.
                continue
            for source in readable:
                data = source.recv(65536)
                if not data:
                    client.close()
                    upstream.close()
                    return
                (upstream if source is client else client).sendall(data)


def test_blackholed_stream_replaced(
    database_url: str, device_id: str, make_link: Callable[..., RunningLink]
) -> None:
    server = start_server_thread(database_url, insecure=True)
    forwarder = Forwarder(server.port)
    try:
        running = make_link(f"127.0.0.1:{forwarder.port}")
        running.link.submit(report(1))
        assert running.link.wait_drained(timeout=30)
        connects = running.link.connects

        forwarder.blackhole()
        started = time.monotonic()
        running.link.submit(report(2))
        replaced = wait_for(lambda: running.link.connects > connects, timeout=120)
        detected_seconds = time.monotonic() - started
        print(
            f"half-open stream detected and replaced in {detected_seconds:.1f} s "
            f"(watchdog cancels: {running.link.watchdog_cancels})"
        )

        assert replaced
        assert running.link.wait_drained(timeout=60)
        assert stored(database_url, device_id) == (2, 2)
    finally:
        forwarder.close()
        server.stop()


def test_proxy_variables_honoured(
    database_url: str,
    device_id: str,
    make_link: Callable[..., RunningLink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server_thread(database_url, insecure=True)
    proxy = Forwarder(server.port, connect_proxy=True)
    try:
        monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("no_grpc_proxy", raising=False)
        running = make_link(server.address)
        running.link.submit(report(1))

        assert running.link.wait_drained(timeout=30)
        assert proxy.connect_lines
        assert proxy.connect_lines[0].startswith(f"CONNECT {server.address}".encode())
    finally:
        proxy.close()
        server.stop()


def test_no_proxy_bypasses_proxy(
    database_url: str,
    device_id: str,
    make_link: Callable[..., RunningLink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server_thread(database_url, insecure=True)
    proxy = Forwarder(server.port, connect_proxy=True)
    try:
        monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        running = make_link(server.address)
        running.link.submit(report(1))

        assert running.link.wait_drained(timeout=30)
        assert proxy.accepted == 0
    finally:
        proxy.close()
        server.stop()


# -- a real agent process killed after spooling ---------------------------------------


def test_sigkill_then_restart_exactly_once(tmp_path: Path, database_url: str) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(
        "[usage]\nenabled = false\n[intervals]\nreport_min = 1\n", encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMEND_")}
    env["FLEETMEND_CONFIG"] = str(config)
    port = free_port()
    command = [
        str(BIN_DIR / "fleetmend-agent"),
        "run",
        "--collector",
        f"127.0.0.1:{port}",
        "--insecure",
        "--state-dir",
        str(state_dir),
    ]
    agent = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def spooled() -> list[int]:
        uri = f"{(state_dir / 'spool.db').as_uri()}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
                return [s for (s,) in conn.execute("SELECT sequence FROM outbox")]
        except sqlite3.Error:
            return []  # not created yet

    try:
        assert wait_for(lambda: len(spooled()) >= 4, timeout=60)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
    before = sorted(spooled())
    identity = json.loads((state_dir / "identity.json").read_text(encoding="utf-8"))

    server = start_server_thread(
        database_url, listen=f"127.0.0.1:{port}", insecure=True
    )
    try:
        result = subprocess.run(
            [*command, "--exit-after", str(len(before) + 1)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        store = Store.open(database_url)
        try:
            device = store.list_devices(limit=10)[0].device_id
            count = store.count_reports(device)
        finally:
            store.close()
    finally:
        server.stop()

    assert before
    assert max(before) < identity["next_sequence"]
    assert spooled() == []
    assert count >= len(before) + 1


def test_dropped_count_reaches_collector(
    tmp_path: Path, database_url: str, device_id: str
) -> None:
    size = len(report(1).SerializeToString())
    spool = Spool(tmp_path / "capped.db", max_bytes=size * 3)
    for sequence in range(1, 9):
        spool.put(report(sequence))
    dropped = spool.dropped_pending()
    spool.max_bytes = 1 << 20

    def connected(committed: int) -> report_pb2.Report:
        message = report(9, full=True)
        spool.put(message, carry_dropped=True)
        return message

    server = start_server_thread(database_url, insecure=True)
    hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
    running = RunningLink(
        Link(
            server.address,
            hello,
            spool,
            insecure=True,
            on_connected=connected,
            ack_timeout=2.0,
        )
    )
    try:
        assert running.link.wait_drained(timeout=60)
    finally:
        running.close()
        server.stop()
    store = Store.open(database_url)
    try:
        device = store.get_device(device_id)
    finally:
        store.close()

    assert dropped == 5
    assert device is not None
    assert device.dropped_reports == 5
    assert spool.stats().dropped_reports == 0
