"""The collector killed with SIGKILL while agents flood it, then restarted."""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time

from tests.fault.flood import SimulatedAgent, backlog, deliver_all, enroll_in_store
from tests.fault.harness import CollectorProcess, scaled, stored_reports, wait_until

SIMULATED_AGENTS = scaled("SIMULATED_AGENTS", 20)
REPORTS_PER_AGENT = scaled("REPORTS_PER_AGENT", 600)
KILLS = scaled("COLLECTOR_KILLS", 3)


def average_ack(agents: list[SimulatedAgent]) -> float:
    return sum(agent.highest_ack for agent in agents) / len(agents)


def acked_at_least(agents: list[SimulatedAgent], target: float) -> bool:
    return average_ack(agents) >= target


def test_collector_sigkill_mid_batch(collector: CollectorProcess) -> None:
    agents = [
        SimulatedAgent(backlog(REPORTS_PER_AGENT)) for _ in range(SIMULATED_AGENTS)
    ]
    enroll_in_store(collector.database_url, agents)
    outcome: dict[str, object] = {}
    # Ample: the collector commits thousands of reports a second.
    flood_timeout = 120 + SIMULATED_AGENTS * REPORTS_PER_AGENT / 200

    def flood() -> None:
        try:
            outcome["seconds"] = asyncio.run(
                deliver_all(collector.address, agents, timeout=flood_timeout)
            )
        except BaseException as error:  # noqa: BLE001 - reported by the test
            outcome["error"] = error

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    rng = random.Random(7)
    unstored_acks = 0
    for kill in range(KILLS):
        # Kill once some reports are acked but the flood is far from done.
        target = REPORTS_PER_AGENT * (kill + 1) // (KILLS + 2)
        wait_until(
            functools.partial(acked_at_least, agents, target),
            60,
            f"an average ack of {target}",
            poll=0.01,
        )
        time.sleep(rng.uniform(0, 0.05))
        acked = {agent.device_id: agent.highest_ack for agent in agents}
        collector.kill()
        # Acks seen before the kill must name only committed reports.
        for agent in agents:
            stored = stored_reports(collector.database_path, agent.device_id)
            unstored_acks += sum(
                1 for s in range(1, acked[agent.device_id] + 1) if s not in stored
            )
        collector.start()
    flooder.join(timeout=flood_timeout + 30)

    assert "error" not in outcome, outcome.get("error")
    issued = SIMULATED_AGENTS * REPORTS_PER_AGENT
    stored_total = 0
    lost = 0
    for agent in agents:
        stored = stored_reports(collector.database_path, agent.device_id)
        stored_total += len(stored)
        lost += sum(1 for s in range(1, REPORTS_PER_AGENT + 1) if s not in stored)
    duplicated = stored_total - (issued - lost)
    print(
        f"collector SIGKILL x{KILLS}: issued {issued}, stored {stored_total}, "
        f"duplicated {duplicated}, lost {lost}, acked but not stored {unstored_acks}"
    )
    assert unstored_acks == 0
    assert lost == 0
    assert duplicated == 0
    assert stored_total == issued
