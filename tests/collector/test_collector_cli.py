"""fleetmend-collector: migrate, serve and the default database location."""

from __future__ import annotations

import re
import selectors
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import platformdirs
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from collector.cli import build_parser, main, settings_from_args
from collector.paths import default_data_dir, default_database_url
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, report_pb2
from tests.conftest import BIN_DIR, free_port

LISTENING = re.compile(r"collector listening on (127\.0\.0\.1:\d+)")


def test_migrate_prints_revisions(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["migrate", "--database", database_url])

    out = capsys.readouterr().out
    assert code == 0
    assert "applied migration" in out
    store = Store.open(database_url)
    try:
        assert store.pending_migrations() == []
    finally:
        store.close()


def test_migrate_twice_up_to_date(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["migrate", "--database", database_url])
    capsys.readouterr()

    code = main(["migrate", "--database", database_url])

    assert code == 0
    assert "already up to date" in capsys.readouterr().out


def test_migrate_hides_password(capsys: pytest.CaptureFixture[str]) -> None:
    # A port bound and closed again, so that nothing listens there.
    port = free_port()
    url = f"postgresql+psycopg://fleet:hunter2@127.0.0.1:{port}/fleet"

    code = main(["migrate", "--database", url])

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "hunter2" not in err
    assert f"migrating postgresql+psycopg://fleet:***@127.0.0.1:{port}/fleet" in err


def test_migrate_unwritable_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")

    code = main(["migrate", "--database", f"sqlite:///{blocker}/collector.db"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("fleetmend-collector: error: migrating")


def test_serve_requires_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"

    code = main(["serve", "--listen", "127.0.0.1:0", "--database", database])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "TLS is not available yet" in err
    assert "--insecure" in err


def test_serve_rejects_non_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"

    code = main(
        ["serve", "--listen", "0.0.0.0:0", "--database", database, "--insecure"]
    )

    assert code == 2
    assert "loopback" in capsys.readouterr().err


def test_serve_bad_listen_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"

    code = main(
        ["serve", "--listen", "127.0.0.1", "--database", database, "--insecure"]
    )

    assert code == 2
    assert "not HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("127.0.0.1:50061:1", "write an IPv6 address in brackets"),
        ("127.0.0.1:70000", "port 70000, outside 0 to 65535"),
    ],
)
def test_serve_listen_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str, reason: str
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"

    code = main(["serve", "--listen", listen, "--database", database, "--insecure"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert reason in err
    assert "loopback" not in err


def test_serve_port_in_use_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"

        code = main(["serve", "--listen", listen, "--database", database, "--insecure"])

    last_line = capsys.readouterr().err.splitlines()[-1]
    assert code == 1
    assert last_line.startswith("fleetmend-collector: error: serve failed")
    assert f"{listen}: Address already in use" in last_line


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "abc"])
def test_serve_bad_grace(capsys: pytest.CaptureFixture[str], grace: str) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["serve", "--insecure", "--grace", grace])

    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert "argument --grace: expected a number of seconds of 0 or more" in err


def test_grace_zero_accepted() -> None:
    args = build_parser().parse_args(["serve", "--grace", "0"])

    assert args.grace == 0.0


def test_limit_defaults() -> None:
    args = build_parser().parse_args(["serve"])

    settings = settings_from_args(args)

    assert settings.max_message_bytes == 4 * 1024 * 1024
    assert settings.limits.reports_per_second == 200
    assert settings.limits.report_burst == 1000
    assert settings.limits.clock.skew_limit == timedelta(minutes=5)
    assert settings.limits.clock.max_report_age == timedelta(days=30)


def test_limit_options_parsed() -> None:
    argv = [
        "serve",
        "--max-message-bytes",
        "65536",
        "--max-reports-per-second",
        "0",
        "--report-burst",
        "7",
        "--clock-skew-limit",
        "90",
        "--max-report-age",
        "2.5",
    ]

    settings = settings_from_args(build_parser().parse_args(argv))

    assert settings.max_message_bytes == 65536
    assert settings.limits.reports_per_second == 0
    assert settings.limits.report_burst == 7
    assert settings.limits.clock.skew_limit == timedelta(seconds=90)
    assert settings.limits.clock.max_report_age == timedelta(days=2.5)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-message-bytes", "1023"),
        ("--max-message-bytes", str(2**31)),
        ("--max-message-bytes", "4MiB"),
        ("--max-reports-per-second", "-1"),
        ("--max-reports-per-second", "nan"),
        ("--report-burst", "0"),
        ("--report-burst", "1.5"),
        ("--clock-skew-limit", "0"),
        ("--clock-skew-limit", "inf"),
        ("--max-report-age", "0"),
        ("--max-report-age", "1e300"),
    ],
)
def test_limit_option_invalid(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["serve", "--insecure", f"{option}={value}"])

    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert f"argument {option}: expected a" in err


