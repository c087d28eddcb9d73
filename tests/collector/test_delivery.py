"""Delivery limits of the collector, through real channels on 127.0.0.1.

Covered: reports per second per device, message size, clock skew,
dropped-report totals and keepalive pings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from collector._limits import (
    DeviceRateLimiter,
    IngestLimits,
    LogThrottle,
    RateLimitLog,
)
from collector._validation import ClockLimits
from collector.server import (
    ServerHandle,
    ServerSettings,
    server_options,
    start_server_thread,
)
from collector.store import Store
from fleetmend.v1 import agent_pb2, ops_pb2, report_pb2
from tests.collector.test_server import (
    T0,
    AgentClient,
    Clock,
    Conversation,
    Enroller,
    acked,
    hello,
    new_device_id,
    ops_stub,
    report,
    run_failing_stream,
    run_stream,
)
from tests.trust import create_token

INGEST_LOGGER = "collector._ingest"
LIMITS_LOGGER = "collector._limits"


class Monotonic:
    """A monotonic clock in seconds that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def start(
    database_url: str,
    tls_dir: Path,
    *,
    clock: Clock | None = None,
    settings: ServerSettings | None = None,
) -> ServerHandle:
    # The enrollment limit is off, because tests enroll many devices at once.
    settings = replace(settings or ServerSettings(), enroll_per_minute=0)
    return start_server_thread(
        database_url,
        tls_dir=tls_dir,
        insecure=True,
        clock=clock or Clock(T0),
        settings=settings,
    )


def agent_client(
    channel: grpc.Channel, handle: ServerHandle, tls_dir: Path
) -> AgentClient:
    return AgentClient(channel, Enroller(handle.address, tls_dir))


@pytest.fixture
def reader(database_url: str) -> Iterator[Store]:
    store = Store.open(database_url)
    yield store
    store.close()


def stored(store: Store, device_id: str) -> ops_pb2.Device:
    device = store.get_device(device_id)
    assert device is not None
    return device


# Reports per second per device


def limited(burst: int, reports_per_second: float = 0.001) -> ServerSettings:
    # A rate this low refills no token while a test runs.
    limits = IngestLimits(reports_per_second=reports_per_second, report_burst=burst)
    return ServerSettings(limits=limits)


@pytest.fixture
def limited_server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start(database_url, tls_dir, settings=limited(burst=5))
    yield handle
    handle.stop()


@pytest.fixture
def agents(limited_server: ServerHandle, tls_dir: Path) -> Iterator[AgentClient]:
    with grpc.insecure_channel(limited_server.address) as channel:
        yield agent_client(channel, limited_server, tls_dir)


