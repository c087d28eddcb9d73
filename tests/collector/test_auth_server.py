"""Authentication and authorization of the collector, through real channels.

Covered: Enroll (secret, rate limit, rotation, id collisions), the node key of
Connect and the binding of a stream to its device, replaced and revoked
streams, operator tokens, roles and the audit log, and TLS serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collector import auth, tls
from collector import server as collector_server
from collector._authz import (
    MAX_AUDIT_ARGUMENTS_BYTES,
    THROTTLED_ACTION,
    UNAUTHENTICATED_AUDITS_PER_ADDRESS,
    UNAUTHENTICATED_WINDOW_SECONDS,
    AuthorizationMetadataError,
    OpsAuthInterceptor,
    bearer_credential,
    current_operator,
)
from collector._enroll import peer_host
from collector.server import ServerHandle, ServerSettings, start_server_thread
from collector.store import Store
from fleetmend.v1 import agent_pb2, agent_pb2_grpc, ops_pb2, ops_pb2_grpc
from tests.collector.test_server import (
    OPEN_ENROLLMENT,
    AgentClient,
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
from tests.trust import (
    bearer,
    channel_to,
    create_token,
    enroll,
    enrollment_secret,
    make_tls_dir,
    remember_secret,
)


@pytest.fixture
def server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    """A plaintext collector on loopback, with the enrollment limit off."""
    handle = start_server_thread(
        database_url, tls_dir=tls_dir, insecure=True, settings=OPEN_ENROLLMENT
    )
    yield handle
    handle.stop()


@pytest.fixture
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture
def reader(server: ServerHandle, database_url: str) -> Iterator[Store]:
    store = Store.open(database_url)
    yield store
    store.close()


@pytest.fixture
def enroller(server: ServerHandle, tls_dir: Path) -> Enroller:
    return Enroller(server.address, tls_dir)


@pytest.fixture
def agents(channel: grpc.Channel, enroller: Enroller) -> AgentClient:
    return AgentClient(channel, enroller)


def enroll_request(
    secret: str, device_id: str | None = None
) -> agent_pb2.EnrollRequest:
    return agent_pb2.EnrollRequest(
        device_id=device_id or new_device_id(),
        enrollment_secret=secret,
        hostname="lab-07",
        agent_version="test",
    )


def call_enroll(
    channel: grpc.Channel, request: agent_pb2.EnrollRequest
) -> agent_pb2.EnrollResponse:
    response: agent_pb2.EnrollResponse = agent_pb2_grpc.AgentServiceStub(
        channel
    ).Enroll(request, timeout=10)
    remember_secret(response.node_key)
    return response


def enroll_error(
    channel: grpc.Channel, request: agent_pb2.EnrollRequest
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call_enroll(channel, request)
    return raised.value


def counts(store: Store) -> tuple[int, int]:
    """Return the number of stored devices and reports."""
    return len(store.list_devices(limit=1000)), store.count_reports()


def agent_version(store: Store, device_id: str) -> str:
    device = store.get_device(device_id)
    assert device is not None
    return device.agent_version


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def forged_secret() -> str:
    return secrets.token_urlsafe(32)


# Enroll


def test_enroll_keeps_device_id(
    channel: grpc.Channel, tls_dir: Path, reader: Store
) -> None:
    device_id = new_device_id()

    response = call_enroll(
        channel, enroll_request(enrollment_secret(tls_dir), device_id)
    )

    assert response.device_id == device_id
    assert response.node_key.startswith("fmk1.")
    key_id, _ = auth.parse_credential(response.node_key, auth.NODE_KEY_PREFIX)
    record = reader.find_node_key(key_id)
    assert record is not None
    assert record.device_id == device_id
    assert record.revoke_time is None
    device = reader.get_device(device_id)
    assert device is not None
    assert device.hostname == "lab-07"


def test_enroll_collision_new_id(
    channel: grpc.Channel, agents: AgentClient, tls_dir: Path, reader: Store
) -> None:
    taken = new_device_id()
    first = call_enroll(channel, enroll_request(enrollment_secret(tls_dir), taken))

    second = call_enroll(channel, enroll_request(enrollment_secret(tls_dir), taken))

    assert first.device_id == taken
    assert second.device_id != taken
    assert str(uuid.UUID(second.device_id)) == second.device_id
    for response in (first, second):
        responses = run_stream(
            agents,
            [hello(response.device_id), report(1)],
            metadata=bearer(response.node_key),
        )
        assert acked(responses) == [1]
        assert reader.count_reports(response.device_id) == 1


def test_enroll_wrong_secret(
    channel: grpc.Channel, tls_dir: Path, reader: Store
) -> None:
    before = counts(reader)
    wrong = remember_secret(f"fme1.{forged_secret()}")

    error = enroll_error(channel, enroll_request(wrong))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "enrollment secret is wrong" in error.details()
    assert wrong not in error.details()
    assert enrollment_secret(tls_dir) not in error.details()
    assert counts(reader) == before


def test_enroll_empty_secret(channel: grpc.Channel, reader: Store) -> None:
    before = counts(reader)

    error = enroll_error(channel, enroll_request(""))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert counts(reader) == before


@pytest.mark.parametrize(
    "device_id",
    ["laptop-17", str(uuid.uuid4()).upper(), str(uuid.UUID(int=0)), ""],
)
def test_enroll_invalid_device_id(
    channel: grpc.Channel, tls_dir: Path, reader: Store, device_id: str
) -> None:
    request = enroll_request(enrollment_secret(tls_dir))
    request.device_id = device_id

    error = enroll_error(channel, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device_id" in error.details()
    assert counts(reader) == (0, 0)


@pytest.mark.parametrize("field", ["hostname", "agent_version"])
def test_enroll_control_character_invalid(
    channel: grpc.Channel, tls_dir: Path, reader: Store, field: str
) -> None:
    request = enroll_request(enrollment_secret(tls_dir))
    setattr(request, field, "lab\nERROR forged line \x1b[2J")
    before = counts(reader)

    error = enroll_error(channel, request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"EnrollRequest.{field}" in error.details()
    assert "U+000A" in error.details()
    assert counts(reader) == before


def test_enroll_without_secret_file(
    channel: grpc.Channel, tls_dir: Path, reader: Store
) -> None:
    secret = enrollment_secret(tls_dir)
    (tls_dir / tls.ENROLLMENT_SECRET_FILENAME).unlink()

    error = enroll_error(channel, enroll_request(secret))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fleetmend-collector init" in error.details()
    assert counts(reader) == (0, 0)


def test_rotated_secret_applies_without_restart(
    channel: grpc.Channel, agents: AgentClient, tls_dir: Path
) -> None:
    old_secret = enrollment_secret(tls_dir)
    device_id, node_key = enroll(agents.enroller.address, tls_dir)

    tls.rotate_enrollment_secret(tls_dir)
    new_secret = enrollment_secret(tls_dir)
    refused = enroll_error(channel, enroll_request(old_secret))
    accepted = call_enroll(channel, enroll_request(new_secret))
    responses = run_stream(
        agents, [hello(device_id), report(1)], metadata=bearer(node_key)
    )

    assert new_secret != old_secret
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert accepted.node_key.startswith("fmk1.")
    assert acked(responses) == [1]


def test_enroll_rate_limit(database_url: str, tls_dir: Path) -> None:
    # At this rate no token comes back while the test runs.
    settings = ServerSettings(enroll_per_minute=0.001, enroll_burst=3)
    handle = start_server_thread(
        database_url, tls_dir=tls_dir, insecure=True, settings=settings
    )
    try:
        with grpc.insecure_channel(handle.address) as channel:
            secret = enrollment_secret(tls_dir)
            # A wrong secret takes a token too.
            wrong = enroll_error(channel, enroll_request(f"fme1.{forged_secret()}"))
            accepted = [call_enroll(channel, enroll_request(secret)) for _ in range(2)]
            limited = enroll_error(channel, enroll_request(secret))
            status = health_status(channel)
    finally:
        handle.stop()

    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(accepted) == 2
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in limited.details()
    assert "127.0.0.1" in limited.details()
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_enroll_limit_defaults() -> None:
    settings = ServerSettings()

    assert settings.enroll_per_minute == 10
    assert settings.enroll_burst == 10


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.5:41000", "10.0.0.5"),
        ("ipv6:[::1]:41000", "::1"),
        ("ipv6:[fe80::1%eth0]:5", "fe80::1%eth0"),
        ("unix:/run/collector.sock", "unix:/run/collector.sock"),
    ],
)
def test_peer_host_drops_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# Connect: the node key


def truncated(key: str) -> tuple[tuple[str, str], ...]:
    return bearer(key[:-5])


def forged(key: str) -> tuple[tuple[str, str], ...]:
    key_id, _ = auth.parse_credential(key, auth.NODE_KEY_PREFIX)
    return bearer(remember_secret(f"fmk1.{key_id}.{forged_secret()}"))


def unknown_key_id(key: str) -> tuple[tuple[str, str], ...]:
    return bearer(remember_secret(f"fmk1.{secrets.token_hex(8)}.{forged_secret()}"))


def no_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return ()


def basic_scheme(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Basic {key}"),)


def operator_prefix(key: str) -> tuple[tuple[str, str], ...]:
    return bearer("fmt1" + key.removeprefix("fmk1"))


@pytest.mark.parametrize(
    "bad_metadata",
    [truncated, forged, unknown_key_id, no_metadata, basic_scheme, operator_prefix],
)
def test_connect_bad_key_unauthenticated(
    agents: AgentClient,
    enroller: Enroller,
    reader: Store,
    bad_metadata: Callable[[str], tuple[tuple[str, str], ...]],
) -> None:
    device_id = new_device_id()
    key = enroller.key(device_id)
    before = counts(reader)

    responses, error = run_failing_stream(
        agents.Connect(
            iter([hello(device_id), report(1)]),
            timeout=30,
            metadata=bad_metadata(key),
        )
    )

    assert responses == []
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert key not in error.details()
    assert key.rsplit(".", 1)[1] not in error.details()
    assert counts(reader) == before
    assert agent_version(reader, device_id) == "test"


def test_connect_revoked_key(
    agents: AgentClient, enroller: Enroller, reader: Store
) -> None:
    device_id = new_device_id()
    key = enroller.key(device_id)
    assert reader.revoke_device(device_id, datetime.now(UTC)) == 1
    before = counts(reader)

    _, error = run_failing_stream(
        agents.Connect(iter([hello(device_id), report(1)]), timeout=30)
    )

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in error.details()
    assert key not in error.details()
    assert counts(reader) == before
    assert agent_version(reader, device_id) == "test"


def test_connect_other_device_denied(
    agents: AgentClient, enroller: Enroller, reader: Store
) -> None:
    mine = new_device_id()
    other = new_device_id()
    my_key = enroller.key(mine)
    enroller.key(other)
    before = counts(reader)

    responses, error = run_failing_stream(
        agents.Connect(
            iter([hello(other), report(1)]), timeout=30, metadata=bearer(my_key)
        )
    )

    assert responses == []
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert other in error.details()
    assert my_key not in error.details()
    assert counts(reader) == before
    assert agent_version(reader, other) == "test"
    assert agent_version(reader, mine) == "test"


# Several streams of one device


def test_second_stream_replaces_first(
    agents: AgentClient, reader: Store, caplog: pytest.LogCaptureFixture
) -> None:
    device_id = new_device_id()
    first = Conversation(agents)
    first.send(hello(device_id))
    first.receive()
    first.send(report(1))
    assert first.receive().ack.committed_sequence == 1

    with caplog.at_level(logging.WARNING, logger="collector"):
        second = Conversation(agents)
        second.send(hello(device_id))
        welcome = second.receive()
        _, error = run_failing_stream(first.responses)
        second.send(report(2))
        acked_second = second.receive().ack.committed_sequence
    first.close()
    second.close()

    assert welcome.welcome.committed_sequence == 1
    assert error.code() == grpc.StatusCode.ABORTED
    assert "newer stream" in error.details()
    assert acked_second == 2
    lines = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert len(lines) == 1
    assert device_id in lines[0]
    assert lines[0].count("127.0.0.1:") == 2
    assert reader.count_reports(device_id) == 2


# Operator tokens, roles and the audit log


def test_revoke_ends_open_stream(
    channel: grpc.Channel,
    agents: AgentClient,
    enroller: Enroller,
    tls_dir: Path,
    database_url: str,
    reader: Store,
) -> None:
    admin = ops_stub(channel, create_token(database_url, "admin", "root-admin"))
    device_id = new_device_id()
    conversation = Conversation(agents)
    conversation.send(hello(device_id))
    conversation.receive()
    conversation.send(report(1))
    assert conversation.receive().ack.committed_sequence == 1

    response = admin.RevokeDevice(
        ops_pb2.RevokeDeviceRequest(device_id=device_id), timeout=10
    )
    # The agent sends nothing more: the collector ends the stream itself.
    _, ended = run_failing_stream(conversation.responses)
    conversation.close()
    _, refused = run_failing_stream(
        agents.Connect(iter([hello(device_id), report(2)]), timeout=30)
    )
    # Enrolling the revoked id again gives a new id: the revoked device's id
    # and history cannot be claimed back with the enrollment secret.
    enrolled_id, new_key = enroll(enroller.address, tls_dir, device_id)
    responses = run_stream(
        agents, [hello(enrolled_id), report(1)], metadata=bearer(new_key)
    )

    assert response.revoked_keys == 1
    assert response.stream_closed
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in refused.details()
    assert enrolled_id != device_id
    assert new_key != enroller.keys[device_id]
    assert acked(responses) == [1]
    assert reader.count_reports(enrolled_id) == 1
    assert reader.count_reports(device_id) == 1


def test_revoke_without_stream(
    channel: grpc.Channel, enroller: Enroller, database_url: str
) -> None:
    admin = ops_stub(channel, create_token(database_url, "admin"))
    device_id = new_device_id()
    enroller.key(device_id)

    response = admin.RevokeDevice(
        ops_pb2.RevokeDeviceRequest(device_id=device_id), timeout=10
    )

    assert response.revoked_keys == 1
    assert not response.stream_closed


def outage_request() -> ops_pb2.DeclareOutageRequest:
    request = ops_pb2.DeclareOutageRequest(app_id="sap", message="SAP is down")
    start = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(start + timedelta(hours=2))
    return request


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("DeclareOutage", outage_request()),
        ("RevokeDevice", ops_pb2.RevokeDeviceRequest(device_id=str(uuid.uuid4()))),
    ],
)
def test_viewer_action_denied_and_audited(
    channel: grpc.Channel,
    database_url: str,
    reader: Store,
    method: str,
    request_message: object,
) -> None:
    viewer = ops_stub(channel, create_token(database_url, "viewer", "watcher"))

    with pytest.raises(grpc.RpcError) as raised:
        getattr(viewer, method)(request_message, timeout=10)

    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "viewer" in raised.value.details()
    events = reader.list_audit(limit=10)
    assert len(events) == 1
    assert events[0].action == method
    assert events[0].actor == "watcher"
    assert events[0].role == auth.Role.VIEWER
    assert events[0].outcome == "PERMISSION_DENIED"
    assert "127.0.0.1" in events[0].peer
    assert reader.list_outages(datetime(2000, 1, 1, tzinfo=UTC)) == []


def test_revoked_token_audited_by_name(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    token = create_token(database_url, "operator", "left-the-company")
    reader.revoke_token("left-the-company", datetime.now(UTC))
    operator = ops_stub(channel, token)

    with pytest.raises(grpc.RpcError) as raised:
        operator.DeclareOutage(outage_request(), timeout=10)

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    events = reader.list_audit(limit=10)
    assert [(e.action, e.actor, e.outcome) for e in events] == [
        ("DeclareOutage", "left-the-company", "UNAUTHENTICATED")
    ]
    assert reader.list_outages(datetime(2000, 1, 1, tzinfo=UTC)) == []


def test_operator_declares_outage(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    operator = ops_stub(channel, create_token(database_url, "operator", "on-call"))

    response = operator.DeclareOutage(outage_request(), timeout=10)

    assert response.outage.declared_by == "on-call"
    events = reader.list_audit(limit=10)
    assert [(e.action, e.actor, e.outcome) for e in events] == [
        ("DeclareOutage", "on-call", "OK")
    ]
    assert '"appId":"sap"' in events[0].arguments_json


def test_admin_call_audited_with_request(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    admin = ops_stub(channel, create_token(database_url, "admin", "root-admin"))
    missing = str(uuid.uuid4())

    with pytest.raises(grpc.RpcError) as raised:
        admin.RevokeDevice(ops_pb2.RevokeDeviceRequest(device_id=missing), timeout=10)

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    events = reader.list_audit(limit=10)
    assert len(events) == 1
    assert events[0].actor == "root-admin"
    assert events[0].role == auth.Role.ADMIN
    assert events[0].outcome == "NOT_FOUND"
    assert missing in events[0].arguments_json
    assert "\n" not in events[0].arguments_json


def test_query_not_audited(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    viewer = ops_stub(channel, create_token(database_url, "viewer"))

    viewer.ListDevices(ops_pb2.ListDevicesRequest(), timeout=10)

    assert reader.list_audit(limit=10) == []


def test_token_use_recorded(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    token = create_token(database_url, "viewer")
    token_id, _ = auth.parse_credential(token, auth.OPERATOR_TOKEN_PREFIX)
    record = reader.find_token(token_id)
    assert record is not None
    assert record.last_use_time is None

    ops_stub(channel, token).ListDevices(ops_pb2.ListDevicesRequest(), timeout=10)

    record = reader.find_token(token_id)
    assert record is not None
    assert record.last_use_time is not None


def real_id_wrong_secret(database_url: str) -> str:
    token = create_token(database_url, "admin")
    token_id, _ = auth.parse_credential(token, auth.OPERATOR_TOKEN_PREFIX)
    return remember_secret(f"fmt1.{token_id}.{forged_secret()}")


@pytest.mark.parametrize(
    "make_token",
    [
        lambda url: "",
        lambda url: remember_secret(
            f"fmt1.{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"
        ),
        real_id_wrong_secret,
        lambda url: create_token(url, "admin")[:-1],
    ],
    ids=["none", "forged", "wrong-secret", "truncated"],
)
def test_bad_token_unauthenticated(
    channel: grpc.Channel,
    database_url: str,
    reader: Store,
    make_token: Callable[[str], str],
) -> None:
    token = make_token(database_url)
    ops = ops_stub(channel, token) if token else ops_pb2_grpc.OpsServiceStub(channel)

    with pytest.raises(grpc.RpcError) as query:
        ops.ListDevices(ops_pb2.ListDevicesRequest(), timeout=10)
    with pytest.raises(grpc.RpcError) as action:
        ops.ListTokens(ops_pb2.ListTokensRequest(), timeout=10)

    assert query.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert action.value.code() == grpc.StatusCode.UNAUTHENTICATED
    if token:
        assert token not in action.value.details()
        assert token.rsplit(".", 1)[-1] not in action.value.details()
    events = reader.list_audit(limit=10)
    assert [(e.action, e.actor, e.outcome) for e in events] == [
        ("ListTokens", "unknown", "UNAUTHENTICATED")
    ]
    assert events[0].role is None


def test_large_request_audit_capped(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    operator = ops_stub(channel, create_token(database_url, "operator", "on-call"))
    request = outage_request()
    request.message = "x" * (3 * 1024 * 1024)

    for stub in (ops_pb2_grpc.OpsServiceStub(channel), operator):
        with pytest.raises(grpc.RpcError):
            stub.DeclareOutage(request, timeout=30)

    events = reader.list_audit(limit=10)
    assert [(e.actor, e.outcome) for e in events] == [
        ("on-call", "INVALID_ARGUMENT"),
        ("unknown", "UNAUTHENTICATED"),
    ]
    for event in events:
        assert len(event.arguments_json.encode("utf-8")) <= MAX_AUDIT_ARGUMENTS_BYTES
        stored = json.loads(event.arguments_json)
        assert stored["truncated"] is True
        assert stored["bytes"] > 3 * 1024 * 1024
        assert stored["head"].startswith('{"appId":"sap"')


def test_unauthenticated_flood_bounded(
    server: ServerHandle, reader: Store, caplog: pytest.LogCaptureFixture
) -> None:
    callers = 100
    calls_per_caller = 3
    barrier = threading.Barrier(callers)
    codes: list[grpc.StatusCode] = []
    request = outage_request()
    request.message = "y" * (64 * 1024)
    # One connection per caller: channels with equal options share one by
    # default, and its limit of concurrent streams would refuse some calls.
    options = [("grpc.use_local_subchannel_pool", 1)]

    def flood() -> None:
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = ops_pb2_grpc.OpsServiceStub(channel)
            barrier.wait(timeout=60)
            for _ in range(calls_per_caller):
                try:
                    stub.DeclareOutage(request, timeout=60)
                except grpc.RpcError as error:
                    codes.append(error.code())

    with caplog.at_level(logging.WARNING, logger="collector"):
        threads = [threading.Thread(target=flood) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    events = reader.list_audit(limit=1000)
    rejected_lines = [r for r in caplog.records if "rejected with" in r.getMessage()]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * (callers * calls_per_caller)
    # One window admits UNAUTHENTICATED_AUDITS_PER_ADDRESS calls of an address;
    # the flood may straddle the end of one window, never of two.
    single = [event for event in events if event.action == "DeclareOutage"]
    summaries = [event for event in events if event.action == THROTTLED_ACTION]
    assert 1 <= len(single) <= 2 * UNAUTHENTICATED_AUDITS_PER_ADDRESS
    assert len(summaries) <= 1
    assert len(rejected_lines) == len(single)
    for event in single:
        assert len(event.arguments_json.encode("utf-8")) <= MAX_AUDIT_ARGUMENTS_BYTES


def test_unauthenticated_summary_after_window(database_url: str) -> None:
    store = Store.open(database_url)
    store.migrate()
    monotonic = [1000.0]
    calls = UNAUTHENTICATED_AUDITS_PER_ADDRESS + 3

    async def scenario() -> list[grpc.StatusCode]:
        interceptor = OpsAuthInterceptor(
            store, lambda: datetime.now(UTC), monotonic=lambda: monotonic[0]
        )
        ops_server = grpc.aio.server(interceptors=(interceptor,))
        ops_pb2_grpc.add_OpsServiceServicer_to_server(
            ops_pb2_grpc.OpsServiceServicer(), ops_server
        )
        port = ops_server.add_insecure_port("127.0.0.1:0")
        await ops_server.start()
        codes: list[grpc.StatusCode] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ops_pb2_grpc.OpsServiceStub(channel)
                for call in range(calls + 1):
                    if call == calls:
                        # The next window begins, and its first call writes
                        # the summary of the previous one.
                        monotonic[0] += UNAUTHENTICATED_WINDOW_SECONDS
                    try:
                        await stub.RevokeToken(
                            ops_pb2.RevokeTokenRequest(name="x"), timeout=10
                        )
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code())
        finally:
            await ops_server.stop(None)
        return codes

    try:
        codes = asyncio.run(scenario())
        events = store.list_audit(limit=100)
    finally:
        store.close()

    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * (calls + 1)
    actions = [event.action for event in reversed(events)]
    assert actions == [
        *["RevokeToken"] * UNAUTHENTICATED_AUDITS_PER_ADDRESS,
        THROTTLED_ACTION,
        "RevokeToken",
    ]
    summary = events[1]
    assert summary.actor == "unknown"
    assert summary.role is None
    assert summary.outcome == "UNAUTHENTICATED"
    assert summary.peer == "127.0.0.1"
    stored = json.loads(summary.arguments_json)
    assert stored["calls"] == 3
    assert stored["methods"] == {"RevokeToken": 3}
    assert stored["summary"].startswith("3 more unauthenticated calls from 127.0.0.1")


@pytest.mark.parametrize(
    ("field", "value"), [("nanos", -1), ("seconds", 253_402_300_800)]
)
def test_out_of_range_timestamp_audited(
    channel: grpc.Channel,
    database_url: str,
    reader: Store,
    caplog: pytest.LogCaptureFixture,
    field: str,
    value: int,
) -> None:
    operator = ops_stub(channel, create_token(database_url, "operator", "on-call"))
    request = outage_request()
    setattr(request.start_time, field, value)

    with (
        caplog.at_level(logging.INFO, logger="collector"),
        pytest.raises(grpc.RpcError) as raised,
    ):
        operator.DeclareOutage(request, timeout=10)

    events = reader.list_audit(limit=10)
    lines = [r for r in caplog.records if "cannot be written as JSON" in r.getMessage()]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(events) == 1
    assert events[0].actor == "on-call"
    assert events[0].outcome == "INVALID_ARGUMENT"
    assert json.loads(events[0].arguments_json) == {
        "bytes": request.ByteSize(),
        "type": "fleetmend.v1.DeclareOutageRequest",
        "unserializable": True,
    }
    assert len(lines) == 1
    assert "\n" not in lines[0].getMessage()
    assert [r for r in caplog.records if r.exc_info] == []


def test_credential_in_request_redacted(
    channel: grpc.Channel, database_url: str, reader: Store
) -> None:
    admin_token = create_token(database_url, "admin", "root-admin")
    admin = ops_stub(channel, admin_token)
    pasted = remember_secret(create_token(database_url, "viewer", "watcher"))

    with pytest.raises(grpc.RpcError) as raised:
        admin.RevokeToken(ops_pb2.RevokeTokenRequest(name=pasted), timeout=10)

    events = reader.list_audit(limit=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(events) == 1
    assert json.loads(events[0].arguments_json) == {"name": "<redacted>"}
    assert pasted not in events[0].arguments_json


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


# TLS


@pytest.fixture
def tls_server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(
        database_url, tls_dir=tls_dir, settings=OPEN_ENROLLMENT
    )
    yield handle
    handle.stop()


def test_tls_enroll_connect_query(
    tls_server: ServerHandle, tls_dir: Path, database_url: str
) -> None:
    enroller = Enroller(tls_server.address, tls_dir, plaintext=False)
    device_id = new_device_id()
    with channel_to(tls_server.address, tls_dir) as channel:
        responses = run_stream(
            AgentClient(channel, enroller), [hello(device_id), report(1)]
        )
        viewer = ops_stub(channel, create_token(database_url, "viewer"))
        device = viewer.GetDevice(
            ops_pb2.GetDeviceRequest(device_id=device_id), timeout=10
        ).device

    assert acked(responses) == [1]
    assert device.committed_sequence == 1


def test_plaintext_client_to_tls_port(tls_server: ServerHandle, tls_dir: Path) -> None:
    with (
        grpc.insecure_channel(tls_server.address) as plaintext,
        pytest.raises(grpc.RpcError) as raised,
    ):
        health_status(plaintext)
    with channel_to(tls_server.address, tls_dir) as secure:
        status = health_status(secure)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_tls_client_to_plaintext_port(server: ServerHandle, tls_dir: Path) -> None:
    with (
        channel_to(server.address, tls_dir) as secure,
        pytest.raises(grpc.RpcError) as raised,
    ):
        health_status(secure)
    with grpc.insecure_channel(server.address) as plaintext:
        status = health_status(plaintext)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_tls_start_logs_expiry(
    database_url: str, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="collector.server"):
        handle = start_server_thread(database_url, tls_dir=tls_dir)
        handle.stop()

    lines = [r.getMessage() for r in caplog.records if "listening" in r.getMessage()]
    assert len(lines) == 1
    assert "(TLS)" in lines[0]
    assert "valid until" in lines[0]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings if "expire" in r.getMessage()] == []


def test_expiring_certificate_warned(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "expiring"
    tls.init_tls_dir(
        folder,
        ["127.0.0.1"],
        now=datetime.now(UTC) - timedelta(days=20),
        server_days=30,
    )

    with caplog.at_level(logging.WARNING, logger="collector.server"):
        handle = start_server_thread(database_url, tls_dir=folder)
        handle.stop()

    warnings = [r.getMessage() for r in caplog.records if "expires" in r.getMessage()]
    assert len(warnings) == 1
    assert "--renew" in warnings[0]


def test_plaintext_start_logs_mode(
    database_url: str, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="collector.server"):
        handle = start_server_thread(database_url, tls_dir=tls_dir, insecure=True)
        handle.stop()

    lines = [r.getMessage() for r in caplog.records if "listening" in r.getMessage()]
    assert len(lines) == 1
    assert "(plaintext)" in lines[0]


def test_tls_other_ca_rejected(tls_server: ServerHandle, tmp_path: Path) -> None:
    other = make_tls_dir(tmp_path / "other")

    with (
        channel_to(tls_server.address, other) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        health_status(channel)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_expiry_warned_again_daily(
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A day stands for a twentieth of a second here.
    monkeypatch.setattr(collector_server, "EXPIRY_CHECK_INTERVAL_SECONDS", 0.05)
    folder = tmp_path / "expiring"
    tls.init_tls_dir(
        folder,
        ["127.0.0.1"],
        now=datetime.now(UTC) - timedelta(days=20),
        server_days=30,
    )

    with caplog.at_level(logging.WARNING, logger="collector.server"):
        handle = start_server_thread(database_url, tls_dir=folder)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(expiry_lines(caplog)) < 3:
                time.sleep(0.05)
        finally:
            handle.stop()

    assert len(expiry_lines(caplog)) >= 3


def expiry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "expires" in r.getMessage()]


# Metadata parsing, without a server


@pytest.mark.parametrize(
    ("metadata", "credential"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"), ("authorization", "BEARER abc")), "abc"),
    ],
)
def test_bearer_credential_parsed(
    metadata: tuple[tuple[str, str], ...], credential: str
) -> None:
    assert bearer_credential(metadata) == credential


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "no authorization metadata"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "send one"),
        ((("authorization", "Basic abc"),), "not of the form"),
        ((("authorization", "Bearer"),), "not of the form"),
    ],
)
def test_bearer_credential_rejected(
    metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    with pytest.raises(AuthorizationMetadataError, match=reason) as raised:
        bearer_credential(metadata)

    assert "abc" not in str(raised.value)


def test_current_operator_outside_call() -> None:
    with pytest.raises(LookupError):
        current_operator()
