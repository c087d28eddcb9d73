"""Measure the agent's memory and CPU over repeated collection cycles.

One cycle runs every probe once, samples usage and builds a report, as the
agent's main loop does when every interval is due at once (the worst case).
Prints the RSS after the cycles and the CPU seconds per cycle.

    .venv/bin/python bench/agent_cycles.py --cycles 100
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import psutil

from agent.config import load_config
from agent.report import ReportBuilder
from agent.sections import probe_sources, read_safely, usage_source
from agent.state import StateStore


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()

    process = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        # No DNS look-ups: the bench machine has no network.
        config = load_config(
            flags={"state_dir": tmp, "usage.resolve_hosts": False}, environ={}
        )
        state = StateStore(Path(tmp))
        builder = ReportBuilder(state, state.load_or_create())
        sources = probe_sources()
        usage = usage_source(config)

        rss_start = process.memory_info().rss
        cpu_start = time.process_time()
        child_start = _children_cpu()
        wall_start = time.perf_counter()
        for cycle in range(args.cycles):
            for source in sources:
                reading = read_safely(source)
                if reading is not None:
                    builder.update(source.section, reading)
            usage.sample(minutes=1)
            builder.update("usage", usage.read())
            builder.build(full=cycle == 0)
        cpu = time.process_time() - cpu_start
        child_cpu = _children_cpu() - child_start
        wall = time.perf_counter() - wall_start
        rss_end = process.memory_info().rss

    children = process.children()
    print(f"cycles: {args.cycles}")
    print(f"RSS before: {rss_start / 2**20:.1f} MiB, after: {rss_end / 2**20:.1f} MiB")
    print(f"CPU seconds per cycle (this process): {cpu / args.cycles:.4f}")
    print(f"CPU seconds per cycle (commands it ran): {child_cpu / args.cycles:.4f}")
    print(f"wall seconds per cycle: {wall / args.cycles:.4f}")
    print(f"child processes left: {len(children)}")


if __name__ == "__main__":
    main()
