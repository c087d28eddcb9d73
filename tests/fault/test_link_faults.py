"""Link faults through the proxy: a half-open connection and cuts mid-message.

The agent runs on the real clock here, because gRPC keepalive, which finds a
half-open connection, measures real time.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable

from tests.fault.harness import (
    AgentProcess,
    CollectorProcess,
    count_delivery,
    scaled,
    wait_caught_up,
    wait_until,
)
from tests.fault.proxy import FaultProxy

# Generous: the agent's keepalive (a ping after 20 s, 10 s for its ack) and its
# ack timeout (45 s) both find the link dead sooner.
HALF_OPEN_DEADLINE_SECONDS = 90
CUTS = scaled("CUTS", 5)


def stored_count(agent: AgentProcess, collector: CollectorProcess) -> int:
    return count_delivery(agent, collector.database_path).stored


def stored_above(agent: AgentProcess, collector: CollectorProcess, count: int) -> bool:
    return stored_count(agent, collector) > count


def cuts_above(proxy: FaultProxy, count: int) -> bool:
    return proxy.cuts > count


def test_half_open_link_replaced(
    collector: CollectorProcess,
    proxy: FaultProxy,
    make_agent: Callable[..., AgentProcess],
) -> None:
    agent = make_agent(proxy.address, report_min_seconds=1)
    agent.start()
    wait_caught_up(agent, collector.database_path, timeout=60)
    connections = proxy.accepted
    proxy.blackhole()
    blackholed = time.monotonic()
    stored_then = stored_count(agent, collector)

    wait_until(
        lambda: proxy.accepted > connections,
        HALF_OPEN_DEADLINE_SECONDS,
        "the agent to open a new connection",
        poll=0.05,
    )
    detected = time.monotonic() - blackholed
    wait_until(
        lambda: stored_count(agent, collector) > stored_then,
        30,
        "a report over the new connection",
    )
    wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.stop() == 0

    counts = count_delivery(agent, collector.database_path)
    print(counts.line(f"half-open link (replaced after {detected:.1f} s)"))
    assert counts.lost == 0, counts
    assert counts.duplicated == 0, counts


def test_cut_mid_message(
    collector: CollectorProcess,
    proxy: FaultProxy,
    make_agent: Callable[..., AgentProcess],
) -> None:
    agent = make_agent(proxy.address, report_min_seconds=1)
    agent.start()
    wait_caught_up(agent, collector.database_path, timeout=60)
    rng = random.Random(5)
    for cut in range(CUTS):
        # A few bytes into the next HTTP/2 DATA frame: a report's header and
        # part of its body reach the collector, the rest does not.
        proxy.cut_after(rng.randint(5, 60))
        wait_until(functools.partial(cuts_above, proxy, cut), 30, f"cut {cut + 1}")
        proxy.restore()
        stored_then = stored_count(agent, collector)
        wait_until(
            functools.partial(stored_above, agent, collector, stored_then),
            30,
            f"a report after cut {cut + 1}",
        )
    wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.stop() == 0

    counts = count_delivery(agent, collector.database_path)
    print(counts.line(f"connection cut mid-message x{CUTS}"))
    assert counts.lost == 0, counts
    assert counts.duplicated == 0, counts
    assert proxy.cuts >= CUTS
