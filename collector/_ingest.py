"""The ingest path: the Connect stream handler and the batcher that commits reports.

The handler authenticates each stream by its node key, binds it to the key's
device, applies the per-device rate limit and flags reports whose collect_time
comes from a skewed clock.

A report that fails validation, or that the store rejects for its content,
ends the stream with INVALID_ARGUMENT after the reports before it are
acknowledged. The status then carries the report's sequence number in the
trailing metadata key ``fleetmend-rejected-seq`` (decimal text), so that the
agent can set that one report aside instead of sending it again on every
stream. Other INVALID_ARGUMENT endings, such as a malformed message or a
missing hello, carry no such key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import grpc
from sqlalchemy import exc as sqlalchemy_errors

from collector import auth, fleet
from collector._authz import AuthorizationMetadataError, bearer_credential
from collector._enroll import peer_host
from collector._limits import (
    DeviceRateLimiter,
    IngestLimits,
    LogThrottle,
    RateLimitLog,
)
from collector._validation import (
    InvalidMessageError,
    clock_offset,
    clock_skew_reason,
    is_offset_skewed,
    parse_connect_request,
    validate_hello,
    validate_report,
)
from collector.store import (
    IncomingReport,
    IngestResult,
    NodeKeyRecord,
    PolicyRecord,
    RuleStateRecord,
    Store,
    StoreError,
)
from collector.store._schema import MAX_SEQUENCE
from fleetmend.v1 import agent_pb2, remediation_pb2, report_pb2

logger = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

# Reports of one stream that are queued but not yet acknowledged. Past this the
# stream stops reading, so HTTP/2 flow control slows the agent down.
MAX_UNACKED_PER_STREAM = 1000

# A Connect call that sends no hello within this time ends with
# DEADLINE_EXCEEDED, so that idle streams cannot pile up on one node key.
HELLO_TIMEOUT_SECONDS = 30.0

# Repeats of the same failed commit are logged as one line at most this often.
REPEATED_FAILURE_LOG_INTERVAL_SECONDS = 10.0

# Trailing metadata key that names the sequence number of a rejected report.
# The agent reads the same key (agent.link), because the two packages share
# only fleetmend.v1.
REJECTED_SEQUENCE_KEY = "fleetmend-rejected-seq"


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


# Failed commits


def is_data_error(error: BaseException) -> bool:
    """Return True if error comes from the content of the reports committed.

    The store raises ValueError for a report it cannot represent, and a
    StoreError caused by a DataError or IntegrityError when the database
    rejects a value. Committing the same report again fails the same way.
    """
    if isinstance(error, StoreError):
        return any(
            isinstance(
                cause, sqlalchemy_errors.DataError | sqlalchemy_errors.IntegrityError
            )
            for cause in _causes(error)
        )
    return isinstance(error, ValueError | OverflowError)


def is_database_error(error: BaseException) -> bool:
    """Return True if error is a failure of the database itself.

    Examples are a full disk, a lost connection or a missing table. Any report
    may succeed once the database is back.
    """
    return isinstance(error, StoreError) and not is_data_error(error)


def describe_root_cause(error: BaseException) -> str:
    """Return "Type: first line" of the innermost cause of error."""
    root = _causes(error)[-1]
    lines = str(root).strip().splitlines()
    if not lines:
        return type(root).__name__
    return f"{type(root).__name__}: {lines[0]}"


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return chain


class _FailureLog:
    """Logs failed batch commits without flooding the log.

    The first failure of a kind is logged with its traceback. Repeats of that
    kind (the same exception types and root message) are counted and logged as
    one line, at most every repeat_interval_seconds. The first successful
    commit after failures logs the number of failed commits.
    """

    def __init__(
        self,
        repeat_interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repeat_interval_seconds = repeat_interval_seconds
        self._clock = clock
        self._kind: tuple[str, ...] | None = None
        self._failures = 0
        self._unlogged_repeats = 0
        self._last_line_time = 0.0

    def failed(
        self, error: BaseException, report_count: int, device_count: int
    ) -> None:
        kind = (
            *(type(cause).__name__ for cause in _causes(error)),
            describe_root_cause(error),
        )
        now = self._clock()
        self._failures += 1
        if kind != self._kind:
            self._flush_repeats()
            self._kind = kind
            self._last_line_time = now
            logger.error(
                "commit of a batch of %d reports from %d devices failed",
                report_count,
                device_count,
                exc_info=error,
            )
            return
        self._unlogged_repeats += 1
        if now - self._last_line_time >= self._repeat_interval_seconds:
            self._flush_repeats()
            self._last_line_time = now

    def succeeded(self) -> None:
        if self._kind is None:
            return
        self._flush_repeats()
        logger.info("commits succeed again after %d failed commits", self._failures)
        self._kind = None
        self._failures = 0

    def _flush_repeats(self) -> None:
        if self._kind is None or self._unlogged_repeats == 0:
            return
        logger.error(
            "commit failed again with the same error, %d times since the last "
            "message: %s",
            self._unlogged_repeats,
            self._kind[-1],
        )
        self._unlogged_repeats = 0


# Rate limits


@dataclass
class _Pending:
    incoming: IncomingReport
    future: asyncio.Future[int]


class Batcher:
    """Collects reports from every stream and commits them in batches.

    One task takes reports off a queue and commits up to max_batch_size of them
    in one store.ingest call, run in a worker thread. A batch closes when it is
    full or max_delay_seconds after its first report arrived. Each report's
    future resolves after its batch commits, with the device's highest committed
    sequence number, or fails with the commit's exception.

    When a batch fails for a reason other than a database error, its halves are
    committed separately, down to single reports, so that one report the store
    cannot take fails alone. A database error fails the whole batch at once.

    on_remediations, if given, is called on the event loop after each commit
    that stored new remediation records.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch_size: int = 500,
        max_delay_seconds: float = 0.020,
        repeat_log_interval_seconds: float = REPEATED_FAILURE_LOG_INTERVAL_SECONDS,
        on_remediations: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self._store = store
        self._on_remediations = on_remediations
        self._max_batch_size = max_batch_size
        self._max_delay_seconds = max_delay_seconds
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._failure_log = _FailureLog(repeat_log_interval_seconds)
        self.committed_batches = 0

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._task = asyncio.create_task(self._run(), name="fleetmend-batcher")

    def submit(self, incoming: IncomingReport) -> asyncio.Future[int]:
        """Queue a report and return the future of its commit."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # A stream that ended stops awaiting its later reports. The batcher
        # logs their failures itself, so asyncio must not report them as
        # "Future exception was never retrieved".
        future.add_done_callback(_retrieve_exception)
        self._queue.put_nowait(_Pending(incoming, future))
        return future

    async def close(self) -> None:
        """Commit every report queued so far, then stop the task."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = await self._collect_batch()
            if batch:
                await self._commit(batch)

    async def _collect_batch(self) -> tuple[list[_Pending], bool]:
        """Wait for a report, then gather more until the batch is full or due.

        The flag is True once close() was called and the batch is the last one.
        """
        first = await self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay_seconds
        while len(batch) < self._max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    async def _commit(self, batch: Sequence[_Pending]) -> None:
        try:
            committed = await self._ingest(batch)
        except Exception as error:
            device_count = len({pending.incoming.device_id for pending in batch})
            self._failure_log.failed(error, len(batch), device_count)
            if len(batch) > 1 and not is_database_error(error):
                await self._commit_halves(batch)
            else:
                _fail(batch, error)
            return
        self._failure_log.succeeded()
        _resolve(batch, committed)

    async def _commit_halves(self, batch: Sequence[_Pending]) -> None:
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            try:
                committed = await self._ingest(half)
            except Exception as error:
                if len(half) > 1 and not is_database_error(error):
                    await self._commit_halves(half)
                else:
                    _fail(half, error)
                continue
            _resolve(half, committed)

    async def _ingest(self, batch: Sequence[_Pending]) -> dict[str, int]:
        incoming = [pending.incoming for pending in batch]
        result = await asyncio.to_thread(self._store.ingest_with_details, incoming)
        self.committed_batches += 1
        if result.rules and self._on_remediations is not None:
            self._on_remediations(result)
        return result.committed


