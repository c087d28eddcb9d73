from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.usage.catalog import Catalog, load_catalog
from agent.usage.sampler import HostResolver, sample_running_apps

# A loopback address other than 127.0.0.1, so that other loopback traffic on the
# machine does not match. Linux routes all of 127.0.0.0/8 to lo.
SERVER_ADDRESS = "127.77.0.5"
MADE_UP_HOST = "sap.example.test"

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="copies /bin/sleep and binds 127/8"
)


class FakeDns:
    """A getaddrinfo that returns addresses from a table and fails for other names."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.queries: list[str] = []

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        self.queries.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, 0),
            )
            for address in self.table[host]
        ]


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def catalog_from(tmp_path: Path, text: str) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    return load_catalog([path], include_default=False)


def wait_for_name(pid: int, name: str, timeout_seconds: float = 5.0) -> None:
    """Wait until the child has exec'd, which Popen does not wait for."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if psutil.Process(pid).name() == name:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never got the name {name!r}")


@pytest.fixture
def start_named_process(
    tmp_path: Path,
) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        executable = tmp_path / name
        shutil.copy("/bin/sleep", executable)
        process = subprocess.Popen([str(executable), "60"])
        started.append(process)
        wait_for_name(process.pid, name)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture
def loopback_server() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((SERVER_ADDRESS, 0))
    server.listen()
    yield server
    server.close()


