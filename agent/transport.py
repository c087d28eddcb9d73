"""gRPC channels to the collector and one-line reasons for TLS failures.

gRPC reports a failed TLS handshake as UNAVAILABLE with OpenSSL's error text,
which does not say whether the certificate came from another CA, expired or
names another host. ``explain_tls_failure`` repeats the handshake with the
``ssl`` module, the same CA file and the same server name, which returns the
certificate verification error. That handshake sends only a ClientHello, so
nothing reaches the collector when verification fails.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Sequence

import grpc

# OpenSSL X509_V_ERR_* codes that ssl.SSLCertVerificationError.verify_code carries.
# 7 is a signature failure, which a certificate from another CA with the same
# subject name as the expected CA gives.
_OTHER_CA_CODES = frozenset({2, 7, 18, 19, 20, 21, 27})
_EXPIRED_CODE = 10
_NOT_YET_VALID_CODE = 9
_HOSTNAME_MISMATCH_CODES = frozenset({62, 64})

PROBE_TIMEOUT_SECONDS = 5.0


def split_target(target: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets) into the bare host and the port."""
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback_target(target: str) -> bool:
    """Return True when target's host is localhost or a loopback address."""
    host, _ = split_target(target)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(
    target: str,
    *,
    root_certificates: bytes | None,
    insecure: bool,
    options: Sequence[tuple[str, int | str]] = (),
) -> grpc.Channel:
    """Open a TLS channel verified with root_certificates, or plaintext if insecure.

    Plaintext is for loopback targets only; any other target raises ValueError.
    root_certificates None means the system's trusted CAs.
    """
    if insecure:
        if not is_loopback_target(target):
            raise ValueError(
                f"--insecure (plaintext) is allowed only for a loopback collector, "
                f"not {target}; use TLS with --ca-file"
            )
        return grpc.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(target, credentials, options=list(options))


# Fragments of grpcio 1.85's UNAVAILABLE details for a failed TLS handshake,
# and for a TLS server that closes a plaintext connection.
_HANDSHAKE_DETAILS = ("handshake failed", "hostname verification", "socket closed")


def is_handshake_failure(exc: grpc.RpcError) -> bool:
    """Return True when gRPC's error looks like a failed TLS or plaintext setup."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code == grpc.StatusCode.UNAVAILABLE and any(
        fragment in details.lower() for fragment in _HANDSHAKE_DETAILS
    )


def _verify_reason(exc: ssl.SSLCertVerificationError, target: str) -> str:
    code = exc.verify_code
    message = exc.verify_message or exc.reason or str(exc)
    if code in _OTHER_CA_CODES:
        return (
            f"the certificate of {target} is not signed by the CA in the CA file "
            f"({message}); get the collector's ca.pem and pass it with --ca-file"
        )
    if code == _EXPIRED_CODE:
        return (
            f"the certificate of {target} has expired ({message}); renew it with "
            "fleetmend-collector init --renew"
        )
    if code == _NOT_YET_VALID_CODE:
        return (
            f"the certificate of {target} is not valid yet ({message}); check the "
            "clocks of this computer and of the collector"
        )
    if code in _HOSTNAME_MISMATCH_CODES:
        return (
            f"the certificate of {target} is issued for another name ({message}); "
            "connect with a name the certificate lists, or renew it with "
            "fleetmend-collector init --renew --name"
        )
    return f"the certificate of {target} failed verification ({message})"


def explain_tls_failure(
    target: str, ca_file_data: bytes | None, *, insecure: bool
) -> str | None:
    """Return one line saying why a TLS (or plaintext) connection to target failed.

    For TLS, handshake with the same CA and server name; for plaintext, check
    whether the port expects TLS. None when the handshake works, so that the
    failure lies elsewhere and the gRPC details are the better message.
    """
    host, port = split_target(target)
    try:
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS)
    except OSError as exc:
        return f"cannot connect to {target}: {exc.strerror or exc}"
    with raw:
        if insecure:
            return _explain_plaintext(raw, host, target)
        context = ssl.create_default_context()
        if ca_file_data is not None:
            context = ssl.create_default_context(cadata=ca_file_data.decode("ascii"))
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            return _verify_reason(exc, target)
        except ssl.SSLError as exc:
            return (
                f"{target} does not speak TLS ({exc.reason or exc}); is it a "
                "plaintext collector? Check the address and port"
            )
        except (ConnectionError, TimeoutError, OSError) as exc:
            return (
                f"{target} closed the connection during the TLS handshake "
                f"({exc.strerror or type(exc).__name__}); it may not speak TLS"
            )


def _explain_plaintext(raw: socket.socket, host: str, target: str) -> str | None:
    """Return a reason when target expects TLS, so that plaintext is refused."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(raw, server_hostname=host):
            pass
    except (ssl.SSLError, OSError):
        return None
    return (
        f"{target} expects TLS and refused plaintext; enroll with --ca-file "
        "instead of --insecure"
    )
