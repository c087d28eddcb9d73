"""Run the fault scenarios with larger counts and print their tallies as a table.

Each scenario is a test in tests/fault. This script runs each one as its own
pytest process, with FAULTS_* variables that raise its counts, and collects
the tally line that the test prints (issued, stored, duplicated, lost). A
scenario whose test fails or is skipped gets that outcome in the
table, with the first line of the reason.

    .venv/bin/python -m bench.reliability
    .venv/bin/python -m bench.reliability --agent-kills 50 --collector-kills 10
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TALLY_LINE = re.compile(r"^(?P<scenario>[^\n:]+): issued (?P<rest>.*)$", re.MULTILINE)
OUTCOME_LINE = re.compile(r"\b(\d+) (passed|failed|skipped|error)")

SCENARIOS = [
    "tests/fault/test_agent_faults.py::test_collector_down_one_day",
    "tests/fault/test_agent_faults.py::test_agent_sigkill_while_sending",
    "tests/fault/test_collector_kill.py::test_collector_sigkill_mid_batch",
    "tests/fault/test_link_faults.py::test_half_open_link_replaced",
    "tests/fault/test_link_faults.py::test_cut_mid_message",
    "tests/fault/test_agent_faults.py::test_spool_disk_full",
    "tests/fault/test_agent_faults.py::test_corrupt_spool_replaced",
]


@dataclass
class Row:
    test: str
    outcome: str
    tally: str
    seconds: float
    reason: str


def run_scenario(test: str, env: dict[str, str]) -> Row:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-rs",
            "-p",
            "no:cacheprovider",
            test,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    tallies = [
        f"{m['scenario'].lstrip('.')}: issued {m['rest']}"
        for m in TALLY_LINE.finditer(output)
    ]
    outcomes = OUTCOME_LINE.findall(output)
    outcome = outcomes[-1][1] if outcomes else f"exit {result.returncode}"
    reason = ""
    if outcome != "passed":
        reasons = [
            line for line in output.splitlines() if line.startswith(("E ", "SKIPPED"))
        ]
        reason = reasons[0][:300] if reasons else output.strip().splitlines()[-1][:300]
    return Row(test.split("::")[-1], outcome, "; ".join(tallies), seconds, reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-kills", type=int, default=50)
    parser.add_argument("--collector-kills", type=int, default=10)
    parser.add_argument("--simulated-agents", type=int, default=50)
    parser.add_argument("--reports-per-agent", type=int, default=1000)
    parser.add_argument("--cuts", type=int, default=20)
    parser.add_argument(
        "-k", dest="only", default="", help="run only tests whose name contains this"
    )
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.update(
        FAULTS_AGENT_KILLS=str(args.agent_kills),
        FAULTS_COLLECTOR_KILLS=str(args.collector_kills),
        FAULTS_SIMULATED_AGENTS=str(args.simulated_agents),
        FAULTS_REPORTS_PER_AGENT=str(args.reports_per_agent),
        FAULTS_CUTS=str(args.cuts),
    )
    rows = []
    for test in SCENARIOS:
        if args.only and args.only not in test:
            continue
        row = run_scenario(test, env)
        rows.append(row)
        detail = row.tally or row.reason
        print(f"{row.test}: {row.outcome} in {row.seconds:.0f} s; {detail}", flush=True)

    print()
    print("| scenario | outcome | tally | seconds |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        detail = row.tally or row.reason.replace("|", "/")
        print(f"| {row.test} | {row.outcome} | {detail} | {row.seconds:.0f} |")
    return 0 if all(row.outcome == "passed" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
