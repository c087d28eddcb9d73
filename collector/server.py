"""The collector's asyncio gRPC server: AgentService, OpsService, health, reflection.

The server speaks TLS with the certificate of its TLS folder, or plaintext on
loopback when started with insecure=True. A certificate renewed in the folder
goes to the connections accepted after the renewal, without a restart. Agents
and operators authenticate the same way over both. ``start_server_thread``
runs a server on a background event loop for tests, benchmarks and the demo.
``serve`` runs one in the foreground until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import make_url

from collector import tls
from collector._address import is_loopback_host, split_host_port
from collector._authz import OPS_SERVICE, OpsAuthInterceptor
from collector._enroll import EnrollServicer
from collector._ingest import AGENT_SERVICE, AgentServicer, Batcher, utc_now
from collector._limits import (
    DEFAULT_ENROLL_BURST,
    DEFAULT_ENROLLS_PER_MINUTE,
    FleetLimitsWorker,
    IngestLimits,
)
from collector._ops import OpsServicer
from collector.store import Store
from fleetmend.v1 import ops_pb2_grpc

logger = logging.getLogger(__name__)

# Default largest message the collector accepts. A full report of a laptop is
# a few kilobytes, so this leaves room for any real one.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_TOUCH_INTERVAL_SECONDS = 60.0
# Agents ping every 20 s, so a minimum of half that never counts their pings
# as strikes.
DEFAULT_MIN_PING_INTERVAL_SECONDS = 10.0
# Pings faster than the minimum that the server accepts on a connection before
# it closes the connection with GOAWAY too_many_pings. 2 is gRPC's default.
MAX_PING_STRIKES = 2
# How often a running server rereads its certificate files if they changed and
# checks the expiry of the certificate in service again.
EXPIRY_CHECK_INTERVAL_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class ServerSettings:
    """Transport and ingest limits of a collector, with the serve defaults."""

    # A larger message ends its stream with RESOURCE_EXHAUSTED.
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Shortest interval between client pings on a connection without data.
    min_ping_interval_seconds: float = DEFAULT_MIN_PING_INTERVAL_SECONDS
    # How often the last-seen time of devices with an open stream is updated.
    touch_interval_seconds: float = DEFAULT_TOUCH_INTERVAL_SECONDS
    limits: IngestLimits = field(default_factory=IngestLimits)
    # Enroll calls per minute per source address (the IP address without the
    # port), and how many may come at once. A rate of 0 turns the limit off.
    enroll_per_minute: float = DEFAULT_ENROLLS_PER_MINUTE
    enroll_burst: int = DEFAULT_ENROLL_BURST

    def __post_init__(self) -> None:
        if not math.isfinite(self.enroll_per_minute) or self.enroll_per_minute < 0:
            raise ValueError(
                f"enroll_per_minute must be 0 or more, got {self.enroll_per_minute}"
            )
        if self.enroll_burst < 1:
            raise ValueError(
                f"enroll_burst must be at least 1, got {self.enroll_burst}"
            )


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Return the gRPC channel arguments of a server with these settings."""
    return [
        # Off, so that a second collector on the same port fails to start
        # instead of silently sharing the agents' connections.
        ("grpc.so_reuseport", 0),
        # A connection that has not finished its TLS and HTTP/2 handshake
        # within 10 s is closed (gRPC's default is 120 s), so that idle
        # sockets cannot use up the process's file descriptors.
        ("grpc.server_handshake_timeout_ms", 10_000),
        # One agent needs one stream and an operator's CLI a few calls at
        # once; 100 per connection bounds what one connection can hold.
        ("grpc.max_concurrent_streams", 100),
        # NOTE: gRPC rejects a larger message before the handler reads it, so
        # the collector cannot log which device sent it. The agent gets
        # RESOURCE_EXHAUSTED with both sizes in the details.
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Agents keep their streams open for days. The server pings a
        # connection after 60 s without traffic to find dead peers.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Agents ping while no call is open too, between reconnects.
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            round(settings.min_ping_interval_seconds * 1000),
        ),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


