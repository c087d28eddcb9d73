"""Parsing of HOST:PORT addresses and the loopback check.

Shared by the collector's server and its CLI. This module imports only the
standard library, so that the CLI does not load the server's dependencies.
"""

from __future__ import annotations

import ipaddress
import re

MAX_PORT = 65535

# Host names and IPv4 addresses; IPv6 addresses go in brackets.
_HOST_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def split_host_port(address: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split HOST:PORT, or [IPV6]:PORT, into host and port.

    The host is a name or an IP address, without a scheme such as http://.
    The port runs from 1 to 65535, or from 0 with allow_port_zero. Raises
    ValueError naming the address and what is wrong with it.
    """
    if "://" in address:
        raise ValueError(
            f"{address!r} has a scheme; give HOST:PORT without it, "
            "such as 127.0.0.1:50051"
        )
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = _bracketed_ipv6(address, host)
    elif ":" in host:
        raise ValueError(
            f"{address!r} is not HOST:PORT; write an IPv6 address in brackets, "
            "as [::1]:50051"
        )
    elif not _HOST_PATTERN.fullmatch(host):
        raise ValueError(f"{address!r} is not HOST:PORT, such as 127.0.0.1:50051")
    lowest = 0 if allow_port_zero else 1
    if not (sep and port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{address!r} has no port; give HOST:PORT")
    port = int(port_text)
    if not lowest <= port <= MAX_PORT:
        raise ValueError(
            f"{address!r} has port {port}, outside {lowest} to {MAX_PORT}"
            + (" (0 picks a free port)" if allow_port_zero else "")
        )
    return host, port


def _bracketed_ipv6(address: str, host: str) -> str:
    bare = host[1:-1]
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        raise ValueError(
            f"{address!r} has {host}, which is not an IPv6 address"
        ) from None
    return bare


def is_loopback_host(host: str) -> bool:
    """Return True for localhost and for addresses in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
