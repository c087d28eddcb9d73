"""Measure a running ``fleetmend-agent run`` process after N collection cycles.

Starts a TLS collector on 127.0.0.1, enrolls an agent whose every interval is
1 second and runs it,
so each second is one full collection cycle (every probe, a usage sample and a
report). After N reports have been issued it reads the agent's memory from
/proc/PID/status (VmRSS, split into anonymous and file-backed pages, and the
thread count) and its CPU time (its own and that of the commands it ran), then
stops both.

    .venv/bin/python -m bench.agent_process --cycles 100
    .venv/bin/python -m bench.agent_process --cycles 100 --agent-env MALLOC_ARENA_MAX=2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.ingest import free_port, wait_serving
from collector import tls

BIN = Path(sys.executable).parent
INTERVALS = ("host", "battery", "credentials", "disks", "usage_sample", "report_min")


def issued(state_dir: Path) -> int:
    try:
        identity = json.loads((state_dir / "identity.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(identity["next_sequence"]) - 1


def proc_status(pid: int) -> dict[str, str]:
    """Return the fields of /proc/PID/status (Linux only), keyed by name."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def kib(field: str) -> float:
    """Convert a /proc/PID/status size such as ``"1736 kB"`` to MiB."""
    number, unit = field.split()
    if unit != "kB":
        raise ValueError(f"unexpected unit {unit!r} in /proc status field {field!r}")
    return int(number) / 1024


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--agent-env {pair!r} is invalid: expected NAME=VALUE")
        env[name] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable for the agent process only (repeatable)",
    )
    args = parser.parse_args()
    agent_env = parse_env(args.agent_env)

    with tempfile.TemporaryDirectory() as tmp:
        address = f"127.0.0.1:{free_port()}"
        tls_dir = Path(tmp) / "tls"
        tls.init_tls_dir(tls_dir, ["127.0.0.1"])
        collector = subprocess.Popen(
            [
                str(BIN / "fleetmend-collector"),
                "serve",
                "--listen",
                address,
                "--database",
                f"sqlite:///{tmp}/c.db",
                "--tls-dir",
                str(tls_dir),
                "--log-level",
                "warning",
            ],
        )
        config = Path(tmp) / "agent.toml"
        # No DNS look-ups of catalog hosts: the bench machine has no network.
        config.write_text(
            "[usage]\nresolve_hosts = false\n[intervals]\n"
            + "".join(f"{name} = 1\n" for name in INTERVALS)
        )
        env = dict(os.environ, FLEETMEND_CONFIG=str(config), FLEETMEND_KEY_STORE="file")
        state_dir = Path(tmp) / "agent"
        try:
            wait_serving(address, tls_dir / "ca.pem")
            subprocess.run(
                [
                    str(BIN / "fleetmend-agent"),
                    "enroll",
                    "--collector",
                    address,
                    "--ca-file",
                    str(tls_dir / "ca.pem"),
                    "--secret-file",
                    str(tls_dir / "enrollment-secret"),
                    "--state-dir",
                    str(state_dir),
                ],
                env=env,
                check=True,
            )
            agent = subprocess.Popen(
                [
                    str(BIN / "fleetmend-agent"),
                    "run",
                    "--state-dir",
                    str(state_dir),
                    "--log-level",
                    "warning",
                ],
                env=dict(env, **agent_env),
            )
            started = time.monotonic()
            while issued(state_dir) < args.cycles:
                if agent.poll() is not None:
                    raise SystemExit("the agent exited early")
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            process = psutil.Process(agent.pid)
            status = proc_status(agent.pid)
            times = process.cpu_times()
            own = times.user + times.system
            children = times.children_user + times.children_system
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        finally:
            collector.send_signal(signal.SIGTERM)
            collector.wait(timeout=30)

    cycles = issued_total = args.cycles
    print(f"reports issued: {issued_total} in {elapsed:.0f} s")
    anonymous = kib(status["RssAnon"])
    files = kib(status["RssFile"])
    print(
        f"agent RSS after {cycles} cycles: {kib(status['VmRSS']):.1f} MiB "
        f"(anonymous {anonymous:.1f}, files {files:.1f}), {status['Threads']} threads"
    )
    print(
        f"CPU seconds per cycle: {own / cycles:.4f} (agent process), "
        f"{children / cycles:.4f} (commands it ran)"
    )


if __name__ == "__main__":
    main()
