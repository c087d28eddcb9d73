"""Enrollment: exchange the fleet's enrollment secret for this device's node key.

``fleetmend-agent enroll`` calls AgentService.Enroll, keeps the device id that
the collector returns in identity.json, stores the node key (agent.keystore),
copies the CA file to ``<state dir>/collector-ca.pem`` and writes
``enrollment.json`` with the collector address, the CA copy, the time and the
key store. ``run`` reads them back, so that it needs no flags after enrolling.
The enrollment secret comes from a file or the FLEETMEND_ENROLL_SECRET
variable, never from the command line, where other users could read it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from agent import __version__
from agent.keystore import KeyStoreError, NodeKeyStore, open_key_store
from agent.state import Identity, StateError, StateStore, write_private
from agent.transport import explain_tls_failure, open_channel
from fleetmend.v1 import agent_pb2, agent_pb2_grpc

ENROLLMENT_FILE = "enrollment.json"
CA_COPY_FILE = "collector-ca.pem"
SECRET_VARIABLE = "FLEETMEND_ENROLL_SECRET"  # noqa: S105 - a variable name
ENROLL_TIMEOUT_SECONDS = 20.0
# The shape of an enrollment secret as `fleetmend-collector init` writes it:
# "fme1." and 32 random bytes in URL-safe base64 without padding.
SECRET_PATTERN = re.compile(r"fme1\.[A-Za-z0-9_-]{43}")


def print_warning(message: str) -> None:
    """Print a one-line warning of the enroll command on stderr."""
    print(f"fleetmend-agent: warning: {message}", file=sys.stderr)


class EnrollmentError(Exception):
    """Enrollment failed or its record is unusable; the message names the fix."""


@dataclass(frozen=True)
class Enrollment:
    """The record that enroll writes: the collector, its CA and the node key's store."""

    collector: str
    ca_file: Path | None  # None: enrolled over plaintext (--insecure)
    enrolled_time: datetime
    key_store: str  # "keyring" or "file"
    insecure: bool = False


def enrollment_path(state_dir: Path) -> Path:
    """Return the path of a state directory's enrollment record."""
    return state_dir / ENROLLMENT_FILE


def read_enrollment(state_dir: Path) -> Enrollment | None:
    """Return the enrollment record of state_dir, or None when it does not exist."""
    path = enrollment_path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnrollmentError(
            f"enrollment file {path} cannot be read: {exc.strerror}"
        ) from exc
    except ValueError as exc:
        raise _damaged(path, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _damaged(path, "expected a JSON object")
    try:
        collector = data["collector"]
        ca_file = data["ca_file"]
        enrolled_time = datetime.fromisoformat(data["enrolled_time"])
        key_store = data["key_store"]
        insecure = bool(data.get("insecure", False))
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"missing or invalid field {exc}") from exc
    if not isinstance(collector, str) or key_store not in ("keyring", "file"):
        raise _damaged(path, "collector or key_store has an invalid value")
    if ca_file is not None and not isinstance(ca_file, str):
        raise _damaged(path, "ca_file must be a path or null")
    return Enrollment(
        collector=collector,
        ca_file=Path(ca_file) if ca_file else None,
        enrolled_time=enrolled_time,
        key_store=key_store,
        insecure=insecure,
    )


def _damaged(path: Path, reason: str) -> EnrollmentError:
    return EnrollmentError(
        f"enrollment file {path} is damaged ({reason}); enroll again with "
        "fleetmend-agent enroll"
    )


def read_secret(
    secret_file: Path | None,
    environ: dict[str, str],
    *,
    warn: Callable[[str], None] = print_warning,
) -> str:
    """Return the enrollment secret from secret_file, else from FLEETMEND_ENROLL_SECRET.

    One trailing newline is removed. An empty, unreadable or multi-line
    source, or one without the ``fme1.<43 characters>`` shape, raises
    EnrollmentError naming it, never its content. On POSIX a secret file that
    the group or others can read is accepted with a warning passed to warn.
    """
    if secret_file is not None:
        _warn_if_shared(secret_file, warn)
        try:
            text = secret_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise EnrollmentError(
                f"enrollment secret file {secret_file} cannot be read: {reason}"
            ) from None
        source = f"enrollment secret file {secret_file}"
    elif environ.get(SECRET_VARIABLE):
        text = environ[SECRET_VARIABLE]
        source = f"environment variable {SECRET_VARIABLE}"
    else:
        raise EnrollmentError(
            f"no enrollment secret: pass --secret-file FILE or set {SECRET_VARIABLE}"
        )
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise EnrollmentError(f"{source} is empty; copy the secret from the collector")
    if any(char.isspace() for char in text):
        raise EnrollmentError(
            f"{source} contains spaces or more than one line; it must contain "
            "the secret only"
        )
    if not SECRET_PATTERN.fullmatch(text):
        raise EnrollmentError(
            f"{source} does not contain an enrollment secret (fme1. followed by "
            "43 characters); copy the enrollment-secret file that "
            "`fleetmend-collector init` wrote on the collector"
        )
    return text


def _warn_if_shared(secret_file: Path, warn: Callable[[str], None]) -> None:
    if sys.platform == "win32":
        return
    try:
        mode = stat.S_IMODE(os.stat(secret_file).st_mode)
    except OSError:
        # Reading the file reports the error.
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warn(
            f"enrollment secret file {secret_file} is readable by other users "
            f"(mode {mode:04o}); run `chmod 600 {secret_file}`"
        )