def _retrieve_exception(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(batch: Sequence[_Pending], committed: dict[str, int]) -> None:
    for pending in batch:
        if not pending.future.done():
            device_id = pending.incoming.device_id
            pending.future.set_result(committed.get(device_id, 0))


def _fail(batch: Sequence[_Pending], error: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


# Streams


class _StreamEnd:
    """Queue marker: the agent closed its side of the stream."""


class _StreamShutdown:
    """Queue marker: the collector is shutting down."""


@dataclass(frozen=True)
class _StreamInvalid:
    """Queue marker: the agent sent a message that the collector rejects.

    sequence is the rejected report's number when the message parsed as a
    report with a sequence in range, else None.
    """

    reason: str
    sequence: int | None = None


class _StreamLimited:
    """Queue marker: the device sent reports faster than its rate limit."""


class _StreamFailed:
    """Queue marker: the reader stopped because reading the stream failed."""


@dataclass(frozen=True)
class _StreamClosed:
    """Queue marker: the collector ends the stream at once with this status.

    close_device_streams puts it at the front of the queue, so reports queued
    behind it are not acknowledged, and the agent sends them again.
    """

    code: grpc.StatusCode
    details: str


@dataclass(frozen=True)
class _QueuedReport:
    sequence: int
    future: asyncio.Future[int]


# Markers that end a stream once the reports queued before them are acked.
_StreamStop = (
    _StreamEnd
    | _StreamShutdown
    | _StreamInvalid
    | _StreamLimited
    | _StreamFailed
    | _StreamClosed
)
_StreamItem = _QueuedReport | _StreamStop


@dataclass(eq=False)
class _Stream:
    """One authenticated Connect stream: what its reader queued, in order."""

    # The device of the stream's node key.
    device_id: str
    peer: str
    key_id: str
    # True once the collector has sent the welcome.
    welcomed: bool = False
    # Set by close_device_streams. The stream then ends with this status.
    close_status: _StreamClosed | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # The device's clock minus the collector's at the hello, None if unknown.
    clock_offset: timedelta | None = None
    skewed_reports: int = 0
    items: collections.deque[_StreamItem] = field(default_factory=collections.deque)
    available: asyncio.Event = field(default_factory=asyncio.Event)
    credit: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_UNACKED_PER_STREAM)
    )
    reader: asyncio.Task[None] | None = None
    # Policies and commands that the handler writes next, in order. Only the
    # handler's task writes to the call, so that responses do not interleave.
    outbox: collections.deque[agent_pb2.ConnectResponse] = field(
        default_factory=collections.deque
    )
    # The serialized effective policy last queued, or the one the agent runs
    # by its hello; None before the first delivery.
    policy_sent: bytes | None = None
    command_ids_sent: set[str] = field(default_factory=set)

    def push(self, item: _StreamItem) -> None:
        self.items.append(item)
        self.available.set()

    def send(self, response: agent_pb2.ConnectResponse) -> None:
        """Queue a response for the handler to write after the acks due."""
        self.outbox.append(response)
        self.available.set()

    def queue_policy(self, policy: remediation_pb2.Policy) -> bool:
        """Queue policy unless it is the one last queued; return whether queued."""
        payload = policy.SerializeToString(deterministic=True)
        if payload == self.policy_sent:
            return False
        self.policy_sent = payload
        self.send(agent_pb2.ConnectResponse(policy=policy))
        return True

    def queue_command(self, command: remediation_pb2.Command) -> bool:
        """Queue command unless this stream sent it before; return whether queued."""
        if command.command_id in self.command_ids_sent:
            return False
        self.command_ids_sent.add(command.command_id)
        self.send(agent_pb2.ConnectResponse(command=command))
        return True

    def close(self, status: _StreamClosed) -> None:
        """Stop reading and make the handler end the stream with status next."""
        self.close_status = status
        if self.reader is not None:
            self.reader.cancel()
        self.items.appendleft(status)
        self.available.set()
        self.closed.set()

    async def pop(self) -> _StreamItem | None:
        """Return the next queued item, or None while the outbox has responses.

        A close by close_device_streams comes before the outbox.
        """
        while not self.items and not self.outbox:
            self.available.clear()
            await self.available.wait()
        if self.outbox and self.close_status is None:
            return None
        if not self.items:
            return None
        return self.items.popleft()


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    await context.abort(code, details, trailing_metadata)
    raise AssertionError("context.abort returned")


