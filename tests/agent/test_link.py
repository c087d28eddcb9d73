"""The agent's Connect stream client against real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
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
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from agent import link as link_module
from agent.link import Link
from agent.runtime import Agent
from agent.spool import Spool
from collector.server import ServerHandle, start_server_thread
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, remediation_pb2, report_pb2
from tests.conftest import BIN_DIR, free_port
from tests.trust import enroll, enrollment_secret, make_tls_dir, remember_secret

# The node key that links to the recording servicer send; it checks none.
UNCHECKED_KEY = "test-node-key"


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
def make_link(
    tmp_path: Path, device_id: str, tls_dir: Path
) -> Iterator[Callable[..., RunningLink]]:
    """Return a factory of running links of device_id.

    A link with a node_key uses TLS with tls_dir's CA; one without uses
    plaintext with UNCHECKED_KEY, for the recording servicer.
    """
    running: list[RunningLink] = []

    def factory(
        address: str,
        on_connected: Callable[[int], report_pb2.Report | None] | None = None,
        backlog: int = 0,
        node_key: str = "",
        root_certificates: bytes | None = None,
        **options: float,
    ) -> RunningLink:
        spool = Spool(tmp_path / f"spool-{len(running)}.db", 1 << 20)
        for sequence in range(1, backlog + 1):
            spool.put(report(sequence))
        hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
        kwargs: dict[str, object] = dict(options)
        if on_connected is not None:
            kwargs["on_connected"] = on_connected
        if node_key:
            kwargs["node_key"] = node_key
            kwargs["root_certificates"] = (
                root_certificates or (tls_dir / "ca.pem").read_bytes()
            )
        else:
            kwargs["node_key"] = UNCHECKED_KEY
            kwargs["root_certificates"] = None
            kwargs["insecure"] = True
        link = Link(address, hello, spool, **kwargs)  # type: ignore[arg-type]
        running.append(RunningLink(link))
        return running[-1]

    yield factory
    for item in running:
        item.close()


def serve(
    database_url: str, tls_dir: Path, listen: str = "127.0.0.1:0"
) -> ServerHandle:
    """Start a TLS collector with tls_dir's certificate."""
    return start_server_thread(database_url, listen=listen, tls_dir=tls_dir)


def enroll_tls(server: ServerHandle, tls_dir: Path, device_id: str) -> str:
    """Enroll device_id with a TLS collector; return its node key."""
    enrolled_id, key = enroll(server.address, tls_dir, device_id, plaintext=False)
    assert enrolled_id == device_id
    return key


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
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
) -> None:
    server = serve(database_url, tls_dir)
    try:
        running = make_link(
            server.address, node_key=enroll_tls(server, tls_dir, device_id)
        )
        for sequence in range(1, 6):
            running.link.submit(report(sequence))

        assert running.link.wait_drained(timeout=30)
        assert running.link.committed_sequence == 5
        assert running.link.spool.stats().pending_reports == 0
        assert stored(database_url, device_id) == (5, 5)
    finally:
        server.stop()


def test_collector_down_at_start(
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
) -> None:
    port = free_port()
    server = serve(database_url, tls_dir, listen=f"127.0.0.1:{port}")
    key = enroll_tls(server, tls_dir, device_id)
    server.stop()
    running = make_link(f"127.0.0.1:{port}", node_key=key)
    running.link.submit(report(1))
    running.link.submit(report(2))
    time.sleep(1.5)
    assert running.link.pending == 2
    assert not running.link.connected

    server = serve(database_url, tls_dir, listen=f"127.0.0.1:{port}")
    try:
        assert running.link.wait_drained(timeout=90)
        assert stored(database_url, device_id) == (2, 2)
    finally:
        server.stop()