def test_serve_help_states_limits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])

    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 4194304)" in out
    assert "0 turns the limit off (default: 200)" in out
    assert "in seconds (default: 300)" in out
    assert "in days (default: 30)" in out


@pytest.mark.parametrize("command", ["serve", "migrate"])
@pytest.mark.parametrize("database", ["", "  "])
def test_empty_database_rejected(
    capsys: pytest.CaptureFixture[str], command: str, database: str
) -> None:
    code = main([command, "--database", database])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "--database is empty" in err


def test_migrate_log_without_alembic_lines(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"

    result = subprocess.run(
        [
            str(BIN_DIR / "fleetmend-collector"),
            "--log-level",
            "INFO",
            "migrate",
            "--database",
            database,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "applied store migration 0001" in result.stderr
    assert "Context impl" not in result.stderr
    assert "non-transactional DDL" not in result.stderr


def test_unknown_command_exit_two() -> None:
    with pytest.raises(SystemExit) as raised:
        main(["launch"])

    assert raised.value.code == 2


def test_root_data_dir() -> None:
    assert default_data_dir(as_root=True) == Path("/var/lib/fleetmend-collector")


def test_user_data_dir() -> None:
    expected = Path(platformdirs.user_data_dir("fleetmend-collector", appauthor=False))

    assert default_data_dir(as_root=False) == expected


def test_default_url_names_file() -> None:
    url = default_database_url(as_root=True)

    assert url == "sqlite:////var/lib/fleetmend-collector/collector.db"


def read_until(process: subprocess.Popen[str], pattern: re.Pattern[str]) -> str:
    """Return the first match of pattern in the process's stderr, within 30 s."""
    assert process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=deadline - time.monotonic()):
            break
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        match = pattern.search(line)
        if match:
            return match.group(1)
    raise AssertionError(f"no {pattern.pattern!r} in stderr: {''.join(seen)}")


def test_serve_process_health_and_sigterm(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/data/collector.db"
    process = subprocess.Popen(
        [
            str(BIN_DIR / "fleetmend-collector"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
            "--insecure",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = read_until(process, LISTENING)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            health = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert process.returncode == 0
    assert "received SIGTERM" in rest
    assert f"collector on {address} stopped" in rest
    assert (tmp_path / "data" / "collector.db").exists()


class StreamingAgent:
    """An agent stream on a thread that sends reports until the collector ends it.

    Reports go out as fast as the stream takes them, so that some are always
    queued or being committed when the collector stops.
    """

    def __init__(self, address: str, device_id: str) -> None:
        self.device_id = device_id
        self.acked = 0
        self.error: grpc.RpcError | None = None
        self._address = address
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[agent_pb2.ConnectRequest]:
        yield agent_pb2.ConnectRequest(
            hello=agent_pb2.Hello(device_id=self.device_id, agent_version="0.1.0")
        )
        sequence = 0
        while not self._ended.is_set():
            sequence += 1
            yield agent_pb2.ConnectRequest(
                report=report_pb2.Report(sequence=sequence, full=sequence == 1)
            )

    def _run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            try:
                for response in stub.Connect(self._requests(), timeout=120):
                    if response.HasField("ack"):
                        self.acked = response.ack.committed_sequence
            except grpc.RpcError as error:
                self.error = error
            finally:
                self._ended.set()

    def wait_acked(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while self.acked < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.acked >= count, f"only {self.acked} reports acked"

    def join(self) -> None:
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def stored_sequences(database: str, device_id: str) -> set[int]:
    engine = create_engine(database)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT sequence FROM reports WHERE device_id = :device"),
            {"device": device_id},
        )
        sequences = {int(sequence) for (sequence,) in rows}
    engine.dispose()
    return sequences


def test_sigterm_commits_acked_reports(tmp_path: Path) -> None:
    grace_seconds = 10
    database = f"sqlite:///{tmp_path}/collector.db"
    process = subprocess.Popen(
        [
            str(BIN_DIR / "fleetmend-collector"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
            "--insecure",
            "--grace",
            str(grace_seconds),
            # Off, so that the agent's stream is never cut by the limit.
            "--max-reports-per-second",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = read_until(process, LISTENING)
        agent = StreamingAgent(address, str(uuid.uuid4()))
        agent.wait_acked(500)

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        acked_at_signal = agent.acked
        _, rest = process.communicate(timeout=grace_seconds + 20)
        stop_seconds = time.monotonic() - signalled
        agent.join()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    stored = stored_sequences(database, agent.device_id)
    assert process.returncode == 0
    assert stop_seconds < grace_seconds
    assert agent.error is not None
    assert agent.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (agent.error.details() or "")
    # Reports queued when the signal came were committed and acked as well.
    assert agent.acked > acked_at_signal
    assert set(range(1, agent.acked + 1)) <= stored
    assert "received SIGTERM" in rest
