"""The collector's gRPC server, driven through real channels on 127.0.0.1."""

from __future__ import annotations

import base64
import collections
import gc
import itertools
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import create_engine, text

from collector import tls
from collector._limits import DEFAULT_REPORT_BURST
from collector._ops import (
    decode_devices_token,
    effective_page_size,
    encode_devices_token,
)
from collector._validation import (
    MAX_STRING_CHARS,
    InvalidMessageError,
    validate_device_id,
    validate_report,
)
from collector.server import (
    ServerHandle,
    ServerSettings,
    split_listen_address,
    start_server_thread,
)
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, ops_pb2, ops_pb2_grpc, report_pb2
from tests.trust import bearer, create_token, enroll

CONNECT_METHOD = "/fleetmend.v1.AgentService/Connect"
T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)


# Test collectors enroll many devices from 127.0.0.1, so the per-address
# enrollment limit is off. tests/collector/test_auth_server.py tests the limit.
OPEN_ENROLLMENT = ServerSettings(enroll_per_minute=0)


class Clock:
    """A clock that tests move by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Enroller:
    """Enrolls devices with a test collector through Enroll and keeps their keys."""

    def __init__(self, address: str, tls_dir: Path, *, plaintext: bool = True) -> None:
        self.address = address
        self.tls_dir = tls_dir
        self.plaintext = plaintext
        self.keys: dict[str, str] = {}
        self._lock = threading.Lock()

    def key(self, device_id: str) -> str:
        """Return the node key of device_id, enrolling it under that id first."""
        with self._lock:
            if device_id not in self.keys:
                enrolled_id, node_key = enroll(
                    self.address, self.tls_dir, device_id, plaintext=self.plaintext
                )
                assert enrolled_id == device_id
                self.keys[device_id] = node_key
            return self.keys[device_id]

    def fresh_key(self) -> str:
        """Return the node key of a newly enrolled device."""
        return self.key(new_device_id())


def stream_key(enroller: Enroller, first: agent_pb2.ConnectRequest | None) -> str:
    """Return the node key for a stream whose first request is first.

    A hello that names a valid device id gets that device's key. Any other
    first request gets the key of a new device, so that the stream passes
    authentication and the collector's checks of the hello run.
    """
    if first is not None and first.WhichOneof("message") == "hello":
        device_id = first.hello.device_id
        try:
            validate_device_id(device_id)
        except InvalidMessageError:
            return enroller.fresh_key()
        if device_id != str(uuid.UUID(int=0)):
            return enroller.key(device_id)
    return enroller.fresh_key()


class AgentClient:
    """An AgentService client that sends each stream with its device's node key.

    Connect takes the first request off the iterator to see which device the
    hello names, enrolls that device on first use and sends its key.
    """

    def __init__(self, channel: grpc.Channel, enroller: Enroller) -> None:
        self.stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.enroller = enroller

    def Connect(  # noqa: N802 - the name of the stub method it stands for
        self,
        requests: Iterable[agent_pb2.ConnectRequest],
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        iterator = iter(requests)
        first = next(iterator, None)
        if metadata is None:
            metadata = bearer(stream_key(self.enroller, first))
        head = [] if first is None else [first]
        return self.stub.Connect(
            itertools.chain(head, iterator), timeout=timeout, metadata=metadata
        )


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        (
            "method",
            "timeout",
            "metadata",
            "credentials",
            "wait_for_ready",
            "compression",
        ),
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds "authorization: Bearer <secret>" to every unary call of a channel."""

    def __init__(self, secret: str) -> None:
        self._metadata = bearer(secret)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        details = _CallDetails(
            client_call_details.method,
            client_call_details.timeout,
            (*(client_call_details.metadata or ()), *self._metadata),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
            client_call_details.compression,
        )
        return continuation(details, request)


def ops_stub(channel: grpc.Channel, token: str) -> ops_pb2_grpc.OpsServiceStub:
    """Return an OpsService stub whose calls carry token."""
    return ops_pb2_grpc.OpsServiceStub(
        grpc.intercept_channel(channel, BearerInterceptor(token))
    )


@pytest.fixture
def server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(
        database_url, tls_dir=tls_dir, insecure=True, settings=OPEN_ENROLLMENT
    )
    yield handle
    handle.stop()


