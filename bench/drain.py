"""Measure how fast a collector process drains agents' backlogs after an outage.

Two cases, each against its own ``fleetmend-collector serve`` process on
127.0.0.1 with SQLite in a temporary folder:

- one agent with a week of reports (2,016 at one report every 300 s);
- 1,000 agents that reconnect at once, each with an hour of reports (12).

The agents are simulated in this process (tests/fault/flood.py). Each keeps
its reports until a cumulative ack covers them. After a rejected or failed
stream, for example the per-device rate limit's RESOURCE_EXHAUSTED, it
reconnects after 0.2 s and sends again from the welcome's committed sequence. The figure
is reports stored divided by the time from the first connect to the last ack.

    .venv/bin/python -m bench.drain
    .venv/bin/python -m bench.drain --agents 1000 --reports 12 --week 2016
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tests.fault.flood import SimulatedAgent, backlog, deliver_all, enroll_in_store
from tests.fault.harness import CollectorProcess, stored_reports

WEEK_OF_REPORTS = 7 * 24 * 3600 // 300
HOUR_OF_REPORTS = 3600 // 300


def drain(agents: list[SimulatedAgent], timeout: float) -> tuple[float, int, int]:
    """Drain the agents into a fresh collector; return seconds, stored, lost."""
    with tempfile.TemporaryDirectory(prefix="fleetmend-drain-") as folder:
        collector = CollectorProcess(Path(folder))
        collector.start()
        enroll_in_store(collector.database_url, agents)
        try:
            seconds = asyncio.run(deliver_all(collector.address, agents, timeout))
        finally:
            collector.stop()
        stored = 0
        lost = 0
        for agent in agents:
            sequences = stored_reports(collector.database_path, agent.device_id)
            stored += len(sequences)
            lost += sum(
                1 for report in agent.reports if report.sequence not in sequences
            )
    return seconds, stored, lost


def print_row(
    case: str, agents: list[SimulatedAgent], seconds: float, stored: int, lost: int
) -> None:
    failures = sum(agent.failures for agent in agents)
    print(
        f"{case}: {stored} reports stored in {seconds:.1f} s = "
        f"{stored / seconds:,.0f} reports/s; lost {lost}; "
        f"{failures} streams retried",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--week",
        type=int,
        default=WEEK_OF_REPORTS,
        help="reports of the one-agent backlog",
    )
    parser.add_argument(
        "--agents", type=int, default=1000, help="agents reconnecting at once"
    )
    parser.add_argument(
        "--reports",
        type=int,
        default=HOUR_OF_REPORTS,
        help="reports per reconnecting agent",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed per case"
    )
    args = parser.parse_args(argv)

    one = [SimulatedAgent(backlog(args.week))]
    seconds, stored, lost = drain(one, args.timeout)
    print_row(f"1 agent, backlog of {args.week}", one, seconds, stored, lost)

    fleet = [SimulatedAgent(backlog(args.reports)) for _ in range(args.agents)]
    seconds, stored, lost = drain(fleet, args.timeout)
    print_row(
        f"{args.agents} agents x {args.reports} reports", fleet, seconds, stored, lost
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
