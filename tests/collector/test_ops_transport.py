"""The fleetmend CLI's TLS checks and its operator token, against real collectors."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from collector import auth, tls
from collector.ops_cli import main
from collector.server import ServerHandle, start_server_thread
from tests.conftest import BIN_DIR, free_port
from tests.trust import create_token, make_tls_dir, remember_secret, write_token_file

LEAK_SHAPE = auth.OPERATOR_TOKEN_PREFIX + "."


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEETMEND_COLLECTOR", "FLEETMEND_CA_FILE", "FLEETMEND_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/collector/store.db"


def start(database_url: str, tls_dir: Path, *, insecure: bool = False) -> ServerHandle:
    return start_server_thread(database_url, tls_dir=tls_dir, insecure=insecure)


@pytest.fixture
def server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start(database_url, tls_dir)
    yield handle
    handle.stop()


@pytest.fixture
def admin_token(database_url: str, server: ServerHandle) -> str:
    return create_token(database_url, "admin", "cli-admin")


@pytest.fixture
def admin_token_file(admin_token: str, tmp_path: Path) -> Path:
    return write_token_file(tmp_path, admin_token)


@pytest.fixture
def offline_token_file(tmp_path: Path) -> Path:
    """A file with a well-formed token that no collector has stored."""
    token = remember_secret(auth.issue_operator_token().text)
    return write_token_file(tmp_path, token)


def cli(address: str, ca_file: Path | None, token_file: Path, *args: str) -> list[str]:
    transport = ["--ca-file", str(ca_file)] if ca_file else ["--insecure"]
    return [
        "--collector",
        address,
        *transport,
        "--token-file",
        str(token_file),
        *args,
    ]


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.startswith("fleetmend: error: "), err
    return err


# certificates that fail verification


def test_other_ca_one_line(
    server: ServerHandle,
    offline_token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = make_tls_dir(tmp_path / "other")

    code = main(cli(server.address, other / "ca.pem", offline_token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"TLS verification of the collector at {server.address} failed" in err
    assert f"not signed by the CA in {other / 'ca.pem'}" in err
    assert "it comes from another CA" in err


def test_expired_certificate_one_line(
    database_url: str,
    offline_token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    expired = tmp_path / "expired"
    tls.init_tls_dir(
        expired,
        ["127.0.0.1"],
        now=datetime.now(UTC) - timedelta(days=10),
        server_days=1,
    )
    handle = start(database_url, expired)
    try:
        code = main(
            cli(handle.address, expired / "ca.pem", offline_token_file, "devices")
        )
    finally:
        handle.stop()

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "certificate has expired" in err
    assert "fleetmend-collector init --renew" in err


def test_other_name_one_line(
    database_url: str,
    offline_token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    named = tmp_path / "named"
    tls.init_tls_dir(named, ["collector.example.org"])
    handle = start(database_url, named)
    try:
        code = main(
            cli(handle.address, named / "ca.pem", offline_token_file, "devices")
        )
    finally:
        handle.stop()

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "the certificate is not valid for 127.0.0.1" in err
    assert "IP address mismatch" in err


def test_localhost_not_in_certificate(
    database_url: str,
    offline_token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    only_ip = tmp_path / "only-ip"
    tls.init_tls_dir(only_ip, ["127.0.0.1"])
    handle = start(database_url, only_ip)
    port = handle.address.rsplit(":", 1)[1]
    try:
        code = main(
            cli(f"localhost:{port}", only_ip / "ca.pem", offline_token_file, "devices")
        )
    finally:
        handle.stop()

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "the certificate is not valid for localhost" in err
    assert "Hostname mismatch" in err


# TLS and plaintext mixed up


def test_tls_to_plaintext_port(
    database_url: str,
    tls_dir: Path,
    offline_token_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    handle = start(database_url, tls_dir, insecure=True)
    try:
        code = main(
            cli(handle.address, tls_dir / "ca.pem", offline_token_file, "devices")
        )
    finally:
        handle.stop()

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"the collector at {handle.address} does not answer in TLS" in err
    assert "--insecure" in err


def test_plaintext_to_tls_port(
    server: ServerHandle, offline_token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(cli(server.address, None, offline_token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"the collector at {server.address} requires TLS" in err
    assert "drop --insecure and pass --ca-file" in err


@pytest.mark.parametrize(
    "host", ["192.0.2.10", "collector.example.org", "[2001:db8::1]"]
)
def test_insecure_remote_rejected(
    host: str, offline_token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The check runs before any connection, so nothing reaches these
    # documentation addresses.
    code = main(cli(f"{host}:50051", None, offline_token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "allowed to loopback addresses only" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost"])
def test_insecure_loopback_allowed(
    host: str,
    database_url: str,
    tls_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    handle = start(database_url, tls_dir, insecure=True)
    token_file = write_token_file(tmp_path, create_token(database_url, "viewer"))
    port = handle.address.rsplit(":", 1)[1]
    try:
        code = main(cli(f"{host}:{port}", None, token_file, "--json", "devices"))
    finally:
        handle.stop()

    captured = capsys.readouterr()
    if host == "127.8.9.10":
        # The collector listens on 127.0.0.1 only: the address is allowed, and
        # the connection is refused.
        assert code == 1
        assert "cannot reach the collector" in captured.err
        return
    assert code == 0, captured.err
    assert captured.out.startswith("{")


class RecordingTLSServer:
    """A TLS server on 127.0.0.1 that records what clients send after a handshake."""

    def __init__(self, tls_dir: Path) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
        self._context.set_alpn_protocols(["h2"])
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self.handshakes = 0
        self.received = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            connection.settimeout(5)
            try:
                with self._context.wrap_socket(connection, server_side=True) as wrapped:
                    self.handshakes += 1
                    while chunk := wrapped.recv(65536):
                        self.received += chunk
            except (ssl.SSLError, OSError):
                connection.close()

    def close(self) -> None:
        # shutdown() wakes the thread's blocking accept() on Linux, and close()
        # alone does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


def test_nothing_sent_on_failed_verification(
    tls_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_tls_dir(tmp_path / "other")
    recorder = RecordingTLSServer(other)
    token = remember_secret(auth.issue_operator_token().text)
    token_file = write_token_file(tmp_path, token)
    try:
        code = main(cli(recorder.address, tls_dir / "ca.pem", token_file, "devices"))
    finally:
        recorder.close()

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "not signed by the CA" in err
    assert recorder.connections >= 1
    assert recorder.handshakes == 0
    assert recorder.received == b""


def test_recording_server_sees_data(tls_dir: Path) -> None:
    # The recorder of the test above can see what a client sends.
    recorder = RecordingTLSServer(tls_dir)
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    host, port = recorder.address.rsplit(":", 1)
    try:
        with (
            socket.create_connection((host, int(port))) as raw,
            context.wrap_socket(raw, server_hostname=host) as wrapped,
        ):
            wrapped.sendall(b"hello")
    finally:
        recorder.close()

    assert recorder.handshakes == 1
    assert recorder.received == b"hello"


# the CA file


def test_ca_file_from_environment(
    server: ServerHandle,
    tls_dir: Path,
    admin_token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FLEETMEND_CA_FILE", str(tls_dir / "ca.pem"))
    monkeypatch.setenv("FLEETMEND_TOKEN_FILE", str(admin_token_file))

    code = main(["--collector", server.address, "token", "list"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "cli-admin" in captured.out


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        (b"not a certificate\n", "contains no PEM certificate"),
    ],
)
def test_bad_ca_file(
    content: bytes | None,
    reason: str,
    offline_token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_bytes(content)

    code = main(cli("127.0.0.1:50051", ca_file, offline_token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert str(ca_file) in err
    assert reason in err


# the token file


def test_token_file_required(tls_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--collector",
            "127.0.0.1:50051",
            "--ca-file",
            str(tls_dir / "ca.pem"),
            "devices",
        ]
    )

    err = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "--token-file" in err
    assert "FLEETMEND_TOKEN_FILE" in err


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "has 0 non-empty lines"),
        ("\n\n", "has 0 non-empty lines"),
        ("fmt1.a\nfmt1.b\n", "has 2 non-empty lines"),
        ("password123\n", "does not contain an operator token"),
        ("fmt1.abc def\n", "does not contain an operator token"),
    ],
)
def test_bad_token_file(
    content: str,
    reason: str,
    tls_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content, encoding="utf-8")
    token_file.chmod(0o600)

    code = main(cli("127.0.0.1:50051", tls_dir / "ca.pem", token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert reason in err
    for line in content.split():
        assert line not in err.split(str(token_file))[1]


def test_readable_token_file_warns(
    server: ServerHandle,
    tls_dir: Path,
    admin_token: str,
    admin_token_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin_token_file.chmod(0o644)

    code = main(
        cli(server.address, tls_dir / "ca.pem", admin_token_file, "token", "list")
    )

    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("\n") == 1
    assert "warning: the token file" in captured.err
    assert "mode 0644" in captured.err
    assert "chmod 600" in captured.err
    assert admin_token not in captured.err + captured.out


def test_private_token_file_quiet(
    server: ServerHandle,
    tls_dir: Path,
    admin_token_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        cli(server.address, tls_dir / "ca.pem", admin_token_file, "token", "list")
    )

    assert code == 0
    assert capsys.readouterr().err == ""


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder under the system's temporary folder that every user can enter."""
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-test-"))
    folder.chmod(0o755)  # noqa: S103 - the unprivileged user must reach it
    yield folder
    shutil.rmtree(folder)


