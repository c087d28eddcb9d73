"""Tests that a served collector picks up a renewed certificate without a restart.

Each test runs a real collector with TLS on 127.0.0.1, renews or damages the
files of its TLS folder, and reads the certificate that new TLS handshakes get.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collector import server as collector_server
from collector import tls
from collector.cli import main
from collector.server import ServerHandle, start_server_thread
from tests.collector.test_server import (
    AgentClient,
    Conversation,
    Enroller,
    hello,
    new_device_id,
    report,
)
from tests.trust import TEST_NAMES, channel_to, enrollment_secret, make_tls_dir

RELOAD_LOGGER = "collector.tls"


def served_serial(port: int, ca_file: Path) -> int:
    """Complete a TLS handshake with the collector and return its serial number."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as secure,
    ):
        der = secure.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def file_serial(tls_dir: Path) -> int:
    pem = (tls_dir / "server.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).serial_number


def health_status(address: str, tls_dir: Path) -> int:
    with channel_to(address, tls_dir) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(response.status)


def reload_records(
    caplog: pytest.LogCaptureFixture, level: int
) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == RELOAD_LOGGER and record.levelno == level
    ]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll condition until it is true or timeout seconds pass; return whether it is."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def collector(tmp_path: Path, tls_dir: Path) -> Iterator[ServerHandle]:
    """A TLS collector serving tls_dir's certificate on 127.0.0.1."""
    handle = start_server_thread(
        f"sqlite:///{tmp_path}/collector/store.db", tls_dir=tls_dir
    )
    yield handle
    handle.stop()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="collector")
    return caplog


# Renewal


def test_renew_command_served_without_restart(
    collector: ServerHandle,
    tls_dir: Path,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)

    code = main(["init", "--dir", str(tls_dir), "--renew"])

    output = capsys.readouterr().out
    after = served_serial(collector.port, ca_file)
    renewed = tls.ServerCertificateReloader(tls_dir).certificate
    (switch,) = reload_records(logs, logging.INFO)
    assert code == 0
    assert "gives the new certificate to new connections" in output
    assert before != after
    assert after == file_serial(tls_dir)
    assert f"{after:x}" in switch.getMessage()
    assert renewed.not_valid_after_utc.isoformat() in switch.getMessage()
    assert reload_records(logs, logging.WARNING) == []
    assert health_status(collector.address, tls_dir) == 1


def test_second_renewal_served(collector: ServerHandle, tls_dir: Path) -> None:
    ca_file = tls_dir / "ca.pem"
    tls.renew_server_certificate(tls_dir)
    first = served_serial(collector.port, ca_file)

    tls.renew_server_certificate(tls_dir, ["localhost", "127.0.0.1"])

    second = served_serial(collector.port, ca_file)
    assert first != second
    assert second == file_serial(tls_dir)


def test_open_stream_keeps_session(collector: ServerHandle, tls_dir: Path) -> None:
    enroller = Enroller(collector.address, tls_dir, plaintext=False)
    device_id = new_device_id()
    before = served_serial(collector.port, tls_dir / "ca.pem")
    with channel_to(collector.address, tls_dir) as channel:
        stream = Conversation(AgentClient(channel, enroller))
        stream.send(hello(device_id))
        welcome = stream.receive()
        stream.send(report(1))
        first_ack = stream.receive().ack.committed_sequence

        tls.renew_server_certificate(tls_dir)
        after = served_serial(collector.port, tls_dir / "ca.pem")
        stream.send(report(2))
        second_ack = stream.receive().ack.committed_sequence
        stream.close()

    assert welcome.WhichOneof("message") == "welcome"
    assert first_ack == 1
    assert before != after
    assert second_ack == 2


def test_unchanged_files_not_reread(
    collector: ServerHandle, tls_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)
    pem = tls_dir / "server.pem"
    pem.write_bytes(pem.read_bytes())
    os.utime(tls_dir / "server.key")

    after = served_serial(collector.port, ca_file)

    assert before == after
    assert reload_records(logs, logging.INFO) == []
    assert reload_records(logs, logging.WARNING) == []