@pytest.fixture
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture
def reader(server: ServerHandle, database_url: str) -> Iterator[Store]:
    """A second store on the server's database, to check what was committed."""
    store = Store.open(database_url)
    yield store
    store.close()


@pytest.fixture
def enroller(server: ServerHandle, tls_dir: Path) -> Enroller:
    return Enroller(server.address, tls_dir)


@pytest.fixture
def agents(channel: grpc.Channel, enroller: Enroller) -> AgentClient:
    return AgentClient(channel, enroller)


@pytest.fixture
def ops(
    channel: grpc.Channel, server: ServerHandle, database_url: str
) -> ops_pb2_grpc.OpsServiceStub:
    return ops_stub(channel, create_token(database_url, "viewer"))


def stored_ids(store: Store) -> list[str]:
    return sorted(device.device_id for device in store.list_devices(limit=1000))


def new_device_id() -> str:
    return str(uuid.uuid4())


def hello(device_id: str) -> agent_pb2.ConnectRequest:
    return agent_pb2.ConnectRequest(
        hello=agent_pb2.Hello(device_id=device_id, agent_version="0.1.0")
    )


def report(sequence: int, **sections: object) -> agent_pb2.ConnectRequest:
    return agent_pb2.ConnectRequest(
        report=report_pb2.Report(sequence=sequence, **sections)  # type: ignore[arg-type]
    )


def host(hostname: str) -> report_pb2.HostFacts:
    return report_pb2.HostFacts(hostname=hostname, os_name="Debian GNU/Linux")