def test_rate_limit_exhausted(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    requests = [hello(device_id), *(report(n) for n in range(1, 9))]

    responses, error = run_failing_stream(agents.Connect(iter(requests), timeout=30))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "reports per second" in error.details()
    assert acked(responses)[-1] == 5
    assert reader.count_reports(device_id) == 5


def test_rate_limit_logs_device(
    agents: AgentClient, caplog: pytest.LogCaptureFixture
) -> None:
    device_id = new_device_id()
    requests = [hello(device_id), *(report(n) for n in range(1, 9))]

    with caplog.at_level(logging.WARNING, logger=LIMITS_LOGGER):
        run_failing_stream(agents.Connect(iter(requests), timeout=30))

    lines = [r.getMessage() for r in caplog.records if "rate limit" in r.getMessage()]
    assert len(lines) == 1
    assert device_id in lines[0]


def test_rate_limit_shared_by_streams(agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()
    first = run_stream(agents, [hello(device_id), report(1), report(2), report(3)])

    second = [hello(device_id), report(4), report(5), report(6)]
    responses, error = run_failing_stream(agents.Connect(iter(second), timeout=30))

    assert acked(first)[-1] == 3
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert acked(responses)[-1] == 5
    assert reader.count_reports(device_id) == 5


def test_rate_limit_per_device(agents: AgentClient, reader: Store) -> None:
    flooding = new_device_id()
    quiet = new_device_id()
    flood = [hello(flooding), *(report(n) for n in range(1, 9))]
    run_failing_stream(agents.Connect(iter(flood), timeout=30))

    responses = run_stream(agents, [hello(quiet), *(report(n) for n in range(1, 6))])

    assert acked(responses)[-1] == 5
    assert reader.count_reports(quiet) == 5


def test_rate_limit_off(database_url: str, tls_dir: Path, reader: Store) -> None:
    handle = start(
        database_url, tls_dir, settings=limited(burst=1, reports_per_second=0)
    )
    device_id = new_device_id()
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = agent_client(channel, handle, tls_dir)
            requests = [hello(device_id), *(report(n) for n in range(1, 51))]
            responses = run_stream(stub, requests)
    finally:
        handle.stop()

    assert acked(responses)[-1] == 50
    assert reader.count_reports(device_id) == 50


def test_limiter_burst_then_empty() -> None:
    limiter = DeviceRateLimiter(10, 3, Monotonic())

    results = [limiter.try_acquire("a") for _ in range(4)]

    assert results == [True, True, True, False]


def test_limiter_refills_at_rate() -> None:
    clock = Monotonic()
    limiter = DeviceRateLimiter(10, 3, clock)
    for _ in range(3):
        limiter.try_acquire("a")

    clock.now += 0.25

    assert [limiter.try_acquire("a") for _ in range(3)] == [True, True, False]


def test_limiter_refill_capped_at_burst() -> None:
    clock = Monotonic()
    limiter = DeviceRateLimiter(10, 3, clock)
    limiter.try_acquire("a")

    clock.now += 3600

    assert [limiter.try_acquire("a") for _ in range(4)] == [True, True, True, False]


def test_limiter_devices_apart() -> None:
    limiter = DeviceRateLimiter(10, 1, Monotonic())
    limiter.try_acquire("a")

    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("a")


def test_limiter_sweep_keeps_drained() -> None:
    clock = Monotonic()
    limiter = DeviceRateLimiter(0.001, 2, clock)
    limiter.try_acquire("drained")
    limiter.try_acquire("drained")
    limiter.try_acquire("full")
    clock.now += DeviceRateLimiter.SWEEP_INTERVAL_SECONDS + 1

    assert not limiter.try_acquire("drained")
    assert limiter.try_acquire("full")


def test_limiter_zero_rate_unlimited() -> None:
    limiter = DeviceRateLimiter(0, 1, Monotonic())

    assert all(limiter.try_acquire("a") for _ in range(100))


def test_limiter_seconds_until_available() -> None:
    clock = Monotonic()
    limiter = DeviceRateLimiter(0.5, 1, clock)

    unknown = limiter.seconds_until_available("a")
    limiter.try_acquire("a")
    drained = limiter.seconds_until_available("a")
    clock.now += 1.5
    later = limiter.seconds_until_available("a")

    assert unknown == 0
    assert drained == pytest.approx(2.0)
    assert later == pytest.approx(0.5)


def test_log_throttle_counts_held_back() -> None:
    clock = Monotonic()
    throttle = LogThrottle(interval_seconds=60, clock=clock)

    first = throttle.admit("10.0.0.5")
    held = [throttle.admit("10.0.0.5") for _ in range(3)]
    other = throttle.admit("10.0.0.6")
    clock.now += 60
    after_interval = throttle.admit("10.0.0.5")

    assert first == 0
    assert held == [None, None, None]
    assert other == 0
    assert after_interval == 3


def test_log_throttle_forgets_quiet_keys() -> None:
    clock = Monotonic()
    throttle = LogThrottle(interval_seconds=60, clock=clock)
    throttle.admit("10.0.0.5")
    throttle.admit("10.0.0.5")

    clock.now += 121
    throttle.admit("10.0.0.6")

    assert throttle.admit("10.0.0.5") == 0


def test_settings_reject_bad_enroll_limits() -> None:
    with pytest.raises(ValueError, match="enroll_per_minute"):
        ServerSettings(enroll_per_minute=-1)
    with pytest.raises(ValueError, match="enroll_burst"):
        ServerSettings(enroll_burst=0)


def rate_limit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LIMITS_LOGGER]


def test_limit_log_counts_repeats(caplog: pytest.LogCaptureFixture) -> None:
    clock = Monotonic()
    log = RateLimitLog(IngestLimits(), interval_seconds=60, clock=clock)

    with caplog.at_level(logging.WARNING, logger=LIMITS_LOGGER):
        log.rejected("dev-1", "ipv4:127.0.0.1:1")
        clock.now += 10
        log.rejected("dev-1", "ipv4:127.0.0.1:2")
        log.rejected("dev-1", "ipv4:127.0.0.1:3")
        before_interval = len(rate_limit_lines(caplog))
        clock.now += 60
        log.rejected("dev-1", "ipv4:127.0.0.1:4")

    lines = rate_limit_lines(caplog)
    assert before_interval == 1
    assert len(lines) == 2
    assert "dev-1" in lines[1]
    assert "3 more times" in lines[1]


def test_limit_log_flush_writes_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Monotonic()
    log = RateLimitLog(IngestLimits(), interval_seconds=60, clock=clock)

    with caplog.at_level(logging.WARNING, logger=LIMITS_LOGGER):
        log.rejected("dev-1", "peer")
        log.rejected("dev-1", "peer")
        log.flush()
        early = len(rate_limit_lines(caplog))
        clock.now += 61
        log.flush()

    lines = rate_limit_lines(caplog)
    assert early == 1
    assert len(lines) == 2
    assert "1 more times" in lines[1]


def test_limit_log_forgets_quiet(caplog: pytest.LogCaptureFixture) -> None:
    clock = Monotonic()
    log = RateLimitLog(IngestLimits(), interval_seconds=60, clock=clock)

    with caplog.at_level(logging.WARNING, logger=LIMITS_LOGGER):
        log.rejected("dev-1", "peer")
        clock.now += 61
        log.flush()
        log.rejected("dev-1", "peer")

    lines = rate_limit_lines(caplog)
    assert len(lines) == 2
    assert "ending its stream" in lines[1]


def test_limits_reject_negative_rate() -> None:
    with pytest.raises(ValueError, match="reports_per_second"):
        IngestLimits(reports_per_second=-1)


def test_limits_reject_zero_burst() -> None:
    with pytest.raises(ValueError, match="report_burst"):
        IngestLimits(report_burst=0)


# Maximum message size


def host_of_bytes(size: int) -> report_pb2.HostFacts:
    volume = report_pb2.Volume(mount_point="m" * 1000)
    return report_pb2.HostFacts(volumes=[volume] * (size // 1000))


def test_message_limit_setting(database_url: str, tls_dir: Path, reader: Store) -> None:
    settings = ServerSettings(max_message_bytes=64 * 1024)
    handle = start(database_url, tls_dir, settings=settings)
    device_id = new_device_id()
    try:
        with grpc.insecure_channel(handle.address) as channel:
            conversation = Conversation(agent_client(channel, handle, tls_dir))
            conversation.send(hello(device_id))
            conversation.receive()
            conversation.send(report(1, host=host_of_bytes(50 * 1024)))
            first = conversation.receive()
            conversation.send(report(2, host=host_of_bytes(80 * 1024)))
            _, error = run_failing_stream(conversation.responses)
            conversation.close()
    finally:
        handle.stop()

    assert first.ack.committed_sequence == 1
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reader.count_reports(device_id) == 1


def test_message_limit_in_options() -> None:
    options = dict(server_options(ServerSettings(max_message_bytes=123_456)))

    assert options["grpc.max_receive_message_length"] == 123_456


# Clock skew


def timed_hello(device_id: str, send_time: datetime | None) -> agent_pb2.ConnectRequest:
    request = hello(device_id)
    if send_time is not None:
        request.hello.send_time.FromDatetime(send_time)
    return request


def collected(sequence: int, moment: datetime) -> agent_pb2.ConnectRequest:
    request = report(sequence)
    request.report.collect_time.FromDatetime(moment)
    return request


def report_flags(database_url: str, device_id: str) -> dict[int, bool]:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT sequence, clock_skewed FROM reports WHERE device_id = :device"
            ),
            {"device": device_id},
        )
        flags = {int(sequence): bool(flag) for sequence, flag in rows}
    engine.dispose()
    return flags


@pytest.fixture
def clocked_server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start(database_url, tls_dir, clock=Clock(T0))
    yield handle
    handle.stop()


@pytest.fixture
def clocked_agents(
    clocked_server: ServerHandle, tls_dir: Path
) -> Iterator[AgentClient]:
    with grpc.insecure_channel(clocked_server.address) as channel:
        yield agent_client(channel, clocked_server, tls_dir)


def test_hello_offset_stored(clocked_agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()

    run_stream(clocked_agents, [timed_hello(device_id, T0 + timedelta(hours=2))])

    device = stored(reader, device_id)
    assert device.clock_offset.ToTimedelta() == timedelta(hours=2)
    assert device.clock_skewed


def test_hello_offset_in_step(clocked_agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()

    run_stream(clocked_agents, [timed_hello(device_id, T0 - timedelta(seconds=3))])

    device = stored(reader, device_id)
    assert device.clock_offset.ToTimedelta() == timedelta(seconds=-3)
    assert not device.clock_skewed


def test_hello_without_send_time(clocked_agents: AgentClient, reader: Store) -> None:
    device_id = new_device_id()

    run_stream(clocked_agents, [timed_hello(device_id, None)])

    device = stored(reader, device_id)
    assert not device.HasField("clock_offset")
    assert not device.clock_skewed


def test_skewed_hello_logged(
    clocked_agents: AgentClient, caplog: pytest.LogCaptureFixture
) -> None:
    device_id = new_device_id()

    with caplog.at_level(logging.WARNING, logger=INGEST_LOGGER):
        run_stream(clocked_agents, [timed_hello(device_id, T0 - timedelta(days=1))])

    lines = [r.getMessage() for r in caplog.records if "skewed clock" in r.getMessage()]
    assert len(lines) == 1
    assert device_id in lines[0]


def test_skewed_device_reports_flagged(
    clocked_agents: AgentClient,
    reader: Store,
    database_url: str,
) -> None:
    device_id = new_device_id()
    ahead = T0 + timedelta(hours=2)

    run_stream(clocked_agents, [timed_hello(device_id, ahead), collected(1, ahead)])

    device = stored(reader, device_id)
    assert report_flags(database_url, device_id) == {1: True}
    assert device.clock_skewed
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == T0


def test_backlog_report_not_skewed(
    clocked_agents: AgentClient,
    reader: Store,
    database_url: str,
) -> None:
    device_id = new_device_id()
    requests = [
        timed_hello(device_id, T0),
        collected(1, T0 - timedelta(hours=9)),
        collected(2, T0 - timedelta(days=6)),
    ]

    run_stream(clocked_agents, requests)

    device = stored(reader, device_id)
    assert report_flags(database_url, device_id) == {1: False, 2: False}
    assert not device.clock_skewed
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == T0 - timedelta(days=6)


def test_future_report_flagged(
    clocked_agents: AgentClient,
    reader: Store,
    database_url: str,
) -> None:
    device_id = new_device_id()
    requests = [timed_hello(device_id, T0), collected(1, T0 + timedelta(hours=1))]

    run_stream(clocked_agents, requests)

    assert report_flags(database_url, device_id) == {1: True}
    assert stored(reader, device_id).clock_skewed


def test_ancient_report_flagged(
    clocked_agents: AgentClient,
    reader: Store,
    database_url: str,
) -> None:
    device_id = new_device_id()
    requests = [
        timed_hello(device_id, T0),
        collected(1, T0 - timedelta(days=40)),
        collected(2, T0),
    ]

    run_stream(clocked_agents, requests)

    assert report_flags(database_url, device_id) == {1: True, 2: False}
    assert not stored(reader, device_id).clock_skewed


def test_skew_limit_setting(database_url: str, tls_dir: Path, reader: Store) -> None:
    limits = IngestLimits(clock=ClockLimits(skew_limit=timedelta(hours=1)))
    handle = start(database_url, tls_dir, settings=ServerSettings(limits=limits))
    device_id = new_device_id()
    ahead = T0 + timedelta(minutes=30)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = agent_client(channel, handle, tls_dir)
            run_stream(stub, [timed_hello(device_id, ahead), collected(1, ahead)])
    finally:
        handle.stop()

    device = stored(reader, device_id)
    assert device.clock_offset.ToTimedelta() == timedelta(minutes=30)
    assert not device.clock_skewed


def test_get_device_carries_clock(
    clocked_server: ServerHandle, clocked_agents: AgentClient, database_url: str
) -> None:
    device_id = new_device_id()
    run_stream(clocked_agents, [timed_hello(device_id, T0 + timedelta(minutes=9))])

    with grpc.insecure_channel(clocked_server.address) as channel:
        ops = ops_stub(channel, create_token(database_url, "viewer"))
        request = ops_pb2.GetDeviceRequest(device_id=device_id)
        device = ops.GetDevice(request, timeout=10).device

    assert device.clock_offset.ToTimedelta() == timedelta(minutes=9)
    assert device.clock_skewed


# Dropped reports


def dropping(sequence: int, dropped: int) -> agent_pb2.ConnectRequest:
    request = report(sequence)
    request.report.dropped_reports = dropped
    return request


def test_dropped_reports_once(
    clocked_server: ServerHandle, clocked_agents: AgentClient, database_url: str
) -> None:
    device_id = new_device_id()
    run_stream(clocked_agents, [hello(device_id), dropping(1, 4), dropping(2, 3)])

    # A reconnect resends report 2, whose ack the agent may have missed.
    run_stream(clocked_agents, [hello(device_id), dropping(2, 3), dropping(3, 0)])

    with grpc.insecure_channel(clocked_server.address) as channel:
        ops = ops_stub(channel, create_token(database_url, "viewer"))
        request = ops_pb2.GetDeviceRequest(device_id=device_id)
        device = ops.GetDevice(request, timeout=10).device
    assert device.committed_sequence == 3
    assert device.dropped_reports == 7


# Keepalive

# The agent pings every 20 s with a 10 s timeout against a server minimum of
# 10 s. These tests keep the ratios at a twentieth of the time.
CLIENT_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 500),
    ("grpc.keepalive_permit_without_calls", 1),
    # Without this, gRPC stops pinging after 2 pings on a connection with no
    # data, and the test would pass without pinging.
    ("grpc.http2.max_pings_without_data", 0),
]
KEEPALIVE_HOLD_SECONDS = 10.0


def hold_idle_stream(address: str, tls_dir: Path) -> agent_pb2.ConnectResponse:
    """Keep a stream idle for KEEPALIVE_HOLD_SECONDS, then send one report.

    Returns the response to the report; raises grpc.RpcError if the server
    closed the connection meanwhile.
    """
    with grpc.insecure_channel(address, options=CLIENT_KEEPALIVE_OPTIONS) as channel:
        conversation = Conversation(AgentClient(channel, Enroller(address, tls_dir)))
        try:
            conversation.send(hello(new_device_id()))
            conversation.receive()
            time.sleep(KEEPALIVE_HOLD_SECONDS)
            conversation.send(report(1))
            return conversation.receive()
        finally:
            conversation.close()


def test_server_keepalive_options() -> None:
    options = dict(server_options(ServerSettings()))

    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_ping_strikes"] == 2


def test_agent_pings_no_goaway(tmp_path: Path, tls_dir: Path) -> None:
    settings = ServerSettings(min_ping_interval_seconds=0.5)
    handle = start(f"sqlite:///{tmp_path}/collector.db", tls_dir, settings=settings)
    try:
        response = hold_idle_stream(handle.address, tls_dir)
    finally:
        handle.stop()

    assert response.ack.committed_sequence == 1


def test_fast_pings_get_goaway(tmp_path: Path, tls_dir: Path) -> None:
    # The control: the same client against a minimum above its ping interval.
    settings = ServerSettings(min_ping_interval_seconds=5.0)
    handle = start(f"sqlite:///{tmp_path}/collector.db", tls_dir, settings=settings)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            hold_idle_stream(handle.address, tls_dir)
    finally:
        handle.stop()

    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in (error.details() or "").lower()
