"""``make run``: a collector on loopback, this machine's agent, and the operators' view.

On the first run it makes a CA, a server certificate for 127.0.0.1 and an
enrollment secret (``fleetmend-collector init``) and an admin token
(``fleetmend-collector token create``). Each run starts ``fleetmend-collector
serve`` over TLS with SQLite, enrolls this machine's agent if it is not
enrolled yet, runs ``fleetmend-agent run`` until one full and one delta report
are acknowledged, prints ``fleetmend devices`` and ``fleetmend device show
<this host>``, shows the self-healing rules of tools/demo_policy.toml (dry runs
and notices only) evaluated on this machine and the records they sent, and
stops the collector. Everything it creates stays in .fleetmend-run/, the node
key included.
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
TLS_DIR = RUN_DIR / "collector"
TOKEN_FILE = RUN_DIR / "admin-token"
DEMO_POLICY = ROOT / "tools" / "demo_policy.toml"
BIN = Path(sys.executable).parent
AGENT_TIMEOUT_SECONDS = 180


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    address: str, ca_file: Path, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30
    credentials = grpc.ssl_channel_credentials(ca_file.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
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


def run_cli(address: str, *args: str) -> None:
    command = [
        str(BIN / "fleetmend"),
        "--collector",
        address,
        "--ca-file",
        str(TLS_DIR / "ca.pem"),
        "--token-file",
        str(TOKEN_FILE),
        *args,
    ]
    print(f"$ fleetmend {' '.join(args)}", flush=True)
    subprocess.run(command, check=False)
    print(flush=True)


def run_step(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a set-up command with its output in log; exit if it fails."""
    with log.open("ab") as log_file:
        result = subprocess.run(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, check=False
        )
    if result.returncode != 0:
        sys.exit(f"{Path(command[0]).name} {command[1]} failed; see {log}")


def set_up_collector(database: str, log: Path) -> None:
    """Make the TLS folder and the admin token, unless an earlier run made them."""
    collector = str(BIN / "fleetmend-collector")
    if not (TLS_DIR / "server.pem").exists():
        shown = TLS_DIR.relative_to(ROOT)
        step(f"making a CA, a certificate for 127.0.0.1 and a secret in {shown}/")
        run_step([collector, "init", "--dir", str(TLS_DIR), "--name", "127.0.0.1"], log)
    if not TOKEN_FILE.exists():
        step(f"creating an admin token in {TOKEN_FILE.relative_to(ROOT)}")
        run_step(
            [
                collector,
                "token",
                "create",
                "--role",
                "admin",
                "--name",
                "demo-admin",
                "--database",
                database,
                "--output",
                str(TOKEN_FILE),
            ],
            log,
        )


def agent_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["FLEETMEND_INTERVALS_REPORT_MIN"] = "2"
    # The demo sends nothing beyond loopback: no DNS look-ups of the
    # catalog's web application hosts.
    env["FLEETMEND_USAGE_RESOLVE_HOSTS"] = "false"
    env["FLEETMEND_CONFIG"] = str(RUN_DIR / "agent.toml")
    # The node key stays in .fleetmend-run/ rather than in the keyring of
    # whoever runs the demo.
    env["FLEETMEND_KEY_STORE"] = "file"
    env.pop("FLEETMEND_ENROLL_SECRET", None)
    # Dry runs and notices only, evaluated every second.
    env["FLEETMEND_HEALING_POLICY_FILE"] = str(DEMO_POLICY)
    env["FLEETMEND_INTERVALS_HEALING"] = "1"
    (RUN_DIR / "agent.toml").touch()
    return env


def main() -> int:
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    database = f"sqlite:///{RUN_DIR / 'collector.db'}"
    collector_log = RUN_DIR / "collector.log"
    agent_log = RUN_DIR / "agent.log"
    state_dir = RUN_DIR / "agent"

    set_up_collector(database, collector_log)
    step(f"starting the collector on {address} over TLS (SQLite in {RUN_DIR.name}/)")
    with collector_log.open("ab") as log_file:
        collector = subprocess.Popen(
            [
                str(BIN / "fleetmend-collector"),
                "serve",
                "--listen",
                address,
                "--database",
                database,
                "--tls-dir",
                str(TLS_DIR),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_serving(address, TLS_DIR / "ca.pem", collector, collector_log)
        env = agent_environment()
        if not (state_dir / "enrollment.json").exists():
            step("enrolling this machine's agent with the enrollment secret")
            run_step(
                [
                    str(BIN / "fleetmend-agent"),
                    "enroll",
                    "--collector",
                    address,
                    "--ca-file",
                    str(TLS_DIR / "ca.pem"),
                    "--secret-file",
                    str(TLS_DIR / "enrollment-secret"),
                    "--state-dir",
                    str(state_dir),
                ],
                agent_log,
                env,
            )
        step("running this machine's agent until a full and a delta report are acked")
        with agent_log.open("ab") as log_file:
            agent = subprocess.run(
                [
                    str(BIN / "fleetmend-agent"),
                    "run",
                    # Each demo run picks a free port; the CA and the node key
                    # from the first enrollment stay valid.
                    "--collector",
                    address,
                    "--state-dir",
                    str(state_dir),
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

        run_cli(address, "devices")
        run_cli(address, "device", "show", socket.gethostname())
        step("the self-healing rules, evaluated now on this machine (dry run)")
        subprocess.run(
            [str(BIN / "fleetmend-agent"), "rules", "--state-dir", str(state_dir)],
            env=env,
            check=False,
        )
        print(flush=True)
        run_cli(address, "remediations")
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