def test_collector_restart_resends_pending(
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    server = serve(database_url, tls_dir, listen=listen)
    running = make_link(listen, node_key=enroll_tls(server, tls_dir, device_id))
    running.link.submit(report(1))
    assert running.link.wait_drained(timeout=30)
    server.stop()

    running.link.submit(report(2))
    running.link.submit(report(3))
    assert wait_for(lambda: not running.link.connected)
    server = serve(database_url, tls_dir, listen=listen)
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


def test_plaintext_needs_loopback(tmp_path: Path, device_id: str) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    hello = agent_pb2.Hello(device_id=device_id)

    with pytest.raises(ValueError, match="loopback") as caught:
        Link(
            "collector.example.com:50051",
            hello,
            spool,
            node_key=UNCHECKED_KEY,
            root_certificates=None,
            insecure=True,
        )

    assert "collector.example.com:50051" in str(caught.value)


def test_empty_node_key_rejected(tmp_path: Path, device_id: str) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    hello = agent_pb2.Hello(device_id=device_id)

    with pytest.raises(ValueError, match="enroll"):
        Link("127.0.0.1:1", hello, spool, node_key="", root_certificates=None)


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
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
) -> None:
    server = serve(database_url, tls_dir)
    forwarder = Forwarder(server.port)
    try:
        running = make_link(
            f"127.0.0.1:{forwarder.port}",
            node_key=enroll_tls(server, tls_dir, device_id),
        )
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
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = serve(database_url, tls_dir)
    key = enroll_tls(server, tls_dir, device_id)
    proxy = Forwarder(server.port, connect_proxy=True)
    try:
        monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("no_grpc_proxy", raising=False)
        running = make_link(server.address, node_key=key)
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
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = serve(database_url, tls_dir)
    key = enroll_tls(server, tls_dir, device_id)
    proxy = Forwarder(server.port, connect_proxy=True)
    try:
        monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        running = make_link(server.address, node_key=key)
        running.link.submit(report(1))

        assert running.link.wait_drained(timeout=30)
        assert proxy.accepted == 0
    finally:
        proxy.close()
        server.stop()


# -- a real agent process killed after spooling ---------------------------------------


