"""Limits on what one connection or one node key can hold open on the collector."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from collector import _ingest
from collector.server import (
    ServerHandle,
    ServerSettings,
    server_options,
    start_server_thread,
)
from fleetmend.v1 import agent_pb2, agent_pb2_grpc
from tests.trust import bearer, enroll


@pytest.fixture
def server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(database_url, tls_dir=tls_dir, insecure=True)
    yield handle
    handle.stop()


def test_stream_without_hello_times_out(
    server: ServerHandle, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ingest, "HELLO_TIMEOUT_SECONDS", 0.5)
    _, key = enroll(server.address, tls_dir)
    silent: queue.Queue[agent_pb2.ConnectRequest | None] = queue.Queue()

    def requests() -> Iterator[agent_pb2.ConnectRequest]:
        while (item := silent.get()) is not None:
            yield item

    with grpc.insecure_channel(server.address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            requests(), metadata=bearer(key), timeout=30
        )
        try:
            with pytest.raises(grpc.RpcError) as raised:
                list(call)
        finally:
            silent.put(None)

    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no hello within 0.5 s" in raised.value.details()


def test_server_bounds_handshakes_and_streams() -> None:
    options = dict(server_options(ServerSettings()))

    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_concurrent_streams"] == 100


def test_collector_serves_after_silent_stream(
    server: ServerHandle, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ingest, "HELLO_TIMEOUT_SECONDS", 0.2)
    device_id, key = enroll(server.address, tls_dir)
    stop = threading.Event()

    def silent() -> Iterator[agent_pb2.ConnectRequest]:
        stop.wait(10)
        return
        yield  # pragma: no cover - makes this a generator

    with grpc.insecure_channel(server.address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            list(stub.Connect(silent(), metadata=bearer(key), timeout=30))
        stop.set()
        hello = agent_pb2.ConnectRequest(
            hello=agent_pb2.Hello(device_id=device_id, agent_version="test")
        )
        first = next(iter(stub.Connect(iter([hello]), metadata=bearer(key))))

    assert first.WhichOneof("message") == "welcome"
