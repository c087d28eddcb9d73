"""Connection of the ``fleetmend`` CLI to the collector, and its failures.

Reads the CA file and the operator token file, opens the gRPC channel and calls
the OpsService. A failed call becomes a CliError with a one-line message. When
gRPC reports a failed connection, a handshake of the ssl module with the same
address and CA file finds the reason. Also defines the global options, such
as --collector and --token-file, that every command accepts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import ssl
import stat
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from collector._address import is_loopback_host, split_host_port
from fleetmend.v1 import ops_pb2, ops_pb2_grpc

PROG = "fleetmend"
COLLECTOR_ENV = "FLEETMEND_COLLECTOR"
CA_FILE_ENV = "FLEETMEND_CA_FILE"
TOKEN_FILE_ENV = "FLEETMEND_TOKEN_FILE"  # noqa: S105 - a variable name, not a secret
DEFAULT_COLLECTOR = "127.0.0.1:50051"
DEFAULT_PAGE_SIZE = 1000
DEFAULT_TIMEOUT_SECONDS = 30.0
OPERATOR_TOKEN_PREFIX = "fmt1."  # noqa: S105 - the format's prefix, not a secret

# Shapes of Fleetmend secrets (node keys, operator tokens, enrollment secrets).
# Error messages pass through redact_secrets, so that a secret that a
# collector echoes in its status details is not printed.
SECRET_PATTERN = re.compile(
    r"fm[kt]1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}|fme1\.[A-Za-z0-9_-]{43}"
)

# OpenSSL's X509_V_ERR_* verification results that the TLS check explains.
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_UNKNOWN_ISSUER_CODES = frozenset({18, 19, 20, 21})
_NAME_MISMATCH_CODES = frozenset({62, 64})


class CliError(Exception):
    """A failure that the CLI reports in one line, exiting with exit_code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AmbiguousHostnameError(CliError):
    """A hostname that more than one device has."""

    def __init__(self, hostname: str, devices: list[ops_pb2.Device]) -> None:
        super().__init__(
            f"{len(devices)} devices have the hostname {hostname!r}; "
            "give one of the device ids above"
        )
        self.devices = devices


# Connection settings


def collector_address(flag: str | None, environ: Mapping[str, str]) -> str:
    """Return the collector address: the flag, else the environment, else default.

    An empty environment variable counts as unset; an empty flag is returned
    as it is, so that the caller rejects it.
    """
    if flag is not None:
        return flag
    return environ.get(COLLECTOR_ENV) or DEFAULT_COLLECTOR