# Files that fail a check keep the certificate in service


def test_mismatched_pair_keeps_current(
    collector: ServerHandle,
    tls_dir: Path,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)
    other = make_tls_dir(tmp_path / "other")
    (tls_dir / "server.key").write_bytes((other / "server.key").read_bytes())

    serials = [served_serial(collector.port, ca_file) for _ in range(3)]

    warnings = reload_records(logs, logging.WARNING)
    assert serials == [before, before, before]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"{tls_dir / 'server.key'} does not match {tls_dir / 'server.pem'}" in (
        message
    )
    assert f"fleetmend-collector init --renew --dir {tls_dir}" in message
    assert f"serial {before:x}" in message
    assert "PRIVATE KEY" not in message
    assert reload_records(logs, logging.INFO) == []


def test_renew_after_mismatch_served(
    collector: ServerHandle,
    tls_dir: Path,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)
    other = make_tls_dir(tmp_path / "other")
    (tls_dir / "server.key").write_bytes((other / "server.key").read_bytes())
    served_serial(collector.port, ca_file)

    tls.renew_server_certificate(tls_dir)

    after = served_serial(collector.port, ca_file)
    assert after not in (before, file_serial(other))
    assert after == file_serial(tls_dir)
    assert len(reload_records(logs, logging.WARNING)) == 1
    assert len(reload_records(logs, logging.INFO)) == 1


def test_certificate_of_other_ca_keeps_current(
    collector: ServerHandle,
    tls_dir: Path,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)
    other = make_tls_dir(tmp_path / "other")
    for name in ("server.key", "server.pem"):
        shutil.copyfile(other / name, tls_dir / name)

    served = served_serial(collector.port, ca_file)

    (warning,) = reload_records(logs, logging.WARNING)
    assert served == before
    assert "was not issued by the CA in" in warning.getMessage()


def test_half_written_certificate_keeps_current(
    collector: ServerHandle, tls_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)
    pem = tls_dir / "server.pem"
    complete = pem.read_bytes()
    pem.write_bytes(complete[: len(complete) // 2])

    served = served_serial(collector.port, ca_file)
    pem.write_bytes(complete)
    still = served_serial(collector.port, ca_file)

    (warning,) = reload_records(logs, logging.WARNING)
    assert served == before
    assert still == before
    assert f"{pem} is not a PEM certificate" in warning.getMessage()
    assert (
        f"fleetmend-collector init --renew --dir {tls_dir} "
        "--name 127.0.0.1 --name localhost;"
    ) in warning.getMessage()
    assert reload_records(logs, logging.INFO) == []


def replace_key_with_folder(tls_dir: Path) -> str:
    key = tls_dir / "server.key"
    key.unlink()
    key.mkdir()
    return f"cannot read {key}: "


def remove_key(tls_dir: Path) -> str:
    (tls_dir / "server.key").unlink()
    return (
        f"{tls_dir / 'server.key'} is missing; issue a new key and certificate "
        f"with fleetmend-collector init --renew --dir {tls_dir}"
    )


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(replace_key_with_folder, id="unreadable"),
        pytest.param(remove_key, id="missing"),
    ],
)
def test_unusable_key_keeps_current(
    collector: ServerHandle,
    tls_dir: Path,
    logs: pytest.LogCaptureFixture,
    damage: Callable[[Path], str],
) -> None:
    ca_file = tls_dir / "ca.pem"
    before = served_serial(collector.port, ca_file)
    expected = damage(tls_dir)

    serials = [served_serial(collector.port, ca_file) for _ in range(3)]

    warnings = reload_records(logs, logging.WARNING)
    assert serials == [before, before, before]
    assert len(warnings) == 1
    assert expected in warnings[0].getMessage()


