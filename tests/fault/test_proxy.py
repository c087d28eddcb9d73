"""The fault proxy itself, in front of an echo server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fault.proxy import FaultProxy


class EchoServer:
    """Echo every byte back until the client closes, and keep what arrived."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(client,), daemon=True).start()

    def _echo(self, client: socket.socket) -> None:
        with client:
            try:
                while chunk := client.recv(4096):
                    self.received += chunk
                    client.sendall(chunk)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    started = FaultProxy("127.0.0.1", echo.port).start()
    yield started
    started.stop()


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return sock


def receive(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def wait_closed(sock: socket.socket) -> bytes:
    """Read until the peer closes or resets; return what arrived."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_proxy_forwards(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert receive(sock, 5) == b"hello"


def test_proxy_cut_resets(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert receive(sock, 4) == b"ping"
        assert proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(10)


def test_proxy_cut_after_bytes(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.cut_after(3)
    with connect(proxy) as sock:
        sock.sendall(b"abcdef")
        wait_closed(sock)
    time.sleep(0.2)
    assert bytes(echo.received) == b"abc"
    assert proxy.cuts == 1


def test_proxy_delay(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"x")
        assert receive(sock, 1) == b"x"
        # One hold on the way in and one on the way back.
        assert time.monotonic() - started >= 0.6


def test_proxy_blackhole_keeps_open(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"one")
        assert receive(sock, 3) == b"one"
        proxy.blackhole()
        time.sleep(0.2)
        sock.sendall(b"two")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert proxy.open_connections == 1
        proxy.restore()
        sock.settimeout(5)
        assert receive(sock, 3) == b"two"


def test_proxy_target_down(proxy: FaultProxy) -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        free = unused.getsockname()[1]
    proxy.retarget("127.0.0.1", free)
    try:
        with connect(proxy) as sock:
            assert wait_closed(sock) == b""
    except ConnectionResetError:
        pass  # The reset may come before connect() returns.
    assert proxy.accepted == 0


def test_proxy_blackhole_spares_new(proxy: FaultProxy) -> None:
    with connect(proxy) as old:
        old.sendall(b"a")
        assert receive(old, 1) == b"a"
        proxy.blackhole()
        with connect(proxy) as new:
            new.sendall(b"b")
            assert receive(new, 1) == b"b"
