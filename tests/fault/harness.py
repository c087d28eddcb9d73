"""Real collector and agent processes for the fault scenarios, and the tally.

A scenario starts a ``fleetmend-collector serve`` process on SQLite in a
temporary folder and one or more agents, breaks something, repairs it, and
ends with count_delivery(), which compares what the agents issued with what
the collector stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetmend.v1 import report_pb2
from tests.conftest import BIN_DIR, free_port
from tests.trust import make_tls_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("launch_agent.py")

# The agent logs each report it numbers as "report N (full|delta, B bytes)".
QUEUED_LINE = re.compile(r"report (\d+) \((?:full|delta), (\d+) bytes\)")


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1
) -> None:
    """Poll condition until it is true, or fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def scaled(name: str, default: int) -> int:
    """Return FAULTS_<name> as an int, else default.

    bench/reliability.py sets these to run the scenarios with larger counts.
    """
    return int(os.environ.get(f"FAULTS_{name}", default))


class CollectorProcess:
    """``fleetmend-collector serve`` on a fixed loopback port and SQLite file.

    The port and database stay the same across restarts, so agents reconnect
    to the same address.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Plaintext on loopback, so that the fault proxy can see and cut the
        # traffic; node keys are checked all the same.
        self.tls_dir = folder / "tls"
        if not self.tls_dir.exists():
            make_tls_dir(self.tls_dir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.database_path = folder / "collector.db"
        self.database_url = f"sqlite:///{self.database_path}"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.folder / f"collector-{self.starts}.log"

    def start(self) -> None:
        """Start the process and wait until its health check reports SERVING."""
        assert self.process is None, "collector already running"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(BIN_DIR / "fleetmend-collector"),
                    "serve",
                    "--listen",
                    self.address,
                    "--database",
                    self.database_url,
                    "--tls-dir",
                    str(self.tls_dir),
                    "--insecure",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_serving()

    def _wait_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"collector exited during start: {self.log_text()}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    time.sleep(0.1)
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        raise AssertionError(f"collector on {self.address} did not start serving")

    def kill(self) -> None:
        """End the process with SIGKILL: no shutdown code runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=15)
        self.process = None

    def stop(self) -> None:
        """End the process with SIGTERM, if it runs."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class AgentProcess:
    """One agent, started and restarted on the same state folder.

    With accelerate set, the agent runs through launch_agent.py with a clock
    that passes that many seconds per real second; otherwise it runs as
    ``fleetmend-agent run``.
    """

    folder: Path
    collector_address: str
    # The collector's enrollment secret; the first start enrolls through
    # collector_address with it.
    secret_file: Path
    accelerate: float | None = None
    # The rate after fast(); see launch_agent.py.
    fast_rate: float | None = None
    report_min_seconds: int = 1
    usage_enabled: bool = False
    extra_config: str = ""
    wrapper: Sequence[str] = ()
    # The folder through which the state directory is read, for an agent in
    # another mount namespace: /proc/PID/root.
    root: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    @property
    def config_path(self) -> Path:
        return self.folder / "agent.toml"

    def command(self) -> list[str]:
        arguments = [
            "run",
            "--collector",
            self.collector_address,
            "--insecure",
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "info",
        ]
        if self.accelerate is None:
            return [*self.wrapper, str(BIN_DIR / "fleetmend-agent"), *arguments]
        return [
            *self.wrapper,
            sys.executable,
            str(LAUNCHER),
            "--accelerate",
            str(self.accelerate),
            "--fast",
            str(self.fast_rate or self.accelerate),
            "--",
            *arguments,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # No DNS look-ups of catalog hosts: the tests reach nothing beyond
        # loopback.
        self.config_path.write_text(
            f"[usage]\nenabled = {str(self.usage_enabled).lower()}\n"
            "resolve_hosts = false\n"
            f"[intervals]\nreport_min = {self.report_min_seconds}\n"
            f"{self.extra_config}",
            encoding="utf-8",
        )
        env["FLEETMEND_CONFIG"] = str(self.config_path)
        env["PYTHONPATH"] = str(REPO_ROOT)
        # The node key stays in the state folder, out of any keyring of the
        # machine running the tests.
        env["FLEETMEND_KEY_STORE"] = "file"
        # No self-healing: the scenarios count reports, and the agents run
        # as root on the test machine.
        env["FLEETMEND_HEALING_ENABLED"] = "false"
        env.pop("FLEETMEND_COLLECTOR", None)
        return env

    def enroll(self) -> None:
        """Enroll the state folder with the collector, unless it is enrolled."""
        if (self.state_dir / "enrollment.json").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        enrolled = subprocess.run(
            [
                str(BIN_DIR / "fleetmend-agent"),
                "enroll",
                "--collector",
                self.collector_address,
                "--insecure",
                "--secret-file",
                str(self.secret_file),
                "--state-dir",
                str(self.state_dir),
            ],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enrolled.returncode == 0, enrolled.stderr

    def start(self) -> None:
        assert self.process is None, "agent already running"
        self.enroll()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        log_path = self.folder / f"agent-{self.runs}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """End the agent with SIGKILL, in the middle of whatever it does."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)
        self.process = None

    def fast(self) -> None:
        """Switch the agent's clock to fast_rate (SIGUSR1 to the launcher)."""
        assert self.process is not None and self.accelerate is not None
        self.process.send_signal(signal.SIGUSR1)

    def normal(self) -> None:
        """Switch the agent's clock back to the accelerate rate (SIGUSR2)."""
        assert self.process is not None and self.accelerate is not None
        self.process.send_signal(signal.SIGUSR2)

    def stop(self, timeout: float = 30) -> int:
        """End the agent with SIGTERM and return its exit status."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            status = self.process.wait(timeout=5)
        self.process = None
        return status

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_running(self) -> None:
        """Fail with the log's end if the agent process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"agent exited with {self.process.returncode}: "
                f"{self.log_text()[-3000:]}"
            )

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Wait until the agent's log contains text, failing if the agent exits."""

        def logged() -> bool:
            self.check_running()
            return text in self.log_text()

        wait_until(logged, timeout, f"the agent to log {text!r}")

    def log_text(self) -> str:
        return "\n".join(
            path.read_text(encoding="utf-8", errors="replace") for path in self.logs
        )

    def queued_sizes(self) -> list[tuple[int, int]]:
        """Return (sequence, bytes) of every report the agent logged as numbered."""
        return [
            (int(match[1]), int(match[2]))
            for match in QUEUED_LINE.finditer(self.log_text())
        ]

    def state_path(self, name: str) -> Path:
        """Return the path of a file in the state directory, as this process sees it."""
        path = self.state_dir / name
        if self.root is None:
            return path
        return self.root / path.relative_to("/")

    def spooled_sequences(self) -> set[int]:
        """Return the sequences waiting in the spool's outbox (none without a spool)."""
        path = self.state_path("spool.db")
        if not path.exists():
            return set()
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=10)) as connection:
                rows = connection.execute("SELECT sequence FROM outbox").fetchall()
        except sqlite3.DatabaseError:
            # A spool that is being created or is corrupt contains nothing that
            # can be counted as pending, so its reports count as lost.
            return set()
        return {int(row[0]) for row in rows}

    def device_id(self) -> str:
        return str(self._identity()["device_id"])

    def next_sequence(self) -> int:
        return int(str(self._identity()["next_sequence"]))

    def _identity(self) -> dict[str, object]:
        path = self.state_path("identity.json")
        loaded: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
        return loaded


