"""The ingest path: agent message validation, the Connect stream and the batcher."""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NoReturn

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from collector.store import IncomingReport, Store
from fleetmend.v1 import agent_pb2, report_pb2

logger = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

HOURS_PER_WEEK = 168

# Bounds for any one field of a report. They are far above what a laptop
# produces, and they cap the memory and rows that one message can cost.
MAX_STRING_CHARS = 4096
MAX_REPEATED_ITEMS = 1024
# Per-field exceptions to MAX_REPEATED_ITEMS, by full field name.
REPEATED_ITEM_LIMITS = {
    "fleetmend.v1.AppUsage.hours_of_week": HOURS_PER_WEEK,
    "fleetmend.v1.AppUsage.minutes": HOURS_PER_WEEK,
    # ATA attribute ids are one byte.
    "fleetmend.v1.Disk.ata_attributes": 255,
}
MAX_AGENT_VERSION_CHARS = 128

# Reports of one stream that are queued but not yet acknowledged. Past this the
# stream stops reading, so HTTP/2 flow control slows the agent down.
MAX_UNACKED_PER_STREAM = 1000


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class InvalidMessageError(ValueError):
    """A message from an agent that the collector rejects, with the reason."""


def parse_connect_request(payload: bytes) -> agent_pb2.ConnectRequest:
    """Deserialize one ConnectRequest, raising InvalidMessageError if malformed."""
    request = agent_pb2.ConnectRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as error:
        raise InvalidMessageError(
            f"message of {len(payload)} bytes is not a valid ConnectRequest"
        ) from error
    return request


def validate_device_id(device_id: str) -> None:
    """Raise InvalidMessageError unless device_id is a UUID in canonical form.

    The canonical form is 36 lowercase characters with hyphens, as str(uuid.UUID)
    writes it, so one device has exactly one spelling in the store.
    """
    try:
        canonical = str(uuid.UUID(device_id))
    except ValueError:
        canonical = None
    if canonical != device_id:
        raise InvalidMessageError(
            f"device_id {device_id[:64]!r} is not a canonical lowercase UUID"
        )


def validate_hello(hello: agent_pb2.Hello) -> None:
    """Raise InvalidMessageError unless the hello names a valid device."""
    validate_device_id(hello.device_id)
    if len(hello.agent_version) > MAX_AGENT_VERSION_CHARS:
        raise InvalidMessageError(
            f"agent_version has {len(hello.agent_version)} characters, "
            f"more than the maximum of {MAX_AGENT_VERSION_CHARS}"
        )


def validate_report(report: report_pb2.Report) -> None:
    """Raise InvalidMessageError unless the report is safe to store.

    Checks the sequence number, the shape of each AppUsage, and the size of every
    string and repeated field. Enum values that this version does not know are
    accepted and stored as numbers.
    """
    if report.sequence == 0:
        raise InvalidMessageError("report sequence must be greater than 0")
    _validate_bounds(report)
    if report.HasField("usage"):
        for app in report.usage.apps:
            _validate_app_usage(app)


def _validate_app_usage(app: report_pb2.AppUsage) -> None:
    if len(app.hours_of_week) != len(app.minutes):
        raise InvalidMessageError(
            f"app {app.app_id!r} has {len(app.hours_of_week)} hours_of_week "
            f"but {len(app.minutes)} minutes"
        )
    for hour in app.hours_of_week:
        if hour >= HOURS_PER_WEEK:
            raise InvalidMessageError(
                f"app {app.app_id!r} has hour_of_week {hour}, "
                f"but the maximum is {HOURS_PER_WEEK - 1}"
            )


def _validate_bounds(message: Message) -> None:
    for descriptor, value in message.ListFields():
        if descriptor.is_repeated:
            limit = REPEATED_ITEM_LIMITS.get(descriptor.full_name, MAX_REPEATED_ITEMS)
            if len(value) > limit:
                raise InvalidMessageError(
                    f"{descriptor.full_name} has {len(value)} items, "
                    f"more than the maximum of {limit}"
                )
            items = value
        else:
            items = [value]
        for item in items:
            _validate_value(descriptor, item)


