"""Tests of the store's node keys, operator tokens, audit log and outages.

Every test runs on a real SQLite file and, where FLEETMEND_TEST_POSTGRES_URL is
set, on a real PostgreSQL database.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, insert, text

from collector import auth
from collector.auth import Role
from collector.store import (
    EnrollResult,
    IncomingReport,
    Store,
    StoreError,
    TokenNameTakenError,
)
from collector.store._schema import node_keys
from fleetmend.v1 import report_pb2

DEVICE = "5f0c7d2e-8a41-4c3b-9e0d-2b6f1a7c9d31"
OTHER_DEVICE = "9a3e51c4-0b7d-4f26-8c15-d4e2f6a8b073"
NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def enroll(
    store: Store,
    device_id: str = DEVICE,
    now: datetime = NOW,
    hostname: str = "pc-ops-017",
) -> tuple[EnrollResult, auth.IssuedCredential]:
    key = auth.issue_node_key()
    result = store.enroll_device(
        device_id, hostname, "0.2.0", key.credential_id, key.secret_hash, now
    )
    return result, key


def revoked_time(database_url: str, device_id: str) -> object:
    """Read devices.revoked_time of a device with plain SQL."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT revoked_time FROM devices WHERE device_id = :id"),
                {"id": device_id},
            ).scalar_one()
    finally:
        engine.dispose()


def new_token(
    store: Store, name: str, role: Role = Role.VIEWER, now: datetime = NOW
) -> auth.IssuedCredential:
    token = auth.issue_operator_token()
    store.create_token(
        name, role, token.credential_id, token.secret_hash, "local:root", now
    )
    return token


# Enrollment and node keys


def test_enroll_new_device(store: Store) -> None:
    result, key = enroll(store)

    device = store.get_device(DEVICE)
    stored_key = store.find_node_key(key.credential_id)
    assert result == EnrollResult(device_id=DEVICE, new_id_assigned=False)
    assert device is not None
    assert device.hostname == "pc-ops-017"
    assert device.agent_version == "0.2.0"
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == NOW
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == NOW
    assert stored_key is not None
    assert stored_key.device_id == DEVICE
    assert stored_key.key_hash == key.secret_hash
    assert stored_key.create_time == NOW
    assert stored_key.revoke_time is None


def test_enroll_hostname_lookup(store: Store) -> None:
    enroll(store, hostname="PC-Ops-017")

    found = store.list_devices(limit=10, hostname="pc-ops-017")

    assert [device.device_id for device in found] == [DEVICE]


def test_enroll_enrolled_id_gets_new_id(store: Store) -> None:
    _, first_key = enroll(store)

    result, second_key = enroll(store, now=NOW + timedelta(minutes=1))

    assert result.new_id_assigned
    assert result.device_id != DEVICE
    assert str(uuid.UUID(result.device_id, version=4)) == result.device_id
    second = store.find_node_key(second_key.credential_id)
    first = store.find_node_key(first_key.credential_id)
    assert second is not None
    assert second.device_id == result.device_id
    assert first is not None
    assert first.device_id == DEVICE
    assert first.revoke_time is None
    new_device = store.get_device(result.device_id)
    assert new_device is not None
    assert new_device.hostname == "pc-ops-017"
    assert new_device.first_seen_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(
        minutes=1
    )


def test_enroll_revoked_device_new_id(store: Store, database_url: str) -> None:
    _, old_key = enroll(store)
    store.revoke_device(DEVICE, NOW + timedelta(hours=1))

    later = NOW + timedelta(hours=2)
    result, new_key = enroll(store, now=later, hostname="pc-ops-018")

    old = store.find_node_key(old_key.credential_id)
    new = store.find_node_key(new_key.credential_id)
    revoked_device = store.get_device(DEVICE)
    new_device = store.get_device(result.device_id)
    assert result.new_id_assigned
    assert result.device_id != DEVICE
    assert old is not None
    assert old.device_id == DEVICE
    assert old.revoke_time == NOW + timedelta(hours=1)
    assert new is not None
    assert new.device_id == result.device_id
    assert new.revoke_time is None
    # The revoked device stays revoked, with its old hostname.
    assert revoked_time(database_url, DEVICE) is not None
    assert revoked_device is not None
    assert revoked_device.hostname == "pc-ops-017"
    assert new_device is not None
    assert new_device.hostname == "pc-ops-018"
    assert new_device.first_seen_time.ToDatetime(tzinfo=UTC) == later


