"""The link against reports it can never send, with a real gRPC server on loopback."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.link import MAX_MESSAGE_BYTES, Link, request_size
from agent.spool import Spool
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2


class AckingServicer(agent_pb2_grpc.AgentServiceServicer):
    """Ack every report by name as it arrives; record the sequences."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def Connect(  # noqa: N802 - generated method name
        self,
        request_iterator: Iterator[agent_pb2.ConnectRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[agent_pb2.ConnectResponse]:
        next(request_iterator)
        yield agent_pb2.ConnectResponse(welcome=agent_pb2.Welcome())
        for request in request_iterator:
            sequence = request.report.sequence
            self.received.append(sequence)
            ack = agent_pb2.Ack(committed_sequence=sequence, sequences=[sequence])
            yield agent_pb2.ConnectResponse(ack=ack)


@pytest.fixture
def collector() -> Iterator[tuple[AckingServicer, str]]:
    servicer = AckingServicer()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def remediation_report(sequence: int, reason_bytes: int) -> bytes:
    message = report_pb2.Report(sequence=sequence)
    message.remediations.add(reason="r" * reason_bytes)
    return message.SerializeToString()


def test_request_size_matches_protobuf() -> None:
    for reason_bytes in (0, 100, 200, 20_000, 3_000_000):
        body = remediation_report(7, reason_bytes)
        request = agent_pb2.ConnectRequest(report=report_pb2.Report.FromString(body))

        assert request_size(body) == request.ByteSize()


def test_oversized_report_dropped(
    tmp_path: Path,
    collector: tuple[AckingServicer, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer, address = collector
    spool = Spool(tmp_path / "spool.db", 64 << 20)
    oversized = remediation_report(2, MAX_MESSAGE_BYTES + 1000)
    spool.put_remediation(1, remediation_report(1, 10))
    spool.put_remediation(2, oversized)
    spool.put_remediation(3, remediation_report(3, 10))
    hello = agent_pb2.Hello(device_id="device-oversized", agent_version="test")
    link = Link(
        address,
        hello,
        spool,
        node_key="unchecked",
        root_certificates=None,
        insecure=True,
    )
    stop = threading.Event()
    thread = threading.Thread(target=link.run, args=(stop,), daemon=True)
    caplog.set_level(logging.ERROR, logger="agent.link")
    thread.start()
    try:
        drained = wait_for(lambda: spool.stats().pending_remediations == 0)
        spool_dropped = spool.dropped_pending()
    finally:
        stop.set()
        link.close()
        thread.join(timeout=10)
        spool.close()

    assert drained
    assert servicer.received == [1, 3]
    assert spool_dropped == 1
    messages = [record.getMessage() for record in caplog.records]
    dropped = [m for m in messages if "report 2 is" in m]
    assert len(dropped) == 1
    assert str(request_size(oversized)) in dropped[0]