def redact_database_url(url: str) -> str:
    """Return url with its password masked, for logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL must still be loggable
        return "<unparsable database URL>"


def split_listen_address(listen: str) -> tuple[str, int]:
    """Split HOST:PORT (or [IPV6]:PORT) into host and port.

    Port 0 picks a free port. Raises ValueError naming the address and what is
    wrong with it.
    """
    try:
        return split_host_port(listen, allow_port_zero=True)
    except ValueError as error:
        raise ValueError(f"invalid listen address: {error}") from None


def check_plaintext_allowed(listen: str, *, insecure: bool) -> None:
    """Raise ValueError unless listen is a valid HOST:PORT for this mode.

    insecure (plaintext) is allowed on loopback addresses only. TLS is allowed
    on any address.
    """
    host, _ = split_listen_address(listen)
    if insecure and not is_loopback_host(host):
        raise ValueError(
            f"plaintext gRPC (--insecure) may listen on loopback only, not on "
            f"{host}; leave out --insecure to serve TLS"
        )


def describe_bind_failure(host: str, port: int) -> str:
    """Return why listening on host:port fails, with advice, for an error message.

    gRPC reports a failed bind without its cause, so this binds a plain socket
    to the same address and reports the operating system's error.
    """
    try:
        addresses = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return f"cannot resolve {host}: {error.strerror}"
    family, kind, protocol, _, socket_address = addresses[0]
    with socket.socket(family, kind, protocol) as probe:
        if os.name != "nt":
            # gRPC sets SO_REUSEADDR too, so a port in TIME_WAIT is no cause.
            # On Windows the option would allow binding a port in use.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(socket_address)
        except OSError as error:
            return _bind_advice(error)
    return "gRPC gave no reason, and a test bind of the same address succeeded"


def _bind_advice(error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        return (
            f"{reason}; another process listens on that port, so stop it or "
            "choose another port"
        )
    if error.errno == errno.EACCES:
        return (
            f"{reason}; ports below 1024 need root or CAP_NET_BIND_SERVICE, so "
            "choose a port from 1024 up"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{reason}; the host is not an address of this machine"
    return reason


class CollectorServer:
    """The aio server with its store, batcher, fleet limits and last-seen updater.

    Create it on the event loop that will run it. start() binds the port, and
    stop() shuts everything down in order. tls_dir contains the certificate
    and key that TLS serves, reread when they change, and the enrollment
    secret, which Enroll reads in both modes.
    """

    def __init__(
        self,
        store: Store,
        listen: str,
        *,
        tls_dir: Path,
        insecure: bool,
        clock: Callable[[], datetime] = utc_now,
        settings: ServerSettings | None = None,
    ) -> None:
        check_plaintext_allowed(listen, insecure=insecure)
        self._settings = settings or ServerSettings()
        self._store = store
        self._listen = listen
        self._tls_dir = Path(tls_dir)
        self._insecure = insecure
        self._clock = clock
        # After a state change, the fleet limits send the changed effective
        # policy to every open stream.
        self._fleet_limits = FleetLimitsWorker(
            store, clock, on_changed=self._notify_policy_changed
        )
        self._batcher = Batcher(
            store, on_remediations=lambda _result: self._fleet_limits.request()
        )
        self._agents = AgentServicer(
            store, self._batcher, clock=clock, limits=self._settings.limits
        )
        self._enroller = EnrollServicer(
            store,
            self._tls_dir,
            clock=clock,
            enrolls_per_minute=self._settings.enroll_per_minute,
            burst=self._settings.enroll_burst,
        )
        self._health = health.aio.HealthServicer()
        self._server = grpc.aio.server(
            options=server_options(self._settings),
            interceptors=(OpsAuthInterceptor(store, clock),),
        )
        self._toucher: asyncio.Task[None] | None = None
        self._expiry_checker: asyncio.Task[None] | None = None
        self._certificates: tls.ServerCertificateReloader | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """HOST:PORT that clients connect to, with the bound port."""
        host, _ = split_listen_address(self._listen)
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def _notify_policy_changed(self) -> None:
        self._agents.notify_policy_changed()

    @property
    def agents(self) -> AgentServicer:
        """The AgentService servicer, which tracks the open streams."""
        return self._agents

    async def start(self) -> None:
        """Bind the listen address and start serving.

        Raises tls.TLSSetupError when TLS is on and the TLS folder's
        certificate or key cannot be loaded, and OSError when the address
        cannot be bound.
        """
        credentials = None
        if not self._insecure:
            self._certificates = tls.ServerCertificateReloader(self._tls_dir)
            credentials = self._certificates.credentials()
        self._server.add_generic_rpc_handlers(
            (self._agents.rpc_handler(enroll=self._enroller.method_handler()),)
        )
        ops_pb2_grpc.add_OpsServiceServicer_to_server(
            OpsServicer(self._store, self._clock, streams=self._agents), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        services = (AGENT_SERVICE, OPS_SERVICE, health.SERVICE_NAME)
        reflection.enable_server_reflection(
            (*services, reflection.SERVICE_NAME), self._server
        )
        for name in ("", AGENT_SERVICE, OPS_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(self._listen)
            else:
                self.port = self._server.add_secure_port(self._listen, credentials)
        except RuntimeError as error:
            raise self._bind_error() from error
        if self.port == 0:
            raise self._bind_error()
        self._batcher.start()
        self._fleet_limits.start()
        await self._server.start()
        self._toucher = asyncio.create_task(self._touch_open_streams())
        self._log_listening()
        self._log_settings()
        if self._certificates is not None:
            self._expiry_checker = asyncio.create_task(
                self._check_expiry(self._certificates)
            )

    def _log_listening(self) -> None:
        if self._certificates is None:
            logger.info(
                "collector listening on %s (plaintext); enrollment secret in %s",
                self.address,
                self._tls_dir,
            )
            return
        certificate = self._certificates.certificate
        logger.info(
            "collector listening on %s (TLS), certificate %s valid until %s",
            self.address,
            self._tls_dir / tls.SERVER_CERT_FILENAME,
            certificate.not_valid_after_utc.isoformat(),
        )
        self._warn_if_expiring(certificate)

    def _warn_if_expiring(self, certificate: x509.Certificate) -> None:
        not_after = certificate.not_valid_after_utc
        warning = tls.expiry_warning(not_after, self._clock(), directory=self._tls_dir)
        if warning is None:
            logger.debug(
                "the server certificate in service is valid until %s",
                not_after.isoformat(),
            )
        else:
            logger.warning("%s", warning)

    async def _check_expiry(self, certificates: tls.ServerCertificateReloader) -> None:
        # The check rereads changed files itself, so that it finds a renewal
        # even when no connection has come in since.
        while True:
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL_SECONDS)
            certificate = await asyncio.to_thread(certificates.refresh)
            self._warn_if_expiring(certificate)

    def _log_settings(self) -> None:
        limits = self._settings.limits
        rate = "no rate limit"
        if limits.reports_per_second:
            rate = (
                f"{limits.reports_per_second:g} reports per second per device "
                f"(burst {limits.report_burst})"
            )
        enroll_rate = "no enrollment rate limit"
        if self._settings.enroll_per_minute:
            enroll_rate = (
                f"{self._settings.enroll_per_minute:g} enrollments per minute per "
                f"address (burst {self._settings.enroll_burst})"
            )
        logger.info(
            "limits: messages up to %d bytes, %s, %s, clock skew limit %g s, "
            "maximum report age %g days",
            self._settings.max_message_bytes,
            rate,
            enroll_rate,
            limits.clock.skew_limit.total_seconds(),
            limits.clock.max_report_age / timedelta(days=1),
        )

    def _bind_error(self) -> OSError:
        host, port = split_listen_address(self._listen)
        reason = describe_bind_failure(host, port)
        return OSError(f"could not bind the listen address {self._listen}: {reason}")

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop accepting calls, ack what streams queued, then close the store.

        Each open stream stops reading, waits for the commit of every report it
        has queued, acknowledges them and ends with UNAVAILABLE. Open calls get
        up to grace_seconds to finish before they are cancelled; reports of a
        cancelled stream are still committed, but not acknowledged.
        """
        logger.info("collector on %s stopping", self.address)
        await self._health.enter_graceful_shutdown()
        self._agents.begin_shutdown()
        await self._server.stop(grace_seconds)
        for task in (self._toucher, self._expiry_checker):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._batcher.close()
        await self._fleet_limits.close()
        await self._agents.close_deliveries()
        await asyncio.to_thread(self._store.close)
        logger.info("collector on %s stopped", self.address)

    async def _touch_open_streams(self) -> None:
        while True:
            await asyncio.sleep(self._settings.touch_interval_seconds)
            self._agents.flush_logs()
            device_ids = self._agents.open_device_ids()
            if not device_ids:
                continue
            try:
                await asyncio.to_thread(self._store.touch, device_ids, self._clock())
            except Exception:
                logger.exception(
                    "updating the last-seen time of %d devices failed", len(device_ids)
                )


