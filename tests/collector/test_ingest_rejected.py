"""The collector names a rejected report in the trailing metadata of its status.

A real collector runs on 127.0.0.1 in plaintext. The tests send Connect streams
through a real channel and read the status and the trailing metadata that an
agent receives.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from collector._ingest import REJECTED_SEQUENCE_KEY
from collector.server import ServerHandle, ServerSettings, start_server_thread
from collector.store import Store
from fleetmend.v1 import agent_pb2, report_pb2
from tests.trust import bearer, enroll

CONNECT_METHOD = "/fleetmend.v1.AgentService/Connect"


@pytest.fixture
def server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(
        database_url,
        tls_dir=tls_dir,
        insecure=True,
        settings=ServerSettings(enroll_per_minute=0),
    )
    yield handle
    handle.stop()


@pytest.fixture
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture
def device(server: ServerHandle, tls_dir: Path) -> tuple[str, str]:
    """Enroll a new device; return its id and node key."""
    return enroll(server.address, tls_dir, str(uuid.uuid4()))


def hello(device_id: str) -> agent_pb2.ConnectRequest:
    return agent_pb2.ConnectRequest(
        hello=agent_pb2.Hello(device_id=device_id, agent_version="test")
    )


def report(sequence: int, hostname: str = "laptop-1") -> agent_pb2.ConnectRequest:
    message = report_pb2.Report(sequence=sequence)
    message.host.hostname = hostname
    return agent_pb2.ConnectRequest(report=message)


def hot_disk_report(sequence: int) -> agent_pb2.ConnectRequest:
    """Return a report whose NVMe temperature is outside the collector's range."""
    request = report(sequence)
    disk = request.report.disks.disks.add(name="nvme0n1")
    disk.nvme_health.temperature_celsius = 9000
    return request


def run_failing(
    channel: grpc.Channel, node_key: str, payloads: list[bytes]
) -> tuple[list[agent_pb2.ConnectResponse], grpc.RpcError]:
    """Send payloads as they are on one Connect stream until the collector ends it."""
    call = channel.stream_stream(
        CONNECT_METHOD,
        request_serializer=None,
        response_deserializer=agent_pb2.ConnectResponse.FromString,
    )
    received: list[agent_pb2.ConnectResponse] = []
    try:
        for response in call(iter(payloads), timeout=30, metadata=bearer(node_key)):
            received.append(response)
    except grpc.RpcError as error:
        return received, error
    raise AssertionError(f"stream ended without an error after {received}")


def trailing(error: grpc.RpcError) -> dict[str, str | bytes]:
    metadata = error.trailing_metadata()
    return {item.key: item.value for item in metadata or ()}


def acked(responses: list[agent_pb2.ConnectResponse]) -> list[int]:
    return [
        sequence
        for response in responses
        if response.HasField("ack")
        for sequence in response.ack.sequences
    ]


def count_reports(database_url: str, device_id: str) -> int:
    with Store.open(database_url) as store:
        return store.count_reports(device_id)


def serialized(*requests: agent_pb2.ConnectRequest) -> list[bytes]:
    return [request.SerializeToString() for request in requests]


def test_invalid_report_named_in_trailers(
    channel: grpc.Channel, device: tuple[str, str], database_url: str
) -> None:
    device_id, node_key = device
    payloads = serialized(hello(device_id), report(1), hot_disk_report(2), report(3))

    responses, error = run_failing(channel, node_key, payloads)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature_celsius 9000" in error.details()
    assert trailing(error).get(REJECTED_SEQUENCE_KEY) == "2"
    assert acked(responses) == [1]
    assert count_reports(database_url, device_id) == 1


def test_first_report_rejected_names_it(
    channel: grpc.Channel, device: tuple[str, str]
) -> None:
    device_id, node_key = device

    responses, error = run_failing(
        channel, node_key, serialized(hello(device_id), hot_disk_report(7))
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(error).get(REJECTED_SEQUENCE_KEY) == "7"
    assert acked(responses) == []


def test_malformed_message_names_nothing(
    channel: grpc.Channel, device: tuple[str, str]
) -> None:
    device_id, node_key = device
    # Field 2 (report) with a length of 5 but only 2 bytes of content.
    payloads = [*serialized(hello(device_id), report(1)), b"\x12\x05\x08\x01"]

    responses, error = run_failing(channel, node_key, payloads)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert REJECTED_SEQUENCE_KEY not in trailing(error)
    assert acked(responses) == [1]


def test_sequence_zero_names_nothing(
    channel: grpc.Channel, device: tuple[str, str]
) -> None:
    device_id, node_key = device

    _, error = run_failing(channel, node_key, serialized(hello(device_id), report(0)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 0" in error.details()
    assert REJECTED_SEQUENCE_KEY not in trailing(error)


def test_second_hello_names_nothing(
    channel: grpc.Channel, device: tuple[str, str]
) -> None:
    device_id, node_key = device
    payloads = serialized(hello(device_id), report(1), hello(device_id))

    _, error = run_failing(channel, node_key, payloads)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert REJECTED_SEQUENCE_KEY not in trailing(error)


def reject_hostname_in_database(database_url: str, hostname: str) -> None:
    """Add a trigger that makes the database refuse a device row with hostname.

    The report passes the collector's validation, and only the commit fails,
    as a value would that the database cannot store.
    """
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                connection.execute(
                    text(
                        "CREATE TRIGGER refuse_hostname BEFORE UPDATE ON devices "
                        f"WHEN NEW.hostname = '{hostname}' "
                        "BEGIN SELECT RAISE(ABORT, 'hostname refused'); END"
                    )
                )
                return
            connection.execute(
                text(
                    "CREATE FUNCTION refuse_hostname() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.hostname = '{hostname}' THEN RAISE EXCEPTION "
                    "'hostname refused' USING ERRCODE = 'check_violation'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_hostname BEFORE UPDATE ON devices "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_hostname()"
                )
            )
    finally:
        engine.dispose()


def test_store_rejection_named_in_trailers(
    channel: grpc.Channel, device: tuple[str, str], database_url: str
) -> None:
    device_id, node_key = device
    reject_hostname_in_database(database_url, "refused")
    # The newest host section of a batch is the one written to the device row,
    # so report 3 carries none.
    no_host = agent_pb2.ConnectRequest(report=report_pb2.Report(sequence=3))
    payloads = serialized(
        hello(device_id), report(1), report(2, hostname="refused"), no_host
    )

    responses, error = run_failing(channel, node_key, payloads)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "report 2 cannot be stored" in error.details()
    assert trailing(error).get(REJECTED_SEQUENCE_KEY) == "2"
    assert 1 in acked(responses)
    assert 2 not in acked(responses)
