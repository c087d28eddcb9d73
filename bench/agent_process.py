"""Measure a running ``fleetmend-agent run`` process after N collection cycles.

Starts a TLS collector on 127.0.0.1, enrolls an agent whose every interval is
1 second and runs it,
so each second is one full collection cycle (every probe, a usage sample and a
report). After N reports have been issued it reads the agent's RSS and CPU time
(its own and that of the commands it ran) and stops both.

    .venv/bin/python bench/agent_process.py --cycles 100
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()

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
                env=env,
            )
            started = time.monotonic()
            while issued(state_dir) < args.cycles:
                if agent.poll() is not None:
                    raise SystemExit("the agent exited early")
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            process = psutil.Process(agent.pid)
            rss = process.memory_info().rss
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
    print(f"agent RSS after {cycles} cycles: {rss / 2**20:.1f} MiB")
    print(
        f"CPU seconds per cycle: {own / cycles:.4f} (agent process), "
        f"{children / cycles:.4f} (commands it ran)"
    )


if __name__ == "__main__":
    main()