def connect(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(server.getsockname(), timeout=5)
    accepted, _ = server.accept()
    return client, accepted


SAP_BY_PROCESS = """
[apps.sapgui]
name = "SAP GUI"
processes.linux = ["Fake-SAPGUI"]
processes.windows = ["fake-sapgui.exe"]
"""

SAP_BY_HOST = f"""
[apps.sap-web]
name = "SAP web"
hosts = ["{MADE_UP_HOST}"]
"""


@linux_only
def test_process_name_match(
    tmp_path: Path, start_named_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_PROCESS)
    start_named_process("fake-sapgui")

    in_use = sample_running_apps(catalog, HostResolver(FakeDns({})), os_name="linux")

    assert in_use == {"sapgui"}


@linux_only
def test_process_exit_ends_match(
    tmp_path: Path, start_named_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_PROCESS)
    process = start_named_process("fake-sapgui")
    process.kill()
    process.wait()

    in_use = sample_running_apps(catalog, HostResolver(FakeDns({})), os_name="linux")

    assert in_use == set()


@linux_only
def test_process_name_over_15_chars(
    tmp_path: Path, start_named_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    # The kernel truncates a process name to 15 characters; psutil restores the
    # full name from the command line.
    catalog = catalog_from(
        tmp_path,
        '[apps.long]\nname = "Long"\nprocesses.linux = ["fake-expense-reporter"]\n',
    )
    start_named_process("fake-expense-reporter")

    in_use = sample_running_apps(catalog, HostResolver(FakeDns({})), os_name="linux")

    assert in_use == {"long"}


@linux_only
def test_process_names_of_other_os_ignored(
    tmp_path: Path, start_named_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    catalog = catalog_from(
        tmp_path,
        '[apps.sapgui]\nname = "SAP GUI"\nprocesses.windows = ["fake-sapgui.exe"]\n',
    )
    start_named_process("fake-sapgui")

    in_use = sample_running_apps(catalog, HostResolver(FakeDns({})), os_name="linux")

    assert in_use == set()


@linux_only
def test_unknown_os_skips_process_names(
    tmp_path: Path, start_named_process: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_PROCESS)
    start_named_process("fake-sapgui")

    in_use = sample_running_apps(catalog, HostResolver(FakeDns({})), os_name=None)

    assert in_use == set()


@linux_only
def test_host_match_established_connection(
    tmp_path: Path, loopback_server: socket.socket
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_HOST)
    resolver = HostResolver(FakeDns({MADE_UP_HOST: [SERVER_ADDRESS]}))

    before = sample_running_apps(catalog, resolver)
    client, accepted = connect(loopback_server)
    during = sample_running_apps(catalog, resolver)
    client.close()
    accepted.close()
    after = sample_running_apps(catalog, resolver)

    assert before == set()
    assert during == {"sap-web"}
    assert after == set()


@linux_only
def test_host_match_ipv4_mapped_address(
    tmp_path: Path, loopback_server: socket.socket
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_HOST)
    resolver = HostResolver(FakeDns({MADE_UP_HOST: [f"::ffff:{SERVER_ADDRESS}"]}))
    client, accepted = connect(loopback_server)

    try:
        in_use = sample_running_apps(catalog, resolver)
    finally:
        client.close()
        accepted.close()

    assert in_use == {"sap-web"}


@linux_only
def test_host_match_after_access_denied(
    tmp_path: Path, loopback_server: socket.socket
) -> None:
    def denied(kind: str) -> list[Any]:
        raise psutil.AccessDenied()

    catalog = catalog_from(tmp_path, SAP_BY_HOST)
    resolver = HostResolver(FakeDns({MADE_UP_HOST: [SERVER_ADDRESS]}))
    client, accepted = connect(loopback_server)

    try:
        in_use = sample_running_apps(catalog, resolver, connections=denied)
    finally:
        client.close()
        accepted.close()

    assert in_use == {"sap-web"}


@linux_only
def test_host_match_after_os_error(
    tmp_path: Path, loopback_server: socket.socket
) -> None:
    def failing(kind: str) -> list[Any]:
        raise OSError(5, "Input/output error")

    catalog = catalog_from(tmp_path, SAP_BY_HOST)
    resolver = HostResolver(FakeDns({MADE_UP_HOST: [SERVER_ADDRESS]}))
    client, accepted = connect(loopback_server)

    try:
        in_use = sample_running_apps(catalog, resolver, connections=failing)
    finally:
        client.close()
        accepted.close()

    assert in_use == {"sap-web"}


@linux_only
def test_unresolvable_host_skipped(
    tmp_path: Path, loopback_server: socket.socket
) -> None:
    catalog = catalog_from(
        tmp_path,
        SAP_BY_HOST + '\n[apps.gone]\nname = "Gone"\nhosts = ["gone.example.test"]\n',
    )
    resolver = HostResolver(FakeDns({MADE_UP_HOST: [SERVER_ADDRESS]}))
    client, accepted = connect(loopback_server)

    try:
        in_use = sample_running_apps(catalog, resolver)
    finally:
        client.close()
        accepted.close()

    assert in_use == {"sap-web"}


@linux_only
def test_process_and_host_together(
    tmp_path: Path,
    start_named_process: Callable[[str], subprocess.Popen[bytes]],
    loopback_server: socket.socket,
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_PROCESS + SAP_BY_HOST)
    resolver = HostResolver(FakeDns({MADE_UP_HOST: [SERVER_ADDRESS]}))
    start_named_process("fake-sapgui")
    client, accepted = connect(loopback_server)

    try:
        in_use = sample_running_apps(catalog, resolver, os_name="linux")
    finally:
        client.close()
        accepted.close()

    assert in_use == {"sapgui", "sap-web"}


def test_no_resolver_skips_hosts(
    tmp_path: Path, loopback_server: socket.socket
) -> None:
    catalog = catalog_from(tmp_path, SAP_BY_HOST)

    client, accepted = connect(loopback_server)
    try:
        in_use = sample_running_apps(catalog, None)
    finally:
        client.close()
        accepted.close()

    assert in_use == set()


def test_only_first_failing_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    resolver = HostResolver(FakeDns({}))

    with caplog.at_level(logging.DEBUG, logger="agent.usage.sampler"):
        resolver.addresses("one.example.invalid")
        resolver.addresses("two.example.invalid")

    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]


def test_default_catalog_sample_returns_ids() -> None:
    catalog = load_catalog()
    resolver = HostResolver(FakeDns({host: [] for host in catalog.host_index()}))

    in_use = sample_running_apps(catalog, resolver)

    assert in_use <= catalog.app_ids


def test_resolver_caches_until_ttl() -> None:
    dns = FakeDns({MADE_UP_HOST: [SERVER_ADDRESS]})
    clock = FakeMonotonic()
    resolver = HostResolver(dns, clock=clock, ttl_seconds=3600)

    first = resolver.addresses(MADE_UP_HOST)
    clock.now += 3599
    resolver.addresses(MADE_UP_HOST)
    queries_within_ttl = len(dns.queries)
    clock.now += 1
    resolver.addresses(MADE_UP_HOST)

    assert first == frozenset({SERVER_ADDRESS})
    assert queries_within_ttl == 1
    assert len(dns.queries) == 2


def test_resolver_caches_failure() -> None:
    dns = FakeDns({})
    clock = FakeMonotonic()
    resolver = HostResolver(dns, clock=clock, failure_ttl_seconds=300)

    first = resolver.addresses(MADE_UP_HOST)
    clock.now += 299
    resolver.addresses(MADE_UP_HOST)
    queries_within_ttl = len(dns.queries)
    clock.now += 1
    resolver.addresses(MADE_UP_HOST)

    assert first == frozenset()
    assert queries_within_ttl == 1
    assert len(dns.queries) == 2


def test_resolver_failure_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeMonotonic()
    resolver = HostResolver(FakeDns({}), clock=clock, failure_ttl_seconds=1)

    with caplog.at_level(logging.WARNING, logger="agent.usage.sampler"):
        for _ in range(3):
            resolver.addresses(MADE_UP_HOST)
            clock.now += 2

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert MADE_UP_HOST in warnings[0].getMessage()


def test_resolver_logs_again_after_recovery(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns({})
    clock = FakeMonotonic()
    resolver = HostResolver(dns, clock=clock, ttl_seconds=1, failure_ttl_seconds=1)

    with caplog.at_level(logging.WARNING, logger="agent.usage.sampler"):
        resolver.addresses(MADE_UP_HOST)
        dns.table[MADE_UP_HOST] = [SERVER_ADDRESS]
        clock.now += 2
        recovered = resolver.addresses(MADE_UP_HOST)
        del dns.table[MADE_UP_HOST]
        clock.now += 2
        resolver.addresses(MADE_UP_HOST)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert recovered == frozenset({SERVER_ADDRESS})
    assert len(warnings) == 2


def test_resolver_normalizes_addresses() -> None:
    dns = FakeDns({MADE_UP_HOST: ["::ffff:10.1.2.3", "fe80::1%eth0", "2001:DB8::1"]})

    addresses = HostResolver(dns).addresses(MADE_UP_HOST)

    assert addresses == frozenset({"10.1.2.3", "fe80::1", "2001:db8::1"})


def test_resolver_real_localhost() -> None:
    addresses = HostResolver().addresses("localhost")

    assert "127.0.0.1" in addresses