def test_unreadable_key_as_other_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # The folder belongs to uid 65534, so that chmod 000 locks the collector
    # code itself out: root would read the file whatever its mode.
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-tls-reload-"))
    os.chown(folder, 65534, 65534)
    script = (
        "import json, logging, os, sys\n"
        "from pathlib import Path\n"
        "from collector import tls\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "folder = Path(sys.argv[1]) / 'tls'\n"
        "tls.init_tls_dir(folder, ['localhost'])\n"
        "reloader = tls.ServerCertificateReloader(folder)\n"
        "first = reloader.certificate.serial_number\n"
        "tls.renew_server_certificate(folder)\n"
        "os.chmod(folder / 'server.key', 0)\n"
        "locked = [reloader.fetch() is None for _ in range(3)]\n"
        "unchanged = reloader.certificate.serial_number == first\n"
        "os.chmod(folder / 'server.key', 0o600)\n"
        "unlocked = reloader.fetch() is not None\n"
        "renewed = reloader.certificate.serial_number != first\n"
        "print(json.dumps([locked, unchanged, unlocked, renewed]))\n"
    )
    try:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [sys.executable, "-c", script, str(folder)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    finally:
        shutil.rmtree(folder)

    assert result.returncode == 0, result.stderr
    locked, unchanged, unlocked, renewed = json.loads(result.stdout)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert locked == [True, True, True]
    assert unchanged
    assert unlocked
    assert renewed
    assert len(warnings) == 1
    assert "server.key: Permission denied" in warnings[0]
    assert "PRIVATE KEY" not in result.stderr


# Expiry checks and the reloader itself


def test_expiry_check_uses_served_certificate(
    tmp_path: Path, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A day stands for a twentieth of a second here.
    monkeypatch.setattr(collector_server, "EXPIRY_CHECK_INTERVAL_SECONDS", 0.05)
    tls_dir = tmp_path / "tls"
    tls.init_tls_dir(tls_dir, list(TEST_NAMES), server_days=10)
    enrollment_secret(tls_dir)
    handle = start_server_thread(
        f"sqlite:///{tmp_path}/collector/store.db", tls_dir=tls_dir
    )
    try:
        renewed_path = tls.renew_server_certificate(tls_dir)
        renewed = x509.load_pem_x509_certificate(renewed_path.read_bytes())
        in_service = (
            "the server certificate in service is valid until "
            f"{renewed.not_valid_after_utc.isoformat()}"
        )
        checked = wait_for(
            lambda: any(r.getMessage() == in_service for r in logs.records)
        )
        serial = served_serial(handle.port, tls_dir / "ca.pem")
    finally:
        handle.stop()

    expiring = [
        record
        for record in logs.records
        if record.levelno == logging.WARNING and "expires in" in record.getMessage()
    ]
    assert checked
    assert expiring
    assert "expires in 10 days" in expiring[0].getMessage()
    assert len(reload_records(logs, logging.INFO)) == 1
    assert serial == renewed.serial_number


def test_fetch_hands_over_renewal_once(tls_dir: Path) -> None:
    reloader = tls.ServerCertificateReloader(tls_dir)
    first = reloader.certificate.serial_number

    unchanged = reloader.fetch()
    tls.renew_server_certificate(tls_dir)
    renewed = reloader.fetch()
    again = reloader.fetch()

    assert unchanged is None
    assert isinstance(renewed, grpc.ServerCertificateConfiguration)
    assert again is None
    assert reloader.certificate.serial_number != first
    assert reloader.certificate.serial_number == file_serial(tls_dir)


def test_refresh_leaves_fetch_to_hand_over(tls_dir: Path) -> None:
    reloader = tls.ServerCertificateReloader(tls_dir)
    tls.renew_server_certificate(tls_dir)

    refreshed = reloader.refresh()
    handed = reloader.fetch()

    assert refreshed.serial_number == file_serial(tls_dir)
    assert isinstance(handed, grpc.ServerCertificateConfiguration)
    assert reloader.fetch() is None


def test_reloader_rejects_unusable_folder(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSSetupError) as caught:
        tls.ServerCertificateReloader(tmp_path)

    assert str(caught.value) == (
        f"{tmp_path / 'server.pem'} is missing; run fleetmend-collector init "
        f"--dir {tmp_path} --name HOST"
    )
