"""fleetmend-collector: migrate, serve, init wiring, tokens, default locations."""

from __future__ import annotations

import json
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import platformdirs
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from collector import auth, server
from collector.cli import build_parser, main, settings_from_args
from collector.paths import default_data_dir, default_database_url
from collector.store import AuditRecord, Store, TokenRecord
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, ops_pb2, ops_pb2_grpc, report_pb2
from tests.conftest import BIN_DIR, free_port
from tests.trust import bearer, channel_to, enroll, remember_secret

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


def test_serve_missing_tls_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"
    missing = tmp_path / "no-tls"

    code = main(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
            "--tls-dir",
            str(missing),
        ]
    )

    last_line = capsys.readouterr().err.splitlines()[-1]
    assert code == 1
    assert last_line.startswith("fleetmend-collector: error: serve failed")
    assert str(missing) in last_line
    assert "init" in last_line


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        ("0.0.0.0:0", "0.0.0.0"),  # noqa: S104 - parsed only, never bound
        ("192.0.2.1:50051", "192.0.2.1"),
        ("[::]:0", "::"),
    ],
)
def test_serve_insecure_non_loopback(
    tmp_path: Path,
    tls_dir: Path,
    capsys: pytest.CaptureFixture[str],
    listen: str,
    host: str,
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"

    code = main(
        [
            "serve",
            "--listen",
            listen,
            "--database",
            database,
            "--tls-dir",
            str(tls_dir),
            "--insecure",
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert f"loopback only, not on {host}" in err
    # Nothing was opened before the check: the database file does not exist.
    assert not (tmp_path / "collector.db").exists()


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
    tmp_path: Path, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"

        code = main(
            [
                "serve",
                "--listen",
                listen,
                "--database",
                database,
                "--tls-dir",
                str(tls_dir),
                "--insecure",
            ]
        )

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


def test_serve_process_health_and_sigterm(tmp_path: Path, tls_dir: Path) -> None:
    database = f"sqlite:///{tmp_path}/data/collector.db"
    process = subprocess.Popen(
        [
            str(BIN_DIR / "fleetmend-collector"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
            "--tls-dir",
            str(tls_dir),
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


def test_serve_process_tls(tmp_path: Path, tls_dir: Path) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"
    process = subprocess.Popen(
        [
            str(BIN_DIR / "fleetmend-collector"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
            "--tls-dir",
            str(tls_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = read_until(process, LISTENING)
        with channel_to(address, tls_dir) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            health = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as plaintext:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    assert process.returncode == 0


class StreamingAgent:
    """An agent stream on a thread that sends reports until the collector ends it.

    Reports go out as fast as the stream takes them, so that some are always
    queued or being committed when the collector stops.
    """

    def __init__(self, address: str, device_id: str, node_key: str) -> None:
        self.device_id = device_id
        self.acked = 0
        self._node_key = node_key
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
                responses = stub.Connect(
                    self._requests(), timeout=120, metadata=bearer(self._node_key)
                )
                for response in responses:
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


def test_sigterm_commits_acked_reports(tmp_path: Path, tls_dir: Path) -> None:
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
            "--tls-dir",
            str(tls_dir),
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
        device_id, node_key = enroll(address, tls_dir)
        agent = StreamingAgent(address, device_id, node_key)
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


# Operator tokens

TOKEN_SHAPE = re.compile(r"fmt1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")


def login_actor() -> str:
    return f"local:{pwd.getpwuid(os.geteuid()).pw_name}"


def create_token_command(
    database_url: str, *extra: str, role: str = "operator", name: str = "alice"
) -> int:
    return main(
        [
            "token",
            "create",
            "--role",
            role,
            "--name",
            name,
            "--database",
            database_url,
            *extra,
        ]
    )


def stored_tokens(database_url: str) -> list[TokenRecord]:
    with Store.open(database_url) as store:
        store.migrate()
        return store.list_tokens()


def audit_events(database_url: str) -> list[AuditRecord]:
    with Store.open(database_url) as store:
        store.migrate()
        return store.list_audit(100)


def test_token_create_prints_token(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = create_token_command(database_url)

    captured = capsys.readouterr()
    token = remember_secret(captured.out.strip())
    token_id, secret = auth.parse_credential(token, "fmt1")
    (stored,) = stored_tokens(database_url)
    assert code == 0
    assert TOKEN_SHAPE.fullmatch(token)
    assert captured.out == token + "\n"
    assert "cannot be shown again" in captured.err
    assert token not in captured.err
    assert stored.token_id == token_id
    assert stored.name == "alice"
    assert stored.role is auth.Role.OPERATOR
    assert stored.created_by == login_actor()
    assert auth.secret_matches(secret, stored.token_hash)


def test_token_create_audited(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    create_token_command(database_url, role="admin")
    token = remember_secret(capsys.readouterr().out.strip())

    (event,) = audit_events(database_url)

    assert event.actor == login_actor()
    assert event.role is None
    assert event.action == "token create"
    assert event.outcome == "OK"
    assert event.peer == ""
    assert json.loads(event.arguments_json) == {"name": "alice", "role": "ROLE_ADMIN"}
    assert token.split(".")[2] not in event.arguments_json


def test_token_create_name_taken(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    create_token_command(database_url)
    remember_secret(capsys.readouterr().out.strip())

    code = create_token_command(database_url, role="admin")

    captured = capsys.readouterr()
    (stored,) = stored_tokens(database_url)
    newest_event = audit_events(database_url)[0]
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "'alice' exists already" in captured.err
    assert stored.role is auth.Role.OPERATOR
    assert newest_event.outcome == "ALREADY_EXISTS"


def test_token_create_invalid_role(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        create_token_command(f"sqlite:///{tmp_path}/c.db", role="boss")

    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert "unknown role 'boss'; choose one of viewer, operator, admin" in err


@pytest.mark.parametrize("name", ["local:root", "two words", ""])
def test_token_create_invalid_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code = create_token_command(f"sqlite:///{tmp_path}/c.db", name=name)

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert f"invalid token name {name!r}" in captured.err
    assert not (tmp_path / "c.db").exists()


def test_token_create_output_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/c.db"
    output = tmp_path / "alice.token"

    code = create_token_command(database, "--output", str(output))

    captured = capsys.readouterr()
    content = output.read_text(encoding="utf-8")
    token = remember_secret(content.strip())
    token_id, secret = auth.parse_credential(token, "fmt1")
    (stored,) = stored_tokens(database)
    assert code == 0
    assert captured.out == f"{output}\n"
    assert "cannot be shown again" in captured.err
    assert token not in captured.out + captured.err
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert content == token + "\n"
    assert TOKEN_SHAPE.fullmatch(token)
    assert stored.token_id == token_id
    assert auth.secret_matches(secret, stored.token_hash)


def test_token_output_ignores_umask(tmp_path: Path) -> None:
    output = tmp_path / "alice.token"
    previous = os.umask(0)
    try:
        code = create_token_command(
            f"sqlite:///{tmp_path}/c.db", "--output", str(output)
        )
    finally:
        os.umask(previous)

    remember_secret(output.read_text(encoding="utf-8").strip())
    assert code == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600


def test_token_output_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/c.db"
    output = tmp_path / "alice.token"
    output.write_text("keep me\n", encoding="utf-8")

    code = create_token_command(database, "--output", str(output))

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert f"--output {output} exists" in captured.err
    assert output.read_text(encoding="utf-8") == "keep me\n"
    assert stored_tokens(database) == []


def test_token_output_symlink_not_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/c.db"
    target = tmp_path / "elsewhere"
    output = tmp_path / "alice.token"
    output.symlink_to(target)

    code = create_token_command(database, "--output", str(output))

    assert code == 1
    assert "exists" in capsys.readouterr().err
    assert not target.exists()
    assert output.is_symlink()
    assert stored_tokens(database) == []


def test_token_output_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "missing" / "alice.token"

    code = create_token_command(f"sqlite:///{tmp_path}/c.db", "--output", str(output))

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert f"cannot create --output {output}: No such file or directory" in err


def test_token_output_removed_on_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    output = tmp_path / "alice.token"

    code = create_token_command(f"sqlite:///{blocker}/c.db", "--output", str(output))

    err = capsys.readouterr().err
    assert code == 1
    assert "creating token 'alice'" in err
    assert not output.exists()


def run_as(user_id: int, *command: str) -> subprocess.CompletedProcess[str]:
    """Run command as an unprivileged user id, with umask 000."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user_id}",
            f"--regid={user_id}",
            "--clear-groups",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        umask=0,
    )


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder owned by user 65534, below one that every user can traverse."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = Path(tempfile.mkdtemp(prefix="fleetmend-token-test-"))
    os.chmod(base, 0o711)  # noqa: S103 - let the other users traverse the folder
    folder = base / "nobody"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    os.chmod(folder, 0o755)  # noqa: S103 - a second user must reach the token file
    try:
        yield folder
    finally:
        shutil.rmtree(base)


def test_token_output_as_unprivileged_user(nobody_dir: Path) -> None:
    output = nobody_dir / "alice.token"
    database = f"sqlite:///{nobody_dir}/c.db"

    created = run_as(
        65534,
        str(BIN_DIR / "fleetmend-collector"),
        "token",
        "create",
        "--role",
        "viewer",
        "--name",
        "alice",
        "--database",
        database,
        "--output",
        str(output),
    )
    assert created.returncode == 0, created.stderr
    other_user = run_as(65533, "cat", str(output))

    token = remember_secret(output.read_text(encoding="utf-8").strip())
    info = output.stat()
    (stored,) = stored_tokens(database)
    assert created.stdout == f"{output}\n"
    assert info.st_uid == 65534
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert TOKEN_SHAPE.fullmatch(token)
    assert other_user.returncode != 0
    assert "Permission denied" in other_user.stderr
    assert token not in other_user.stdout
    assert stored.created_by == f"local:{pwd.getpwuid(65534).pw_name}"


def test_token_list_table(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    create_token_command(database_url, role="admin", name="carol")
    create_token_command(database_url, role="viewer", name="bob")
    remember_secret(capsys.readouterr().out.splitlines()[0])
    main(["token", "revoke", "bob", "--database", database_url])
    capsys.readouterr()

    code = main(["token", "list", "--database", database_url])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split() == ["NAME", "ROLE", "CREATED", "REVOKED", "LAST", "USED"]
    assert lines[1].split()[:2] == ["bob", "viewer"]
    # Created and revoked are times, last used is "never".
    assert lines[1].count(" UTC") == 2
    assert lines[1].endswith("never")
    assert lines[2].split()[:2] == ["carol", "admin"]
    assert lines[2].split()[-2:] == ["never", "never"]
    assert len(lines) == 3


def test_token_list_json(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    create_token_command(database_url, role="admin", name="carol")
    token = remember_secret(capsys.readouterr().out.strip())

    code = main(["token", "list", "--json", "--database", database_url])

    out = capsys.readouterr().out
    (listed,) = json.loads(out)["tokens"]
    assert code == 0
    assert listed["name"] == "carol"
    assert listed["role"] == "ROLE_ADMIN"
    assert listed["create_time"].endswith("Z")
    assert "revoke_time" not in listed
    assert "last_use_time" not in listed
    assert token.split(".")[1] not in out
    assert token.split(".")[2] not in out
    assert "hash" not in out


def test_token_list_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = f"sqlite:///{tmp_path}/c.db"
    main(["migrate", "--database", database])
    capsys.readouterr()

    code = main(["token", "list", "--database", database])

    assert code == 0
    assert "no operator tokens" in capsys.readouterr().out


@pytest.mark.parametrize("action", [["list"], ["list", "--json"], ["revoke", "bob"]])
def test_token_missing_database_file(
    action: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo" / "c.db"

    code = main(["token", *action, "--database", f"sqlite:///{path}"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert f"database file {path} does not exist" in captured.err
    assert not path.exists()
    assert not path.parent.exists()


def test_token_create_new_database_noted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.db"

    first = create_token_command(f"sqlite:///{path}")
    first_err = capsys.readouterr().err
    second = create_token_command(f"sqlite:///{path}", name="bob")
    second_err = capsys.readouterr().err

    assert first == 0
    assert f"created a new database at {path}\n" in first_err
    assert second == 0
    assert "created a new database" not in second_err


def test_token_list_audited(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["migrate", "--database", database_url])
    main(["token", "list", "--json", "--database", database_url])
    capsys.readouterr()

    (event,) = audit_events(database_url)

    assert event.action == "token list"
    assert event.actor == login_actor()
    assert event.arguments_json == "{}"
    assert event.outcome == "OK"


def test_token_revoke(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    create_token_command(database_url)
    remember_secret(capsys.readouterr().out.strip())

    code = main(["token", "revoke", "alice", "--database", database_url])

    out = capsys.readouterr().out
    (stored,) = stored_tokens(database_url)
    newest_event = audit_events(database_url)[0]
    assert code == 0
    assert out == "revoked operator token 'alice'\n"
    assert stored.revoke_time is not None
    assert newest_event.action == "token revoke"
    assert newest_event.actor == login_actor()
    assert json.loads(newest_event.arguments_json) == {"name": "alice"}
    assert newest_event.outcome == "OK"


def test_token_revoke_twice(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    create_token_command(database_url)
    remember_secret(capsys.readouterr().out.strip())
    main(["token", "revoke", "alice", "--database", database_url])
    capsys.readouterr()

    code = main(["token", "revoke", "alice", "--database", database_url])

    assert code == 0
    assert "was revoked already" in capsys.readouterr().out


def test_token_revoke_unknown(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["migrate", "--database", database_url])
    capsys.readouterr()

    code = main(["token", "revoke", "nobody", "--database", database_url])

    err = capsys.readouterr().err
    (event,) = audit_events(database_url)
    assert code == 1
    assert err.count("\n") == 1
    assert "no operator token named 'nobody'" in err
    assert event.outcome == "NOT_FOUND"


def test_token_revoke_redacts_credential(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    create_token_command(database_url)
    token = remember_secret(capsys.readouterr().out.strip())
    secret = remember_secret(f"fme1.{'A' * 43}")

    codes = [
        main(["token", "revoke", pasted, "--database", database_url])
        for pasted in (token, f" {secret}\n")
    ]

    captured = capsys.readouterr()
    events = audit_events(database_url)
    assert codes == [1, 1]
    assert "no operator token named '<redacted>'" in captured.err
    assert token not in captured.err
    assert secret not in captured.err
    assert [event.outcome for event in events[:2]] == ["NOT_FOUND", "NOT_FOUND"]
    for event in events:
        assert token not in event.arguments_json
        assert secret not in event.arguments_json
    assert json.loads(events[1].arguments_json) == {"name": "<redacted>"}


@pytest.mark.parametrize("name", ["unknown", "Unknown", "UNKNOWN"])
def test_token_create_reserved_name(
    name: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = create_token_command(database_url, name=name)

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "is reserved for the actor of unauthenticated calls" in captured.err
    assert TOKEN_SHAPE.search(captured.err) is None


def test_token_create_credential_name(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = remember_secret(f"fme1.{'B' * 43}")

    code = create_token_command(database_url, name=secret)

    captured = capsys.readouterr()
    assert code == 2
    assert "invalid token name" in captured.err
    assert secret not in captured.err
    assert captured.out == ""


def test_token_revoked_fails_calls(
    tmp_path: Path, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path}/collector.db"
    create_token_command(database, role="viewer")
    token = remember_secret(capsys.readouterr().out.strip())
    handle = server.start_server_thread(database, tls_dir=tls_dir, insecure=True)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = ops_pb2_grpc.OpsServiceStub(channel)
            request = ops_pb2.ListDevicesRequest()
            before = stub.ListDevices(request, timeout=10, metadata=bearer(token))
            main(["token", "revoke", "alice", "--database", database])
            with pytest.raises(grpc.RpcError) as after:
                stub.ListDevices(request, timeout=10, metadata=bearer(token))
    finally:
        handle.stop()

    assert list(before.devices) == []
    assert after.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_init_command_wired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "tls"

    code = main(["init", "--dir", str(folder), "--name", "127.0.0.1"])

    remember_secret((folder / "enrollment-secret").read_text(encoding="utf-8").strip())
    out = capsys.readouterr().out
    assert code == 0
    assert (folder / "server.pem").exists()
    assert (folder / "enrollment-secret").exists()
    assert "fme1." not in out