def test_enroll_revoked_keyless_device_new_id(store: Store) -> None:
    report = report_pb2.Report(sequence=1, full=True)
    store.ingest([IncomingReport(DEVICE, report, NOW)])
    store.revoke_device(DEVICE, NOW + timedelta(hours=1))

    result, _ = enroll(store, now=NOW + timedelta(hours=2))

    assert result.new_id_assigned
    assert result.device_id != DEVICE


def test_enroll_keyless_device_claimed_once(store: Store) -> None:
    report = report_pb2.Report(sequence=1, full=True)
    store.ingest([IncomingReport(DEVICE, report, NOW)])

    first, _ = enroll(store, now=NOW + timedelta(hours=1))
    second, _ = enroll(store, now=NOW + timedelta(hours=2))

    assert first == EnrollResult(device_id=DEVICE, new_id_assigned=False)
    assert second.new_id_assigned
    assert second.device_id != DEVICE


def test_enroll_known_unenrolled_device(store: Store) -> None:
    report = report_pb2.Report(sequence=1, full=True)
    store.ingest([IncomingReport(DEVICE, report, NOW)])

    result, _ = enroll(store, now=NOW + timedelta(days=1))

    device = store.get_device(DEVICE)
    assert result == EnrollResult(device_id=DEVICE, new_id_assigned=False)
    assert store.count_reports(DEVICE) == 1
    assert device is not None
    assert device.committed_sequence == 1
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == NOW
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == NOW