def _validate_value(descriptor: FieldDescriptor, value: object) -> None:
    if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        _validate_bounds(value)
    elif descriptor.type == FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        if len(value) > MAX_STRING_CHARS:
            raise InvalidMessageError(
                f"{descriptor.full_name} has {len(value)} characters, "
                f"more than the maximum of {MAX_STRING_CHARS}"
            )


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
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch_size: int = 500,
        max_delay_seconds: float = 0.020,
    ) -> None:
        self._store = store
        self._max_batch_size = max_batch_size
        self._max_delay_seconds = max_delay_seconds
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.committed_batches = 0

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._task = asyncio.create_task(self._run(), name="fleetmend-batcher")

    def submit(self, incoming: IncomingReport) -> asyncio.Future[int]:
        """Queue a report and return the future of its commit."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
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
        incoming = [pending.incoming for pending in batch]
        try:
            committed = await asyncio.to_thread(self._store.ingest, incoming)
        except Exception as error:
            logger.exception(
                "commit of a batch of %d reports from %d devices failed",
                len(batch),
                len({item.device_id for item in incoming}),
            )
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        self.committed_batches += 1
        for pending in batch:
            if not pending.future.done():
                device_id = pending.incoming.device_id
                pending.future.set_result(committed.get(device_id, 0))


class _StreamEnd:
    """Queue marker: the agent closed its side of the stream."""


class _StreamShutdown:
    """Queue marker: the collector is shutting down."""


@dataclass(frozen=True)
class _StreamInvalid:
    """Queue marker: the agent sent a message that the collector rejects."""

    reason: str


class _StreamFailed:
    """Queue marker: the reader stopped because reading the stream failed."""


@dataclass(frozen=True)
class _QueuedReport:
    sequence: int
    future: asyncio.Future[int]


_StreamItem = (
    _QueuedReport | _StreamEnd | _StreamShutdown | _StreamInvalid | _StreamFailed
)


@dataclass(eq=False)
class _Stream:
    """One open Connect stream: what its reader queued, in order."""

    device_id: str
    peer: str
    items: collections.deque[_StreamItem] = field(default_factory=collections.deque)
    available: asyncio.Event = field(default_factory=asyncio.Event)
    credit: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_UNACKED_PER_STREAM)
    )
    reader: asyncio.Task[None] | None = None

    def push(self, item: _StreamItem) -> None:
        self.items.append(item)
        self.available.set()

    async def pop(self) -> _StreamItem:
        while not self.items:
            self.available.clear()
            await self.available.wait()
        return self.items.popleft()


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")


class AgentServicer:
    """Serves AgentService.Connect.

    Each stream has a reader task that parses, validates and queues reports for
    the batcher, while the handler's own task waits for commits in order and
    sends cumulative acks. Reading waits for commits only while
    MAX_UNACKED_PER_STREAM reports of the stream are not yet acknowledged.
    """

    def __init__(
        self,
        store: Store,
        batcher: Batcher,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._batcher = batcher
        self._clock = clock
        self._streams: set[_Stream] = set()
        self._closing = False

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """Return the handler of AgentService with Connect taking raw bytes.

        The handler deserializes each message itself, so that a malformed one
        ends the stream with INVALID_ARGUMENT and a logged reason.
        """
        connect = grpc.stream_stream_rpc_method_handler(
            self.connect,
            request_deserializer=None,
            response_serializer=agent_pb2.ConnectResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(AGENT_SERVICE, {"Connect": connect})

    def open_device_ids(self) -> list[str]:
        """Return the ids of devices with an open stream, sorted."""
        return sorted({stream.device_id for stream in self._streams})

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
        """Run one Connect stream: hello and welcome, then reports and acks."""
        peer = context.peer()
        if self._closing:
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "the collector is shutting down"
            )
        first = await context.read()
        if first is grpc.aio.EOF:
            logger.info("stream from %s closed before its hello", peer)
            return
        hello = await self._read_hello(context, peer, first)
        committed = await self._record_hello(context, peer, hello)
        if self._closing:
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "the collector is shutting down"
            )
        welcome = agent_pb2.Welcome(committed_sequence=committed)
        await context.write(agent_pb2.ConnectResponse(welcome=welcome))

        stream = _Stream(device_id=hello.device_id, peer=peer)
        self._streams.add(stream)
        logger.info(
            "stream opened: device %s from %s, agent %s, committed sequence %d",
            stream.device_id,
            peer,
            hello.agent_version or "unknown",
            committed,
        )
        stream.reader = asyncio.create_task(self._read_reports(context, stream))
        try:
            await self._send_acks(context, stream)
        finally:
            stream.reader.cancel()
            self._streams.discard(stream)
            logger.info("stream closed: device %s from %s", stream.device_id, peer)

    async def _read_hello(
        self, context: grpc.aio.ServicerContext, peer: str, payload: bytes
    ) -> agent_pb2.Hello:
        try:
            request = parse_connect_request(payload)
            if request.WhichOneof("message") != "hello":
                raise InvalidMessageError("the first message must be a hello")
            validate_hello(request.hello)
        except InvalidMessageError as error:
            await self._reject(context, peer, "", str(error))
        return request.hello

    async def _record_hello(
        self, context: grpc.aio.ServicerContext, peer: str, hello: agent_pb2.Hello
    ) -> int:
        try:
            return await asyncio.to_thread(
                self._store.record_hello,
                hello.device_id,
                hello.agent_version,
                self._clock(),
            )
        except Exception:
            logger.exception(
                "recording the hello of device %s from %s failed", hello.device_id, peer
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
    ) -> NoReturn:
        logger.warning(
            "rejected message from %s (device %s): %s",
            peer,
            device_id or "not yet known",
            reason,
        )
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, reason)

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
            if payload is grpc.aio.EOF:
                stream.push(_StreamEnd())
                return
            try:
                report = self._parse_report(payload)
            except InvalidMessageError as error:
                stream.push(_StreamInvalid(str(error)))
                return
            incoming = IncomingReport(
                device_id=stream.device_id,
                report=report,
                received_time=self._clock(),
            )
            future = self._batcher.submit(incoming)
            stream.push(_QueuedReport(report.sequence, future))

    @staticmethod
    def _parse_report(payload: bytes) -> report_pb2.Report:
        request = parse_connect_request(payload)
        kind = request.WhichOneof("message")
        if kind != "report":
            raise InvalidMessageError(
                f"expected a report after the hello, got {kind or 'an empty message'}"
            )
        validate_report(request.report)
        return request.report

    async def _send_acks(
        self, context: grpc.aio.ServicerContext, stream: _Stream
    ) -> None:
        """Send an ack each time committed reports raise the stream's maximum.

        Reports are awaited in the order they arrived, and every report whose
        commit has already finished is folded into the same ack.
        """
        highest = 0
        acked = 0
        while True:
            if highest > acked and not _front_is_committed(stream):
                await context.write(_ack(highest))
                acked = highest
            item = await stream.pop()
            if isinstance(item, _QueuedReport):
                stream.credit.release()
                await self._wait_commit(context, stream, item)
                highest = max(highest, item.sequence)
                continue
            if highest > acked:
                await context.write(_ack(highest))
            await self._end_stream(context, stream, item)
            return

    async def _wait_commit(
        self, context: grpc.aio.ServicerContext, stream: _Stream, item: _QueuedReport
    ) -> None:
        try:
            await item.future
        except Exception as error:
            logger.error(
                "commit of report %d of device %s from %s failed, "
                "ending the stream: %s",
                item.sequence,
                stream.device_id,
                stream.peer,
                error,
            )
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the collector could not commit a report; send it again",
            )

    async def _end_stream(
        self,
        context: grpc.aio.ServicerContext,
        stream: _Stream,
        item: _StreamEnd | _StreamShutdown | _StreamInvalid | _StreamFailed,
    ) -> None:
        if isinstance(item, _StreamFailed):
            await _abort(
                context,
                grpc.StatusCode.INTERNAL,
                "the collector failed to read a report",
            )
        if isinstance(item, _StreamInvalid):
            await self._reject(context, stream.peer, stream.device_id, item.reason)
        if isinstance(item, _StreamShutdown):
            await _abort(
                context, grpc.StatusCode.UNAVAILABLE, "the collector is shutting down"
            )


def _front_is_committed(stream: _Stream) -> bool:
    if not stream.items:
        return False
    front = stream.items[0]
    return not isinstance(front, _QueuedReport) or front.future.done()


def _ack(sequence: int) -> agent_pb2.ConnectResponse:
    return agent_pb2.ConnectResponse(ack=agent_pb2.Ack(committed_sequence=sequence))