def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(BIN_DIR / "fleetmend"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("mode", "readable"), [(0o600, False), (0o644, True)])
def test_token_file_other_user(
    mode: int, readable: bool, shared_folder: Path, offline_token_file: Path
) -> None:
    token_file = shared_folder / "operator-token"
    shutil.copyfile(offline_token_file, token_file)
    token_file.chmod(mode)
    address = f"127.0.0.1:{free_port()}"

    result = run_as_nobody(*cli(address, None, token_file, "devices"))

    assert result.stdout == ""
    if readable:
        # The token was read, so the CLI went on to the closed port.
        assert result.returncode == 1
        assert "warning: the token file" in result.stderr
        assert f"cannot reach the collector at {address}" in result.stderr
        return
    assert result.returncode == 2
    one_error_line(result.stderr)
    assert f"cannot read the token file {token_file}" in result.stderr
    assert "Permission denied" in result.stderr


# tokens that the collector rejects


def test_unknown_token_rejected(
    server: ServerHandle,
    tls_dir: Path,
    offline_token_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = offline_token_file.read_text(encoding="utf-8").strip()

    code = main(cli(server.address, tls_dir / "ca.pem", offline_token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert err.startswith("fleetmend: error: the token was rejected: ")
    assert token not in err
    assert token.split(".")[2] not in err


def test_revoked_token_rejected(
    server: ServerHandle,
    database_url: str,
    tls_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = write_token_file(tmp_path, create_token(database_url, "admin", "gone"))
    ca_file = tls_dir / "ca.pem"
    assert (
        main(cli(server.address, ca_file, token_file, "token", "revoke", "gone")) == 0
    )
    capsys.readouterr()

    code = main(cli(server.address, ca_file, token_file, "devices"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "the token was rejected: " in err
    assert "gone was revoked" in err


def test_viewer_cannot_revoke(
    server: ServerHandle,
    database_url: str,
    tls_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = write_token_file(
        tmp_path, create_token(database_url, "viewer", "watcher")
    )

    code = main(cli(server.address, tls_dir / "ca.pem", token_file, "token", "list"))

    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert err.startswith("fleetmend: error: permission denied: ")
    assert "watcher" in err
    assert "viewer" in err
    assert "admin" in err


# the installed console script


def test_script_tls_failure_one_line(
    server: ServerHandle, offline_token_file: Path, tmp_path: Path
) -> None:
    # grpc core prints INFO lines about failed handshakes unless GRPC_VERBOSITY
    # is ERROR or quieter, which the CLI sets before it imports grpc.
    other = make_tls_dir(tmp_path / "other")
    environment = {
        key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"
    }

    result = subprocess.run(
        [
            str(BIN_DIR / "fleetmend"),
            *cli(server.address, other / "ca.pem", offline_token_file, "devices"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    one_error_line(result.stderr)
    assert "not signed by the CA" in result.stderr
    assert LEAK_SHAPE not in result.stderr