def run_stream(
    agents: AgentClient,
    requests: Iterable[agent_pb2.ConnectRequest],
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> list[agent_pb2.ConnectResponse]:
    return list(agents.Connect(iter(requests), timeout=30, metadata=metadata))


def run_failing_stream(
    responses: Iterator[agent_pb2.ConnectResponse],
) -> tuple[list[agent_pb2.ConnectResponse], grpc.RpcError]:
    received = []
    try:
        for response in responses:
            received.append(response)
    except grpc.RpcError as error:
        return received, error
    raise AssertionError(f"stream ended without an error after {received}")


def raw_connect(
    channel: grpc.Channel, payloads: list[bytes], node_key: str
) -> Iterator[agent_pb2.ConnectResponse]:
    """Send payloads as they are, without serializing, on a Connect stream."""
    call = channel.stream_stream(
        CONNECT_METHOD,
        request_serializer=None,
        response_deserializer=agent_pb2.ConnectResponse.FromString,
    )
    return call(iter(payloads), timeout=30, metadata=bearer(node_key))


def acked(responses: list[agent_pb2.ConnectResponse]) -> list[int]:
    return [r.ack.committed_sequence for r in responses if r.HasField("ack")]


class Conversation:
    """A Connect stream whose requests the test sends one at a time.

    The call starts with the first send, so that AgentClient can read the hello.
    """

    def __init__(self, agents: AgentClient) -> None:
        self._agents = agents
        self._requests: queue.Queue[agent_pb2.ConnectRequest | None] = queue.Queue()
        self._responses: Iterator[agent_pb2.ConnectResponse] | None = None

    @property
    def responses(self) -> Iterator[agent_pb2.ConnectResponse]:
        assert self._responses is not None, "send the first request first"
        return self._responses

    def _iter_requests(self) -> Iterator[agent_pb2.ConnectRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: agent_pb2.ConnectRequest) -> None:
        self._requests.put(request)
        if self._responses is None:
            self._responses = self._agents.Connect(self._iter_requests(), timeout=30)

    def receive(self) -> agent_pb2.ConnectResponse:
        return next(self.responses)

    def close(self) -> None:
        self._requests.put(None)


# Connect: hello and welcome


def test_hello_new_device_welcome_zero(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()

    responses = run_stream(agents, [hello(device_id)])

    assert [r.WhichOneof("message") for r in responses] == ["welcome"]
    assert responses[0].welcome.committed_sequence == 0
    stored = reader.get_device(device_id)
    assert stored is not None
    assert stored.agent_version == "0.1.0"


def test_welcome_after_reconnect(agents: AgentClient) -> None:
    device_id = new_device_id()
    run_stream(agents, [hello(device_id), report(1), report(2)])

    responses = run_stream(agents, [hello(device_id)])

    assert responses[0].welcome.committed_sequence == 2


def test_hello_uppercase_uuid_rejected(
    agents: AgentClient, enroller: Enroller, reader: Store
) -> None:
    device_id = new_device_id().upper()

    _, error = run_failing_stream(agents.Connect(iter([hello(device_id)])))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "canonical" in error.details()
    assert stored_ids(reader) == sorted(enroller.keys)


def test_hello_not_uuid_rejected(
    agents: AgentClient, enroller: Enroller, reader: Store
) -> None:
    _, error = run_failing_stream(agents.Connect(iter([hello("laptop-17")])))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stored_ids(reader) == sorted(enroller.keys)


def test_report_before_hello_rejected(agents: AgentClient, reader: Store) -> None:
    _, error = run_failing_stream(agents.Connect(iter([report(1)])))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in error.details()
    assert reader.count_reports() == 0


def test_second_hello_rejected(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    requests = [hello(device_id), report(1), hello(device_id)]

    responses, error = run_failing_stream(agents.Connect(iter(requests)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert acked(responses) == [1]
    assert reader.count_reports(device_id) == 1


def test_stream_closed_before_hello(
    agents: AgentClient, enroller: Enroller, reader: Store
) -> None:
    responses = run_stream(agents, [])

    assert responses == []
    assert stored_ids(reader) == sorted(enroller.keys)
    assert reader.count_reports() == 0


# Connect: reports and acks


def test_each_ack_follows_commit(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    conversation = Conversation(agents)
    conversation.send(hello(device_id))
    conversation.receive()

    for sequence in (1, 2, 3):
        conversation.send(report(sequence, full=sequence == 1))
        response = conversation.receive()

        assert response.ack.committed_sequence == sequence
        assert reader.count_reports(device_id) == sequence
        assert reader.committed_sequence(device_id) == sequence
    conversation.close()
    assert list(conversation.responses) == []


def test_duplicates_stored_once(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    run_stream(agents, [hello(device_id), report(1), report(2)])

    responses = run_stream(agents, [hello(device_id), report(2), report(2), report(3)])

    assert responses[0].welcome.committed_sequence == 2
    assert acked(responses)[-1] == 3
    assert reader.count_reports(device_id) == 3


def test_out_of_order_reports_stored(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    requests = [
        hello(device_id),
        report(3, host=host("third")),
        report(1, host=host("first")),
        report(2, host=host("second")),
    ]

    responses = run_stream(agents, requests)

    assert acked(responses)[-1] == 3
    assert acked(responses) == sorted(set(acked(responses)))
    assert reader.count_reports(device_id) == 3
    stored = reader.get_device(device_id)
    assert stored is not None
    assert stored.host.hostname == "third"


def test_acks_name_each_report(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    # A fresh full report first, then an older backlog, then a repeat.
    sequences = [50, 10, 11, 12, 10]

    responses = run_stream(agents, [hello(device_id), *(report(n) for n in sequences)])

    named = [n for r in responses if r.HasField("ack") for n in r.ack.sequences]
    assert named == sequences
    assert acked(responses)[-1] == 50
    assert reader.count_reports(device_id) == 4


def test_many_reports_one_stream(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    # As many as the rate limit lets a device send at once.
    count = DEFAULT_REPORT_BURST
    requests = [hello(device_id), *(report(n) for n in range(1, count + 1))]

    responses = run_stream(agents, requests)

    acks = acked(responses)
    assert acks[-1] == count
    # Reading does not wait for commits, so one commit covers many reports.
    assert len(acks) < count
    assert reader.count_reports(device_id) == count


def test_unknown_enum_value_stored(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    disk = report_pb2.Disk(name="sda", smart_state=99, interface=42)  # type: ignore[arg-type]
    section = report_pb2.DiskSection(disks=[disk])

    responses = run_stream(agents, [hello(device_id), report(1, disks=section)])

    assert acked(responses) == [1]
    stored = reader.get_device(device_id)
    assert stored is not None
    assert stored.disks.disks[0].smart_state == 99
    assert stored.disks.disks[0].interface == 42


def test_malformed_bytes_rejected(
    channel: grpc.Channel,
    enroller: Enroller,
    reader: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device_id = new_device_id()
    node_key = enroller.key(device_id)
    # Field 2 (report) with a length of 5 but only 2 bytes of content.
    payloads = [hello(device_id).SerializeToString(), b"\x12\x05\x08\x01"]

    with caplog.at_level(logging.WARNING, logger="collector"):
        responses, error = run_failing_stream(raw_connect(channel, payloads, node_key))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ConnectRequest" in error.details()
    assert len(responses) == 1
    assert reader.count_reports(device_id) == 0
    rejections = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 1
    assert "127.0.0.1" in rejections[0].getMessage()


def test_malformed_first_message_rejected(
    channel: grpc.Channel, enroller: Enroller, reader: Store
) -> None:
    node_key = enroller.fresh_key()

    _, error = run_failing_stream(raw_connect(channel, [b"\xff\xff\xff\xff"], node_key))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stored_ids(reader) == sorted(enroller.keys)
    assert reader.count_reports() == 0


def test_invalid_report_keeps_earlier(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    bad_usage = report_pb2.UsageSection(
        enabled=True,
        apps=[report_pb2.AppUsage(app_id="sap", hours_of_week=[1, 2], minutes=[5])],
    )
    requests = [hello(device_id), report(1), report(2, usage=bad_usage), report(3)]

    responses, error = run_failing_stream(agents.Connect(iter(requests)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hours_of_week" in error.details()
    assert acked(responses) == [1]
    assert reader.count_reports(device_id) == 1


def test_oversized_message_rejected(
    agents: AgentClient, channel: grpc.Channel, reader: Store
) -> None:
    device_id = new_device_id()
    volume = report_pb2.Volume(mount_point="m" * 4000)
    # About 4.8 MB, over the 4 MiB receive limit.
    volumes = report_pb2.HostFacts(volumes=[volume] * 1200)
    requests = [hello(device_id), report(1, host=volumes)]

    _, error = run_failing_stream(agents.Connect(iter(requests)))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reader.count_reports(device_id) == 0
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_sequence_zero_rejected(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()

    _, error = run_failing_stream(agents.Connect(iter([hello(device_id), report(0)])))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reader.count_reports(device_id) == 0


def test_failed_commit_unavailable(
    agents: AgentClient,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device_id = new_device_id()
    conversation = Conversation(agents)
    conversation.send(hello(device_id))
    conversation.receive()
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE reports"))
    engine.dispose()

    with caplog.at_level(logging.ERROR, logger="collector"):
        conversation.send(report(1))
        responses, error = run_failing_stream(conversation.responses)

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert acked(responses) == []
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1


def test_shutdown_ends_stream_unavailable(
    server: ServerHandle, agents: AgentClient, reader: Store
) -> None:
    device_id = new_device_id()
    conversation = Conversation(agents)
    conversation.send(hello(device_id))
    conversation.receive()
    conversation.send(report(1))
    assert conversation.receive().ack.committed_sequence == 1

    stopper = threading.Thread(target=server.stop, kwargs={"grace_seconds": 5})
    stopper.start()
    _, error = run_failing_stream(conversation.responses)
    stopper.join()

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in error.details()
    assert reader.count_reports(device_id) == 1


def test_open_stream_touched(database_url: str, tls_dir: Path) -> None:
    clock = Clock(T0)
    handle = start_server_thread(
        database_url,
        tls_dir=tls_dir,
        insecure=True,
        clock=clock,
        touch_interval_seconds=0.05,
    )
    store = Store.open(database_url)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            enroller = Enroller(handle.address, tls_dir)
            conversation = Conversation(AgentClient(channel, enroller))
            device_id = new_device_id()
            conversation.send(hello(device_id))
            conversation.receive()
            later = T0 + timedelta(hours=1)
            clock.now = later

            seen = wait_for_last_seen(store, device_id, later)
            conversation.close()
    finally:
        store.close()
        handle.stop()

    assert seen == later


def wait_for_last_seen(store: Store, device_id: str, expected: datetime) -> datetime:
    deadline = time.monotonic() + 10
    seen = datetime.min.replace(tzinfo=UTC)
    while time.monotonic() < deadline:
        device = store.get_device(device_id)
        assert device is not None
        seen = device.last_seen_time.ToDatetime(tzinfo=UTC)
        if seen == expected:
            break
        time.sleep(0.05)
    return seen


# Health and reflection


@pytest.mark.parametrize(
    "service", ["", "fleetmend.v1.AgentService", "fleetmend.v1.OpsService"]
)
def test_health_serving(channel: grpc.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)

    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))

    names = {s.name for s in responses[0].list_services_response.service}
    assert "fleetmend.v1.AgentService" in names
    assert "fleetmend.v1.OpsService" in names
    assert "grpc.health.v1.Health" in names


def test_reflection_describes_agent_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="fleetmend.v1.AgentService"
    )

    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))

    files = responses[0].file_descriptor_response.file_descriptor_proto
    assert len(files) >= 1


# OpsService


def seed_devices(store: Store, count: int) -> list[str]:
    device_ids = [new_device_id() for _ in range(count)]
    for device_id in device_ids:
        store.record_hello(device_id, "0.1.0", T0)
    return sorted(device_ids)


def test_list_devices_pages(ops: ops_pb2_grpc.OpsServiceStub, reader: Store) -> None:
    seeded = seed_devices(reader, 250)
    pages = []
    token = ""

    while True:
        request = ops_pb2.ListDevicesRequest(page_size=100, page_token=token)
        response = ops.ListDevices(request, timeout=10)
        pages.append([device.device_id for device in response.devices])
        token = response.next_page_token
        if not token:
            break

    assert [len(page) for page in pages] == [100, 100, 50]
    assert [device_id for page in pages for device_id in page] == seeded


def test_list_devices_default_page(
    ops: ops_pb2_grpc.OpsServiceStub, reader: Store
) -> None:
    seed_devices(reader, 101)

    response = ops.ListDevices(ops_pb2.ListDevicesRequest(), timeout=10)

    assert len(response.devices) == 100
    assert response.next_page_token != ""


def test_list_devices_exact_page_no_token(
    ops: ops_pb2_grpc.OpsServiceStub, reader: Store
) -> None:
    seed_devices(reader, 5)

    response = ops.ListDevices(ops_pb2.ListDevicesRequest(page_size=5), timeout=10)

    assert len(response.devices) == 5
    assert response.next_page_token == ""


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "d1." + base64.urlsafe_b64encode(b"not-a-uuid").decode(),
        "d1.%%%",
        "f1." + base64.urlsafe_b64encode(b"[]").decode(),
    ],
)
def test_list_devices_bad_token(ops: ops_pb2_grpc.OpsServiceStub, token: str) -> None:
    request = ops_pb2.ListDevicesRequest(page_token=token)

    with pytest.raises(grpc.RpcError) as raised:
        ops.ListDevices(request, timeout=10)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_devices_negative_size(ops: ops_pb2_grpc.OpsServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        ops.ListDevices(ops_pb2.ListDevicesRequest(page_size=-1), timeout=10)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_devices_hostname_filter(
    agents: AgentClient, ops: ops_pb2_grpc.OpsServiceStub
) -> None:
    wanted = new_device_id()
    run_stream(agents, [hello(wanted), report(1, host=host("Lab-01"))])
    run_stream(agents, [hello(new_device_id()), report(1, host=host("lab-02"))])

    request = ops_pb2.ListDevicesRequest(hostname="lab-01")
    response = ops.ListDevices(request, timeout=10)

    assert [device.device_id for device in response.devices] == [wanted]


def test_get_device_full(agents: AgentClient, ops: ops_pb2_grpc.OpsServiceStub) -> None:
    device_id = new_device_id()
    disks = report_pb2.DiskSection(disks=[report_pb2.Disk(name="nvme0n1")])
    run_stream(agents, [hello(device_id), report(1, host=host("lab-03"), disks=disks)])

    request = ops_pb2.GetDeviceRequest(device_id=device_id)
    response = ops.GetDevice(request, timeout=10)

    assert response.device.host.hostname == "lab-03"
    assert response.device.disks.disks[0].name == "nvme0n1"
    assert response.device.committed_sequence == 1


def test_get_device_not_found(ops: ops_pb2_grpc.OpsServiceStub) -> None:
    device_id = new_device_id()

    with pytest.raises(grpc.RpcError) as raised:
        ops.GetDevice(ops_pb2.GetDeviceRequest(device_id=device_id), timeout=10)

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert device_id in raised.value.details()


def failing_disk() -> report_pb2.DiskSection:
    reallocated = report_pb2.AtaAttribute(
        id=5, name="Reallocated_Sector_Ct", value=90, raw=8, raw_text="8"
    )
    disk = report_pb2.Disk(
        name="sda",
        interface=report_pb2.DISK_INTERFACE_ATA,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        ata_attributes=[reallocated],
    )
    return report_pb2.DiskSection(disks=[disk])


def worn_battery() -> report_pb2.BatterySection:
    battery = report_pb2.Battery(
        name="BAT0", design_capacity=50_000, full_capacity=25_000, health_percent=50.0
    )
    return report_pb2.BatterySection(batteries=[battery])


@pytest.fixture
def two_findings(agents: AgentClient) -> tuple[str, str]:
    """Store one device with a failing disk and one with a worn battery."""
    disk_device = new_device_id()
    battery_device = new_device_id()
    run_stream(
        agents, [hello(disk_device), report(1, host=host("d"), disks=failing_disk())]
    )
    run_stream(
        agents,
        [hello(battery_device), report(1, host=host("b"), batteries=worn_battery())],
    )
    return disk_device, battery_device


def list_all_findings(
    ops: ops_pb2_grpc.OpsServiceStub, page_size: int, device_id: str = ""
) -> list[ops_pb2.Finding]:
    findings: list[ops_pb2.Finding] = []
    token = ""
    while True:
        request = ops_pb2.ListFindingsRequest(
            page_size=page_size, page_token=token, device_id=device_id
        )
        response = ops.ListFindings(request, timeout=10)
        findings.extend(response.findings)
        token = response.next_page_token
        if not token:
            return findings


def test_list_findings_fleet(
    ops: ops_pb2_grpc.OpsServiceStub, two_findings: tuple[str, str]
) -> None:
    disk_device, battery_device = two_findings

    findings = list_all_findings(ops, page_size=0)

    assert [(f.device_id, f.kind) for f in findings] == [
        (disk_device, ops_pb2.FINDING_KIND_DISK_FAILING),
        (battery_device, ops_pb2.FINDING_KIND_BATTERY_WORN),
    ]
    assert findings[0].severity == ops_pb2.SEVERITY_CRITICAL


def test_list_findings_pages(
    ops: ops_pb2_grpc.OpsServiceStub, two_findings: tuple[str, str]
) -> None:
    whole = list_all_findings(ops, page_size=0)

    paged = list_all_findings(ops, page_size=1)

    assert paged == whole


def test_list_findings_one_device(
    ops: ops_pb2_grpc.OpsServiceStub, two_findings: tuple[str, str]
) -> None:
    _, battery_device = two_findings

    findings = list_all_findings(ops, page_size=0, device_id=battery_device)

    assert [f.kind for f in findings] == [ops_pb2.FINDING_KIND_BATTERY_WORN]


def test_list_findings_unknown_device(ops: ops_pb2_grpc.OpsServiceStub) -> None:
    request = ops_pb2.ListFindingsRequest(device_id=new_device_id())

    with pytest.raises(grpc.RpcError) as raised:
        ops.ListFindings(request, timeout=10)

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        encode_devices_token(str(uuid.uuid4())),
        "f1." + base64.urlsafe_b64encode(b'[1, "a"]').decode(),
        "f1." + base64.urlsafe_b64encode(b"{not json").decode(),
    ],
)
def test_list_findings_bad_token(ops: ops_pb2_grpc.OpsServiceStub, token: str) -> None:
    request = ops_pb2.ListFindingsRequest(page_token=token)

    with pytest.raises(grpc.RpcError) as raised:
        ops.ListFindings(request, timeout=10)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Starting the server


def test_start_tls_without_certificate(database_url: str, tmp_path: Path) -> None:
    empty = tmp_path / "no-tls"
    empty.mkdir()

    with pytest.raises(tls.TLSSetupError, match="server.pem"):
        start_server_thread(database_url, tls_dir=empty)


def test_start_rejects_non_loopback(database_url: str, tls_dir: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        start_server_thread(database_url, "0.0.0.0:0", tls_dir=tls_dir, insecure=True)


def test_start_port_in_use(
    server: ServerHandle, database_url: str, tls_dir: Path
) -> None:
    with pytest.raises(OSError, match="could not bind.*: Address already in use"):
        start_server_thread(database_url, server.address, tls_dir=tls_dir)


def test_start_port_taken_by_socket(database_url: str, tls_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        with pytest.raises(OSError, match="in use; another process listens"):
            start_server_thread(database_url, address, tls_dir=tls_dir, insecure=True)


def test_start_privileged_port(tmp_path: Path, tls_dir: Path) -> None:
    database_url = f"sqlite:///{tmp_path}/collector.db"
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 1))
        except PermissionError:
            pass
        else:
            pytest.skip("this process may bind ports below 1024")

    with pytest.raises(OSError, match="Permission denied; ports below 1024"):
        start_server_thread(database_url, "127.0.0.1:1", tls_dir=tls_dir)


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("127.0.0.1:50061:1", "IPv6 address in brackets"),
        ("127.0.0.1:70000", "port 70000, outside 0 to 65535"),
        ("http://127.0.0.1:50061", "has a scheme"),
        ("[127.0.0.1]:50061", "not an IPv6 address"),
        (":50061", "is not HOST:PORT"),
    ],
)
def test_start_invalid_listen(
    tmp_path: Path, tls_dir: Path, listen: str, reason: str
) -> None:
    database_url = f"sqlite:///{tmp_path}/collector.db"

    with pytest.raises(ValueError, match=reason) as raised:
        start_server_thread(database_url, listen, tls_dir=tls_dir, insecure=True)

    assert "loopback" not in str(raised.value)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("localhost:50051", ("localhost", 50051)),
    ],
)
def test_split_listen_valid(listen: str, expected: tuple[str, int]) -> None:
    assert split_listen_address(listen) == expected


def test_handle_address_has_port(server: ServerHandle) -> None:
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"


# Validation and page tokens, without a server


@pytest.mark.parametrize(
    "device_id",
    [
        "{12345678-1234-5678-1234-567812345678}",
        "12345678123456781234567812345678",
        "12345678-1234-5678-1234-56781234567G",
        "",
    ],
)
def test_device_id_not_canonical(device_id: str) -> None:
    with pytest.raises(InvalidMessageError):
        validate_device_id(device_id)


def test_device_id_canonical_accepted() -> None:
    validate_device_id("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (report_pb2.Report(sequence=0), "sequence 0 is outside 1 to"),
        (
            report_pb2.Report(
                sequence=1,
                usage=report_pb2.UsageSection(
                    enabled=True,
                    apps=[
                        report_pb2.AppUsage(
                            app_id="vpn", hours_of_week=[168], minutes=[1]
                        )
                    ],
                ),
            ),
            "maximum is 167",
        ),
        (
            report_pb2.Report(
                sequence=1,
                host=report_pb2.HostFacts(hostname="x" * (MAX_STRING_CHARS + 1)),
            ),
            "HostFacts.hostname",
        ),
        (
            report_pb2.Report(
                sequence=1,
                host=report_pb2.HostFacts(
                    volumes=[report_pb2.Volume(mount_point="/m")] * 1025
                ),
            ),
            "HostFacts.volumes",
        ),
        (
            report_pb2.Report(
                sequence=1,
                disks=report_pb2.DiskSection(
                    errors=[report_pb2.ProbeError(reason="r" * (MAX_STRING_CHARS + 1))]
                ),
            ),
            "ProbeError.reason",
        ),
    ],
)
def test_report_rejected(bad: report_pb2.Report, reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        validate_report(bad)


def test_full_week_usage_accepted() -> None:
    app = report_pb2.AppUsage(
        app_id="sap", hours_of_week=list(range(168)), minutes=[60] * 168
    )
    valid = report_pb2.Report(
        sequence=7, usage=report_pb2.UsageSection(enabled=True, apps=[app])
    )

    validate_report(valid)


def test_devices_token_round_trip() -> None:
    device_id = str(uuid.uuid4())

    assert decode_devices_token(encode_devices_token(device_id)) == device_id


@pytest.mark.parametrize(("requested", "used"), [(0, 100), (7, 7), (5000, 1000)])
def test_page_size_default_and_max(requested: int, used: int) -> None:
    assert effective_page_size(requested) == used


# One bad report among many devices


def send_reports(
    enroller: Enroller, device_id: str, reports: list[report_pb2.Report]
) -> tuple[str, int]:
    """Run one stream on its own channel; return its status name and last ack."""
    requests = [
        hello(device_id),
        *(agent_pb2.ConnectRequest(report=r) for r in reports),
    ]
    last_ack = 0
    with grpc.insecure_channel(enroller.address) as channel:
        stub = AgentClient(channel, enroller)
        try:
            for response in stub.Connect(iter(requests), timeout=60):
                if response.HasField("ack"):
                    last_ack = response.ack.committed_sequence
        except grpc.RpcError as error:
            return error.code().name, last_ack
    return "OK", last_ack


def run_streams_together(
    enroller: Enroller, streams: dict[str, list[report_pb2.Report]]
) -> dict[str, tuple[str, int]]:
    """Run every stream at once, on threads, so that their reports share batches.

    Every device is enrolled first, so that the streams start together.
    """
    results: dict[str, tuple[str, int]] = {}
    for device_id in streams:
        enroller.key(device_id)

    def run(device_id: str, reports: list[report_pb2.Report]) -> None:
        results[device_id] = send_reports(enroller, device_id, reports)

    threads = [
        threading.Thread(target=run, args=(device_id, reports))
        for device_id, reports in streams.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def hosts_reports(count: int, hostname: str = "lab") -> list[report_pb2.Report]:
    return [
        report_pb2.Report(sequence=n, full=n == 1, host=host(hostname))
        for n in range(1, count + 1)
    ]


def test_uint64_sequence_fails_alone(enroller: Enroller, reader: Store) -> None:
    good = {new_device_id(): hosts_reports(50) for _ in range(20)}
    poison = new_device_id()
    streams = {**good, poison: [report_pb2.Report(sequence=2**64 - 1, full=True)]}

    results = run_streams_together(enroller, streams)

    assert results[poison][0] == "INVALID_ARGUMENT"
    assert {results[device_id] for device_id in good} == {("OK", 50)}
    assert reader.count_reports() == 20 * 50


def add_poison_trigger(database_url: str) -> None:
    """Make the database reject a device row whose hostname is "poison".

    This stands for a value that passes validation but that the database
    refuses, so the store raises only when the batch is committed.
    """
    engine = create_engine(database_url)
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(
                text(
                    "CREATE TRIGGER reject_poison BEFORE UPDATE ON devices "
                    "WHEN NEW.hostname = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'poison hostname'); END"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE FUNCTION reject_poison() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.hostname = 'poison' THEN RAISE EXCEPTION "
                    "'poison hostname' USING ERRCODE = 'check_violation'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER reject_poison BEFORE UPDATE ON devices "
                    "FOR EACH ROW EXECUTE FUNCTION reject_poison()"
                )
            )
    engine.dispose()


def test_store_rejection_fails_alone(
    enroller: Enroller, database_url: str, reader: Store
) -> None:
    add_poison_trigger(database_url)
    good = {new_device_id(): hosts_reports(50) for _ in range(20)}
    poison = new_device_id()
    streams = {**good, poison: hosts_reports(5, hostname="poison")}

    results = run_streams_together(enroller, streams)

    assert results[poison] == ("INVALID_ARGUMENT", 0)
    assert {results[device_id] for device_id in good} == {("OK", 50)}
    assert reader.count_reports() == 20 * 50


def test_store_rejection_names_cause(agents: AgentClient, database_url: str) -> None:
    add_poison_trigger(database_url)
    requests = [hello(new_device_id()), report(1, host=host("poison"))]

    _, error = run_failing_stream(agents.Connect(iter(requests)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "report 1 cannot be stored" in error.details()
    assert "poison hostname" in error.details()
    assert "sqlite:" not in error.details()
    assert "postgresql" not in error.details()


def test_failed_commit_no_stray_errors(
    database_url: str, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handle = start_server_thread(database_url, tls_dir=tls_dir, insecure=True)
    enroller = Enroller(handle.address, tls_dir)
    device_id = new_device_id()
    enroller.key(device_id)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE reports"))
    engine.dispose()
    requests = [hello(device_id), *(report(n) for n in range(1, 201))]

    with caplog.at_level(logging.ERROR):
        try:
            with grpc.insecure_channel(handle.address) as channel:
                stub = AgentClient(channel, enroller)
                _, error = run_failing_stream(stub.Connect(iter(requests), timeout=30))
        finally:
            handle.stop()
        # asyncio logs a future whose exception was never retrieved when the
        # future is garbage collected.
        gc.collect()

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    stray = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert stray == []
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1


# Several streams of one device


def test_streams_of_two_devices_no_warning(
    agents: AgentClient, caplog: pytest.LogCaptureFixture
) -> None:
    first = Conversation(agents)
    first.send(hello(new_device_id()))
    first.receive()

    with caplog.at_level(logging.WARNING, logger="collector"):
        second = Conversation(agents)
        second.send(hello(new_device_id()))
        second.receive()
    first.close()
    second.close()

    assert [r for r in caplog.records if "replaces" in r.getMessage()] == []
