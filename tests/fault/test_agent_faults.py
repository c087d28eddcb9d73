"""Agent-side faults: a long outage, SIGKILL, a corrupt spool and a full disk.

Every scenario runs a real collector process and a real agent process and
ends with the tally of issued, stored, duplicated and lost reports.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fault.harness import (
    AgentProcess,
    CollectorProcess,
    Counts,
    count_delivery,
    scaled,
    wait_caught_up,
    wait_until,
)

# Simulated seconds per real second during the outage: a day passes in 12 s.
# Outside it the agent runs 10 times faster than real time, slow enough that
# the link's stall timeouts of tens of simulated seconds exceed a round trip.
DAY_ACCELERATION = 7200.0
NORMAL_ACCELERATION = 10.0
DAY_SECONDS = 86_400
AGENT_KILLS = scaled("AGENT_KILLS", 20)


def assert_nothing_lost(counts: Counts, scenario: str) -> None:
    print(counts.line(scenario))
    assert counts.lost == 0, counts
    assert counts.duplicated == 0, counts
    assert counts.issued > 0, counts


def test_collector_down_one_day(
    collector: CollectorProcess, make_agent: Callable[..., AgentProcess]
) -> None:
    agent = make_agent(
        collector.address,
        accelerate=NORMAL_ACCELERATION,
        fast_rate=DAY_ACCELERATION,
        report_min_seconds=300,
    )
    agent.start()
    wait_caught_up(agent, collector.database_path, timeout=60)
    collector.stop()
    before = count_delivery(agent, collector.database_path)

    agent.fast()
    time.sleep(DAY_SECONDS / DAY_ACCELERATION)
    agent.normal()
    offline = count_delivery(agent, collector.database_path)
    # A report every 300 simulated seconds: about 288 in a day.
    assert offline.issued - before.issued >= 200, offline
    agent.check_running()
    collector.start()
    wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.stop() == 0

    counts = count_delivery(agent, collector.database_path)
    assert_nothing_lost(counts, "collector down a simulated day")
    assert counts.dropped == 0


def test_agent_sigkill_while_sending(
    collector: CollectorProcess, make_agent: Callable[..., AgentProcess]
) -> None:
    # With a report every simulated second, the agent spools and sends
    # about 10 reports a second.
    agent = make_agent(
        collector.address, accelerate=NORMAL_ACCELERATION, report_min_seconds=1
    )
    rng = random.Random(20)
    for _ in range(AGENT_KILLS):
        agent.start()
        # Python and grpc take about a second to start; kill after that, at
        # a random point of the sending.
        time.sleep(rng.uniform(0.8, 2.0))
        agent.kill()
    agent.start()
    # Caught up only counts once this last run has spooled a report of its
    # own, and then its SIGTERM handler is installed too.
    wait_until(
        lambda: "spooled" in agent.logs[-1].read_text(encoding="utf-8"),
        30,
        "a report from the last run",
    )
    wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.stop() == 0

    counts = count_delivery(agent, collector.database_path)
    assert_nothing_lost(counts, f"agent SIGKILL x{AGENT_KILLS}")
    assert agent.runs == AGENT_KILLS + 1


def test_corrupt_spool_replaced(
    collector: CollectorProcess, make_agent: Callable[..., AgentProcess]
) -> None:
    agent = make_agent(collector.address, accelerate=NORMAL_ACCELERATION)
    agent.start()
    wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.stop() == 0
    before = count_delivery(agent, collector.database_path)
    spool = agent.state_dir / "spool.db"
    assert spool.exists()
    for companion in agent.state_dir.glob("spool.db-*"):
        companion.unlink()
    spool.write_bytes(os.urandom(64 * 1024))

    agent.start()
    agent.wait_for_log("is corrupt", 30)
    wait_until(
        lambda: (
            count_delivery(agent, collector.database_path).stored >= before.stored + 5
        ),
        60,
        "five reports after the corrupt spool",
    )
    assert agent.alive()
    moved = list(agent.state_dir.glob("spool.db.corrupt-*"))
    wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.stop() == 0

    counts = count_delivery(agent, collector.database_path)
    assert_nothing_lost(counts, "corrupt spool")
    assert len(moved) == 1


def mount_namespace_error() -> str | None:
    """Return why a private mount namespace with a tmpfs is unavailable, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare is not installed"
    result = subprocess.run(
        [
            unshare,
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /mnt",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        return f"a private mount namespace with a tmpfs is not allowed: {result.stderr}"
    return None


def fill(path: Path) -> None:
    """Write zeros to path until the file system is full."""
    block = bytes(64 * 1024)
    with path.open("wb") as filler:
        try:
            while True:
                filler.write(block)
                filler.flush()
        except OSError:
            pass


def test_spool_disk_full(
    collector: CollectorProcess, make_agent: Callable[..., AgentProcess]
) -> None:
    reason = mount_namespace_error()
    if reason is not None:
        pytest.skip(reason)
    agent = make_agent(collector.address, accelerate=NORMAL_ACCELERATION)
    agent.enroll()
    # The agent runs in its own mount namespace with its state directory on a
    # 4 MiB tmpfs that is mounted only in that namespace, seeded with the
    # enrollment made above. This process reaches that tmpfs through
    # /proc/PID/root.
    state = agent.state_dir
    seed = agent.folder / "state-seed"
    agent.wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'rm -rf "{seed}" && cp -a "{state}" "{seed}" '
        f'&& mount -t tmpfs -o size=4m tmpfs "{state}" '
        f'&& cp -a "{seed}/." "{state}/" && exec "$0" "$@"',
    ]
    agent.start()
    assert agent.process is not None
    agent.root = Path(f"/proc/{agent.process.pid}/root")
    wait_caught_up(agent, collector.database_path, timeout=60)

    filler = agent.state_path("filler")
    fill(filler)
    agent.wait_for_log("disk is full", 30)
    time.sleep(2)
    agent.check_running()
    filler.unlink()
    full_seen = count_delivery(agent, collector.database_path)
    wait_until(
        lambda: (
            count_delivery(agent, collector.database_path).stored
            >= full_seen.stored + 5
        ),
        60,
        "five reports after space returned",
    )
    # The tmpfs disappears with the agent, so the tally is taken first.
    counts = wait_caught_up(agent, collector.database_path, timeout=60)
    assert agent.alive()
    assert_nothing_lost(counts, "spool on a full disk")
    assert agent.stop() == 0
