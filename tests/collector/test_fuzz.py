"""Malformed, truncated, oversized and odd messages fed to the ingest path.

Hypothesis drives both the pure parse and validate functions and the Connect
handler of a real server on 127.0.0.1. Every input must end in OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and a rejected input must leave the
reports table as it was. Each stream carries the node key of a device enrolled
for it, so a valid hello that names another device ends in PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from collector._validation import (
    MAX_STRING_CHARS,
    InvalidMessageError,
    parse_connect_request,
    validate_hello,
    validate_report,
)
from collector.server import (
    MAX_MESSAGE_BYTES,
    ServerHandle,
    ServerSettings,
    start_server_thread,
)
from collector.store._schema import devices, reports
from fleetmend.v1 import agent_pb2, report_pb2
from tests.trust import bearer, enroll, make_tls_dir

CONNECT_METHOD = "/fleetmend.v1.AgentService/Connect"
CLEAR_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
REJECT_CODES = CLEAR_CODES - {grpc.StatusCode.OK}
# A first message may also be a valid hello of another device than the key's.
HELLO_CODES = CLEAR_CODES | {grpc.StatusCode.PERMISSION_DENIED}
MAX_DEPTH = 4

# Bounded so that the whole file runs in well under a minute on 2 cores.
PURE_EXAMPLES = 1000
SERVER_EXAMPLES = 300

FD = FieldDescriptor
INTEGER_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


# Strategies


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    # The edges of the range and small values come ahead of arbitrary values,
    # because most decoding bugs live there.
    edges = sorted({low, high, max(low, 0), min(high, 1), min(high, 255)})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _strings() -> st.SearchStrategy[str]:
    oversized = st.sampled_from([MAX_STRING_CHARS, MAX_STRING_CHARS + 1]).map(
        lambda length: "é" * length
    )
    return st.one_of(st.text(max_size=12), st.just("a\x00b"), oversized)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[object]:
    if field.type in INTEGER_RANGES:
        low, high = INTEGER_RANGES[field.type]
        return _integers(low, high)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if field.type == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if field.type == FD.TYPE_STRING:
        return _strings()
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=16)
    if field.type == FD.TYPE_ENUM:
        # Values this version does not know must be kept, not rejected.
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field {field.full_name}")


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """Draw a message of any type with a random subset of its fields set."""
    message_class = _message_class(descriptor)
    message = message_class()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FD.TYPE_MESSAGE:
            if depth >= MAX_DEPTH:
                continue
            assert field.message_type is not None
            count = draw(st.integers(0, 3)) if field.is_repeated else 1
            for _ in range(count):
                value = draw(messages(field.message_type, depth + 1))
                if field.is_repeated:
                    getattr(message, field.name).add().CopyFrom(value)
                else:
                    getattr(message, field.name).CopyFrom(value)
        elif field.is_repeated:
            getattr(message, field.name).extend(
                draw(st.lists(_scalar(field), max_size=4))
            )
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@st.composite
def valid_reports(draw: st.DrawFn) -> report_pb2.Report:
    """Draw a report that validation accepts, through odd but legal values."""
    report = report_pb2.Report(
        sequence=draw(st.integers(1, 2**63 - 1)),
        full=draw(st.booleans()),
        dropped_reports=draw(st.integers(0, 2**64 - 1)),
    )
    report.collect_time.seconds = draw(st.integers(0, 253_402_300_799))
    report.host.hostname = draw(st.text(max_size=40).filter(lambda s: "\x00" not in s))
    report.host.memory_bytes = draw(st.integers(0, 2**64 - 1))
    credential = report.credentials.credentials.add()
    credential.account = draw(st.text(max_size=20))
    # An expiry kind that this version does not know.
    credential.expiry = report_pb2.CredentialExpiry.ValueType(
        draw(st.integers(100, 2**31 - 1))
    )
    disk = report.disks.disks.add()
    disk.name = "nvme0n1"
    disk.interface = report_pb2.DiskInterface.ValueType(
        draw(st.integers(-(2**31), 2**31 - 1))
    )
    disk.smart_state = report_pb2.SmartState.ValueType(draw(st.integers(8, 2**31 - 1)))
    return report


def _connect_bytes(message: Message) -> bytes:
    request = agent_pb2.ConnectRequest()
    if isinstance(message, report_pb2.Report):
        request.report.CopyFrom(message)
    else:
        assert isinstance(message, agent_pb2.ConnectRequest)
        request.CopyFrom(message)
    return request.SerializeToString()


@st.composite
def damaged_payloads(draw: st.DrawFn) -> bytes:
    """Draw a serialized ConnectRequest that is truncated or has bytes changed."""
    source = draw(st.one_of(valid_reports(), messages(report_pb2.Report.DESCRIPTOR)))
    payload = bytearray(_connect_bytes(source))
    if not payload:
        return bytes(payload)
    if draw(st.booleans()):
        return bytes(payload[: draw(st.integers(0, len(payload) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(payload) - 1))
        payload[position] = draw(st.integers(0, 255))
    return bytes(payload)


def report_payloads() -> st.SearchStrategy[bytes]:
    """Raw bytes, damaged messages, random messages and odd valid reports."""
    return st.one_of(
        st.binary(max_size=256),
        damaged_payloads(),
        messages(agent_pb2.ConnectRequest.DESCRIPTOR).map(_connect_bytes),
        messages(report_pb2.Report.DESCRIPTOR).map(_connect_bytes),
        valid_reports().map(_connect_bytes),
    )


# The oracle: what the pure functions make of one message after a hello


def rejection_reason(payload: bytes) -> str | None:
    """Return why the collector must reject payload as a report, or None.

    Raises anything other than InvalidMessageError that parsing or validation
    lets escape, which is the failure this file looks for.
    """
    try:
        request = parse_connect_request(payload)
        if request.WhichOneof("message") != "report":
            return "not a report"
        validate_report(request.report)
    except InvalidMessageError as error:
        return str(error)
    return None


def hello_rejection_reason(payload: bytes) -> str | None:
    """Return why the collector must reject payload as the first message, or None."""
    try:
        request = parse_connect_request(payload)
        if request.WhichOneof("message") != "hello":
            return "not a hello"
        validate_hello(request.hello)
    except InvalidMessageError as error:
        return str(error)
    return None


@settings(max_examples=PURE_EXAMPLES, deadline=None)
@given(payload=report_payloads())
def test_validation_rejects_cleanly(payload: bytes) -> None:
    reason = rejection_reason(payload)
    assert reason is None or reason.strip()


@settings(max_examples=PURE_EXAMPLES // 2, deadline=None)
@given(payload=st.one_of(st.binary(max_size=128), damaged_payloads()))
def test_hello_validation_rejects_cleanly(payload: bytes) -> None:
    reason = hello_rejection_reason(payload)
    assert reason is None or reason.strip()


@settings(max_examples=PURE_EXAMPLES // 2, deadline=None)
@given(report=valid_reports())
def test_odd_valid_reports_pass(report: report_pb2.Report) -> None:
    assert rejection_reason(_connect_bytes(report)) is None


def test_unknown_enum_kept() -> None:
    report = report_pb2.Report(sequence=1)
    report.disks.disks.add(name="sda", interface=4242)
    parsed = parse_connect_request(_connect_bytes(report))
    assert parsed.report.disks.disks[0].interface == 4242


# Through the server


@dataclass
class Collector:
    handle: ServerHandle
    engine: Engine
    channel: grpc.Channel
    tls_dir: Path

    def enroll(self) -> tuple[str, str]:
        """Enroll a new device; return its id and node key."""
        return enroll(self.handle.address, self.tls_dir)

    def stored_reports(self) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.scalar(select(func.count()).select_from(reports)) or 0
            )

    def stored_devices(self) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.scalar(select(func.count()).select_from(devices)) or 0
            )

    def device_reports(self, device_id: str) -> int:
        query = (
            select(func.count())
            .select_from(reports)
            .where(reports.c.device_id == device_id)
        )
        with self.engine.connect() as connection:
            return int(connection.scalar(query) or 0)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[agent_pb2.ConnectResponse]


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    folder = tmp_path_factory.mktemp("fuzz")
    tls_dir = make_tls_dir(folder / "tls")
    url = f"sqlite:///{folder / 'collector.db'}"
    # Every example enrolls a device, so the enrollment limit is off.
    settings = ServerSettings(enroll_per_minute=0)
    handle = start_server_thread(url, tls_dir=tls_dir, insecure=True, settings=settings)
    engine = create_engine(url)
    options = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]
    channel = grpc.insecure_channel(handle.address, options=options)
    yield Collector(handle, engine, channel, tls_dir)
    channel.close()
    engine.dispose()
    handle.stop()


def hello_bytes(device_id: str) -> bytes:
    hello = agent_pb2.Hello(device_id=device_id, agent_version="fuzz")
    return agent_pb2.ConnectRequest(hello=hello).SerializeToString()


def send_raw(collector: Collector, payloads: list[bytes], node_key: str) -> Outcome:
    """Send payloads on one Connect stream, half-close, and return the status."""
    connect = collector.channel.stream_stream(
        CONNECT_METHOD,
        request_serializer=None,
        response_deserializer=agent_pb2.ConnectResponse.FromString,
    )
    call = connect(iter(payloads), timeout=30, metadata=bearer(node_key))
    responses: list[agent_pb2.ConnectResponse] = []
    try:
        for response in call:
            responses.append(response)
    except grpc.RpcError:
        pass
    return Outcome(call.code(), call.details() or "", responses)


def acked(outcome: Outcome) -> int:
    sequences = [r.ack.committed_sequence for r in outcome.responses if r.ack]
    return max(sequences, default=0)


@settings(
    max_examples=SERVER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=report_payloads())
def test_connect_report_status(collector: Collector, payload: bytes) -> None:
    device_id, node_key = collector.enroll()
    reason = rejection_reason(payload)
    before = collector.stored_reports()
    outcome = send_raw(collector, [hello_bytes(device_id), payload], node_key)
    event(outcome.code.name)
    assert outcome.code in CLEAR_CODES, outcome.details
    if reason is not None:
        assert outcome.code in REJECT_CODES, reason
        assert collector.stored_reports() == before
        return
    if outcome.code != grpc.StatusCode.OK:
        # Validation passed but the store rejected the value: nothing stored.
        assert collector.device_reports(device_id) == 0, outcome.details
        return
    sequence = parse_connect_request(payload).report.sequence
    assert collector.device_reports(device_id) == 1
    assert acked(outcome) == sequence


@settings(
    max_examples=SERVER_EXAMPLES // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.one_of(st.binary(max_size=128), damaged_payloads()))
def test_connect_hello_status(collector: Collector, payload: bytes) -> None:
    reason = hello_rejection_reason(payload)
    _, node_key = collector.enroll()
    devices_before = collector.stored_devices()
    reports_before = collector.stored_reports()
    outcome = send_raw(collector, [payload], node_key)
    assert outcome.code in HELLO_CODES, outcome.details
    if reason is not None:
        assert outcome.code in REJECT_CODES, reason
    else:
        # A valid hello of a random device id names another device than the key's.
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, outcome.details
    assert collector.stored_devices() == devices_before
    assert collector.stored_reports() == reports_before


def test_connect_oversized_message(collector: Collector) -> None:
    report = report_pb2.Report(sequence=1)
    report.host.hostname = "h" * (MAX_MESSAGE_BYTES + 1)
    before = collector.stored_reports()
    device_id, node_key = collector.enroll()
    outcome = send_raw(
        collector, [hello_bytes(device_id), report_bytes(report)], node_key
    )
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert collector.stored_reports() == before


def test_connect_oversized_field(collector: Collector) -> None:
    report = report_pb2.Report(sequence=1)
    report.host.hostname = "h" * (MAX_STRING_CHARS + 1)
    before = collector.stored_reports()
    device_id, node_key = collector.enroll()
    outcome = send_raw(
        collector, [hello_bytes(device_id), report_bytes(report)], node_key
    )
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "HostFacts.hostname" in outcome.details
    assert collector.stored_reports() == before


def test_connect_truncated_report(collector: Collector) -> None:
    report = report_pb2.Report(sequence=1)
    report.host.hostname = "laptop-17"
    payload = report_bytes(report)[:-3]
    before = collector.stored_reports()
    device_id, node_key = collector.enroll()
    outcome = send_raw(collector, [hello_bytes(device_id), payload], node_key)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ConnectRequest" in outcome.details
    assert collector.stored_reports() == before


def test_connect_unknown_enum(collector: Collector) -> None:
    device_id, node_key = collector.enroll()
    report = report_pb2.Report(sequence=1)
    report.disks.disks.add(name="sda", interface=4242)
    outcome = send_raw(
        collector, [hello_bytes(device_id), report_bytes(report)], node_key
    )
    assert outcome.code == grpc.StatusCode.OK
    assert collector.device_reports(device_id) == 1


def report_bytes(report: report_pb2.Report) -> bytes:
    return agent_pb2.ConnectRequest(report=report).SerializeToString()
