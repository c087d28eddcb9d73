"""Tests of the collector's TLS folder: real files, real keys, real handshakes."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collector import tls
from tests.trust import TEST_NAMES, remember_secret

LEAK_PATTERNS = (
    re.compile(r"fm[kt]1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}"),
    re.compile(r"fme1\.[A-Za-z0-9_-]{43}"),
    re.compile(r"PRIVATE KEY"),
)
FILE_MODES = {
    "ca.pem": 0o644,
    "ca.key": 0o600,
    "server.pem": 0o644,
    "server.key": 0o600,
    "enrollment-secret": 0o600,
}
PRIVATE_FILES = ("ca.key", "server.key", "enrollment-secret")


def new_tls_dir(
    directory: Path,
    names: tuple[str, ...] = TEST_NAMES,
    *,
    now: datetime | None = None,
    server_days: int = tls.DEFAULT_SERVER_DAYS,
) -> Path:
    """Run init_tls_dir and register the new enrollment secret for the leak check."""
    tls.init_tls_dir(directory, list(names), now=now, server_days=server_days)
    remember_folder_secret(directory)
    return directory


def remember_folder_secret(directory: Path) -> str:
    """Register the enrollment secret of directory for the leak check; return it."""
    secret = tls.read_enrollment_secret(directory)
    assert secret is not None
    return remember_secret(secret)


def make_expired_tls_dir(directory: Path) -> Path:
    """Create a TLS folder whose server certificate expired a day ago.

    The CA is issued at the same past time with its default validity, so it is
    still valid: only the server certificate is expired.
    """
    return new_tls_dir(
        directory, now=datetime.now(UTC) - timedelta(days=2), server_days=1
    )


def load_pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def init_parser() -> argparse.ArgumentParser:
    """Return a parser with only the init command, as fleetmend-collector adds it."""
    parser = argparse.ArgumentParser(prog="fleetmend-collector")
    commands = parser.add_subparsers(dest="command", required=True)
    tls.add_init_parser(commands)
    return parser


def run_init(argv: list[str]) -> int:
    return tls.run_init(init_parser().parse_args(["init", *argv]))


def assert_no_leak(text: str) -> None:
    for pattern in LEAK_PATTERNS:
        assert not pattern.search(text), f"output matches {pattern.pattern}"


@contextlib.contextmanager
def ssl_server(tls_dir: Path) -> Iterator[int]:
    """Serve TLS with tls_dir's server certificate on 127.0.0.1; yield the port.

    Each connection gets the handshake and the bytes b"ok".
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(10)
            with connection:
                try:
                    with context.wrap_socket(connection, server_side=True) as secure:
                        secure.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    # The client rejected the certificate.
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def handshake(port: int, ca_file: Path, server_hostname: str) -> bytes:
    """Connect with the stdlib's default verification against ca_file."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname) as secure,
    ):
        return secure.recv(2)


@contextlib.contextmanager
def grpc_health_server(tls_dir: Path) -> Iterator[int]:
    """Start a gRPC server with load_server_credentials; yield its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.load_server_credentials(tls_dir))
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def health_check(target: str, ca_file: Path) -> int:
    credentials = grpc.ssl_channel_credentials(ca_file.read_bytes())
    with grpc.secure_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(response.status)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder that every user can traverse, unlike pytest's tmp_path.

    pytest's base temporary folder is 0700, so another user could not reach a
    file in tmp_path whatever its mode.
    """
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-tls-test-"))
    os.chmod(folder, 0o711)  # noqa: S103 - let the other user traverse the folder
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def run_as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
        capture_output=True,
        text=True,
        check=False,
    )


# Files and modes.


def test_init_files_and_modes(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "tls"

    created = tls.init_tls_dir(folder, ["127.0.0.1", "localhost"])

    remember_folder_secret(folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert sorted(path.name for path in created) == sorted(FILE_MODES)
    assert sorted(path.name for path in folder.iterdir()) == sorted(FILE_MODES)
    for name, mode in FILE_MODES.items():
        actual = stat.S_IMODE(os.stat(folder / name).st_mode)
        assert actual == mode, f"{name} has mode {actual:o}"


def test_init_file_contents(tls_dir: Path) -> None:
    secret_text = (tls_dir / "enrollment-secret").read_text(encoding="utf-8")

    assert re.fullmatch(r"fme1\.[A-Za-z0-9_-]{43}\n", secret_text)
    assert tls.read_enrollment_secret(tls_dir) == secret_text.strip()
    for name in ("ca.key", "server.key"):
        assert (tls_dir / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for name in ("ca.pem", "server.pem"):
        assert (tls_dir / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_init_umask_does_not_change_modes(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        new_tls_dir(tmp_path / "tls")
    finally:
        os.umask(previous)

    for name, mode in FILE_MODES.items():
        actual = stat.S_IMODE(os.stat(tmp_path / "tls" / name).st_mode)
        assert actual == mode, f"{name} has mode {actual:o}"


def test_private_files_unreadable_by_other_user(reachable_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    folder = new_tls_dir(reachable_dir / "tls")

    listing = run_as_nobody("ls", str(folder))
    os.chmod(folder, 0o755)  # noqa: S103 - now test the file modes alone
    public = run_as_nobody("cat", str(folder / "ca.pem"), str(folder / "server.pem"))
    private = {name: run_as_nobody("cat", str(folder / name)) for name in PRIVATE_FILES}

    assert listing.returncode != 0
    assert "Permission denied" in listing.stderr
    assert public.returncode == 0, public.stderr
    assert "BEGIN CERTIFICATE" in public.stdout
    for name, result in private.items():
        assert result.returncode != 0, f"{name} was readable"
        assert "Permission denied" in result.stderr, name
        assert result.stdout == "", name


def test_no_temporary_files_left(tls_dir: Path) -> None:
    tls.renew_server_certificate(tls_dir)
    tls.rotate_enrollment_secret(tls_dir)
    remember_folder_secret(tls_dir)

    assert sorted(path.name for path in tls_dir.iterdir()) == sorted(FILE_MODES)


# Certificate contents.


def test_ca_certificate_extensions(tls_dir: Path) -> None:
    ca = load_pem(tls_dir / "ca.pem")

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.subject == ca.issuer
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert key_id.value == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    ca.verify_directly_issued_by(ca)


def test_server_certificate_extensions(tmp_path: Path) -> None:
    names = ("collector.example.com", "192.0.2.10", "::1", "localhost")
    before = datetime.now(UTC)
    folder = new_tls_dir(tmp_path / "tls", names)
    ca = load_pem(folder / "ca.pem")
    server = load_pem(folder / "server.pem")

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    authority = server.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    constraints = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert san.get_values_for_type(x509.DNSName) == [
        "collector.example.com",
        "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("::1"),
    ]
    assert tls.certificate_names(server) == list(names)
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert authority.key_identifier == ca_key_id.digest
    assert not constraints.value.ca
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    assert server.not_valid_before_utc < before - timedelta(minutes=1)
    assert server.not_valid_after_utc - before >= timedelta(days=396)
    assert server.serial_number != ca.serial_number


def test_server_days_sets_validity(tmp_path: Path) -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    folder = new_tls_dir(tmp_path / "tls", now=now, server_days=90)

    not_before = load_pem(folder / "server.pem").not_valid_before_utc
    assert not_before == now - timedelta(minutes=5)
    assert tls.server_certificate_expiry(folder) == not_before + timedelta(days=90)


def test_max_server_days_period(tmp_path: Path) -> None:
    folder = new_tls_dir(tmp_path / "tls", server_days=tls.MAX_SERVER_DAYS)
    certificate = load_pem(folder / "server.pem")

    period = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert period == timedelta(days=825)


# Handshakes.


@pytest.mark.parametrize("server_hostname", TEST_NAMES)
def test_ssl_handshake_verifies(tls_dir: Path, server_hostname: str) -> None:
    with ssl_server(tls_dir) as port:
        received = handshake(port, tls_dir / "ca.pem", server_hostname)

    assert received == b"ok"


def test_ssl_name_not_in_certificate_fails(tls_dir: Path) -> None:
    with (
        ssl_server(tls_dir) as port,
        pytest.raises(ssl.SSLCertVerificationError) as caught,
    ):
        handshake(port, tls_dir / "ca.pem", "other.example.com")

    assert "Hostname mismatch" in str(caught.value)


def test_ssl_expired_certificate_fails(tmp_path: Path) -> None:
    folder = make_expired_tls_dir(tmp_path / "expired")

    with (
        ssl_server(folder) as port,
        pytest.raises(ssl.SSLCertVerificationError) as caught,
    ):
        handshake(port, folder / "ca.pem", "localhost")

    assert caught.value.verify_message == "certificate has expired"
    assert tls.server_certificate_expiry(folder) < datetime.now(UTC)


def test_ssl_other_ca_fails(tls_dir: Path, tmp_path: Path) -> None:
    other = new_tls_dir(tmp_path / "other")

    with (
        ssl_server(tls_dir) as port,
        pytest.raises(ssl.SSLCertVerificationError) as caught,
    ):
        handshake(port, other / "ca.pem", "localhost")

    assert caught.value.verify_message == "unable to get local issuer certificate"


@pytest.mark.parametrize("host", TEST_NAMES)
def test_grpc_server_credentials_verify(tls_dir: Path, host: str) -> None:
    with grpc_health_server(tls_dir) as port:
        status = health_check(f"{host}:{port}", tls_dir / "ca.pem")

    assert status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_other_ca_is_unavailable(tls_dir: Path, tmp_path: Path) -> None:
    other = new_tls_dir(tmp_path / "other")

    with grpc_health_server(tls_dir) as port, pytest.raises(grpc.RpcError) as caught:
        health_check(f"127.0.0.1:{port}", other / "ca.pem")

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_serves_expired_certificate(tmp_path: Path) -> None:
    folder = make_expired_tls_dir(tmp_path / "expired")

    with grpc_health_server(folder) as port, pytest.raises(grpc.RpcError) as caught:
        health_check(f"127.0.0.1:{port}", folder / "ca.pem")

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# Renew, rotate and init twice.


def test_renew_keeps_ca_and_changes_serial(tls_dir: Path) -> None:
    ca_before = (tls_dir / "ca.pem").read_bytes()
    ca_key_before = (tls_dir / "ca.key").read_bytes()
    secret_before = tls.read_enrollment_secret(tls_dir)
    old = load_pem(tls_dir / "server.pem")
    old_key = (tls_dir / "server.key").read_bytes()

    path = tls.renew_server_certificate(tls_dir)

    new = load_pem(path)
    assert path == tls_dir / "server.pem"
    assert (tls_dir / "ca.pem").read_bytes() == ca_before
    assert (tls_dir / "ca.key").read_bytes() == ca_key_before
    assert tls.read_enrollment_secret(tls_dir) == secret_before
    assert new.serial_number != old.serial_number
    assert (tls_dir / "server.key").read_bytes() != old_key
    assert tls.certificate_names(new) == tls.certificate_names(old)
    new.verify_directly_issued_by(load_pem(tls_dir / "ca.pem"))
    assert stat.S_IMODE(os.stat(tls_dir / "server.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tls_dir / "server.pem").st_mode) == 0o644


def test_renewed_certificate_handshakes(tls_dir: Path) -> None:
    tls.renew_server_certificate(tls_dir, ["renewed.example.com"], server_days=30)

    with ssl_server(tls_dir) as port:
        received = handshake(port, tls_dir / "ca.pem", "renewed.example.com")
    with (
        ssl_server(tls_dir) as port,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        handshake(port, tls_dir / "ca.pem", "localhost")

    assert received == b"ok"
    assert tls.server_certificate_expiry(tls_dir) - datetime.now(UTC) <= timedelta(
        days=30
    )


def test_renew_command_keeps_names(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = load_pem(tls_dir / "server.pem")

    code = run_init(["--dir", str(tls_dir), "--renew", "--days", "60"])

    output = capsys.readouterr().out
    new = load_pem(tls_dir / "server.pem")
    assert code == 0
    assert tls.certificate_names(new) == tls.certificate_names(old)
    assert new.serial_number != old.serial_number
    assert f"{tls_dir / 'server.pem'} (mode 0644)" in output
    assert "127.0.0.1, localhost" in output
    assert "gives the new certificate to new connections" in output
    assert_no_leak(output)


def test_rotate_changes_secret(tls_dir: Path) -> None:
    before = tls.read_enrollment_secret(tls_dir)
    server_before = (tls_dir / "server.pem").read_bytes()

    tls.rotate_enrollment_secret(tls_dir)

    after = tls.read_enrollment_secret(tls_dir)
    assert after is not None
    remember_secret(after)
    assert after != before
    assert re.fullmatch(r"fme1\.[A-Za-z0-9_-]{43}", after)
    assert (tls_dir / "server.pem").read_bytes() == server_before
    assert stat.S_IMODE(os.stat(tls_dir / "enrollment-secret").st_mode) == 0o600


def test_rotate_command_output(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tls.read_enrollment_secret(tls_dir)

    code = run_init(["--dir", str(tls_dir), "--rotate-secret"])

    output = capsys.readouterr().out
    after = tls.read_enrollment_secret(tls_dir)
    assert after is not None
    remember_secret(after)
    assert code == 0
    assert after != before
    assert "keep their node keys" in output
    assert str(tls_dir / "enrollment-secret") in output
    assert after not in output
    assert_no_leak(output)


def test_init_twice_refuses(tls_dir: Path) -> None:
    server_before = (tls_dir / "server.pem").read_bytes()

    with pytest.raises(tls.TLSSetupError) as caught:
        tls.init_tls_dir(tls_dir, ["localhost"])

    message = str(caught.value)
    assert "\n" not in message
    assert str(tls_dir / "server.pem") in message
    assert f"init --renew --dir {tls_dir}" in message
    assert (tls_dir / "server.pem").read_bytes() == server_before


def test_init_command_twice_exits_1(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_init(["--dir", str(tls_dir), "--name", "localhost"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "--renew" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_init_keeps_existing_ca_and_secret(tls_dir: Path) -> None:
    ca_before = (tls_dir / "ca.pem").read_bytes()
    secret_before = tls.read_enrollment_secret(tls_dir)
    (tls_dir / "server.pem").unlink()
    (tls_dir / "server.key").unlink()

    created = tls.init_tls_dir(tls_dir, ["kept.example.com"])

    assert [path.name for path in created] == ["server.key", "server.pem"]
    assert (tls_dir / "ca.pem").read_bytes() == ca_before
    assert tls.read_enrollment_secret(tls_dir) == secret_before
    assert tls.certificate_names(load_pem(tls_dir / "server.pem")) == [
        "kept.example.com"
    ]


# The init command's output and its input checks.


def test_init_command_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "tls"

    code = run_init(["--dir", str(folder), "--name", "localhost", "--days", "30"])

    output = capsys.readouterr().out
    secret = tls.read_enrollment_secret(folder)
    assert secret is not None
    remember_secret(secret)
    expiry = tls.server_certificate_expiry(folder).strftime("%Y-%m-%d")
    assert code == 0
    for name, mode in FILE_MODES.items():
        assert f"{folder / name} (mode {mode:04o})" in output, name
    assert "server certificate for localhost, valid until " + expiry in output
    assert f"CA file for agents and operators: {folder / 'ca.pem'}" in output
    assert f"enrollment secret: {folder / 'enrollment-secret'}" in output
    assert secret not in output
    assert_no_leak(output)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a..b",
        "-bad.example.com",
        "bad-.example.com",
        "exa mple.com",
        "10.0.0.300",
        "*.example.com",
        "[::1]",
        "héllo.example.com",
        "x" * 64 + ".example.com",
        "a." * 127 + "com",
        "collector.example.com:50051",
    ],
)
def test_invalid_name_rejected(name: str) -> None:
    with pytest.raises(ValueError) as caught:
        tls.validate_name(name)

    assert repr(name) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_invalid_name_option_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        run_init(["--dir", str(tmp_path / "tls"), "--name", "bad..name"])

    assert caught.value.code == 2
    assert "'bad..name'" in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()


def test_init_tls_dir_rejects_bad_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no spaces please'"):
        tls.init_tls_dir(tmp_path / "tls", ["localhost", "no spaces please"])

    assert not (tmp_path / "tls").exists()


def test_valid_names_normalized() -> None:
    names = tls.validate_names(
        ["Collector.Example.com", "collector.example.com", "::0001", "127.0.0.1"]
    )

    assert names == ["Collector.Example.com", "::1", "127.0.0.1"]


@pytest.mark.parametrize("days", ["0", "826", "-5", "ten", "1.5"])
def test_invalid_days_option_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        run_init(
            ["--dir", str(tmp_path / "tls"), "--name", "localhost", "--days", days]
        )

    assert caught.value.code == 2
    assert repr(days) in capsys.readouterr().err


@pytest.mark.parametrize("days", [0, 826, -1])
def test_invalid_server_days_rejected(tmp_path: Path, days: int) -> None:
    with pytest.raises(ValueError, match=f"{days} days"):
        tls.init_tls_dir(tmp_path / "tls", ["localhost"], server_days=days)


def test_init_without_name_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_init(["--dir", str(tmp_path / "tls")])

    assert code == 2
    assert "--name HOST" in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()


def test_rotate_with_name_exits_2(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tls.read_enrollment_secret(tls_dir)

    code = run_init(["--dir", str(tls_dir), "--rotate-secret", "--name", "x.example"])

    assert code == 2
    assert "--renew" in capsys.readouterr().err
    assert tls.read_enrollment_secret(tls_dir) == before


def test_init_notes_open_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # noqa: S103 - a data folder that already exists

    code = run_init(["--dir", str(folder), "--name", "localhost"])

    remember_folder_secret(folder)
    output = capsys.readouterr().out
    assert code == 0
    assert f"note: {folder} has mode 0755" in output
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(folder / "ca.key").st_mode) == 0o600


def test_init_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tls, "default_data_dir", lambda: tmp_path / "default")

    code = run_init(["--name", "localhost"])

    remember_folder_secret(tmp_path / "default")
    assert code == 0
    assert (tmp_path / "default" / "server.pem").is_file()


# Errors for missing, unreadable and mismatched files.


@pytest.mark.parametrize(
    ("missing", "hint"),
    [
        ("server.pem", "run fleetmend-collector init --dir {dir} --name HOST"),
        (
            "server.key",
            "issue a new key and certificate with fleetmend-collector init "
            "--renew --dir {dir}",
        ),
        (
            "ca.pem",
            "restore ca.pem from a backup, or move ca.pem, ca.key, server.pem "
            "and server.key out of {dir} and run fleetmend-collector init "
            "--dir {dir} --name HOST to make a new CA, which every agent then needs",
        ),
    ],
)
def test_load_missing_file(tls_dir: Path, missing: str, hint: str) -> None:
    (tls_dir / missing).unlink()

    with pytest.raises(tls.TLSSetupError) as caught:
        tls.load_server_credentials(tls_dir)

    message = str(caught.value)
    assert message == f"{tls_dir / missing} is missing; {hint.format(dir=tls_dir)}"


def test_load_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSSetupError, match="fleetmend-collector init --dir"):
        tls.load_server_credentials(tmp_path)


def test_renew_without_ca_fails(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSSetupError) as caught:
        tls.renew_server_certificate(tmp_path, ["localhost"])

    assert str(caught.value).startswith(f"{tmp_path / 'ca.pem'} is missing; ")


def test_renew_command_without_folder_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_init(["--dir", str(tmp_path / "none"), "--renew"])

    error = capsys.readouterr().err
    assert code == 1
    assert "server.pem is missing" in error
    assert "fleetmend-collector init --dir" in error
    assert len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("missing", "present"), [("ca.key", "ca.pem"), ("ca.pem", "ca.key")]
)
def test_half_of_ca_missing(tmp_path: Path, missing: str, present: str) -> None:
    folder = new_tls_dir(tmp_path / "tls")
    (folder / missing).unlink()
    (folder / "server.pem").unlink()

    with pytest.raises(tls.TLSSetupError) as caught:
        tls.init_tls_dir(folder, ["localhost"])

    message = str(caught.value)
    assert message.startswith(
        f"{folder / missing} is missing but {folder / present} exists; "
    )
    assert "\n" not in message
    with pytest.raises(tls.TLSSetupError, match=f"{missing} is missing but"):
        tls.renew_server_certificate(folder, ["localhost"])


def test_key_not_matching_certificate(tls_dir: Path, tmp_path: Path) -> None:
    other = new_tls_dir(tmp_path / "other")
    shutil.copyfile(other / "server.key", tls_dir / "server.key")

    with pytest.raises(tls.TLSSetupError) as caught:
        tls.load_server_credentials(tls_dir)

    message = str(caught.value)
    assert "\n" not in message
    assert f"{tls_dir / 'server.key'} does not match {tls_dir / 'server.pem'}" in (
        message
    )
    assert "init --renew" in message


def test_certificate_from_other_ca_rejected(tls_dir: Path, tmp_path: Path) -> None:
    other = new_tls_dir(tmp_path / "other")
    shutil.copyfile(other / "server.key", tls_dir / "server.key")
    shutil.copyfile(other / "server.pem", tls_dir / "server.pem")

    with pytest.raises(tls.TLSSetupError, match="was not issued by the CA"):
        tls.load_server_credentials(tls_dir)


def test_ca_key_not_matching_ca(tls_dir: Path, tmp_path: Path) -> None:
    other = new_tls_dir(tmp_path / "other")
    shutil.copyfile(other / "ca.key", tls_dir / "ca.key")

    with pytest.raises(tls.TLSSetupError, match="ca.key does not match"):
        tls.renew_server_certificate(tls_dir)


def test_unreadable_key_file(tls_dir: Path) -> None:
    (tls_dir / "server.key").unlink()
    (tls_dir / "server.key").mkdir()

    with pytest.raises(tls.TLSSetupError) as caught:
        tls.load_server_credentials(tls_dir)

    message = str(caught.value)
    assert message.startswith(f"cannot read {tls_dir / 'server.key'}: ")
    assert "\n" not in message


def test_unreadable_key_as_other_user(reachable_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    folder = new_tls_dir(reachable_dir / "tls")
    os.chmod(folder, 0o755)  # noqa: S103 - reach the files, not their contents
    script = (
        "import sys\n"
        "from collector import tls\n"
        "try:\n"
        "    tls.load_server_credentials(sys.argv[1])\n"
        "except tls.TLSSetupError as error:\n"
        "    print(error)\n"
    )

    result = run_as_nobody(sys.executable, "-c", script, str(folder))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"cannot read {folder / 'server.key'}: Permission denied; "
    )


def test_corrupt_certificate(tls_dir: Path) -> None:
    (tls_dir / "server.pem").write_text("not a certificate\n", encoding="utf-8")

    with pytest.raises(tls.TLSSetupError, match="server.pem is not a PEM certificate"):
        tls.server_certificate_expiry(tls_dir)


def test_malformed_enrollment_secret(tls_dir: Path) -> None:
    (tls_dir / "enrollment-secret").write_text("fme1.short\n", encoding="utf-8")

    with pytest.raises(tls.TLSSetupError) as caught:
        tls.read_enrollment_secret(tls_dir)

    assert "fme1.short" not in str(caught.value)
    assert "--rotate-secret" in str(caught.value)


def test_missing_enrollment_secret_is_none(tls_dir: Path) -> None:
    (tls_dir / "enrollment-secret").unlink()

    assert tls.read_enrollment_secret(tls_dir) is None


# expiry_warning.

NOW = datetime(2026, 12, 20, 9, 30, tzinfo=UTC)


def test_expiry_warning_none_outside_window() -> None:
    assert tls.expiry_warning(NOW + timedelta(days=31), NOW) is None
    assert tls.expiry_warning(NOW + timedelta(days=30, seconds=1), NOW) is None


def test_expiry_warning_at_window_edge() -> None:
    warning = tls.expiry_warning(NOW + timedelta(days=30), NOW)

    assert warning == (
        "the server certificate expires in 30 days (2027-01-19); "
        "renew it with fleetmend-collector init --renew"
    )


def test_expiry_warning_names_folder() -> None:
    not_after = datetime(2027, 1, 1, 9, 30, tzinfo=UTC)
    folder = Path("/var/lib/fleetmend-collector")

    warning = tls.expiry_warning(not_after, NOW, directory=folder)

    assert warning == (
        "the server certificate /var/lib/fleetmend-collector/server.pem expires "
        "in 12 days (2027-01-01); renew it with fleetmend-collector init --renew "
        "--dir /var/lib/fleetmend-collector"
    )


def test_expiry_warning_last_day() -> None:
    one = tls.expiry_warning(NOW + timedelta(days=1), NOW)
    hours = tls.expiry_warning(NOW + timedelta(hours=3), NOW)

    assert one is not None
    assert "expires in 1 day (" in one
    assert hours is not None
    assert "expires in less than a day (2026-12-20)" in hours


def test_expiry_warning_after_expiry() -> None:
    warning = tls.expiry_warning(NOW - timedelta(days=3), NOW)

    assert warning == (
        "the server certificate expired on 2026-12-17; "
        "renew it with fleetmend-collector init --renew"
    )


def test_expiry_warning_custom_window() -> None:
    assert tls.expiry_warning(NOW + timedelta(days=45), NOW) is None
    assert tls.expiry_warning(
        NOW + timedelta(days=45), NOW, warn_within=timedelta(days=60)
    ) == (
        "the server certificate expires in 45 days (2027-02-03); "
        "renew it with fleetmend-collector init --renew"
    )


def test_expiry_warning_for_expired_folder(tmp_path: Path) -> None:
    folder = make_expired_tls_dir(tmp_path / "expired")

    warning = tls.expiry_warning(
        tls.server_certificate_expiry(folder), datetime.now(UTC), directory=folder
    )

    assert warning is not None
    assert warning.startswith(
        f"the server certificate {folder / 'server.pem'} expired on "
    )