@dataclass(frozen=True, repr=False)
class Connection:
    """Connection settings of the CLI: address, transport security and token.

    repr() leaves the token out.
    """

    address: str
    host: str
    port: int
    # None with --insecure.
    ca_file: Path | None
    root_certificates: bytes | None
    token: str

    def __repr__(self) -> str:
        return f"Connection(address={self.address!r}, ca_file={self.ca_file!r})"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata that carries the operator token."""
        return (("authorization", f"Bearer {self.token}"),)


def resolve_connection(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> Connection:
    """Check the address, transport and token options; raise CliError (exit 2)."""
    address = collector_address(args.collector, environ)
    try:
        host, port = split_host_port(address)
    except ValueError as error:
        source = "--collector" if args.collector is not None else COLLECTOR_ENV
        raise CliError(f"invalid collector address in {source}: {error}", 2) from None
    ca_file: Path | None = None
    root_certificates: bytes | None = None
    if args.insecure:
        if not is_loopback_host(host):
            raise CliError(
                f"--insecure connects in plaintext, which is allowed to loopback "
                f"addresses only, not to {host}; pass --ca-file (the collector's "
                "ca.pem) instead",
                2,
            )
    else:
        ca_file, root_certificates = read_ca_file(args.ca_file, environ)
    token = read_token_file(args.token_file, environ)
    return Connection(address, host, port, ca_file, root_certificates, token)


def read_ca_file(flag: str | None, environ: Mapping[str, str]) -> tuple[Path, bytes]:
    """Return the CA file's path and PEM content; raise CliError (exit 2)."""
    source = "--ca-file" if flag is not None else CA_FILE_ENV
    text = flag if flag is not None else environ.get(CA_FILE_ENV, "")
    if not text:
        raise CliError(
            "pass --ca-file (the collector's ca.pem) or set FLEETMEND_CA_FILE, "
            "or --insecure for a loopback collector",
            2,
        )
    path = Path(text)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise CliError(
            f"cannot read the CA file {path} from {source}: "
            f"{error.strerror or error}; pass the collector's ca.pem",
            2,
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in content:
        raise CliError(
            f"the CA file {path} from {source} contains no PEM certificate; "
            "pass the collector's ca.pem",
            2,
        )
    return path, content


def read_token_file(flag: str | None, environ: Mapping[str, str]) -> str:
    """Return the operator token in the token file; raise CliError (exit 2).

    Prints a warning on stderr when the file is readable by its group or by
    others. No message contains the file's content.
    """
    source = "--token-file" if flag is not None else TOKEN_FILE_ENV
    text = flag if flag is not None else environ.get(TOKEN_FILE_ENV, "")
    if not text:
        raise CliError(
            "no operator token: pass --token-file FILE or set "
            f"{TOKEN_FILE_ENV} to a file that contains the token on one line",
            2,
        )
    path = Path(text)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise CliError(
            f"cannot read the token file {path} from {source}: {reason or error}",
            2,
        ) from None
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        print(
            f"{PROG}: warning: the token file {path} is readable by other users "
            f"(mode {mode:04o}); restrict it with chmod 600 {path}",
            file=sys.stderr,
        )
    lines = [line.strip() for line in content.splitlines() if line.strip()]
    if len(lines) != 1:
        raise CliError(
            f"the token file {path} has {len(lines)} non-empty lines; it must "
            "contain the operator token on one line",
            2,
        )
    token = lines[0]
    if not (token.startswith(OPERATOR_TOKEN_PREFIX) and _is_metadata_safe(token)):
        raise CliError(
            f"the token file {path} does not contain an operator token; its line "
            f"must start with {OPERATOR_TOKEN_PREFIX} (as `fleetmend-collector token "
            "create` prints it)",
            2,
        )
    return token


def _is_metadata_safe(text: str) -> bool:
    # gRPC metadata values are printable ASCII; a space would split the bearer
    # credential.
    return all("!" <= character <= "~" for character in text)


def open_channel(connection: Connection) -> grpc.Channel:
    """Open a TLS channel with the connection's CA, or plaintext without one."""
    if connection.root_certificates is None:
        return grpc.insecure_channel(connection.address)
    credentials = grpc.ssl_channel_credentials(connection.root_certificates)
    return grpc.secure_channel(connection.address, credentials)


def redact_secrets(text: str) -> str:
    """Return text with every Fleetmend secret in it replaced by a marker."""
    return SECRET_PATTERN.sub("[secret removed]", text)


# Transport failures


def transport_diagnosis(
    connection: Connection, timeout: float
) -> Callable[[str], str | None]:
    """Return a function that explains a failed connection in one line.

    The function takes gRPC's status details of an UNAVAILABLE call and returns
    the reason found by a handshake of the ssl module with the same address,
    CA file and server name, or None when that finds nothing to explain.
    """

    def diagnose(details: str) -> str | None:
        if connection.ca_file is None:
            return explain_plaintext_failure(connection, timeout)
        if not _is_tls_failure(details):
            return None
        return explain_tls_failure(connection, connection.ca_file, timeout)

    return diagnose


def explain_tls_failure(
    connection: Connection, ca_file: Path, timeout: float
) -> str | None:
    """Return why a TLS handshake with the collector fails, or None if it succeeds.

    The check sends a TLS ClientHello and nothing after it, so no token leaves
    the machine when the certificate does not verify.
    """
    where = f"the collector at {connection.address}"
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as error:
        return f"the CA file {ca_file} cannot be loaded as a certificate: {error}"
    context.set_alpn_protocols(["h2"])
    try:
        _handshake(connection, context, timeout)
    except ssl.SSLCertVerificationError as error:
        return f"TLS verification of {where} failed: " + _verify_reason(
            error, connection, ca_file
        )
    except ssl.SSLError as error:
        if error.reason == "WRONG_VERSION_NUMBER":
            return (
                f"{where} does not answer in TLS, so it probably runs with "
                "--insecure; pass --insecure if it is on loopback, else start it "
                "with TLS"
            )
        return f"the TLS handshake with {where} failed: {error.reason or error}"
    except OSError as error:
        return f"the TLS handshake with {where} failed: {error.strerror or error}"
    return None


def explain_plaintext_failure(connection: Connection, timeout: float) -> str | None:
    """Return a hint when the collector at the address speaks TLS, else None.

    The check sends a TLS ClientHello without verifying the certificate and
    closes the connection after the handshake, without sending anything else.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        _handshake(connection, context, timeout)
    except (ssl.SSLError, OSError):
        return None
    return (
        f"the collector at {connection.address} requires TLS and rejected the "
        "plaintext connection of --insecure; drop --insecure and pass --ca-file "
        "(the collector's ca.pem)"
    )


def _handshake(connection: Connection, context: ssl.SSLContext, timeout: float) -> None:
    with (
        socket.create_connection(
            (connection.host, connection.port), timeout=timeout
        ) as raw,
        context.wrap_socket(raw, server_hostname=connection.host),
    ):
        pass


def _verify_reason(
    error: ssl.SSLCertVerificationError, connection: Connection, ca_file: Path
) -> str:
    message = error.verify_message or str(error)
    code = error.verify_code
    if code in _UNKNOWN_ISSUER_CODES:
        return (
            f"{message}: its certificate is not signed by the CA in {ca_file}, "
            "so it comes from another CA; pass that collector's ca.pem"
        )
    if code == _CERT_HAS_EXPIRED:
        return (
            f"{message}: renew it on the collector host with "
            "`fleetmend-collector init --renew`"
        )
    if code == _CERT_NOT_YET_VALID:
        return f"{message}: check the clocks of this machine and the collector"
    if code in _NAME_MISMATCH_CODES:
        return (
            f"the certificate is not valid for {connection.host} ({message}); "
            "connect by a name it was issued for, or renew it with "
            f"`fleetmend-collector init --renew --name {connection.host}`"
        )
    return message


def _is_tls_failure(details: str) -> bool:
    # grpc core's wording (1.85) for TLS failures: "Tls handshake failed
    # (TSI_PROTOCOL_FAILURE): ..." for a failed handshake or certificate
    # check, and "Custom verification check failed ... Hostname Verification
    # Check failed." for a certificate issued for another name.
    lowered = details.lower()
    return "handshake failed" in lowered or "verification check failed" in lowered


# Calls to the collector


class OpsClient:
    """OpsService calls that follow every page and translate errors to CliError.

    metadata is sent with every call. diagnose, given gRPC's details of a failed
    connection, returns a one-line explanation or None.
    """

    def __init__(
        self,
        stub: ops_pb2_grpc.OpsServiceStub,
        address: str,
        timeout: float,
        page_size: int = DEFAULT_PAGE_SIZE,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        diagnose: Callable[[str], str | None] | None = None,
    ) -> None:
        self._stub = stub
        self._address = address
        self._timeout = timeout
        self._page_size = page_size
        self._metadata = tuple(metadata)
        self._diagnose = diagnose

    def iter_devices(self, hostname: str = "") -> Iterator[ops_pb2.Device]:
        """Yield every device (with this hostname, if given), following pages."""
        token = ""
        while True:
            request = ops_pb2.ListDevicesRequest(
                page_size=self._page_size, page_token=token, hostname=hostname
            )
            response = self.call("ListDevices", request)
            yield from response.devices
            token = response.next_page_token
            if not token:
                return

    def iter_findings(self, device_id: str = "") -> Iterator[ops_pb2.Finding]:
        """Yield the findings of the fleet or of one device, following pages."""
        token = ""
        while True:
            request = ops_pb2.ListFindingsRequest(
                page_size=self._page_size, page_token=token, device_id=device_id
            )
            response = self.call("ListFindings", request)
            yield from response.findings
            token = response.next_page_token
            if not token:
                return

    def iter_audit_events(self, actor: str, limit: int) -> Iterator[ops_pb2.AuditEvent]:
        """Yield up to limit audit events, newest first, following pages."""
        token = ""
        remaining = limit
        while remaining > 0:
            request = ops_pb2.ListAuditEventsRequest(
                page_size=min(self._page_size, remaining),
                page_token=token,
                actor=actor,
            )
            response = self.call("ListAuditEvents", request)
            events = response.events[:remaining]
            yield from events
            remaining -= len(events)
            token = response.next_page_token
            if not token:
                return

    def list_remediations(
        self, request: ops_pb2.ListRemediationsRequest, limit: int
    ) -> tuple[list[ops_pb2.StoredRemediation], list[ops_pb2.RuleSummary]]:
        """Return up to limit records of the request's filters, following pages.

        The summaries, per rule, cover every record that matches the filters.
        """
        query = ops_pb2.ListRemediationsRequest()
        query.CopyFrom(request)
        remediations: list[ops_pb2.StoredRemediation] = []
        summaries: list[ops_pb2.RuleSummary] = []
        while True:
            query.page_size = min(self._page_size, limit - len(remediations))
            response = self.call("ListRemediations", query)
            if not summaries:
                summaries = list(response.summaries)
            remediations.extend(response.remediations[: limit - len(remediations)])
            query.page_token = response.next_page_token
            if not query.page_token or len(remediations) >= limit:
                return remediations, summaries

    def get_device(self, device_id: str) -> ops_pb2.Device:
        """Return a device with every section, raising CliError for an unknown id."""
        request = ops_pb2.GetDeviceRequest(device_id=device_id)
        response = self.call("GetDevice", request)
        return response.device

    def resolve_device(self, id_or_hostname: str) -> ops_pb2.Device:
        """Return the full device with this id, or the only one with this hostname.

        Raises CliError for no match and AmbiguousHostnameError for several.
        """
        return self.get_device(self.resolve_device_id(id_or_hostname))

    def resolve_device_id(self, id_or_hostname: str) -> str:
        """Return the device id given, or the id of the only device with this hostname.

        A device id is returned as it is, for the collector to check. Raises
        CliError for no match and AmbiguousHostnameError for several.
        """
        device_id = canonical_uuid(id_or_hostname)
        if device_id:
            return device_id
        matches = list(self.iter_devices(hostname=id_or_hostname))
        if not matches:
            raise CliError(
                f"unknown device {id_or_hostname!r}: no device has that id or hostname"
            )
        if len(matches) > 1:
            raise AmbiguousHostnameError(id_or_hostname, matches)
        return matches[0].device_id

    def call(self, method: str, request: Message) -> Any:
        """Call an OpsService method by name, raising CliError if it fails."""
        function = getattr(self._stub, method)
        try:
            return function(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._translate(method, request, error) from error

    def _translate(
        self, method: str, request: Message, error: grpc.RpcError
    ) -> CliError:
        code = error.code()
        details = error.details() or "no details"
        if code == grpc.StatusCode.UNAVAILABLE:
            unavailable = self._translate_unavailable(details)
            if unavailable is not None:
                return unavailable
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(
                f"the collector at {self._address} did not respond to {method} within "
                f"{self._timeout:g} s; retry or raise --timeout"
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return CliError(
                f"the token was rejected: {details}; check --token-file or "
                f"{TOKEN_FILE_ENV}"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return CliError(f"permission denied: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return self._not_found(request, details)
        if code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        ):
            return CliError(f"the collector rejected {method}: {details}")
        return CliError(f"{method} failed: {code.name}: {details}")

    def _translate_unavailable(self, details: str) -> CliError | None:
        if _is_resolve_failure(details):
            return CliError(
                f"cannot resolve the host of the collector at {self._address} "
                f"({details}); check the host name or use an IP address"
            )
        if _is_refused(details) or not _is_connect_failure(details):
            explanation = None
        elif self._diagnose is not None:
            explanation = self._diagnose(details)
        else:
            explanation = None
        if explanation is not None:
            return CliError(explanation)
        if _is_connect_failure(details):
            return CliError(
                f"cannot reach the collector at {self._address} ({details}); "
                f"set its address with --collector HOST:PORT or {COLLECTOR_ENV}"
            )
        return None

    @staticmethod
    def _not_found(request: Message, details: str) -> CliError:
        if isinstance(request, ops_pb2.RevokeTokenRequest):
            return CliError(
                f"unknown token {request.name!r}: {details}; see `fleetmend token list`"
            )
        if isinstance(request, ops_pb2.ChangeRuleStateRequest):
            return CliError(
                f"unknown rule {request.name!r}: {details}; see `fleetmend rules`"
            )
        if isinstance(request, ops_pb2.SendCommandRequest):
            return CliError(f"the collector rejected SendCommand: {details}")
        device_id = getattr(request, "device_id", "")
        return CliError(f"unknown device {device_id}: {details}")


def _is_connect_failure(details: str) -> bool:
    # grpc core's wording for an address it cannot connect to, for example
    # "failed to connect to all addresses; last error: ... Connection refused".
    return "failed to connect" in details.lower()


def _is_refused(details: str) -> bool:
    return "connection refused" in details.lower()


def _is_resolve_failure(details: str) -> bool:
    # grpc core's wording for a host name it cannot resolve: "errors resolving
    # HOST:PORT: ..." from the EventEngine resolver, "DNS resolution failed for
    # HOST:PORT: ..." from older ones.
    lowered = details.lower()
    return "errors resolving" in lowered or "dns resolution failed" in lowered


def canonical_uuid(text: str) -> str:
    """Return text as a lowercase hyphenated UUID, or "" if it is not a UUID."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return ""


# Global options and argument types of every command


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # A subcommand's copy of an option must not overwrite a value given before
    # the command, so only the top-level parser sets defaults. The help texts
    # state the defaults literally, because %(default)s fails on SUPPRESS.
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--collector",
        metavar="HOST:PORT",
        default=default(None),
        help=(
            f"collector address (default: ${COLLECTOR_ENV}, else {DEFAULT_COLLECTOR})"
        ),
    )
    parser.add_argument(
        "--ca-file",
        metavar="FILE",
        default=default(None),
        help=(
            "CA certificate that the collector's TLS certificate must chain to, "
            f"the collector's ca.pem (default: ${CA_FILE_ENV})"
        ),
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help=(
            "file that contains the operator token on one line "
            f"(default: ${TOKEN_FILE_ENV})"
        ),
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=default(False),
        help="connect in plaintext, without TLS; only to a loopback address",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts instead of tables",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT_SECONDS),
        help=(
            f"deadline of each call, in seconds (default: {DEFAULT_TIMEOUT_SECONDS:g})"
        ),
    )
    parser.add_argument(
        "--page-size",
        type=_positive_int,
        metavar="N",
        default=default(DEFAULT_PAGE_SIZE),
        help=(
            "devices, findings, audit events or remediation records fetched "
            "per call "
            f"(default: {DEFAULT_PAGE_SIZE})"
        ),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds greater than 0, got {text!r}"
        )
    return value


def _device_reference(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty; give a device id or a hostname"
        )
    return text


def _utc_now() -> datetime:
    return datetime.now(UTC)