def enroll_concurrently(
    stores: tuple[Store, Store], device_id: str
) -> list[EnrollResult]:
    """Enroll device_id from two threads at once, one per store; return both results."""
    barrier = threading.Barrier(len(stores))
    results: list[EnrollResult] = []
    errors: list[BaseException] = []

    def run(target: Store) -> None:
        key = auth.issue_node_key()
        barrier.wait(timeout=30)
        try:
            result = target.enroll_device(
                device_id, "pc", "0.2.0", key.credential_id, key.secret_hash, NOW
            )
        except BaseException as error:
            errors.append(error)
        else:
            results.append(result)

    threads = [threading.Thread(target=run, args=(target,)) for target in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    return results


def test_enroll_concurrent_same_id(store: Store, database_url: str) -> None:
    other = Store.open(database_url)
    try:
        for _ in range(5):
            device_id = str(uuid.uuid4())

            results = enroll_concurrently((store, other), device_id)

            kept = [result for result in results if not result.new_id_assigned]
            moved = [result for result in results if result.new_id_assigned]
            assert [result.device_id for result in kept] == [device_id]
            assert len(moved) == 1
            assert moved[0].device_id != device_id
    finally:
        other.close()


def test_enroll_concurrent_keyless_id(store: Store, database_url: str) -> None:
    # The device row exists here, so only its row lock orders the two.
    other = Store.open(database_url)
    try:
        for sequence in range(1, 6):
            device_id = str(uuid.uuid4())
            report = report_pb2.Report(sequence=sequence, full=True)
            store.ingest([IncomingReport(device_id, report, NOW)])

            results = enroll_concurrently((store, other), device_id)

            kept = [result for result in results if not result.new_id_assigned]
            moved = [result for result in results if result.new_id_assigned]
            assert [result.device_id for result in kept] == [device_id]
            assert len(moved) == 1
            assert moved[0].device_id != device_id
    finally:
        other.close()


def test_enroll_empty_device_id(store: Store) -> None:
    with pytest.raises(ValueError, match="device id is empty"):
        enroll(store, device_id="")


def test_enroll_naive_time(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        enroll(store, now=datetime(2026, 3, 2, 9, 30))

    assert store.get_device(DEVICE) is None


def test_enroll_repeated_key_id(store: Store) -> None:
    key = auth.issue_node_key()
    store.enroll_device(DEVICE, "pc", "0.2.0", key.credential_id, key.secret_hash, NOW)

    with pytest.raises(StoreError, match=f"enrolling device {OTHER_DEVICE} failed"):
        store.enroll_device(
            OTHER_DEVICE, "pc", "0.2.0", key.credential_id, key.secret_hash, NOW
        )

    # The transaction rolled back: the other device was not created.
    assert store.get_device(OTHER_DEVICE) is None


def test_find_node_key_unknown(store: Store) -> None:
    assert store.find_node_key("0123456789abcdef") is None


def test_node_key_times_in_utc(store: Store) -> None:
    berlin = timezone(timedelta(hours=1))
    _, key = enroll(store, now=NOW.astimezone(berlin))

    stored = store.find_node_key(key.credential_id)

    assert stored is not None
    assert stored.create_time == NOW
    assert stored.create_time.tzinfo == UTC


def test_deleting_device_deletes_keys(store: Store, database_url: str) -> None:
    _, key = enroll(store)

    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                connection.execute(text("PRAGMA foreign_keys=ON"))
            connection.execute(
                text("DELETE FROM devices WHERE device_id = :id"), {"id": DEVICE}
            )
    finally:
        engine.dispose()

    assert store.find_node_key(key.credential_id) is None


# Revoking devices


def test_revoke_device(store: Store, database_url: str) -> None:
    _, key = enroll(store)
    revoked_at = NOW + timedelta(hours=1)

    count = store.revoke_device(DEVICE, revoked_at)

    stored = store.find_node_key(key.credential_id)
    assert count == 1
    assert stored is not None
    assert stored.revoke_time == revoked_at
    assert revoked_time(database_url, DEVICE) is not None


def test_revoke_device_twice(store: Store) -> None:
    _, key = enroll(store)
    store.revoke_device(DEVICE, NOW + timedelta(hours=1))

    count = store.revoke_device(DEVICE, NOW + timedelta(hours=2))

    stored = store.find_node_key(key.credential_id)
    assert count == 0
    assert stored is not None
    assert stored.revoke_time == NOW + timedelta(hours=1)


def test_revoke_device_keeps_first_time(store: Store, database_url: str) -> None:
    enroll(store)
    store.revoke_device(DEVICE, NOW + timedelta(hours=1))
    first = revoked_time(database_url, DEVICE)

    store.revoke_device(DEVICE, NOW + timedelta(hours=2))

    assert revoked_time(database_url, DEVICE) == first


def add_node_key(
    database_url: str, device_id: str, now: datetime, revoke_time: datetime | None
) -> auth.IssuedCredential:
    """Insert a node key for device_id directly, as enroll_device gives one key."""
    key = auth.issue_node_key()
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(node_keys).values(
                    key_id=key.credential_id,
                    device_id=device_id,
                    key_hash=key.secret_hash,
                    create_time=now,
                    revoke_time=revoke_time,
                )
            )
    finally:
        engine.dispose()
    return key


def test_revoke_device_all_keys(store: Store, database_url: str) -> None:
    _, first_key = enroll(store)
    revoked_key = add_node_key(
        database_url, DEVICE, NOW, revoke_time=NOW + timedelta(hours=1)
    )
    second_key = add_node_key(database_url, DEVICE, NOW, revoke_time=None)

    count = store.revoke_device(DEVICE, NOW + timedelta(hours=3))

    first = store.find_node_key(first_key.credential_id)
    revoked = store.find_node_key(revoked_key.credential_id)
    second = store.find_node_key(second_key.credential_id)
    assert count == 2
    assert first is not None
    assert first.revoke_time == NOW + timedelta(hours=3)
    assert revoked is not None
    assert revoked.revoke_time == NOW + timedelta(hours=1)
    assert second is not None
    assert second.revoke_time == NOW + timedelta(hours=3)


def test_revoke_device_only_its_keys(store: Store) -> None:
    enroll(store)
    _, other_key = enroll(store, device_id=OTHER_DEVICE)

    store.revoke_device(DEVICE, NOW + timedelta(hours=1))

    other = store.find_node_key(other_key.credential_id)
    assert other is not None
    assert other.revoke_time is None


def test_revoke_device_never_enrolled(store: Store, database_url: str) -> None:
    report = report_pb2.Report(sequence=1, full=True)
    store.ingest([IncomingReport(DEVICE, report, NOW)])

    count = store.revoke_device(DEVICE, NOW + timedelta(hours=1))

    assert count == 0
    assert revoked_time(database_url, DEVICE) is not None


def test_revoke_device_unknown(store: Store) -> None:
    assert store.revoke_device(DEVICE, NOW) is None


def test_revoke_device_naive_time(store: Store) -> None:
    enroll(store)

    with pytest.raises(ValueError, match="naive"):
        store.revoke_device(DEVICE, datetime(2026, 3, 2, 10, 0))


# Operator tokens


def test_create_and_find_token(store: Store) -> None:
    token = new_token(store, "alice", Role.OPERATOR)

    stored = store.find_token(token.credential_id)

    assert stored is not None
    assert stored.token_id == token.credential_id
    assert stored.name == "alice"
    assert stored.role is Role.OPERATOR
    assert stored.token_hash == token.secret_hash
    assert stored.create_time == NOW
    assert stored.created_by == "local:root"
    assert stored.revoke_time is None
    assert stored.last_use_time is None


def test_find_token_unknown(store: Store) -> None:
    assert store.find_token("0123456789abcdef") is None


def test_create_token_name_taken(store: Store) -> None:
    first = new_token(store, "alice")

    with pytest.raises(TokenNameTakenError, match="'alice' exists already"):
        new_token(store, "alice", Role.ADMIN)

    tokens = store.list_tokens()
    assert [token.token_id for token in tokens] == [first.credential_id]
    assert tokens[0].role is Role.VIEWER


def test_create_token_name_of_revoked(store: Store) -> None:
    new_token(store, "alice")
    store.revoke_token("alice", NOW)

    with pytest.raises(TokenNameTakenError):
        new_token(store, "alice")


@pytest.mark.parametrize("name", ["", "local:root", "two words"])
def test_create_token_invalid_name(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="invalid token name"):
        new_token(store, name)

    assert store.list_tokens() == []


def test_create_token_invalid_role(store: Store) -> None:
    with pytest.raises(ValueError, match="is not a valid Role"):
        new_token(store, "alice", Role(3) + 1)  # type: ignore[arg-type]


def test_list_tokens_by_name(store: Store) -> None:
    for name in ("carol", "alice", "bob"):
        new_token(store, name)
    store.revoke_token("bob", NOW)

    tokens = store.list_tokens()

    assert [token.name for token in tokens] == ["alice", "bob", "carol"]
    assert [token.revoke_time is None for token in tokens] == [True, False, True]


def test_revoke_token(store: Store) -> None:
    token = new_token(store, "alice")
    revoked_at = NOW + timedelta(hours=1)

    assert store.revoke_token("alice", revoked_at) is True

    stored = store.find_token(token.credential_id)
    assert stored is not None
    assert stored.revoke_time == revoked_at


def test_revoke_token_twice(store: Store) -> None:
    token = new_token(store, "alice")
    store.revoke_token("alice", NOW + timedelta(hours=1))

    assert store.revoke_token("alice", NOW + timedelta(hours=2)) is False

    stored = store.find_token(token.credential_id)
    assert stored is not None
    assert stored.revoke_time == NOW + timedelta(hours=1)


def test_revoke_token_unknown(store: Store) -> None:
    new_token(store, "alice")

    assert store.revoke_token("bob", NOW) is None


def test_mark_token_used(store: Store) -> None:
    token = new_token(store, "alice")
    later = NOW + timedelta(minutes=5)

    store.mark_token_used(token.credential_id, later)
    store.mark_token_used(token.credential_id, NOW + timedelta(minutes=1))

    stored = store.find_token(token.credential_id)
    assert stored is not None
    assert stored.last_use_time == later


def test_mark_token_used_unknown(store: Store) -> None:
    token = new_token(store, "alice")

    store.mark_token_used("0123456789abcdef", NOW)

    stored = store.find_token(token.credential_id)
    assert stored is not None
    assert stored.last_use_time is None


# Audit log


def append(
    store: Store,
    actor: str = "alice",
    action: str = "RevokeDevice",
    role: Role | None = Role.ADMIN,
    outcome: str = "OK",
) -> int:
    return store.append_audit(
        NOW, actor, role, action, '{"deviceId":"x"}', outcome, "ipv4:127.0.0.1:50000"
    )


def test_append_audit_round_trip(store: Store) -> None:
    event_id = append(store)

    (event,) = store.list_audit(10)

    assert event.event_id == event_id
    assert event.event_time == NOW
    assert event.actor == "alice"
    assert event.role is Role.ADMIN
    assert event.action == "RevokeDevice"
    assert event.arguments_json == '{"deviceId":"x"}'
    assert event.outcome == "OK"
    assert event.peer == "ipv4:127.0.0.1:50000"


def test_append_audit_without_role(store: Store) -> None:
    append(store, actor="", role=None, outcome="UNAUTHENTICATED")

    (event,) = store.list_audit(10)

    assert event.role is None
    assert event.outcome == "UNAUTHENTICATED"


def test_audit_ids_increase(store: Store) -> None:
    ids = [append(store) for _ in range(3)]

    assert ids == sorted(ids)
    assert len(set(ids)) == 3


def test_list_audit_newest_first(store: Store) -> None:
    ids = [append(store, action=f"Action{index}") for index in range(5)]

    events = store.list_audit(3)

    assert [event.event_id for event in events] == ids[::-1][:3]


def test_list_audit_paging(store: Store) -> None:
    ids = [append(store) for _ in range(5)]

    first_page = store.list_audit(2)
    second_page = store.list_audit(2, before_event_id=first_page[-1].event_id)
    last_page = store.list_audit(2, before_event_id=second_page[-1].event_id)

    pages = [first_page, second_page, last_page]
    seen = [event.event_id for page in pages for event in page]
    assert seen == ids[::-1]
    assert len(last_page) == 1


def test_list_audit_by_actor(store: Store) -> None:
    append(store, actor="alice")
    bob_event = append(store, actor="bob")
    append(store, actor="local:root")

    events = store.list_audit(10, actor="bob")

    assert [event.event_id for event in events] == [bob_event]


def test_list_audit_negative_limit(store: Store) -> None:
    with pytest.raises(ValueError, match="limit must not be negative"):
        store.list_audit(-1)


def test_append_audit_naive_time(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.append_audit(
            datetime(2026, 3, 2), "alice", Role.ADMIN, "RevokeToken", "{}", "OK", ""
        )


# Outages


def add_outage(
    store: Store,
    start: datetime = NOW,
    hours: int = 2,
    devices: tuple[str, ...] = (OTHER_DEVICE, DEVICE, DEVICE),
) -> int:
    outage = store.add_outage(
        "sap",
        start,
        start + timedelta(hours=hours),
        "Europe/Berlin",
        "SAP is down until 15:00",
        "alice",
        NOW,
        devices,
    )
    return outage.outage_id


def test_add_outage_round_trip(store: Store) -> None:
    berlin = timezone(timedelta(hours=1))
    outage = store.add_outage(
        "sap",
        NOW.astimezone(berlin),
        NOW + timedelta(hours=2),
        "Europe/Berlin",
        "SAP is down until 15:00",
        "alice",
        NOW,
        [OTHER_DEVICE, DEVICE, DEVICE],
    )

    (listed,) = store.list_outages(NOW)

    assert listed == outage
    assert outage.app_id == "sap"
    assert outage.start_time == NOW
    assert outage.start_time.tzinfo == UTC
    assert outage.end_time == NOW + timedelta(hours=2)
    assert outage.time_zone == "Europe/Berlin"
    assert outage.message == "SAP is down until 15:00"
    assert outage.declared_by == "alice"
    assert outage.declare_time == NOW
    assert outage.affected_device_ids == (DEVICE, OTHER_DEVICE)


def test_add_outage_stores_json(store: Store, database_url: str) -> None:
    outage_id = add_outage(store)

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(
                text("SELECT affected_device_ids FROM outages WHERE outage_id = :id"),
                {"id": outage_id},
            ).scalar_one()
    finally:
        engine.dispose()

    assert json.loads(stored) == [DEVICE, OTHER_DEVICE]


def test_add_outage_no_devices(store: Store) -> None:
    add_outage(store, devices=())

    (outage,) = store.list_outages(NOW)

    assert outage.affected_device_ids == ()


def test_outage_ids_increase(store: Store) -> None:
    first = add_outage(store)
    second = add_outage(store)

    assert second > first


def test_list_outages_end_after(store: Store) -> None:
    ended = add_outage(store, start=NOW - timedelta(hours=3), hours=2)
    running = add_outage(store, start=NOW - timedelta(hours=1), hours=2)

    current = store.list_outages(NOW)
    everything = store.list_outages(NOW - timedelta(days=1))

    assert [outage.outage_id for outage in current] == [running]
    assert [outage.outage_id for outage in everything] == [running, ended]


def test_list_outages_end_exactly_at(store: Store) -> None:
    add_outage(store, start=NOW - timedelta(hours=2), hours=2)

    assert store.list_outages(NOW) == []


def test_list_outages_latest_start_first(store: Store) -> None:
    early = add_outage(store, start=NOW, hours=5)
    late = add_outage(store, start=NOW + timedelta(hours=1), hours=1)
    middle = add_outage(store, start=NOW + timedelta(minutes=30), hours=1)

    outages = store.list_outages(NOW)

    assert [outage.outage_id for outage in outages] == [late, middle, early]


def test_add_outage_end_not_after_start(store: Store) -> None:
    with pytest.raises(ValueError, match="is not after its start time"):
        add_outage(store, hours=0)

    assert store.list_outages(NOW - timedelta(days=1)) == []


def test_add_outage_empty_app(store: Store) -> None:
    with pytest.raises(ValueError, match="app id is empty"):
        store.add_outage("", NOW, NOW + timedelta(hours=1), "", "", "alice", NOW, [])


def test_add_outage_naive_time(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.add_outage(
            "sap",
            datetime(2026, 3, 2),
            NOW + timedelta(hours=1),
            "",
            "",
            "alice",
            NOW,
            [],
        )
