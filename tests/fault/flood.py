"""Simulated agents that send a backlog of reports as fast as the collector takes them.

Each simulated agent keeps its reports until the collector's cumulative ack
covers them, and after a failed stream reconnects and sends again from the
welcome's committed sequence, which is the delivery contract of the real agent.
It records the highest ack it saw, so a test can check that everything
acknowledged was stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from collector import auth
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2
from tests.trust import bearer, remember_secret

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 0.2


def backlog(count: int, *, first_sequence: int = 1) -> list[report_pb2.Report]:
    """Return count small delta reports numbered from first_sequence."""
    reports = []
    for offset in range(count):
        report = report_pb2.Report(sequence=first_sequence + offset, full=offset == 0)
        report.collect_time.seconds = 1_780_000_000 + 300 * offset
        report.host.hostname = "simulated-laptop"
        report.host.volumes.add(
            mount_point="/", total_bytes=512 * 10**9, free_bytes=10**9 + offset
        )
        reports.append(report)
    return reports


@dataclass
class SimulatedAgent:
    """One device's backlog and what the collector acknowledged of it."""

    reports: Sequence[report_pb2.Report]
    device_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # Set by enroll_in_store before the agent delivers.
    node_key: str = ""
    highest_ack: int = 0
    connects: int = 0
    failures: int = 0
    finished_time: float | None = None

    @property
    def last_sequence(self) -> int:
        return self.reports[-1].sequence if self.reports else 0

    async def deliver(self, channel: grpc.aio.Channel, deadline: float) -> None:
        """Send the backlog, reconnecting after failures, until all is acked."""
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        while self.highest_ack < self.last_sequence:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"device {self.device_id}: acked {self.highest_ack} of "
                    f"{self.last_sequence} reports before the deadline"
                )
            try:
                await self._stream_once(stub)
            except grpc.aio.AioRpcError as error:
                self.failures += 1
                logger.info(
                    "device %s: stream failed (%s), reconnecting",
                    self.device_id,
                    error.code().name,
                )
                await asyncio.sleep(RECONNECT_SECONDS)
        self.finished_time = time.monotonic()

    async def _stream_once(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        welcomed = asyncio.Event()
        start_after = 0

        async def requests() -> AsyncIterator[agent_pb2.ConnectRequest]:
            yield agent_pb2.ConnectRequest(
                hello=agent_pb2.Hello(device_id=self.device_id, agent_version="sim")
            )
            await welcomed.wait()
            for report in self.reports:
                if report.sequence > start_after:
                    yield agent_pb2.ConnectRequest(report=report)
            # Keep the stream open until every report is acknowledged.
            while self.highest_ack < self.last_sequence:
                await asyncio.sleep(0.05)

        call = stub.Connect(requests(), metadata=bearer(self.node_key))
        async for response in call:
            kind = response.WhichOneof("message")
            if kind == "welcome":
                start_after = response.welcome.committed_sequence
                self.highest_ack = max(self.highest_ack, start_after)
                self.connects += 1
                welcomed.set()
            elif kind == "ack":
                self.highest_ack = max(
                    self.highest_ack, response.ack.committed_sequence
                )
            if self.highest_ack >= self.last_sequence:
                call.cancel()
                return


def enroll_in_store(database_url: str, agents: Sequence[SimulatedAgent]) -> None:
    """Give each agent a node key, written straight into the collector's database.

    The collector limits enrollments per source address, and every simulated
    agent calls from 127.0.0.1, so they enroll through the store instead of
    the Enroll call.
    """
    with Store.open(database_url) as store:
        store.migrate()
        for agent in agents:
            issued = auth.issue_node_key()
            store.enroll_device(
                agent.device_id,
                "simulated-laptop",
                "sim",
                issued.credential_id,
                issued.secret_hash,
                datetime.now(UTC),
            )
            agent.node_key = remember_secret(issued.text)


async def deliver_all(
    address: str, agents: Sequence[SimulatedAgent], timeout: float
) -> float:
    """Deliver every agent's backlog over one channel; return the seconds taken."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.gather(*(agent.deliver(channel, deadline) for agent in agents))
    return time.monotonic() - started
