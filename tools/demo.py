"""``make run``: a collector on loopback, this machine's agent, and the operators' view.

Starts ``fleetmend-collector serve`` with SQLite in .fleetmend-run/, runs
``fleetmend-agent run`` until one full and one delta report are acknowledged,
prints ``fleetmend devices`` and ``fleetmend device show <this host>``, and
stops the collector. Everything it creates stays in .fleetmend-run/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".fleetmend-run"
BIN = Path(sys.executable).parent
AGENT_TIMEOUT_SECONDS = 180


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                sys.exit(f"the collector exited early; see {log}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    sys.exit(f"the collector did not start serving within 30 s; see {log}")


def run_cli(*args: str) -> None:
    command = [str(BIN / "fleetmend"), *args]
    print(f"$ fleetmend {' '.join(args)}", flush=True)
    subprocess.run(command, check=False)
    print(flush=True)


def main() -> int:
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    database = f"sqlite:///{RUN_DIR / 'collector.db'}"
    collector_log = RUN_DIR / "collector.log"
    agent_log = RUN_DIR / "agent.log"

    step(f"starting the collector on {address} (SQLite in {RUN_DIR.name}/collector.db)")
    with collector_log.open("ab") as log_file:
        collector = subprocess.Popen(
            [
                str(BIN / "fleetmend-collector"),
                "serve",
                "--listen",
                address,
                "--database",
                database,
                "--insecure",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_serving(address, collector, collector_log)
        step("running this machine's agent until a full and a delta report are acked")
        env = dict(os.environ)
        env["FLEETMEND_INTERVALS_REPORT_MIN"] = "2"
        # The demo sends nothing beyond loopback: no DNS look-ups of the
        # catalog's web application hosts.
        env["FLEETMEND_USAGE_RESOLVE_HOSTS"] = "false"
        env["FLEETMEND_CONFIG"] = str(RUN_DIR / "agent.toml")
        (RUN_DIR / "agent.toml").touch()
        with agent_log.open("ab") as log_file:
            agent = subprocess.run(
                [
                    str(BIN / "fleetmend-agent"),
                    "run",
                    "--collector",
                    address,
                    "--insecure",
                    "--state-dir",
                    str(RUN_DIR / "agent"),
                    "--exit-after",
                    "2",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=AGENT_TIMEOUT_SECONDS,
                check=False,
            )
        if agent.returncode != 0:
            print(f"the agent failed (exit {agent.returncode}); see {agent_log}")
            return 1
        for line in agent_log.read_text(encoding="utf-8").splitlines()[-4:]:
            print(f"    agent: {line}")
        print(flush=True)

        run_cli("--collector", address, "--insecure", "devices")
        run_cli(
            "--collector", address, "--insecure", "device", "show", socket.gethostname()
        )
        step(f"logs: {collector_log.relative_to(ROOT)}, {agent_log.relative_to(ROOT)}")
        return 0
    finally:
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(timeout=15)
        except subprocess.TimeoutExpired:
            collector.kill()
        step("collector stopped")


if __name__ == "__main__":
    sys.exit(main())