@dataclass(frozen=True)
class Counts:
    """The tally of one scenario.

    issued: sequences the agent logged as numbered, plus any stored that the
    log missed because a kill came between the spool write and the log line.
    numbered: next_sequence - 1 from identity.json. A kill between saving the
    number and spooling its report skips a number, so it may exceed issued.
    pending: issued, not stored, and still waiting in the spool file, which
    sends them after the next start.
    lost: issued and neither stored, pending nor dropped by the spool cap.
    duplicated: sequences numbered twice, or stored with content of another
    size than the agent logged for them.
    """

    issued: int
    numbered: int
    stored: int
    dropped: int
    pending: int
    duplicated: int
    lost: int

    def line(self, scenario: str) -> str:
        return (
            f"{scenario}: issued {self.issued}, numbered {self.numbered}, stored "
            f"{self.stored}, dropped {self.dropped}, pending {self.pending}, "
            f"duplicated {self.duplicated}, "
            f"lost {self.lost}"
        )


def stored_reports(database_path: Path, device_id: str) -> dict[int, bytes]:
    """Return sequence -> payload of one device's stored reports."""
    uri = f"file:{database_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
        rows = connection.execute(
            "SELECT sequence, payload FROM reports WHERE device_id = ?", (device_id,)
        ).fetchall()
    return {int(sequence): bytes(payload) for sequence, payload in rows}


def count_delivery(agent: AgentProcess, database_path: Path) -> Counts:
    """Compare the agent's issued reports with the collector's stored ones."""
    stored = stored_reports(database_path, agent.device_id())
    logged = agent.queued_sizes()
    times_numbered = Counter(sequence for sequence, _ in logged)
    sizes = dict(logged)
    reused = {sequence for sequence, times in times_numbered.items() if times > 1}
    for sequence, payload in stored.items():
        if sequence in sizes and len(payload) != sizes[sequence]:
            reused.add(sequence)
    # Each report carries the reports dropped since the previous one carried
    # a count, so the total is the sum.
    dropped = sum(
        report_pb2.Report.FromString(payload).dropped_reports
        for payload in stored.values()
    )
    issued = set(times_numbered) | set(stored)
    missing = issued - set(stored)
    pending = missing & agent.spooled_sequences()
    return Counts(
        issued=len(issued),
        numbered=agent.next_sequence() - 1,
        stored=len(stored),
        dropped=dropped,
        pending=len(pending),
        duplicated=len(reused),
        lost=max(0, len(missing - pending) - dropped),
    )


def wait_caught_up(agent: AgentProcess, database_path: Path, timeout: float) -> Counts:
    """Wait until every report the agent issued so far is stored; return the tally."""
    latest: list[Counts] = []

    def caught_up() -> bool:
        agent.check_running()
        if not agent.state_path("identity.json").exists():
            return False
        counts = count_delivery(agent, database_path)
        latest[:] = [counts]
        return counts.stored > 0 and counts.stored + counts.dropped >= counts.issued

    try:
        wait_until(caught_up, timeout, "the collector to store every issued report")
    except AssertionError as error:
        raise AssertionError(f"{error}; last tally {latest}") from None
    return latest[0]