class AgentServicer:
    """Serves AgentService.Connect.

    Each call is authenticated by the node key in its metadata before anything
    is read, and its hello must name the key's device. A newer stream of a
    device replaces the older one, which ends with ABORTED.

    Each stream has a reader task that parses, validates and queues reports for
    the batcher, while the handler's own task waits for commits in order and
    acknowledges the committed reports by sequence number. Reading waits for
    commits only while MAX_UNACKED_PER_STREAM reports of the stream are not yet
    acknowledged.

    A report over the device's rate limit ends the stream with
    RESOURCE_EXHAUSTED once the reports before it are acknowledged. Reports are
    flagged as clock-skewed by the clock offset that the stream's hello showed.

    After the welcome, a stream gets the device's effective policy unless its
    hello names that version, and every pending command. Later policy changes
    and new commands reach open streams through notify_policy_changed and
    deliver_commands. The handler's task writes these between the acks.
    """

    def __init__(
        self,
        store: Store,
        batcher: Batcher,
        *,
        clock: Callable[[], datetime] = utc_now,
        limits: IngestLimits | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._batcher = batcher
        self._clock = clock
        self._limits = limits or IngestLimits()
        self._rate_limiter = DeviceRateLimiter(
            self._limits.reports_per_second, self._limits.report_burst, monotonic
        )
        self._rate_limit_log = RateLimitLog(self._limits, clock=monotonic)
        self._rejection_log = LogThrottle(clock=monotonic)
        # Every authenticated stream, from before its hello until it ends.
        self._streams: set[_Stream] = set()
        self._closing = False
        # Held while the policy is read and queued, so that an older read
        # cannot be queued after a newer one.
        self._policy_lock = asyncio.Lock()
        self._deliveries: set[asyncio.Task[None]] = set()

    def rpc_handler(
        self, *, enroll: grpc.RpcMethodHandler | None = None
    ) -> grpc.GenericRpcHandler:
        """Return the handler of AgentService with Connect taking raw bytes.

        The handler deserializes each message itself, so that a malformed one
        ends the stream with INVALID_ARGUMENT and a logged reason. enroll, if
        given, serves the Enroll method; without it Enroll is UNIMPLEMENTED.
        """
        connect = grpc.stream_stream_rpc_method_handler(
            self.connect,
            request_deserializer=None,
            response_serializer=agent_pb2.ConnectResponse.SerializeToString,
        )
        methods = {"Connect": connect}
        if enroll is not None:
            methods["Enroll"] = enroll
        return grpc.method_handlers_generic_handler(AGENT_SERVICE, methods)

    def open_device_ids(self) -> list[str]:
        """Return the ids of devices with an open stream past its welcome, sorted."""
        return sorted({stream.device_id for stream in self._streams if stream.welcomed})

    def close_device_streams(
        self, device_id: str, code: grpc.StatusCode, details: str
    ) -> int:
        """End every stream of the device at once with code and details.

        The streams stop reading at once. Reports whose ack is already on its
        way may still be acknowledged, and reports still queued are not, so the
        agent sends them again. Returns the number of streams ended.
        """
        ended = 0
        for stream in list(self._streams):
            if stream.device_id != device_id or stream.close_status is not None:
                continue
            stream.close(_StreamClosed(code, details))
            ended += 1
        if ended:
            logger.info(
                "ending %d streams of device %s with %s: %s",
                ended,
                device_id,
                code.name,
                details,
            )
        return ended

    def notify_policy_changed(self) -> None:
        """Send every open stream its effective policy if it changed; call on the loop.

        The policy and the rule states are read in a worker thread by a
        background task, so this returns at once.
        """
        self._start_delivery(self._push_policies(), "fleetmend-policy-push")

    def deliver_commands(self, device_ids: Iterable[str]) -> set[str]:
        """Send the pending commands of these devices to their open streams.

        Returns the ids of the devices that have an open stream past its
        welcome. A background task reads and sends the commands, so this
        returns at once. Call it on the event loop, after the commands are
        stored. A device without an open stream gets its commands after the
        welcome of its next stream.
        """
        requested = set(device_ids)
        streams = [
            stream
            for stream in self._deliverable_streams()
            if stream.device_id in requested
        ]
        if streams:
            self._start_delivery(
                self._send_pending_commands(streams), "fleetmend-command-delivery"
            )
        return {stream.device_id for stream in streams}

    async def close_deliveries(self) -> None:
        """Cancel the policy and command deliveries still running."""
        tasks = list(self._deliveries)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start_delivery(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _deliverable_streams(self) -> list[_Stream]:
        return [
            stream
            for stream in self._streams
            if stream.welcomed and stream.close_status is None
        ]

    def _read_policy(self) -> tuple[PolicyRecord, dict[str, RuleStateRecord]] | None:
        record = self._store.current_policy()
        if record is None:
            return None
        return record, self._store.rule_states()

    async def _push_policies(self) -> None:
        async with self._policy_lock:
            try:
                loaded = await asyncio.to_thread(self._read_policy)
            except Exception:
                logger.exception("reading the policy to send to open streams failed")
                return
            if loaded is None:
                return
            record, states = loaded
            streams = self._deliverable_streams()
            queued = 0
            version = 0
            for stream in streams:
                policy = fleet.effective_policy(record, states, stream.device_id)
                version = policy.version
                if stream.queue_policy(policy):
                    queued += 1
            if queued:
                logger.info(
                    "sending fleet policy version %d (generation %d) to %d of %d "
                    "open streams",
                    record.version,
                    version,
                    queued,
                    len(streams),
                )

    async def _send_pending_commands(self, streams: Sequence[_Stream]) -> None:
        for stream in streams:
            await self._queue_pending_commands(stream)

    async def _queue_pending_commands(self, stream: _Stream) -> None:
        try:
            commands = await asyncio.to_thread(
                self._store.pending_commands, stream.device_id, self._clock()
            )
        except Exception:
            logger.exception(
                "reading the pending commands of device %s failed", stream.device_id
            )
            return
        for command in commands:
            stream.queue_command(command.to_message())

    async def _queue_connect_deliveries(
        self, stream: _Stream, hello: agent_pb2.Hello
    ) -> None:
        """Queue the effective policy, unless the agent has it, and pending commands."""
        async with self._policy_lock:
            try:
                loaded = await asyncio.to_thread(self._read_policy)
            except Exception:
                loaded = None
                logger.exception(
                    "reading the policy for device %s failed; it gets the policy "
                    "with the next change or stream",
                    stream.device_id,
                )
            if loaded is not None:
                record, states = loaded
                policy = fleet.effective_policy(record, states, stream.device_id)
                if policy.version == hello.policy_version:
                    # The agent runs this version already, so only a later
                    # change is sent.
                    stream.policy_sent = policy.SerializeToString(deterministic=True)
                elif stream.queue_policy(policy):
                    logger.info(
                        "sending fleet policy version %d (generation %d) to device "
                        "%s, which runs generation %d",
                        record.version,
                        policy.version,
                        stream.device_id,
                        hello.policy_version,
                    )
        await self._queue_pending_commands(stream)

    def flush_logs(self) -> None:
        """Log the rate-limit rejections counted since their device's last line."""
        self._rate_limit_log.flush()

    def begin_shutdown(self) -> None:
        """Stop reading on every stream and end each once its reports are acked."""
        self._closing = True
        for stream in self._streams:
            if stream.reader is not None:
                stream.reader.cancel()
            stream.push(_StreamShutdown())

    async def connect(
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        """Run one Connect stream: authentication, hello, welcome, reports, acks."""
        peer = context.peer()
        if self._closing:
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "the collector is shutting down"
            )
        key = await self._authenticate(context, peer)
        stream = _Stream(device_id=key.device_id, peer=peer, key_id=key.key_id)
        # Registered before the hello, so that close_device_streams reaches a
        # stream whose key is revoked while its hello is on its way.
        self._streams.add(stream)
        try:
            # A revocation that committed after the key was read but before
            # the stream was registered found no stream to close, so the key
            # is read once more now that close_device_streams can reach it.
            await self._authenticate(context, peer)
            await self._run_stream(context, stream)
        finally:
            if stream.reader is not None:
                stream.reader.cancel()
            self._streams.discard(stream)
            if stream.welcomed:
                self._log_stream_closed(stream)

    async def _run_stream(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        try:
            first = await asyncio.wait_for(
                self._read_unless_closed(context, stream), HELLO_TIMEOUT_SECONDS
            )
        except TimeoutError:
            logger.info(
                "stream of device %s from %s sent no hello within %g s",
                stream.device_id,
                stream.peer,
                HELLO_TIMEOUT_SECONDS,
            )
            await _abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no hello within {HELLO_TIMEOUT_SECONDS:g} s of the call's start",
            )
        received_time = self._clock()
        if first is grpc.aio.EOF:
            logger.info(
                "stream of device %s from %s closed before its hello",
                stream.device_id,
                stream.peer,
            )
            return
        hello = await self._read_hello(context, stream, first)
        stream.clock_offset = clock_offset(hello, received_time)
        committed = await self._record_hello(context, stream, hello, received_time)
        await self._abort_if_closed(context, stream)
        if self._closing:
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "the collector is shutting down"
            )
        welcome = agent_pb2.Welcome(committed_sequence=committed)
        await context.write(agent_pb2.ConnectResponse(welcome=welcome))
        await self._abort_if_closed(context, stream)

        self._replace_older_streams(stream)
        stream.welcomed = True
        logger.info(
            "stream opened: device %s from %s with node key %s, agent %s, "
            "committed sequence %d, clock offset %s",
            stream.device_id,
            stream.peer,
            stream.key_id,
            hello.agent_version or "unknown",
            committed,
            _describe_offset(stream.clock_offset),
        )
        await self._queue_connect_deliveries(stream, hello)
        stream.reader = asyncio.create_task(self._read_reports(context, stream))
        await self._send_acks(context, stream)

    async def _authenticate(
        self, context: grpc.aio.ServicerContext, peer: str
    ) -> NodeKeyRecord:
        """Return the node key of the call, or end it with UNAUTHENTICATED."""
        try:
            text = bearer_credential(context.invocation_metadata())
            key_id, secret = auth.parse_credential(text, auth.NODE_KEY_PREFIX)
        except (AuthorizationMetadataError, auth.InvalidCredentialError) as error:
            await self._reject_unauthenticated(context, peer, str(error))
        try:
            record = await asyncio.to_thread(self._store.find_node_key, key_id)
        except Exception:
            logger.exception("looking up node key %s from %s failed", key_id, peer)
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the collector could not check the node key; retry later",
            )
        if record is None or not auth.secret_matches(secret, record.key_hash):
            await self._reject_unauthenticated(
                context,
                peer,
                f"node key {key_id} is not valid; enroll the device again",
            )
        if record.revoke_time is not None:
            await self._reject_unauthenticated(
                context,
                peer,
                f"node key {key_id} of device {record.device_id} was revoked; "
                "enroll the device again",
            )
        return record

    async def _reject_unauthenticated(
        self, context: grpc.aio.ServicerContext, peer: str, reason: str
    ) -> NoReturn:
        # A client can repeat a rejected call at will, so each address gets one
        # line per interval.
        held_back = self._rejection_log.admit(peer_host(peer))
        if held_back is not None:
            logger.warning(
                "Connect from %s rejected with UNAUTHENTICATED: %s (%d rejections "
                "from this address not logged since the previous line)",
                peer,
                reason,
                held_back,
            )
        await _abort(context, grpc.StatusCode.UNAUTHENTICATED, reason)

    async def _read_unless_closed(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> Any:
        """Read one message, or end the call if close_device_streams ends it first."""
        read = asyncio.ensure_future(context.read())
        closed = asyncio.ensure_future(stream.closed.wait())
        try:
            await asyncio.wait((read, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not read.done():
                read.cancel()
        await self._abort_if_closed(context, stream)
        return read.result()

    async def _abort_if_closed(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        if stream.close_status is not None:
            await _abort(context, stream.close_status.code, stream.close_status.details)

    def _log_stream_closed(self, stream: _Stream) -> None:
        if stream.skewed_reports:
            logger.info(
                "stream closed: device %s from %s, %d reports flagged as clock-skewed",
                stream.device_id,
                stream.peer,
                stream.skewed_reports,
            )
        else:
            logger.info(
                "stream closed: device %s from %s", stream.device_id, stream.peer
            )

    def _replace_older_streams(self, stream: _Stream) -> None:
        """End the device's other welcomed streams with ABORTED, in one log line."""
        older = [
            other
            for other in self._streams
            if other is not stream
            and other.device_id == stream.device_id
            and other.welcomed
            and other.close_status is None
        ]
        if not older:
            return
        peers = ", ".join(sorted(other.peer for other in older))
        # Two agents that share one state folder take turns replacing each
        # other's stream, which this line shows at every reconnect.
        logger.warning(
            "device %s opened a new stream from %s, which replaces its stream "
            "from %s; if this repeats, two agents may share one device's state",
            stream.device_id,
            stream.peer,
            peers,
        )
        status = _StreamClosed(
            grpc.StatusCode.ABORTED,
            f"a newer stream of device {stream.device_id} from {stream.peer} "
            "replaced this one",
        )
        for other in older:
            other.close(status)

    async def _read_hello(
        self, context: grpc.aio.ServicerContext, stream: _Stream, payload: bytes
    ) -> agent_pb2.Hello:
        try:
            request = parse_connect_request(payload)
            if request.WhichOneof("message") != "hello":
                raise InvalidMessageError("the first message must be a hello")
            validate_hello(request.hello)
        except InvalidMessageError as error:
            await self._reject(context, stream.peer, stream.device_id, str(error))
        if request.hello.device_id != stream.device_id:
            reason = (
                f"the hello names device {request.hello.device_id}, but the node "
                f"key belongs to device {stream.device_id}; send the device id "
                "that enrollment returned"
            )
            logger.warning(
                "rejected stream from %s with PERMISSION_DENIED: %s",
                stream.peer,
                reason,
            )
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
        return request.hello

    async def _record_hello(
        self,
        context: grpc.aio.ServicerContext,
        stream: _Stream,
        hello: agent_pb2.Hello,
        received_time: datetime,
    ) -> int:
        skewed = is_offset_skewed(stream.clock_offset, self._limits.clock)
        if skewed:
            logger.warning(
                "device %s from %s has a skewed clock: %s, beyond the limit of "
                "%g s; its reports are stored with the receive time beside them",
                stream.device_id,
                stream.peer,
                _describe_offset(stream.clock_offset),
                self._limits.clock.skew_limit.total_seconds(),
            )
        try:
            return await asyncio.to_thread(
                self._store.record_hello,
                hello.device_id,
                hello.agent_version,
                received_time,
                clock_offset=stream.clock_offset,
                clock_skewed=skewed,
            )
        except Exception:
            logger.exception(
                "recording the hello of device %s from %s failed",
                hello.device_id,
                stream.peer,
            )
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the collector could not record the hello; retry later",
            )

    async def _reject(
        self,
        context: grpc.aio.ServicerContext,
        peer: str,
        device_id: str,
        reason: str,
        sequence: int | None = None,
    ) -> NoReturn:
        """End the call with INVALID_ARGUMENT and reason.

        With a sequence, the trailing metadata names the rejected report.
        """
        if sequence is None:
            logger.warning(
                "rejected message from %s (device %s): %s",
                peer,
                device_id or "not yet known",
                reason,
            )
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, reason)
        logger.warning(
            "rejected report %d from %s (device %s): %s",
            sequence,
            peer,
            device_id or "not yet known",
            reason,
        )
        await _abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
            trailing_metadata=((REJECTED_SEQUENCE_KEY, str(sequence)),),
        )

    async def _read_reports(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        """Read, validate and queue reports until the agent half-closes."""
        try:
            await self._read_reports_until_end(context, stream)
        except grpc.aio.AbortError:
            # The handler task ended the call, for example after a failed commit.
            stream.push(_StreamFailed())
        except Exception as error:
            if context.done():
                # The call has ended, for example because the agent cancelled it
                # or sent a message over the size limit; grpc sent the status.
                logger.info(
                    "stream of device %s from %s ended while reading: %r",
                    stream.device_id,
                    stream.peer,
                    error,
                )
            else:
                logger.exception(
                    "reading the stream of device %s from %s failed",
                    stream.device_id,
                    stream.peer,
                )
            stream.push(_StreamFailed())

    async def _read_reports_until_end(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        while True:
            await stream.credit.acquire()
            payload = await context.read()
            received_time = self._clock()
            if payload is grpc.aio.EOF:
                stream.push(_StreamEnd())
                return
            # Checked before parsing, so that a flood costs no decoding.
            if not self._rate_limiter.try_acquire(stream.device_id):
                self._rate_limit_log.rejected(stream.device_id, stream.peer)
                stream.push(_StreamLimited())
                return
            try:
                report = self._parse_report(payload)
            except InvalidMessageError as error:
                stream.push(_StreamInvalid(str(error)))
                return
            try:
                validate_report(report)
            except InvalidMessageError as error:
                stream.push(
                    _StreamInvalid(str(error), _checked_sequence(report.sequence))
                )
                return
            incoming = IncomingReport(
                device_id=stream.device_id,
                report=report,
                received_time=received_time,
                clock_skewed=self._flag_clock_skew(stream, report, received_time),
            )
            future = self._batcher.submit(incoming)
            stream.push(_QueuedReport(report.sequence, future))

    def _flag_clock_skew(
        self, stream: _Stream, report: report_pb2.Report, received_time: datetime
    ) -> bool:
        """Return whether the report is clock-skewed, logging the first of a stream."""
        reason = clock_skew_reason(
            report, received_time, stream.clock_offset, self._limits.clock
        )
        if reason is None:
            return False
        stream.skewed_reports += 1
        if stream.skewed_reports == 1:
            logger.info(
                "report %d of device %s from %s is flagged as clock-skewed: %s",
                report.sequence,
                stream.device_id,
                stream.peer,
                reason,
            )
        return True

    @staticmethod
    def _parse_report(payload: bytes) -> report_pb2.Report:
        """Parse a report request without checking its content.

        The caller runs validate_report next, so that a rejection can name the
        report's sequence.
        """
        request = parse_connect_request(payload)
        kind = request.WhichOneof("message")
        if kind != "report":
            raise InvalidMessageError(
                f"expected a report after the hello, got {kind or 'an empty message'}"
            )
        return request.report

    async def _send_acks(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        """Acknowledge each committed report of the stream by its sequence number.

        Reports are awaited in the order they arrived, and every report whose
        commit has already finished is folded into the same ack. Policies and
        commands in the stream's outbox are written between acks. An ack names
        each report, because an agent sends a fresh full report before its
        older backlog, so a highest-so-far number would not say which of the
        lower ones are committed.
        """
        highest = 0
        committed: list[int] = []
        while True:
            if committed and not _front_is_committed(stream):
                await context.write(_ack(highest, committed))
                committed = []
            item = await stream.pop()
            if item is None:
                if committed:
                    await context.write(_ack(highest, committed))
                    committed = []
                await self._write_outbox(context, stream)
                continue
            if isinstance(item, _QueuedReport):
                stream.credit.release()
                try:
                    await item.future
                except Exception as error:
                    # The reports committed before this one are acked first,
                    # so that the agent does not send them again.
                    if committed:
                        await context.write(_ack(highest, committed))
                    await self._end_failed_commit(context, stream, item, error)
                # The future's result is the device's highest committed number.
                highest = max(highest, item.future.result(), item.sequence)
                committed.append(item.sequence)
                continue
            if committed:
                await context.write(_ack(highest, committed))
            await self._end_stream(context, stream, item)
            return

    async def _write_outbox(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        while stream.outbox:
            response = stream.outbox.popleft()
            await context.write(response)
            if response.HasField("command"):
                logger.info(
                    "sent command %s (%s) to device %s",
                    response.command.command_id,
                    response.command.action.WhichOneof("kind") or "no action",
                    stream.device_id,
                )
            elif response.HasField("policy"):
                logger.debug(
                    "sent policy version %d to device %s",
                    response.policy.version,
                    stream.device_id,
                )

    async def _end_failed_commit(
        self,
        context: grpc.aio.ServicerContext,
        stream: _Stream,
        item: _QueuedReport,
        error: Exception,
    ) -> NoReturn:
        """End the stream after the commit of item's report failed with error.

        A data error fails again on every try, so it names the report as
        rejected. Other errors leave the report for the agent to send again.
        """
        if is_data_error(error):
            reason = (
                f"report {item.sequence} cannot be stored: {_data_error_text(error)}"
            )
            await self._reject(
                context,
                stream.peer,
                stream.device_id,
                reason,
                _checked_sequence(item.sequence),
            )
        logger.warning(
            "commit of report %d of device %s from %s failed, ending the stream: %s",
            item.sequence,
            stream.device_id,
            stream.peer,
            describe_root_cause(error),
        )
        if is_database_error(error):
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the collector could not commit a report; send it again",
            )
        await _abort(
            context,
            grpc.StatusCode.INTERNAL,
            f"the collector failed to store report {item.sequence}",
        )

    async def _end_stream(
        self, context: grpc.aio.ServicerContext, stream: _Stream, item: _StreamStop
    ) -> None:
        if isinstance(item, _StreamFailed):
            await _abort(
                context,
                grpc.StatusCode.INTERNAL,
                "the collector failed to read a report",
            )
        if isinstance(item, _StreamInvalid):
            await self._reject(
                context, stream.peer, stream.device_id, item.reason, item.sequence
            )
        if isinstance(item, _StreamLimited):
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self._limits.reports_per_second:g} reports per second "
                f"(burst {self._limits.report_burst}) from this device; reconnect "
                "with backoff and send the rest again",
            )
        if isinstance(item, _StreamShutdown):
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "the collector is shutting down"
            )
        if isinstance(item, _StreamClosed):
            await _abort(context, item.code, item.details)


def _checked_sequence(sequence: int) -> int | None:
    """Return sequence if it can name a stored report (1 to MAX_SEQUENCE), else None.

    A sequence outside that range is itself the reason for the rejection, so
    it names no report.
    """
    return sequence if 1 <= sequence <= MAX_SEQUENCE else None


def _data_error_text(error: Exception) -> str:
    # The store's ValueError names the device and the value. A StoreError
    # carries the database URL, so only its driver's message is sent.
    if isinstance(error, StoreError):
        return describe_root_cause(error)
    return str(error)


def _describe_offset(offset: timedelta | None) -> str:
    if offset is None:
        return "unknown"
    return f"{offset.total_seconds():+.3f} s"


def _front_is_committed(stream: _Stream) -> bool:
    if not stream.items:
        return False
    front = stream.items[0]
    return not isinstance(front, _QueuedReport) or front.future.done()


def _ack(highest: int, sequences: list[int]) -> agent_pb2.ConnectResponse:
    ack = agent_pb2.Ack(committed_sequence=highest, sequences=sequences)
    return agent_pb2.ConnectResponse(ack=ack)
