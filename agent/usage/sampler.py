"""Sample which catalogued applications are in use at this moment.

An app is in use when a process with one of its names runs, or when an established
TCP connection goes to an address of one of its hosts. The sample is a set of app ids
and nothing else: no process names, pids, command lines, URLs or window titles are
kept or returned.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psutil

from agent import clock as clock_module
from agent.usage.catalog import CURRENT_OS, Catalog, OsName

if TYPE_CHECKING:
    from psutil._ntuples import pconn, sconn

logger = logging.getLogger(__name__)

RESOLVE_TTL_SECONDS = 3600.0
# A host that failed to resolve (offline laptop, VPN not up yet) is tried again
# sooner than a resolved one expires.
FAILED_RESOLVE_TTL_SECONDS = 300.0

GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]
ProcessIter = Callable[[list[str]], Iterable[psutil.Process]]
SystemConnections = Callable[[str], Iterable["sconn"]]

# Warnings that would otherwise repeat on every sample.
_logged_once: set[str] = set()


def _agent_monotonic() -> float:
    # Read at each call, so that a clock assigned to agent.clock.clock later,
    # as test launchers do, ages the cache too.
    return clock_module.clock.monotonic()


class HostResolver:
    """Resolves catalog host names to IP addresses and caches each result.

    A lookup that fails is logged once, until the host resolves again, and the host
    counts as having no addresses until the failure's cache entry expires. clock
    returns seconds for the cache's expiry, agent.clock's monotonic clock by
    default.
    """

    def __init__(
        self,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
        clock: Callable[[], float] | None = None,
        ttl_seconds: float = RESOLVE_TTL_SECONDS,
        failure_ttl_seconds: float = FAILED_RESOLVE_TTL_SECONDS,
    ) -> None:
        self._getaddrinfo = getaddrinfo
        self._clock = _agent_monotonic if clock is None else clock
        self._ttl_seconds = ttl_seconds
        self._failure_ttl_seconds = failure_ttl_seconds
        # host -> (expiry on the clock, addresses)
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._failing: set[str] = set()

    def addresses(self, host: str) -> frozenset[str]:
        """Return the IP addresses of host, from the cache while it is fresh."""
        now = self._clock()
        cached = self._cache.get(host)
        if cached is not None and now < cached[0]:
            return cached[1]

        try:
            infos = self._getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            self._record_failure(host, exc)
            self._cache[host] = (now + self._failure_ttl_seconds, frozenset())
            return frozenset()

        if host in self._failing:
            self._failing.discard(host)
            logger.info("catalog host %s resolves again", host)
        # Each info is (family, type, proto, canonname, sockaddr), and sockaddr[0]
        # is the address for both IPv4 and IPv6.
        normalized = (_normalize_address(str(info[4][0])) for info in infos)
        addresses = frozenset(filter(None, normalized))
        self._cache[host] = (now + self._ttl_seconds, addresses)
        return addresses

    def _record_failure(self, host: str, exc: Exception) -> None:
        if host in self._failing:
            return
        # The first failing host is a warning; on a machine without DNS every
        # host fails, so the others are logged at debug level only.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing.add(host)
        logger.log(
            level,
            "cannot resolve catalog host %s (%s); connections to it are not "
            "counted until it resolves",
            host,
            exc,
        )


def sample_running_apps(
    catalog: Catalog,
    resolver: HostResolver | None,
    process_iter: ProcessIter = psutil.process_iter,
    connections: SystemConnections = psutil.net_connections,
    os_name: OsName | None = CURRENT_OS,
) -> set[str]:
    """Return the ids of the catalog apps in use at this moment.

    os_name selects the catalog's process names. With None (an OS the catalog does
    not know) only hosts are matched. With resolver None, hosts are not matched
    and no host name is looked up. When the system-wide connection list is denied
    or fails, each process's own connections are read instead, and a process that
    exits or denies access is skipped.
    """
    process_index = catalog.process_index(os_name) if os_name is not None else {}
    address_index = _address_index(catalog, resolver) if resolver is not None else {}

    remote_addresses: set[str] = set()
    read_per_process = False
    if address_index:
        system_wide = _system_remote_addresses(connections)
        read_per_process = system_wide is None
        remote_addresses = system_wide or set()

    in_use: set[str] = set()
    if process_index or read_per_process:
        for process in process_iter(["name"]):
            in_use |= _match_process_name(process, process_index)
            if read_per_process:
                remote_addresses |= _process_remote_addresses(process)

    for address in remote_addresses:
        in_use |= address_index.get(address, frozenset())
    logger.debug("apps in use: %s", sorted(in_use))
    return in_use


def _address_index(catalog: Catalog, resolver: HostResolver) -> dict[str, set[str]]:
    index: dict[str, set[str]] = {}
    for host, app_ids in catalog.host_index().items():
        for address in resolver.addresses(host):
            index.setdefault(address, set()).update(app_ids)
    return index


def _match_process_name(
    process: psutil.Process, process_index: dict[str, frozenset[str]]
) -> frozenset[str]:
    # process_iter(["name"]) fills info, with None where the name was not readable.
    name = process.info.get("name")
    if not isinstance(name, str):
        return frozenset()
    return process_index.get(name.lower(), frozenset())


def _system_remote_addresses(connections: SystemConnections) -> set[str] | None:
    """Return the remote addresses of all established TCP connections.

    Returns None when the OS denies the system-wide list, which macOS does to a user
    other than root.
    """
    try:
        return _remote_addresses(connections("tcp"))
    except psutil.AccessDenied:
        _warn_once(
            "connections-denied",
            "listing all TCP connections was denied; reading each process's "
            "connections instead, which misses processes of other users",
        )
    except (psutil.Error, OSError) as exc:
        _warn_once(
            "connections-failed",
            f"listing all TCP connections failed ({exc!r}); reading each "
            "process's connections instead",
        )
    return None


def _process_remote_addresses(process: psutil.Process) -> set[str]:
    try:
        return _remote_addresses(process.net_connections(kind="tcp"))
    except psutil.Error:
        # The process exited, or belongs to another user.
        return set()


def _remote_addresses(connections: Iterable[sconn | pconn]) -> set[str]:
    addresses: set[str] = set()
    for connection in connections:
        if connection.status != psutil.CONN_ESTABLISHED or not connection.raddr:
            continue
        address = _normalize_address(connection.raddr[0])
        if address is not None:
            addresses.add(address)
    return addresses


def _normalize_address(text: str) -> str | None:
    """Return the canonical text of an IP address, or None for anything else.

    An IPv4-mapped IPv6 address (a dual-stack socket talking IPv4) becomes the IPv4
    address, and an IPv6 zone ("%eth0") is dropped, so both sides compare equal.
    """
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def _warn_once(key: str, message: str) -> None:
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.warning("%s", message)