def _copy_ca(ca_file: Path, state_dir: Path) -> Path:
    try:
        data = ca_file.read_bytes()
    except OSError as exc:
        raise EnrollmentError(
            f"CA file {ca_file} cannot be read: {exc.strerror}"
        ) from exc
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise EnrollmentError(
            f"CA file {ca_file} contains no PEM certificate; pass the collector's "
            "ca.pem"
        )
    # enrollment.json keeps an absolute path, so that run works from any folder.
    copy = Path(os.path.abspath(state_dir / CA_COPY_FILE))
    if copy.resolve() != ca_file.resolve():
        write_private(copy, data)
    return copy


def _write_enrollment(state_dir: Path, enrollment: Enrollment) -> None:
    payload = {
        "collector": enrollment.collector,
        "ca_file": str(enrollment.ca_file) if enrollment.ca_file else None,
        "enrolled_time": enrollment.enrolled_time.isoformat(),
        "key_store": enrollment.key_store,
        "insecure": enrollment.insecure,
    }
    path = enrollment_path(state_dir)
    try:
        write_private(path, (json.dumps(payload, indent=2) + "\n").encode())
    except OSError as exc:
        raise EnrollmentError(
            f"enrollment file {path} cannot be written: {exc.strerror}"
        ) from exc


def _call_enroll(
    collector: str,
    request: agent_pb2.EnrollRequest,
    ca_data: bytes | None,
    insecure: bool,
) -> agent_pb2.EnrollResponse:
    with open_channel(
        collector, root_certificates=ca_data, insecure=insecure
    ) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        try:
            response: agent_pb2.EnrollResponse = stub.Enroll(
                request, timeout=ENROLL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            raise EnrollmentError(
                describe_enroll_error(exc, collector, ca_data, insecure)
            ) from None
    return response


def describe_enroll_error(
    exc: grpc.RpcError, collector: str, ca_data: bytes | None, insecure: bool
) -> str:
    """Describe an Enroll failure in one line that names the fix."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"the collector rejected the enrollment secret ({collector}); copy the "
            "current secret from the collector's enrollment-secret file"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (
            f"collector {collector} refused more enrollment attempts from this "
            f"address for now ({details}); retry later"
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return (
            f"collector {collector} has no enrollment secret set up ({details}); "
            "run fleetmend-collector init on it"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        reason = explain_tls_failure(collector, ca_data, insecure=insecure)
        if reason is not None:
            return reason
        return f"collector {collector} is unavailable ({details}); retry later"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"collector {collector} did not answer within "
            f"{ENROLL_TIMEOUT_SECONDS:.0f} s; retry later"
        )
    name = code.name if code is not None else "error"
    return f"enrollment with collector {collector} failed ({name}: {details})"


def enroll(
    state_dir: Path,
    collector: str,
    *,
    ca_file: Path | None,
    insecure: bool,
    secret: str,
    key_store_mode: str,
    now: datetime | None = None,
    warn: Callable[[str], None] = print_warning,
) -> tuple[str, NodeKeyStore]:
    """Enroll this device with collector; return its device id and the key store.

    Holds the state directory's lock, so that no running agent reads a
    half-written enrollment. When the collector assigns another device id
    than the stored one, warn gets one line with both ids and the fix.
    """
    if ca_file is None and not insecure:
        raise EnrollmentError(
            "enroll needs --ca-file with the collector's CA certificate (or "
            "--insecure for a loopback collector)"
        )
    state = StateStore(state_dir)
    try:
        key_store = open_key_store(key_store_mode, state_dir)
    except KeyStoreError as exc:
        raise EnrollmentError(str(exc)) from None
    with state.exclusive():
        identity = state.load_or_create()
        ca_copy = None if insecure or ca_file is None else _copy_ca(ca_file, state_dir)
        ca_data = ca_copy.read_bytes() if ca_copy is not None else None
        request = agent_pb2.EnrollRequest(
            device_id=identity.device_id,
            enrollment_secret=secret,
            hostname=socket.gethostname(),
            agent_version=__version__,
        )
        try:
            response = _call_enroll(collector, request, ca_data, insecure)
        except ValueError as exc:
            raise EnrollmentError(str(exc)) from None
        device_id = _checked_device_id(response.device_id, collector)
        try:
            key_store.write(response.node_key)
        except KeyStoreError as exc:
            raise EnrollmentError(str(exc)) from None
        if device_id != identity.device_id:
            try:
                state.save(Identity(device_id, identity.next_sequence))
            except StateError as exc:
                raise EnrollmentError(str(exc)) from None
            warn(new_device_id_note(device_id, identity.device_id))
        _write_enrollment(
            state_dir,
            Enrollment(
                collector=collector,
                ca_file=ca_copy,
                enrolled_time=now or datetime.now(UTC),
                key_store=key_store.kind,
                insecure=insecure,
            ),
        )
    return device_id, key_store


def new_device_id_note(device_id: str, requested_id: str) -> str:
    """Describe why the collector enrolled this machine as a new device."""
    return (
        f"this machine is now device {device_id}: the collector already has "
        f"device {requested_id}, the id in this state folder, enrolled or "
        f"revoked; revoke the old device with `fleetmend device revoke "
        f"{requested_id}` if this machine replaced it"
    )


def _checked_device_id(text: str, collector: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise EnrollmentError(
            f"collector {collector} returned an invalid device id {text!r}"
        ) from None


def secret_in_argv(argv: list[str]) -> bool:
    """Return True when an argument looks like an enrollment secret or passes one."""
    for arg in argv:
        if arg.startswith("fme1.") or arg.split("=", 1)[0] in (
            "--secret",
            "--enrollment-secret",
        ):
            return True
    return False