def test_sigkill_then_restart_exactly_once(
    tmp_path: Path, database_url: str, tls_dir: Path
) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(
        'key_store = "file"\n[usage]\nenabled = false\n[intervals]\nreport_min = 1\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMEND_")}
    env["FLEETMEND_CONFIG"] = str(config)
    port = free_port()
    listen = f"127.0.0.1:{port}"
    # Enroll while the collector is up, then run the agent with it down.
    server = serve(database_url, tls_dir, listen=listen)
    try:
        enrolled = subprocess.run(
            [
                str(BIN_DIR / "fleetmend-agent"),
                "enroll",
                "--collector",
                listen,
                "--ca-file",
                str(tls_dir / "ca.pem"),
                "--state-dir",
                str(state_dir),
            ],
            env={**env, "FLEETMEND_ENROLL_SECRET": enrollment_secret(tls_dir)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.stop()
    assert enrolled.returncode == 0, enrolled.stderr
    remember_secret((state_dir / "node-key").read_text(encoding="utf-8").strip())
    command = [
        str(BIN_DIR / "fleetmend-agent"),
        "run",
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

    server = serve(database_url, tls_dir, listen=listen)
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
    tmp_path: Path, database_url: str, device_id: str, tls_dir: Path
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

    server = serve(database_url, tls_dir)
    hello = agent_pb2.Hello(device_id=device_id, agent_version="test")
    running = RunningLink(
        Link(
            server.address,
            hello,
            spool,
            node_key=enroll_tls(server, tls_dir, device_id),
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
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


# -- node key rejections, replaced streams and TLS failures --------------------------


def test_rejected_key_logged_once(
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The link retries a rejected key at the maximum backoff; a short maximum
    # lets the test see several retries.
    monkeypatch.setattr(link_module, "BACKOFF_MAX_SECONDS", 0.2)
    caplog.set_level(logging.DEBUG, logger="agent.link")
    server = serve(database_url, tls_dir)
    try:
        key = enroll_tls(server, tls_dir, device_id)
        with Store.open(database_url) as store:
            assert store.revoke_device(device_id, datetime.now(UTC)) == 1
        running = make_link(server.address, node_key=key)
        running.link.submit(report(1))

        def rejections(level: int) -> list[logging.LogRecord]:
            return [
                record
                for record in caplog.records
                if record.levelno == level
                and "rejected this device's node key" in record.getMessage()
            ]

        assert wait_for(lambda: len(rejections(logging.DEBUG)) >= 2)
    finally:
        server.stop()

    errors = rejections(logging.ERROR)
    assert len(errors) == 1
    assert "UNAUTHENTICATED" in errors[0].getMessage()
    assert "enroll again with fleetmend-agent enroll" in errors[0].getMessage()
    assert key not in caplog.text
    assert running.link.pending == 1
    assert stored(database_url, device_id) == (0, 0)


def test_replaced_stream_warns(
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = serve(database_url, tls_dir)
    try:
        key = enroll_tls(server, tls_dir, device_id)
        first = make_link(server.address, node_key=key)
        assert wait_for(lambda: first.link.connected)
        make_link(server.address, node_key=key)

        def warnings() -> list[str]:
            return [
                record.getMessage()
                for record in caplog.records
                if record.levelno == logging.WARNING
                and "two agents may share a state folder" in record.getMessage()
            ]

        assert wait_for(lambda: bool(warnings()))
    finally:
        server.stop()

    assert device_id in warnings()[0]
    assert key not in caplog.text


def test_link_other_ca_logs_reason(
    tmp_path: Path,
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = make_tls_dir(tmp_path / "other-tls")
    server = serve(database_url, tls_dir)
    try:
        key = enroll_tls(server, tls_dir, device_id)
        running = make_link(
            server.address,
            node_key=key,
            root_certificates=(other / "ca.pem").read_bytes(),
        )
        running.link.submit(report(1))

        def reasons() -> list[str]:
            return [
                record.getMessage()
                for record in caplog.records
                if record.levelno == logging.ERROR
                and "not signed by the CA" in record.getMessage()
            ]

        assert wait_for(lambda: bool(reasons()))
    finally:
        server.stop()

    assert server.address in reasons()[0]
    assert not running.link.connected
    assert stored(database_url, device_id) == (0, 0)


# -- self-healing on the stream -------------------------------------------------


def restart_policy(version: int, service: str) -> remediation_pb2.Policy:
    """Return a policy whose one rule never holds here (no battery readings)."""
    policy = remediation_pb2.Policy(version=version)
    rule = policy.rules.add(name="restart-cups")
    rule.condition.battery_health_below.ratio = 0.5
    rule.action.restart_service.service = service
    return policy


def command_for(service: str, command_id: str) -> remediation_pb2.Command:
    command = remediation_pb2.Command(command_id=command_id)
    command.action.restart_service.service = service
    command.expire_time.FromDatetime(datetime.now(UTC).replace(year=2100))
    return command


class HealingServicer(agent_pb2_grpc.AgentServiceServicer):
    """Send policies and commands after the welcome; record hellos and reports."""

    def __init__(self, messages: list[agent_pb2.ConnectResponse]) -> None:
        self.messages = messages
        self.hellos: list[agent_pb2.Hello] = []
        self.received: list[report_pb2.Report] = []

    def Connect(  # noqa: N802 - generated method name
        self,
        request_iterator: Iterator[agent_pb2.ConnectRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[agent_pb2.ConnectResponse]:
        self.hellos.append(next(request_iterator).hello)
        yield agent_pb2.ConnectResponse(welcome=agent_pb2.Welcome())
        yield from self.messages
        for request in request_iterator:
            self.received.append(request.report)
            sequence = request.report.sequence
            yield agent_pb2.ConnectResponse(
                ack=agent_pb2.Ack(committed_sequence=sequence, sequences=[sequence])
            )


@contextlib.contextmanager
def healing_server(
    messages: list[agent_pb2.ConnectResponse],
) -> Iterator[tuple[HealingServicer, str]]:
    servicer = HealingServicer(messages)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_policy_and_command_reach_callbacks(
    tmp_path: Path, device_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.link")
    policy = restart_policy(3, "cups.service")
    policy.fleet_version = 2
    command = command_for("cups.service", "c-1")
    messages = [
        agent_pb2.ConnectResponse(policy=policy),
        agent_pb2.ConnectResponse(command=command),
    ]
    policies: list[remediation_pb2.Policy] = []
    commands: list[remediation_pb2.Command] = []
    with healing_server(messages) as (servicer, address):
        link = Link(
            address,
            agent_pb2.Hello(device_id=device_id, agent_version="test"),
            Spool(tmp_path / "spool.db"),
            node_key=UNCHECKED_KEY,
            root_certificates=None,
            insecure=True,
            on_policy=policies.append,
            on_command=commands.append,
            policy_version=lambda: 7,
        )
        running = RunningLink(link)
        try:
            assert wait_for(lambda: len(commands) == 1)
        finally:
            running.close()

    assert policies == [policy]
    assert commands == [command]
    assert servicer.hellos[0].policy_version == 7
    messages_logged = [record.getMessage() for record in caplog.records]
    assert (
        "received fleet policy version 2 (generation 3) from the collector"
        in messages_logged
    )
    assert "received command c-1 from the collector" in messages_logged


def test_callback_error_keeps_stream(tmp_path: Path, device_id: str) -> None:
    def broken(policy: remediation_pb2.Policy) -> None:
        raise RuntimeError("broken callback")

    messages = [agent_pb2.ConnectResponse(policy=restart_policy(3, "cups.service"))]
    with healing_server(messages) as (servicer, address):
        link = Link(
            address,
            agent_pb2.Hello(device_id=device_id, agent_version="test"),
            Spool(tmp_path / "spool.db"),
            node_key=UNCHECKED_KEY,
            root_certificates=None,
            insecure=True,
            on_policy=broken,
        )
        running = RunningLink(link)
        try:
            assert wait_for(lambda: link.connected)
            link.submit(report(1))
            assert wait_for(lambda: link.pending == 0)
        finally:
            running.close()

    assert [r.sequence for r in servicer.received] == [1]
    assert link.connects == 1


def run_agent(
    tmp_path: Path, address: str, stop: threading.Event
) -> tuple[object, threading.Thread]:
    from agent.config import load_config
    from agent.runtime import Agent
    from agent.sections import usage_source

    config = load_config(
        flags={
            "state_dir": str(tmp_path / "agent-state"),
            "usage.enabled": False,
            "healing.services": ["cups.service"],
        },
        environ={},
        privileged=False,
    )
    agent = Agent(
        config,
        [],
        usage_source(config),
        target=address,
        node_key=UNCHECKED_KEY,
        root_certificates=None,
        insecure=True,
    )
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    return agent, thread


def test_agent_reports_policy_status(tmp_path: Path) -> None:
    messages = [
        agent_pb2.ConnectResponse(policy=restart_policy(3, "cups.service")),
        agent_pb2.ConnectResponse(policy=restart_policy(4, "")),
    ]
    stop = threading.Event()
    with healing_server(messages) as (servicer, address):
        _, thread = run_agent(tmp_path, address, stop)
        try:

            def rejected_reported() -> bool:
                return any(
                    r.policy_status.rejected_version == 4 for r in servicer.received
                )

            assert wait_for(rejected_reported)
        finally:
            stop.set()
            thread.join(timeout=30)

    status = next(
        r.policy_status
        for r in servicer.received
        if r.policy_status.rejected_version == 4
    )
    assert status.applied_version == 3
    assert "service is empty" in status.rejected_reason
    # The first report of the stream carried the built-in policy's status.
    assert servicer.received[0].full
    assert servicer.received[0].HasField("policy_status")
    assert servicer.received[0].policy_status.applied_version == 0
    assert servicer.hellos[0].policy_version == 0
    stored_policy = remediation_pb2.Policy.FromString(
        (tmp_path / "agent-state" / "policy.pb").read_bytes()
    )
    assert stored_policy.version == 3


def test_agent_refuses_command(tmp_path: Path) -> None:
    messages = [
        agent_pb2.ConnectResponse(command=command_for("sshd.service", "c-evil"))
    ]
    stop = threading.Event()
    with healing_server(messages) as (servicer, address):
        _, thread = run_agent(tmp_path, address, stop)
        try:

            def refused() -> list[remediation_pb2.RemediationRecord]:
                return [
                    record
                    for r in servicer.received
                    for record in r.remediations
                    if record.command_id == "c-evil"
                ]

            assert wait_for(lambda: bool(refused()))
        finally:
            stop.set()
            thread.join(timeout=30)

    (record,) = refused()
    assert record.outcome == remediation_pb2.REMEDIATION_OUTCOME_REFUSED
    assert "sshd.service" in record.reason


def test_remediations_stored_by_collector(
    database_url: str,
    device_id: str,
    tls_dir: Path,
    make_link: Callable[..., RunningLink],
) -> None:
    from agent.healing.actions.base import LocalAllowlist
    from agent.healing.engine import HealingEngine
    from agent.healing.policy import PolicyStore
    from agent.report import ReportBuilder
    from agent.state import Identity, StateStore

    server = serve(database_url, tls_dir)
    try:
        running = make_link(
            server.address, node_key=enroll_tls(server, tls_dir, device_id)
        )
        state_dir = Path(running.link.spool.path).parent
        builder = ReportBuilder(
            StateStore(state_dir), Identity(device_id=device_id, next_sequence=1)
        )
        allowlist = LocalAllowlist()
        engine = HealingEngine(
            state_dir,
            PolicyStore(state_dir, remediation_pb2.Policy(), allowlist),
            allowlist,
            builder,
            running.link.spool,
            on_records=running.link.wake,
        )

        record = engine.run_command(command_for("sshd.service", "c-stored"))

        assert record.outcome == remediation_pb2.REMEDIATION_OUTCOME_REFUSED
        assert running.link.wait_drained(timeout=30)
        assert running.link.spool.stats().pending_remediations == 0
        # --exit-after counts routine reports only.
        assert running.link.acked_remediations == 1
        assert running.link.acked_reports == 0
        store = Store.open(database_url)
        try:
            stored_records = store.list_remediations(10, device_id=device_id)
        finally:
            store.close()
        assert [r.record.command_id for r in stored_records] == ["c-stored"]
        assert stored_records[0].record.reason == record.reason
    finally:
        server.stop()


# -- the first full report of a run ------------------------------------------------


class LogMatch(logging.Handler):
    """Set an event when a record whose message contains text is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(level=logging.DEBUG)
        self.text = text
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.seen.set()


@contextlib.contextmanager
def watch_log(logger_name: str, text: str) -> Iterator[LogMatch]:
    """Attach a LogMatch for text to a logger, at DEBUG, while the block runs."""
    logger = logging.getLogger(logger_name)
    handler = LogMatch(text)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def blocked_disks(release: threading.Event) -> Callable[[], report_pb2.DiskSection]:
    """Return a disk probe that returns one disk once release is set (or after 30 s)."""

    def read() -> report_pb2.DiskSection:
        release.wait(timeout=30)
        section = report_pb2.DiskSection()
        section.disks.add(name="sda", model="slow disk")
        return section

    return read


def start_probing_agent(
    tmp_path: Path,
    address: str,
    disks: Callable[[], report_pb2.DiskSection],
    **options: float,
) -> tuple[Agent, threading.Event, threading.Thread]:
    """Run an agent with a host probe, the given disk probe and healing off."""
    from agent.config import load_config
    from agent.sections import SectionSource, usage_source

    config = load_config(
        flags={
            "state_dir": str(tmp_path / "agent-state"),
            "usage.enabled": False,
            "healing.enabled": False,
        },
        environ={},
        privileged=False,
    )
    sources = [
        SectionSource(
            "host", "host", lambda: report_pb2.HostFacts(hostname="probing-laptop")
        ),
        SectionSource("disks", "disks", disks),
    ]
    agent = Agent(
        config,
        sources,
        usage_source(config),
        target=address,
        node_key=UNCHECKED_KEY,
        root_certificates=None,
        insecure=True,
        **options,  # type: ignore[arg-type]
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    return agent, stop, thread


def every_report(
    agent: Agent, received: list[report_pb2.Report]
) -> list[report_pb2.Report]:
    """Return the reports that the collector received or that wait in the spool.

    The agent must have stopped, which closes its spool.
    """
    reports = {r.sequence: r for r in received}
    spool = Spool(Path(agent.spool.path), 1 << 20)
    try:
        for record in spool.pending(limit=1000, kind=None):
            reports.setdefault(record.sequence, record.report())
    finally:
        spool.close()
    return [reports[sequence] for sequence in sorted(reports)]


def test_first_full_report_waits_for_probes(
    tmp_path: Path, recording: tuple[RecordingServicer, str]
) -> None:
    servicer, address = recording
    with watch_log("agent.runtime", "connected before the first reading") as waiting:
        # The disk probe returns only once the link has its welcome and waits
        # for the probe, as a slow smartctl makes it wait.
        agent, stop, thread = start_probing_agent(
            tmp_path, address, blocked_disks(waiting.seen)
        )
        try:
            assert wait_for(lambda: bool(servicer.received))
        finally:
            stop.set()
            thread.join(timeout=30)

    first = servicer.received[0]
    assert first.full
    assert first.host.hostname == "probing-laptop"
    assert first.HasField("disks")
    assert [disk.name for disk in first.disks.disks] == ["sda"]
    assert first.HasField("usage")
    assert "sections disks, usage" in waiting.messages[0]
    # The main loop and the link spooled one full report between them.
    reports = every_report(agent, servicer.received)
    assert [r.full for r in reports].count(True) == 1
    assert not thread.is_alive()


def test_hung_probe_bounds_full_report_wait(
    tmp_path: Path, recording: tuple[RecordingServicer, str]
) -> None:
    servicer, address = recording
    release = threading.Event()
    with watch_log("agent.runtime", "have no first reading") as warned:
        agent, stop, thread = start_probing_agent(
            tmp_path, address, blocked_disks(release), first_readings_timeout=0.5
        )
        try:
            assert wait_for(lambda: bool(servicer.received))
            first = servicer.received[0]
            release.set()

            def disks_sent() -> bool:
                return any(r.HasField("disks") for r in servicer.received)

            assert wait_for(disks_sent)
        finally:
            release.set()
            stop.set()
            thread.join(timeout=30)

    assert first.full
    assert first.host.hostname == "probing-laptop"
    assert not first.HasField("disks")
    assert "sections disks, usage have no first reading" in warned.messages[0]
    # The disks go in a delta right after the probe returns, not after
    # intervals.report_min (300 s).
    late = next(r for r in servicer.received if r.HasField("disks"))
    assert not late.full
    assert late.sequence == first.sequence + 1
    assert [disk.name for disk in late.disks.disks] == ["sda"]
    assert late.HasField("usage")
    assert not late.HasField("host")
    assert not thread.is_alive()
