"""The agent's end of the Connect stream: send spooled reports, apply acks, reconnect.

Reports reach the link only through the spool (agent.spool), which commits
each one before it is sent and deletes it when an ack covers it. After every
welcome the link sends a fresh full report first and then drains the spool
oldest first, with at most ``max_in_flight`` unacknowledged reports on the
wire; the next ones go as acks come back.

Acks: the collector names the sequence of every report of the stream that it
has committed (``Ack.sequences``), and the link deletes exactly those from the
spool. The sequence numbers are not in order on the wire (the fresh full
report has the highest number but goes first), so ``committed_sequence`` alone
cannot say which older reports are committed. From a collector that sends no
``sequences``, an ack naming report X covers X and every report sent before it
on the same stream, by send order. If such a collector acks only the highest
sequence of a stream, older reports sent after the full report are never
acked, so after one such stall the link drains in sequence order until the
spool is empty. The welcome's committed sequence deletes nothing from the
spool: reports that the collector already has are sent again, and the
collector drops the repeats. Reports that carry remediation records are
spooled and sent the same way.

The collector may send a self-healing policy or an operator command on the
stream at any time. The link passes each to a callback (on_policy,
on_command) and takes the Hello's policy_version from policy_version() at
every connect, so that the collector can compare it with its current policy.

Every Connect call carries the node key as ``authorization: Bearer <key>``
over TLS (plaintext only to a loopback collector). A rejected key
(UNAUTHENTICATED, PERMISSION_DENIED) is logged once as an error and retried at
the maximum backoff, because only enrolling again fixes it. A failed TLS
handshake is logged once with its reason (agent.transport).

A report that the collector rejects as invalid ends the stream with
INVALID_ARGUMENT, and the collector names its sequence number in the trailing
metadata key ``fleetmend-rejected-seq``. The link then moves exactly that
report from the spool into the spool's quarantine, logs one error with the
collector's reason and reconnects at once, so that the reports behind it are
sent. It does so only for a report that was in flight on that stream. A
rejected fresh full report is the exception to reconnecting at once: every
stream brings a new one, so those streams reconnect with backoff. A
rejection without the key keeps every report spooled, and the link reconnects
with backoff as after any other error.

A stream is replaced when gRPC keepalive finds the connection dead or when
reports are in flight and no ack arrives within ``ack_timeout`` seconds.
Proxies come from the standard https_proxy, http_proxy, grpc_proxy and
no_proxy variables, which gRPC core reads itself.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent import clock as clock_module
from agent.healing.policy import policy_name
from agent.spool import Spool, SpooledRecord
from agent.text import count_text
from agent.transport import (
    explain_tls_failure,
    is_handshake_failure,
    is_loopback_target,
    open_channel,
)
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, remediation_pb2, report_pb2

log = logging.getLogger(__name__)

BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The start of grpc's status details when a message over
# grpc.max_send_message_length is sent (grpcio 1.85).
_CLIENT_SEND_LIMIT = "CLIENT: Sent message larger than max"
# Unacknowledged reports on the wire at once, so that a fleet reconnecting
# with week-long backlogs does not flood the collector.
MAX_IN_FLIGHT = 64
# Without an ack for this long while reports are in flight (or without a
# welcome after the hello), the stream is cancelled and replaced.
ACK_TIMEOUT_SECONDS = 45.0
WATCHDOG_POLL_SECONDS = 1.0

# Keepalive pings every 20 s, even without calls, and a 10 s wait for the
# ping ack, so a half-open TCP connection is found within about 30 s. The
# collector accepts pings as often as every 10 s, so it does not end the
# connection with GOAWAY too_many_pings. max_pings_without_data 0 keeps pinging
# on a stream without data (gRPC core stops after 2 pings otherwise), and
# ping_timeout_ms bounds the wait for any ping ack, which is 60 s by default in
# grpcio 1.85 (measured: an idle blackholed stream failed after 60 s without it).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 10_000),
]

_CLOSE = object()

# Status codes for a node key that the collector does not accept.
_REJECTED_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)

# Trailing metadata key in which the collector names the sequence number of a
# report that it rejected as invalid (collector._ingest sends it).
REJECTED_SEQUENCE_KEY = "fleetmend-rejected-seq"
# The largest sequence an SQLite INTEGER (the spool's key) can contain.
_MAX_SEQUENCE = 2**63 - 1


@dataclass
class _Stream:
    """The send-side state of one Connect stream."""

    outbox: queue.Queue[object]
    started: float
    call: grpc.Future | None = None
    welcomed: bool = False
    # Sequences sent on this stream and not yet acked, in send order.
    in_flight: list[int] = field(default_factory=list)
    # Highest sequence taken from the spool by the drain so far.
    cursor: int = 0
    # The fresh full report sent first on this stream, 0 if none was sent.
    fresh_sequence: int = 0
    highest_acked: int = 0
    last_progress: float = 0.0
    ended: threading.Event = field(default_factory=threading.Event)


def _no_fresh_report(committed: int) -> report_pb2.Report | None:
    return None


def _ignore_policy(policy: remediation_pb2.Policy) -> None:
    log.warning(
        "ignoring policy version %d from the collector: self-healing is not "
        "running in this agent",
        policy.version,
    )


def _ignore_command(command: remediation_pb2.Command) -> None:
    log.warning(
        "ignoring command %s from the collector: self-healing is not running in "
        "this agent",
        command.command_id,
    )


def _default_policy_version() -> int:
    return 0


class Link:
    """Keep one Connect stream to the collector open and deliver spooled reports."""

    def __init__(
        self,
        target: str,
        hello: agent_pb2.Hello,
        spool: Spool,
        *,
        node_key: str,
        root_certificates: bytes | None,
        insecure: bool = False,
        on_connected: Callable[[int], report_pb2.Report | None] = _no_fresh_report,
        on_policy: Callable[[remediation_pb2.Policy], object] = _ignore_policy,
        on_command: Callable[[remediation_pb2.Command], object] = _ignore_command,
        policy_version: Callable[[], int] = _default_policy_version,
        max_in_flight: int = MAX_IN_FLIGHT,
        ack_timeout: float = ACK_TIMEOUT_SECONDS,
    ) -> None:
        """Prepare a link; run() connects.

        The stream uses TLS verified with root_certificates (PEM; None means
        the system's CAs), or plaintext when insecure, which only a loopback
        target allows (ValueError otherwise). node_key goes in the
        authorization metadata of every Connect call. on_connected gets the
        welcome's committed sequence and returns the fresh full report to send
        first, already spooled, or None. on_policy and on_command get each
        policy and command the collector sends; they run on the stream's
        reader thread, so they must return quickly. policy_version returns the
        applied collector policy's version for the Hello.
        """
        if insecure and not is_loopback_target(target):
            raise ValueError(
                f"plaintext (--insecure) is allowed only for a loopback collector, "
                f"not {target}"
            )
        if not node_key:
            raise ValueError("node_key is empty; enroll first")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be 1 or more, got {max_in_flight}")
        self.target = target
        self.spool = spool
        self._insecure = insecure
        self._root_certificates = root_certificates
        self._metadata = (("authorization", f"Bearer {node_key}"),)
        # The last rejection or TLS problem logged as an error, so that a
        # retry loop logs it once instead of every minute.
        self._logged_problem = ""
        self._hello = hello
        self._on_connected = on_connected
        self._on_policy = on_policy
        self._on_command = on_command
        self._policy_version = policy_version
        self._max_in_flight = max_in_flight
        self._window = max_in_flight
        self._ack_timeout = ack_timeout
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._progress = threading.Event()
        # False after a stream stalled behind its fresh full report: then the
        # backlog goes first, in sequence order, until the spool is empty.
        self._full_first = True
        self.committed_sequence = 0
        # Acked routine reports, and acked reports that carry remediation
        # records, counted apart so that --exit-after counts routine reports.
        self.acked_reports = 0
        self.acked_remediations = 0
        self._remediation_sequences: set[int] = set()
        self.connects = 0
        self.watchdog_cancels = 0
        self.quarantined_reports = 0
        # Streams in a row whose own fresh full report was rejected. Each new
        # stream brings a new one, so these reconnect with backoff.
        self._fresh_rejections = 0

    # -- used by the agent's main loop -----------------------------------------

    def submit(self, report: report_pb2.Report) -> None:
        """Commit a report to the spool, then send it if the window allows."""
        self.spool.put(report)
        self.wake()

    def wake(self) -> None:
        """Send spooled reports that fit in the window; call after a spool put."""
        self._fill()

    @property
    def pending(self) -> int:
        """Reports in the spool (on disk or in memory) that no ack covers yet.

        Reports that carry remediation records count as well.
        """
        stats = self.spool.stats()
        return stats.pending_reports + stats.pending_remediations

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._stream is not None and self._stream.welcomed

    @property
    def in_flight(self) -> int:
        with self._lock:
            return 0 if self._stream is None else len(self._stream.in_flight)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the spool contains no reports; return False on timeout."""
        clock = clock_module.clock
        deadline = clock.monotonic() + timeout
        while self.pending:
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return False
            clock.wait(self._progress, min(remaining, 0.5))
            self._progress.clear()
        return True

    def close(self) -> None:
        """End the current stream, if any; run() then returns once stop is set."""
        with self._lock:
            stream = self._stream
        if stream is None:
            return
        stream.outbox.put(_CLOSE)
        if stream.call is not None:
            stream.call.cancel()

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
                clock_module.clock.wait(stop, self._backoff(1))
            except grpc.RpcError as exc:
                if stop.is_set():
                    break
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    quarantined_delay = self._quarantine_rejected(exc)
                    if quarantined_delay is not None:
                        failures = 0
                        clock_module.clock.wait(stop, quarantined_delay)
                        continue
                # A stream that got as far as the welcome was healthy, so the
                # backoff starts again, unless the collector is rate-limiting.
                if (
                    self.connects != connects_before
                    and code != grpc.StatusCode.RESOURCE_EXHAUSTED
                ):
                    failures = 0
                failures += 1
                delay = self._backoff(failures)
                if code in _REJECTED_CODES:
                    # Retrying cannot help until the device is enrolled again,
                    # so the link only checks once in a while.
                    delay = BACKOFF_MAX_SECONDS
                self._log_failure(exc, code, delay, stop)
            except Exception:
                # A spool or state error while streaming; the reports stay
                # spooled and the next stream sends them again.
                failures += 1
                delay = self._backoff(failures)
                log.exception(
                    "stream to collector %s stopped on an agent error; "
                    "reconnecting in %.1f s",
                    self.target,
                    delay,
                )
                clock_module.clock.wait(stop, delay)
            finally:
                with self._lock:
                    stream, self._stream = self._stream, None
                if stream is not None:
                    stream.ended.set()

    def _quarantine_rejected(self, exc: grpc.RpcError) -> float | None:
        """Quarantine the report that the collector named as rejected, if any.

        Returns the delay before the next stream, or None when the rejection
        named no report of this stream, or the spool could not move it.
        """
        sequence = _rejected_sequence(exc)
        if sequence is None:
            return None
        with self._lock:
            stream = self._stream
            in_flight = stream is not None and sequence in stream.in_flight
            fresh = stream is not None and sequence == stream.fresh_sequence
        if not in_flight:
            log.warning(
                "collector %s named report %d as rejected, but that report was "
                "not in flight on the stream; keeping it in the spool",
                self.target,
                sequence,
            )
            return None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        reason = details or "no reason given"
        if not self.spool.quarantine(sequence, reason):
            return None
        self.quarantined_reports += 1
        self._remediation_sequences.discard(sequence)
        delay = 0.0
        if fresh:
            self._fresh_rejections += 1
            delay = self._backoff(self._fresh_rejections)
        log.error(
            "collector %s rejected report %d as invalid (%s); moved it from the "
            "spool to its quarantine (%s there) and reconnecting in %.1f s "
            "so that the reports behind it are sent",
            self.target,
            sequence,
            reason,
            count_text(self.spool.stats().quarantined, "report"),
            delay,
        )
        return delay

    def _log_failure(
        self,
        exc: grpc.RpcError,
        code: grpc.StatusCode | None,
        delay: float,
        stop: threading.Event,
    ) -> None:
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(
            _CLIENT_SEND_LIMIT
        ):
            # gRPC's own refusal to send a message over the agent's limit; the
            # link drops such reports from the spool before sending them.
            log.error(
                "gRPC on this agent did not send a message over the agent's own "
                "limit of %d bytes (%s); reconnecting in %.1f s",
                MAX_MESSAGE_BYTES,
                details,
                delay,
            )
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # A rate limit: the reports stay spooled and a smaller window
            # spreads them out on the next stream.
            self._window = max(1, self._window // 2)
            log.warning(
                "collector %s is limiting this device (%s); %s stay spooled, "
                "at most %d in flight next time; reconnecting in %.1f s",
                self.target,
                details,
                count_text(self.pending, "report"),
                self._window,
                delay,
            )
        elif code is not None and code in _REJECTED_CODES:
            self._log_once(
                f"the collector {self.target} rejected this device's node key "
                f"({code.name}: {details}); enroll again with fleetmend-agent enroll",
                delay,
            )
        elif code == grpc.StatusCode.ABORTED:
            log.warning(
                "collector %s ended this stream because a newer stream of device "
                "%s replaced it (%s); two agents may share a state folder or a "
                "copied identity; reconnecting in %.1f s",
                self.target,
                self._hello.device_id,
                details,
                delay,
            )
        elif is_handshake_failure(exc) and (reason := self._tls_reason()) is not None:
            self._log_once(f"connection to {self.target} failed: {reason}", delay)
        else:
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                # NOTE: a rejection that names no report of the stream (a
                # collector without fleetmend-rejected-seq, or a malformed
                # message) leaves every report spooled, so a bad one is sent
                # again on every stream until the cap drops it.
                log.error("collector %s rejected the stream: %s", self.target, details)
            log.warning(
                "stream to collector %s failed (%s: %s); reconnecting in %.1f s",
                self.target,
                code.name if code else "error",
                details,
                delay,
            )
        clock_module.clock.wait(stop, delay)

    def _log_once(self, problem: str, delay: float) -> None:
        """Log problem as an error the first time in a row, later at debug level."""
        if problem != self._logged_problem:
            self._logged_problem = problem
            log.error("%s; retrying in %.1f s", problem, delay)
        else:
            log.debug("%s; retrying in %.1f s", problem, delay)

    def _tls_reason(self) -> str | None:
        try:
            return explain_tls_failure(
                self.target, self._root_certificates, insecure=self._insecure
            )
        except (OSError, ValueError) as exc:
            log.debug("TLS check of %s failed: %s", self.target, exc)
            return None

    @staticmethod
    def _backoff(failures: int) -> float:
        """Exponential backoff with full jitter, capped at BACKOFF_MAX_SECONDS."""
        # The exponent stops growing long before a float overflows; a day of
        # failed attempts at the cap is well over a thousand failures.
        exponent = min(max(failures - 1, 0), 32)
        ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2**exponent)
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not security

    def _stream_once(self) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *KEEPALIVE_OPTIONS,
        ]
        with open_channel(
            self.target,
            root_certificates=self._root_certificates,
            insecure=self._insecure,
            options=options,
        ) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            now = clock_module.clock.monotonic()
            stream = _Stream(outbox=queue.Queue(), started=now, last_progress=now)
            hello = agent_pb2.Hello()
            hello.CopyFrom(self._hello)
            hello.send_time.FromDatetime(clock_module.clock.now())
            hello.policy_version = self._policy_version()
            stream.outbox.put(agent_pb2.ConnectRequest(hello=hello))
            call = stub.Connect(_drain(stream.outbox), metadata=self._metadata)
            stream.call = call
            with self._lock:
                self._stream = stream
            watchdog = threading.Thread(
                target=self._watch,
                args=(stream,),
                name="fleetmend-link-watchdog",
                daemon=True,
            )
            watchdog.start()
            try:
                self._receive(call, stream)
            finally:
                stream.ended.set()

    def _watch(self, stream: _Stream) -> None:
        """Cancel the stream when acks (or the welcome) stop coming."""
        clock = clock_module.clock
        poll = min(WATCHDOG_POLL_SECONDS, self._ack_timeout / 4)
        while not clock.wait(stream.ended, poll):
            with self._lock:
                waiting = not stream.welcomed or bool(stream.in_flight)
                silent = clock.monotonic() - stream.last_progress
                in_flight = len(stream.in_flight)
            if waiting and silent > self._ack_timeout:
                self.watchdog_cancels += 1
                self._note_stall(stream)
                log.warning(
                    "no %s from collector %s for %.0f s with %s in flight; "
                    "replacing the stream",
                    "ack" if stream.welcomed else "welcome",
                    self.target,
                    silent,
                    count_text(in_flight, "report"),
                )
                if stream.call is not None:
                    stream.call.cancel()
                return

    def _note_stall(self, stream: _Stream) -> None:
        """Send the backlog in sequence order next time if acks stopped behind it.

        A collector that acks the highest committed sequence of a stream never
        acks older reports sent after a newer one. In sequence order such a
        collector's acks cover the backlog again.
        """
        with self._lock:
            stalled_behind_newer = bool(stream.in_flight) and (
                stream.highest_acked > min(stream.in_flight)
            )
        if stalled_behind_newer and self._full_first:
            self._full_first = False
            log.warning(
                "collector %s acknowledged no older report sent after a newer "
                "one; the next stream sends the backlog in sequence order",
                self.target,
            )

    def _receive(
        self, call: Iterator[agent_pb2.ConnectResponse], stream: _Stream
    ) -> None:
        for response in call:
            kind = response.WhichOneof("message")
            if kind == "welcome":
                self._welcome(response.welcome.committed_sequence, stream)
            elif kind == "ack":
                self._acknowledge(response.ack, stream)
            elif kind == "policy":
                self._deliver(
                    policy_name(response.policy), self._on_policy, response.policy
                )
            elif kind == "command":
                self._deliver(
                    f"command {response.command.command_id}",
                    self._on_command,
                    response.command,
                )
            else:
                log.warning("ignoring a collector message of unknown kind %r", kind)
        log.info("collector %s closed the stream", self.target)

    @staticmethod
    def _deliver(name: str, callback: Callable[[Any], object], message: Any) -> None:
        """Pass a policy or command to its callback; its failure keeps the stream."""
        log.info("received %s from the collector", name)
        try:
            callback(message)
        except Exception:
            log.exception("handling %s from the collector failed", name)

    def _welcome(self, committed: int, stream: _Stream) -> None:
        self.committed_sequence = max(self.committed_sequence, committed)
        fresh = self._on_connected(committed)
        with self._lock:
            stream.welcomed = True
            stream.last_progress = clock_module.clock.monotonic()
            if fresh is not None and self._full_first:
                size = request_size(fresh.SerializeToString())
                if size <= MAX_MESSAGE_BYTES:
                    self._send(stream, fresh)
                    stream.fresh_sequence = fresh.sequence
                else:
                    log.error(
                        "full report %d is %d bytes, more than the %d bytes a "
                        "message may have; it is not sent",
                        fresh.sequence,
                        size,
                        MAX_MESSAGE_BYTES,
                    )
            self.connects += 1
            self._logged_problem = ""
        log.info(
            "connected to collector %s; it has committed up to report %d; "
            "%s waiting in the spool",
            self.target,
            committed,
            count_text(self.pending, "report"),
        )
        self._fill()

    def _acknowledge(self, ack: agent_pb2.Ack, stream: _Stream) -> None:
        committed = ack.committed_sequence
        with self._lock:
            if ack.sequences:
                # The collector names every committed report of the stream.
                acked = list(ack.sequences)
                named = set(acked)
                stream.in_flight = [s for s in stream.in_flight if s not in named]
            elif committed in stream.in_flight:
                # An older collector: the ack is a position in the send order.
                position = stream.in_flight.index(committed) + 1
                acked = stream.in_flight[:position]
                del stream.in_flight[:position]
            else:
                acked = []
            stream.highest_acked = max(stream.highest_acked, *acked, 0)
            stream.last_progress = clock_module.clock.monotonic()
            self._window = min(self._max_in_flight, self._window + 1)
        if not acked:
            log.debug("ack for report %d matches nothing in flight", committed)
        else:
            self._fresh_rejections = 0
        self.spool.remove(acked)
        if not self._full_first and not self.pending:
            self._full_first = True
        remediations = self._remediation_sequences.intersection(acked)
        self._remediation_sequences.difference_update(remediations)
        self.acked_remediations += len(remediations)
        self.acked_reports += len(acked) - len(remediations)
        self.committed_sequence = max(self.committed_sequence, committed)
        self._progress.set()
        self._fill()

    def _fill(self) -> None:
        """Send spooled reports, oldest first, until the window is full."""
        with self._lock:
            stream = self._stream
            if stream is None or not stream.welcomed:
                return
            while len(stream.in_flight) < self._window:
                batch = self.spool.pending(
                    after_sequence=stream.cursor,
                    limit=self._window - len(stream.in_flight),
                    kind=None,
                )
                if not batch:
                    return
                for record in batch:
                    stream.cursor = record.sequence
                    if self._drop_if_oversized(record):
                        continue
                    if record.kind == "remediation":
                        self._remediation_sequences.add(record.sequence)
                    if record.sequence not in stream.in_flight:
                        self._send(stream, record.report())

    def _drop_if_oversized(self, record: SpooledRecord) -> bool:
        """Delete a spooled report that can never be sent; return True if it was.

        gRPC refuses to send a message over MAX_MESSAGE_BYTES and ends the
        stream, so such a report would block every later one.
        """
        size = request_size(record.body)
        if size <= MAX_MESSAGE_BYTES:
            return False
        log.error(
            "spooled %s report %d is %d bytes, more than the %d bytes a message "
            "may have; dropped it from the spool because it can never be sent, "
            "and counted it in dropped_reports",
            record.kind,
            record.sequence,
            size,
            MAX_MESSAGE_BYTES,
        )
        self.spool.discard(record.sequence)
        return True

    @staticmethod
    def _send(stream: _Stream, report: report_pb2.Report) -> None:
        """Queue a report on the stream; the caller holds the lock."""
        if not stream.in_flight:
            # The ack timeout counts from the first report after a quiet spell.
            stream.last_progress = clock_module.clock.monotonic()
        stream.in_flight.append(report.sequence)
        stream.outbox.put(agent_pb2.ConnectRequest(report=report))


def request_size(report_body: bytes) -> int:
    """Return the bytes of a ConnectRequest that carries a serialized report.

    The report is a length-delimited field: a one-byte tag (field number 2),
    the length as a varint, then the body.
    """
    length = len(report_body)
    varint_bytes = max(1, (length.bit_length() + 6) // 7)
    return 1 + varint_bytes + length


def _rejected_sequence(exc: grpc.RpcError) -> int | None:
    """Return the sequence named in REJECTED_SEQUENCE_KEY, None if absent or invalid."""
    trailing = getattr(exc, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key != REJECTED_SEQUENCE_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if text.isascii() and text.isdigit() and 1 <= int(text) <= _MAX_SEQUENCE:
            return int(text)
        log.warning(
            "ignoring %s %r from the collector: not a sequence number from 1 to %d",
            REJECTED_SEQUENCE_KEY,
            text[:40],
            _MAX_SEQUENCE,
        )
        return None
    return None


def _drain(outbox: queue.Queue[object]) -> Iterator[agent_pb2.ConnectRequest]:
    while True:
        item = outbox.get()
        if item is _CLOSE:
            return
        assert isinstance(item, agent_pb2.ConnectRequest)
        yield item
