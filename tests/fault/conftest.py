"""Fixtures of the fault scenarios: a collector process and agents beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fault.harness import AgentProcess, CollectorProcess
from tests.fault.proxy import FaultProxy


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProcess]:
    """A running collector process; stopped with SIGTERM at the end."""
    process = CollectorProcess(tmp_path)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def proxy(collector: CollectorProcess) -> Iterator[FaultProxy]:
    """A fault proxy in front of the collector."""
    started = FaultProxy("127.0.0.1", collector.port).start()
    yield started
    started.stop()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Return a factory of agents in tmp_path; each is stopped at the end."""
    agents: list[AgentProcess] = []

    def make(address: str, name: str = "agent", **options: object) -> AgentProcess:
        secret_file = tmp_path / "tls" / "enrollment-secret"
        agent = AgentProcess(tmp_path / name, address, secret_file, **options)  # type: ignore[arg-type]
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()