def open_store(database_url: str) -> Store:
    """Open the store, apply pending migrations and log which were applied."""
    store = Store.open(database_url)
    try:
        applied = store.migrate()
    except BaseException:
        store.close()
        raise
    if applied:
        logger.info("database migrated: applied %s", ", ".join(applied))
    else:
        logger.info("database schema is up to date")
    return store


@dataclass
class ServerHandle:
    """Handle of a collector on a background thread, made by start_server_thread."""

    port: int
    address: str
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _server: CollectorServer

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop the server and wait for its thread to end."""
        if not self._thread.is_alive():
            return
        stopping = asyncio.run_coroutine_threadsafe(
            self._server.stop(grace_seconds), self._loop
        )
        try:
            stopping.result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


def start_server_thread(
    database_url: str,
    listen: str = "127.0.0.1:0",
    *,
    tls_dir: Path,
    insecure: bool = False,
    clock: Callable[[], datetime] = utc_now,
    touch_interval_seconds: float | None = None,
    settings: ServerSettings | None = None,
) -> ServerHandle:
    """Migrate the store, start a collector on a background thread, return its handle.

    touch_interval_seconds, if given, replaces the one in settings. The thread
    runs its own event loop until handle.stop(). Errors from opening the store,
    loading the TLS folder or binding the address are raised here.
    """
    check_plaintext_allowed(listen, insecure=insecure)
    settings = settings or ServerSettings()
    if touch_interval_seconds is not None:
        settings = replace(settings, touch_interval_seconds=touch_interval_seconds)
    logger.info("collector database: %s", redact_database_url(database_url))
    store = open_store(database_url)
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[CollectorServer] = concurrent.futures.Future()
    thread = threading.Thread(
        target=_run_loop,
        args=(loop, store, listen, Path(tls_dir), insecure, clock, settings, started),
        name=f"fleetmend-collector {listen}",
        daemon=True,
    )
    thread.start()
    try:
        server = started.result()
    except BaseException:
        thread.join()
        store.close()
        raise
    return ServerHandle(server.port, server.address, loop, thread, server)


def _run_loop(
    loop: asyncio.AbstractEventLoop,
    store: Store,
    listen: str,
    tls_dir: Path,
    insecure: bool,
    clock: Callable[[], datetime],
    settings: ServerSettings,
    started: concurrent.futures.Future[CollectorServer],
) -> None:
    asyncio.set_event_loop(loop)

    async def start() -> CollectorServer:
        server = CollectorServer(
            store,
            listen,
            tls_dir=tls_dir,
            insecure=insecure,
            clock=clock,
            settings=settings,
        )
        await server.start()
        return server

    try:
        server = loop.run_until_complete(start())
    except BaseException as error:
        started.set_exception(error)
        loop.close()
        return
    started.set_result(server)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def serve(
    database_url: str,
    listen: str,
    *,
    tls_dir: Path,
    insecure: bool,
    grace_seconds: float = 5.0,
    settings: ServerSettings | None = None,
    ready: Callable[[CollectorServer], None] | None = None,
) -> None:
    """Migrate the store and serve until SIGTERM or SIGINT, then stop gracefully.

    ready, if given, is called once the server listens. Raises ValueError for
    --insecure on a non-loopback address, tls.TLSSetupError for a TLS folder
    that cannot be loaded, and OSError when the address cannot be bound.
    """
    check_plaintext_allowed(listen, insecure=insecure)
    logger.info("collector database: %s", redact_database_url(database_url))
    store = await asyncio.to_thread(open_store, database_url)
    try:
        server = CollectorServer(
            store, listen, tls_dir=tls_dir, insecure=insecure, settings=settings
        )
        await server.start()
    except BaseException:
        store.close()
        raise
    if ready is not None:
        ready(server)
    stop_requested = asyncio.Event()
    restore = _install_stop_handlers(stop_requested)
    try:
        await stop_requested.wait()
    finally:
        restore()
        await server.stop(grace_seconds)


def _install_stop_handlers(event: asyncio.Event) -> Callable[[], None]:
    """Set event on SIGTERM or SIGINT, and return a function that removes this."""
    loop = asyncio.get_running_loop()
    signals = [signal.SIGTERM, signal.SIGINT]

    def request_stop(signum: int) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        event.set()

    try:
        for signum in signals:
            loop.add_signal_handler(signum, request_stop, signum)
    except NotImplementedError:
        # The Windows event loops have no add_signal_handler.
        return _install_plain_signal_handlers(loop, signals, request_stop)

    def remove() -> None:
        for signum in signals:
            loop.remove_signal_handler(signum)

    return remove


def _install_plain_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    signals: list[signal.Signals],
    request_stop: Callable[[int], None],
) -> Callable[[], None]:
    def handle(signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(request_stop, signum)

    previous = {signum: signal.signal(signum, handle) for signum in signals}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore
