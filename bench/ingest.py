"""Measure reports committed per second by a collector, with many concurrent agents.

Starts ``fleetmend-collector serve`` as a separate process on 127.0.0.1 and
drives it from this process with N simulated agents, each on its own Connect
stream. Every agent sends its hello, then its reports without waiting, and the
figure is the number of reports acknowledged (so committed) divided by the time
from the first report sent to the last ack received.

The agents' devices are enrolled in the database before the collector starts,
because the Enroll call is rate-limited per source address. The collector
serves plaintext on loopback unless --tls is given.

    .venv/bin/python bench/ingest.py --agents 100 --reports 200 --database sqlite
    .venv/bin/python bench/ingest.py --agents 100 --reports 200 --tls
    .venv/bin/python bench/ingest.py --agents 100 --reports 200 \\
        --database postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collector import auth, tls
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2

BIN = Path(sys.executable).parent


def sample_report(sequence: int) -> report_pb2.Report:
    """Build a delta that changes the host section, about the size of a real one."""
    report = report_pb2.Report(sequence=sequence)
    report.collect_time.GetCurrentTime()
    host = report.host
    host.hostname = f"bench-{sequence % 97}"
    host.os_name = "Debian GNU/Linux"
    host.os_version = "12"
    host.kernel_version = "6.1.0-27-amd64"
    host.architecture = "x86_64"
    host.manufacturer = "LENOVO"
    host.model = "ThinkPad T14 Gen 3"
    host.memory_bytes = 16 * 2**30
    for mount in ("/", "/home"):
        host.volumes.add(
            mount_point=mount,
            device="/dev/nvme0n1p2",
            filesystem="ext4",
            total_bytes=500 * 2**30,
            free_bytes=(100 + sequence % 50) * 2**30,
        )
    return report


def enroll_devices(url: str, count: int) -> list[tuple[str, str]]:
    """Migrate the database and enroll count devices; return ids and node keys."""
    enrolled = []
    now = datetime.now(UTC)
    with Store.open(url) as store:
        store.migrate()
        for _ in range(count):
            key = auth.issue_node_key()
            result = store.enroll_device(
                str(uuid.uuid4()),
                "bench",
                "bench",
                key.credential_id,
                key.secret_hash,
                now,
            )
            enrolled.append((result.device_id, key.text))
    return enrolled


async def run_agent(
    channel: grpc.aio.Channel,
    device: tuple[str, str],
    reports: int,
    started: asyncio.Event,
    welcomed: list[int],
) -> int:
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    device_id, node_key = device
    call = stub.Connect(metadata=(("authorization", f"Bearer {node_key}"),))
    await call.write(
        agent_pb2.ConnectRequest(hello=agent_pb2.Hello(device_id=device_id))
    )
    first = await call.read()
    assert first.WhichOneof("message") == "welcome"
    welcomed.append(1)
    await started.wait()
    for sequence in range(1, reports + 1):
        await call.write(agent_pb2.ConnectRequest(report=sample_report(sequence)))
    committed = 0
    while committed < reports:
        response = await call.read()
        if response is grpc.aio.EOF:
            break
        committed = response.ack.committed_sequence
    await call.done_writing()
    return committed


def open_channel(address: str, ca_file: Path | None) -> grpc.aio.Channel:
    if ca_file is None:
        return grpc.aio.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(ca_file.read_bytes())
    return grpc.aio.secure_channel(address, credentials)


async def drive(
    address: str,
    devices: list[tuple[str, str]],
    reports: int,
    ca_file: Path | None,
) -> tuple[int, float]:
    agents = len(devices)
    channels = [open_channel(address, ca_file) for _ in range(max(1, agents // 100))]
    started = asyncio.Event()
    welcomed: list[int] = []
    tasks = [
        asyncio.create_task(
            run_agent(channels[i % len(channels)], device, reports, started, welcomed)
        )
        for i, device in enumerate(devices)
    ]
    while len(welcomed) < agents:
        await asyncio.sleep(0.05)
    begin = time.perf_counter()
    started.set()
    committed = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    for channel in channels:
        await channel.close()
    return sum(committed), elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(address: str, ca_file: Path | None) -> None:
    if ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.1)
    raise SystemExit("collector did not start")


def fresh_postgres(url: str) -> str:
    """Create an empty database beside the one in url and return its URL."""
    import sqlalchemy

    name = f"fleetmend_bench_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return str(sqlalchemy.engine.make_url(url).set(database=name))


def drop_postgres(url: str, admin_url: str) -> None:
    import sqlalchemy

    name = sqlalchemy.engine.make_url(url).database
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1)
    parser.add_argument("--reports", type=int, default=1000, help="reports per agent")
    parser.add_argument(
        "--database", default="sqlite", help="'sqlite' (a temporary file) or a URL"
    )
    parser.add_argument(
        "--tls", action="store_true", help="serve TLS instead of plaintext on loopback"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.database == "sqlite":
            url = f"sqlite:///{tmp}/bench.db"
        else:
            url = fresh_postgres(args.database)
        address = f"127.0.0.1:{free_port()}"
        tls_dir = Path(tmp) / "tls"
        tls.init_tls_dir(tls_dir, ["127.0.0.1"])
        ca_file = tls_dir / tls.CA_CERT_FILENAME if args.tls else None
        devices = enroll_devices(url, args.agents)
        command = [
            str(BIN / "fleetmend-collector"),
            "serve",
            "--listen",
            address,
            "--database",
            url,
            "--tls-dir",
            str(tls_dir),
            "--log-level",
            "warning",
        ]
        if not args.tls:
            command.append("--insecure")
        log = open(os.path.join(tmp, "collector.log"), "wb")  # noqa: SIM115
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_serving(address, ca_file)
            committed, elapsed = asyncio.run(
                drive(address, devices, args.reports, ca_file)
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            log.close()
            if args.database != "sqlite":
                drop_postgres(url, args.database)

    expected = args.agents * args.reports
    backend = "sqlite" if args.database == "sqlite" else "postgresql"
    transport = "TLS" if args.tls else "plaintext"
    print(
        f"{backend}, {transport}: {args.agents} agents x {args.reports} reports: "
        f"{committed}/{expected} committed in {elapsed:.2f} s = "
        f"{committed / elapsed:,.0f} reports/s"
    )


if __name__ == "__main__":
    main()
