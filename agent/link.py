"""The agent's end of the Connect stream: send reports, track acks, reconnect.

Reports wait in memory until the collector's cumulative ack covers them and are
sent again after a reconnect. NOTE: the queue does not survive an agent crash
and is capped at MAX_PENDING reports (the oldest go first); a durable spool is
what removes both limits.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import grpc

from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2

log = logging.getLogger(__name__)

# A week of reports at the default report_min of 300 seconds.
MAX_PENDING = 2016
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_CLOSE = object()


class LinkError(Exception):
    """The collector rejected the stream in a way that retrying cannot fix."""


class Link:
    """Keep one Connect stream to the collector open and deliver queued reports."""

    def __init__(
        self,
        target: str,
        hello: agent_pb2.Hello,
        *,
        insecure: bool,
        on_connected: Callable[[int], None] = lambda committed: None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if not insecure:
            raise LinkError(
                "TLS is not available yet: pass --insecure (plaintext) for a "
                "collector on a loopback address"
            )
        self.target = target
        self._hello = hello
        self._on_connected = on_connected
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, report_pb2.Report] = OrderedDict()
        self._outbox: queue.Queue[object] | None = None
        self._call: grpc.Future | None = None
        self._drained = threading.Condition(self._lock)
        self.committed_sequence = 0
        self.acked_reports = 0
        self.dropped_reports = 0
        self.connects = 0

    # -- used by the agent's main loop -----------------------------------------

    def submit(self, report: report_pb2.Report) -> None:
        """Queue a report and send it now if the stream is up."""
        with self._lock:
            self._pending[report.sequence] = report
            while len(self._pending) > self._max_pending:
                dropped, _ = self._pending.popitem(last=False)
                self.dropped_reports += 1
                log.warning(
                    "dropped unacknowledged report %d: more than %d are waiting",
                    dropped,
                    self._max_pending,
                )
            if self._outbox is not None:
                self._outbox.put(agent_pb2.ConnectRequest(report=report))

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._outbox is not None

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every queued report is acknowledged; return False on timeout."""
        with self._drained:
            return self._drained.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """End the current stream, if any; run() then returns once stop is set."""
        with self._lock:
            outbox, call = self._outbox, self._call
        if outbox is not None:
            outbox.put(_CLOSE)
        if call is not None:
            call.cancel()

    # -- the connection loop -----------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect, stream and reconnect with backoff until stop is set."""
        failures = 0
        while not stop.is_set():
            connects_before = self.connects
            try:
                self._stream_once()
                failures = 0
                # The collector ended the stream without an error; a short
                # pause keeps a collector that does so at once from being
                # called in a tight loop.
                stop.wait(self._backoff(1))
            except grpc.RpcError as exc:
                if stop.is_set():
                    break
                # A stream that got as far as the welcome was healthy: the next
                # attempt starts the backoff sequence again.
                if self.connects != connects_before:
                    failures = 0
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    log.error(
                        "collector %s rejected the stream: %s",
                        self.target,
                        exc.details(),
                    )
                failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "stream to collector %s failed (%s: %s); reconnecting in %.1f s",
                    self.target,
                    code.name if code else "error",
                    exc.details() if hasattr(exc, "details") else exc,
                    delay,
                )
                stop.wait(delay)
            finally:
                with self._lock:
                    self._outbox = None
                    self._call = None

    @staticmethod
    def _backoff(failures: int) -> float:
        """Exponential backoff with full jitter, capped at BACKOFF_MAX_SECONDS."""
        ceiling = min(
            BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** (failures - 1)
        )
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not security

    def _stream_once(self) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            outbox: queue.Queue[object] = queue.Queue()
            outbox.put(agent_pb2.ConnectRequest(hello=self._hello))
            call = stub.Connect(_drain(outbox))
            with self._lock:
                self._call = call
            self._receive(call, outbox)

    def _receive(
        self, call: Iterator[agent_pb2.ConnectResponse], outbox: queue.Queue[object]
    ) -> None:
        for response in call:
            kind = response.WhichOneof("message")
            if kind == "welcome":
                self._welcome(response.welcome.committed_sequence, outbox)
            elif kind == "ack":
                self._acknowledge(response.ack.committed_sequence)
            else:
                log.warning("ignoring a collector message of unknown kind %r", kind)
        log.info("collector %s closed the stream", self.target)

    def _welcome(self, committed: int, outbox: queue.Queue[object]) -> None:
        with self._lock:
            self._prune(committed)
            self._outbox = outbox
            for report in self._pending.values():
                outbox.put(agent_pb2.ConnectRequest(report=report))
            waiting = len(self._pending)
            self.connects += 1
        log.info(
            "connected to collector %s; it has committed up to report %d, "
            "%d reports waiting to be sent",
            self.target,
            committed,
            waiting,
        )
        self._on_connected(committed)

    def _acknowledge(self, committed: int) -> None:
        with self._lock:
            self._prune(committed)

    def _prune(self, committed: int) -> None:
        """Drop queued reports up to committed; the caller holds the lock."""
        self.committed_sequence = max(self.committed_sequence, committed)
        for sequence in [s for s in self._pending if s <= committed]:
            del self._pending[sequence]
            self.acked_reports += 1
        if not self._pending:
            self._drained.notify_all()


def _drain(outbox: queue.Queue[object]) -> Iterator[agent_pb2.ConnectRequest]:
    while True:
        item = outbox.get()
        if item is _CLOSE:
            return
        assert isinstance(item, agent_pb2.ConnectRequest)
        yield item
