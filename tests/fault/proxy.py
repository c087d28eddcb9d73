"""A TCP proxy on 127.0.0.1 that breaks the connections it forwards on command.

Each accepted connection gets one upstream connection to the target and two
pump threads, one per direction. Faults apply to every open connection and to
later ones until restore() is called:

- cut(): close every connection now, with an RST (SO_LINGER 0) or a FIN;
- cut_after(n): close each connection once n more bytes went from client to
  target, which ends a message in its middle;
- delay(seconds): hold every chunk that long before forwarding it;
- blackhole(): stop forwarding in both directions on the open connections and
  keep their sockets open, the way a half-open TCP link behaves. With
  new_connections=True, later connections are accepted and blackholed too.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CHUNK_BYTES = 65536
POLL_SECONDS = 0.05


@dataclass
class _Faults:
    blackhole: bool = False
    delay_seconds: float = 0.0
    cut_after_bytes: int | None = None


@dataclass(eq=False)
class _Connection:
    client: socket.socket
    upstream: socket.socket
    # Bytes sent from client to target since the current cut_after() began.
    bytes_to_target: int = 0
    blackholed: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self, *, reset: bool) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if reset:
                # A zero linger time makes close() send an RST.
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forward 127.0.0.1:port to target_host:target_port, with injectable faults."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._faults = _Faults()
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="fault-proxy-accept", daemon=True
        )
        self.accepted = 0
        self.cuts = 0
        self.bytes_forwarded = 0

    @property
    def address(self) -> str:
        """HOST:PORT that clients connect to."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Start accepting connections and return self."""
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then wait for the acceptor."""
        self._stopping.set()
        self.cut(reset=False)
        self._acceptor.join(timeout=5)
        with contextlib.suppress(OSError):
            self._listener.close()

    def retarget(self, target_host: str, target_port: int) -> None:
        """Send later connections to another target, such as a restarted server."""
        with self._lock:
            self._target = (target_host, target_port)

    # Faults

    def cut(self, *, reset: bool = True) -> int:
        """Close every open connection now and return how many were closed."""
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
            self.cuts += len(connections)
        for connection in connections:
            connection.close(reset=reset)
        return len(connections)

    def cut_after(self, byte_count: int) -> None:
        """Close each connection once byte_count more bytes went to the target."""
        with self._lock:
            self._faults.cut_after_bytes = byte_count
            for connection in self._connections:
                connection.bytes_to_target = 0

    def delay(self, seconds: float) -> None:
        """Hold each chunk seconds before forwarding it, in both directions."""
        with self._lock:
            self._faults.delay_seconds = seconds

    def blackhole(self, *, new_connections: bool = False) -> None:
        """Stop forwarding in both directions without closing any socket."""
        with self._lock:
            for connection in self._connections:
                connection.blackholed = True
            self._faults.blackhole = new_connections

    def restore(self) -> None:
        """Clear every fault: forward normally again, also on blackholed links."""
        with self._lock:
            self._faults = _Faults()
            for connection in self._connections:
                connection.blackholed = False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # Forwarding

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        with self._lock:
            target = self._target
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError as error:
            logger.info("proxy: target %s:%d refused: %s", *target, error)
            # The client sees its connection refused the way a down server
            # would refuse it: closed at once.
            _Connection(client, client).close(reset=True)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        connection = _Connection(client, upstream)
        with self._lock:
            connection.blackholed = self._faults.blackhole
            self._connections.add(connection)
            self.accepted += 1
        for source, sink, to_target in (
            (client, upstream, True),
            (upstream, client, False),
        ):
            threading.Thread(
                target=self._pump,
                args=(connection, source, sink, to_target),
                name="fault-proxy-pump",
                daemon=True,
            ).start()

    def _pump(
        self,
        connection: _Connection,
        source: socket.socket,
        sink: socket.socket,
        to_target: bool,
    ) -> None:
        try:
            self._pump_until_closed(connection, source, sink, to_target)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close(reset=False)

    def _pump_until_closed(
        self,
        connection: _Connection,
        source: socket.socket,
        sink: socket.socket,
        to_target: bool,
    ) -> None:
        while not connection.closed.is_set():
            with self._lock:
                faults = _Faults(**vars(self._faults))
                blackholed = connection.blackholed
            if blackholed:
                # Bytes stay unread in the kernel buffers, and no reply goes back.
                time.sleep(POLL_SECONDS)
                continue
            readable, _, _ = select.select([source], [], [], POLL_SECONDS)
            with self._lock:
                blackholed = connection.blackholed
            if not readable or blackholed:
                continue
            limit = CHUNK_BYTES
            if to_target and faults.cut_after_bytes is not None:
                limit = max(1, faults.cut_after_bytes - connection.bytes_to_target)
            chunk = source.recv(min(limit, CHUNK_BYTES))
            if not chunk:
                return
            if faults.delay_seconds:
                time.sleep(faults.delay_seconds)
            sink.sendall(chunk)
            with self._lock:
                self.bytes_forwarded += len(chunk)
                if to_target:
                    connection.bytes_to_target += len(chunk)
                cut_now = (
                    to_target
                    and self._faults.cut_after_bytes is not None
                    and connection.bytes_to_target >= self._faults.cut_after_bytes
                )
                if cut_now:
                    self._connections.discard(connection)
                    self.cuts += 1
            if cut_now:
                connection.close(reset=True)
                return
