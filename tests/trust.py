"""Test helpers for the trust model: TLS folders, enrollment and operator tokens.

Every secret that these helpers create is remembered in CREATED_SECRETS, so
that the suite can check that none of them reaches a log.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc

from fleetmend.v1 import agent_pb2, agent_pb2_grpc

# Names that the test collectors' certificates are issued for.
TEST_NAMES = ("127.0.0.1", "localhost")

CREATED_SECRETS: set[str] = set()


def remember_secret(secret: str) -> str:
    """Add secret to the ones the leak check looks for; return it."""
    CREATED_SECRETS.add(secret)
    return secret


def make_tls_dir(directory: Path, names: tuple[str, ...] = TEST_NAMES) -> Path:
    """Create a CA, a server certificate and an enrollment secret in directory."""
    from collector import tls

    tls.init_tls_dir(directory, list(names))
    secret = tls.read_enrollment_secret(directory)
    assert secret is not None
    remember_secret(secret)
    return directory


def enrollment_secret(tls_dir: Path) -> str:
    """Return the enrollment secret of a TLS folder made by make_tls_dir."""
    from collector import tls

    secret = tls.read_enrollment_secret(tls_dir)
    assert secret is not None
    return remember_secret(secret)


def channel_to(
    address: str, tls_dir: Path | None, *, options: list[tuple[str, int]] | None = None
) -> grpc.Channel:
    """Open a channel to a test collector: TLS with tls_dir's CA, else plaintext."""
    if tls_dir is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials((tls_dir / "ca.pem").read_bytes())
    return grpc.secure_channel(address, credentials, options=options)


def enroll(
    address: str,
    tls_dir: Path,
    device_id: str | None = None,
    *,
    plaintext: bool = True,
    hostname: str = "test-host",
) -> tuple[str, str]:
    """Enroll a device with a test collector; return its device id and node key.

    plaintext=True talks to a collector started with insecure=True; tls_dir
    then only supplies the enrollment secret.
    """
    request = agent_pb2.EnrollRequest(
        device_id=device_id or str(uuid.uuid4()),
        enrollment_secret=enrollment_secret(tls_dir),
        hostname=hostname,
        agent_version="test",
    )
    with channel_to(address, None if plaintext else tls_dir) as channel:
        response = agent_pb2_grpc.AgentServiceStub(channel).Enroll(request, timeout=10)
    remember_secret(response.node_key)
    return response.device_id, response.node_key


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    """Return call metadata that carries secret as a bearer credential."""
    return (("authorization", f"Bearer {secret}"),)


def create_token(database_url: str, role: str = "admin", name: str = "") -> str:
    """Create an operator token in the collector database directly; return it."""
    from collector import auth
    from collector.store import Store

    issued = auth.issue_operator_token()
    with Store.open(database_url) as store:
        store.migrate()
        store.create_token(
            name or f"test-{role}-{issued.credential_id[:6]}",
            auth.Role.parse(role),
            issued.credential_id,
            issued.secret_hash,
            "tests",
            datetime.now(UTC),
        )
    return remember_secret(issued.text)


def write_token_file(directory: Path, token: str) -> Path:
    """Write token to an owner-only file in directory, as the CLI reads it."""
    path = directory / "operator-token"
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path
