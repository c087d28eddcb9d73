"""Tests of the store's self-healing state: policies, rule states, commands, records.

Every test runs on a real SQLite file and, where FLEETMEND_TEST_POSTGRES_URL is
set, on a real PostgreSQL database.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import Table, create_engine, func, select, text

from collector import auth
from collector.migrations import alembic_config
from collector.store import (
    RULE_STATS_OUTCOMES,
    CommandRecord,
    IncomingReport,
    Store,
    StoredRemediationRecord,
    UnknownDeviceError,
)
from collector.store._schema import commands, remediations
from fleetmend.v1 import ops_pb2, remediation_pb2, report_pb2

DEVICE = "5f0c7d2e-8a41-4c3b-9e0d-2b6f1a7c9d31"
OTHER_DEVICE = "9a3e51c4-0b7d-4f26-8c15-d4e2f6a8b073"
THIRD_DEVICE = "c2d9e7a1-3f48-4b65-a0c1-7e5b9d2f4a86"
NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)

SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
FAILED = remediation_pb2.REMEDIATION_OUTCOME_FAILED
SKIPPED = remediation_pb2.REMEDIATION_OUTCOME_SKIPPED
DRY_RUN = remediation_pb2.REMEDIATION_OUTCOME_DRY_RUN
REFUSED = remediation_pb2.REMEDIATION_OUTCOME_REFUSED


def clear_cache_rule(
    name: str = "low-disk", canary_percent: int = 0
) -> remediation_pb2.Rule:
    rule = remediation_pb2.Rule(name=name)
    rule.condition.free_space_below.mount_point = "/"
    rule.condition.free_space_below.ratio = 0.1
    rule.action.clear_cache.cache_sets.append("browser")
    rule.fleet.canary_percent = canary_percent
    rule.fleet.promote_after_runs = 20
    rule.fleet.max_failure_ratio = 0.2
    rule.fleet.breaker_window = 10
    return rule


def policy_of(*rules: remediation_pb2.Rule) -> remediation_pb2.Policy:
    return remediation_pb2.Policy(rules=list(rules))


def record(
    rule: str = "low-disk",
    outcome: int = SUCCEEDED,
    start_time: datetime | None = NOW,
    *,
    command_id: str = "",
    bytes_freed: int = 0,
) -> remediation_pb2.RemediationRecord:
    """Return a clear_cache record as the agent writes it for one run."""
    entry = remediation_pb2.RemediationRecord(
        rule=rule,
        command_id=command_id,
        policy_version=3,
        outcome=outcome,  # type: ignore[arg-type]
        reason="" if outcome == SUCCEEDED else "free space did not rise",
        before=8.5e9,
        after=12.25e9,
        unit="free bytes of /",
        bytes_freed=bytes_freed,
    )
    entry.action.clear_cache.cache_sets.append("browser")
    if start_time is not None:
        entry.start_time.FromDatetime(start_time)
    entry.duration.FromMilliseconds(1830)
    return entry


def report_with(
    sequence: int,
    *records: remediation_pb2.RemediationRecord,
    status: remediation_pb2.PolicyStatus | None = None,
) -> report_pb2.Report:
    report = report_pb2.Report(sequence=sequence, remediations=list(records))
    if status is not None:
        report.policy_status.CopyFrom(status)
    return report


def incoming(
    report: report_pb2.Report,
    device_id: str = DEVICE,
    received_time: datetime = NOW,
) -> IncomingReport:
    return IncomingReport(
        device_id=device_id, report=report, received_time=received_time
    )


def ingest_records(
    store: Store,
    device_id: str,
    sequence: int,
    *records: remediation_pb2.RemediationRecord,
) -> None:
    store.ingest([incoming(report_with(sequence, *records), device_id)])


def clear_cache_action() -> remediation_pb2.Action:
    action = remediation_pb2.Action()
    action.clear_cache.cache_sets.append("user_temp")
    action.clear_cache.older_than_days = 7
    return action


def count_rows(database_url: str, table: Table) -> int:
    """Count a table's rows with a connection of its own."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            query = select(func.count()).select_from(table)
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


# Migration


def migrate_to(database_url: str, revision: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config(connection)
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def test_downgrade_0004_keeps_reports(store: Store, database_url: str) -> None:
    ingest_records(store, DEVICE, 1, record())
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)

    migrate_to(database_url, "0003")

    assert store.pending_migrations() == ["0004", "0005", "0006"]
    assert store.count_reports(DEVICE) == 1
    assert store.migrate() == ["0004", "0005", "0006"]
    assert store.current_policy() is None
    assert store.list_remediations(10) == []


def test_migrate_from_0003_device_status(store: Store, database_url: str) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)
    migrate_to(database_url, "0003")

    store.migrate()

    assert store.device_policy_status(DEVICE) is None
    assert store.committed_sequence(DEVICE) == 0


# Policies and rule states


def test_current_policy_none_before_set(store: Store) -> None:
    assert store.current_policy() is None
    assert store.rule_states() == {}


def test_set_policy_versions_increase(store: Store) -> None:
    first = store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)
    second = store.set_policy(
        policy_of(clear_cache_rule(), clear_cache_rule("other")),
        "bob",
        NOW + timedelta(minutes=5),
    )

    current = store.current_policy()
    assert second > first
    assert current is not None
    assert current.version == second
    assert current.policy.version == second
    assert [rule.name for rule in current.policy.rules] == ["low-disk", "other"]
    assert current.set_by == "bob"
    assert current.set_time == NOW + timedelta(minutes=5)


def test_set_policy_leaves_argument(store: Store) -> None:
    policy = policy_of(clear_cache_rule())

    store.set_policy(policy, "alice", NOW)

    assert policy.version == 0


def test_set_policy_keeps_rule_content(store: Store) -> None:
    rule = clear_cache_rule(canary_percent=10)
    rule.limits.cooldown.FromSeconds(3600)
    rule.limits.quiet_hours.add(start_hour=22, end_hour=7)

    version = store.set_policy(policy_of(rule), "alice", NOW)

    current = store.current_policy()
    assert current is not None
    expected = policy_of(rule)
    expected.version = version
    assert current.policy == expected


@pytest.mark.parametrize(
    ("canary_percent", "stage"),
    [(0, "active"), (1, "canary"), (50, "canary"), (99, "canary"), (100, "active")],
)
def test_set_policy_initial_stage(
    store: Store, canary_percent: int, stage: str
) -> None:
    store.set_policy(
        policy_of(clear_cache_rule(canary_percent=canary_percent)), "alice", NOW
    )

    state = store.rule_states()["low-disk"]
    assert state.stage == stage
    assert state.reason == ""
    assert state.changed_by == "alice"
    assert state.changed_time == NOW


def test_set_policy_keeps_existing_state(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule(canary_percent=10)), "alice", NOW)
    store.set_rule_state("low-disk", "paused", "breaker tripped", "fleet", NOW)

    store.set_policy(
        policy_of(clear_cache_rule(canary_percent=10), clear_cache_rule("new-rule")),
        "bob",
        NOW + timedelta(hours=1),
    )

    states = store.rule_states()
    assert states["low-disk"].stage == "paused"
    assert states["low-disk"].reason == "breaker tripped"
    assert states["low-disk"].changed_time == NOW
    assert states["new-rule"].stage == "active"
    assert states["new-rule"].changed_by == "bob"


def redefined(rule: remediation_pb2.Rule) -> remediation_pb2.Rule:
    """Return rule with another action under the same name and fleet limits."""
    changed = remediation_pb2.Rule()
    changed.CopyFrom(rule)
    changed.action.clear_cache.cache_sets[:] = ["thumbnails"]
    return changed


def test_redefined_rule_back_in_canary(store: Store) -> None:
    rule = clear_cache_rule(canary_percent=10)
    store.set_policy(policy_of(rule), "alice", NOW)
    store.set_rule_state("low-disk", "active", "promoted by alice", "alice", NOW)
    for sequence in range(1, 4):
        ingest_records(store, DEVICE, sequence, record(start_time=NOW))
    later = NOW + timedelta(hours=1)

    version = store.set_policy(policy_of(redefined(rule)), "bob", later)

    state = store.rule_states()["low-disk"]
    assert state.stage == "canary"
    assert state.reason == (
        f"changed in policy version {version}, so it runs on its canary set again"
    )
    assert state.changed_by == "bob"
    assert state.changed_time == later
    assert state.rollout_time == later
    stats = store.rule_statistics(NOW.replace(hour=0, minute=0))["low-disk"]
    assert stats.runs == 0
    assert stats.last_outcomes == ()
    assert stats.runs_today == 3


def test_redefined_rule_counts_new_runs(store: Store) -> None:
    rule = clear_cache_rule(canary_percent=10)
    store.set_policy(policy_of(rule), "alice", NOW)
    ingest_records(store, DEVICE, 1, record(outcome=FAILED, start_time=NOW))
    later = NOW + timedelta(hours=1)
    store.set_policy(policy_of(redefined(rule)), "bob", later)

    ingest_records(store, DEVICE, 2, record(start_time=later + timedelta(minutes=5)))

    stats = store.rule_statistics(NOW.replace(hour=0, minute=0))["low-disk"]
    assert stats.runs == 1
    assert stats.failures == 0
    assert stats.last_outcomes == (SUCCEEDED,)
    assert stats.runs_today == 2


def test_redefined_rule_without_canary_stays_active(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)
    later = NOW + timedelta(hours=1)

    version = store.set_policy(policy_of(redefined(clear_cache_rule())), "bob", later)

    state = store.rule_states()["low-disk"]
    assert state.stage == "active"
    assert state.reason == (
        f"changed in policy version {version}; its run counts restart"
    )
    assert state.rollout_time == later


def test_redefined_paused_rule_stays_paused(store: Store) -> None:
    rule = clear_cache_rule(canary_percent=10)
    store.set_policy(policy_of(rule), "alice", NOW)
    store.set_rule_state("low-disk", "paused", "breaker tripped", "fleet", NOW)
    later = NOW + timedelta(hours=1)

    store.set_policy(policy_of(redefined(rule)), "bob", later)

    state = store.rule_states()["low-disk"]
    assert state.stage == "paused"
    assert state.reason == "breaker tripped"
    assert state.changed_by == "fleet"
    assert state.changed_time == NOW
    assert state.rollout_time == later


def test_fleet_limits_change_keeps_rollout(store: Store) -> None:
    rule = clear_cache_rule(canary_percent=10)
    store.set_policy(policy_of(rule), "alice", NOW)
    store.set_rule_state("low-disk", "active", "promoted by alice", "alice", NOW)
    ingest_records(store, DEVICE, 1, record(start_time=NOW))
    wider = remediation_pb2.Rule()
    wider.CopyFrom(rule)
    wider.fleet.daily_budget = 50

    store.set_policy(policy_of(wider), "bob", NOW + timedelta(hours=1))

    state = store.rule_states()["low-disk"]
    assert state.stage == "active"
    assert state.reason == "promoted by alice"
    assert state.rollout_time == NOW
    assert store.rule_statistics(NOW.replace(hour=0))["low-disk"].runs == 1


def test_migrate_from_0005_counts_all_runs(store: Store, database_url: str) -> None:
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)
    ingest_records(store, DEVICE, 1, record(start_time=NOW - timedelta(days=1)))
    migrate_to(database_url, "0005")

    assert store.migrate() == ["0006"]

    assert store.rule_states()["low-disk"].rollout_time is None
    assert store.rule_statistics(NOW.replace(hour=0))["low-disk"].runs == 1


def test_set_policy_drops_removed_rules(store: Store) -> None:
    store.set_policy(
        policy_of(clear_cache_rule(), clear_cache_rule("other")), "alice", NOW
    )
    store.set_rule_state("other", "paused", "by alice", "alice", NOW)

    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)
    removed_states = set(store.rule_states())
    store.set_policy(
        policy_of(clear_cache_rule(), clear_cache_rule("other", canary_percent=5)),
        "alice",
        NOW,
    )

    assert removed_states == {"low-disk"}
    assert store.rule_states()["other"].stage == "canary"


def test_set_policy_empty(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)

    version = store.set_policy(policy_of(), "alice", NOW)

    current = store.current_policy()
    assert current is not None
    assert current.version == version
    assert list(current.policy.rules) == []
    assert store.rule_states() == {}


def test_set_policy_duplicate_names(store: Store) -> None:
    policy = policy_of(clear_cache_rule(), clear_cache_rule())

    with pytest.raises(ValueError, match="more than one rule named 'low-disk'"):
        store.set_policy(policy, "alice", NOW)

    assert store.current_policy() is None


def test_set_policy_naive_time(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.set_policy(policy_of(), "alice", NOW.replace(tzinfo=None))


def test_set_policy_concurrent(store: Store, database_url: str) -> None:
    other = Store.open(database_url)
    versions: list[int] = []
    errors: list[BaseException] = []

    def set_policies(target: Store, name: str) -> None:
        # Alternating with an empty policy makes "shared" a new rule each time.
        shared = policy_of(clear_cache_rule("shared"), clear_cache_rule(name))
        try:
            for _ in range(10):
                versions.append(target.set_policy(shared, name, NOW))
                versions.append(target.set_policy(policy_of(), name, NOW))
        except BaseException as error:  # noqa: BLE001 - reported by the assert
            errors.append(error)

    threads = [
        threading.Thread(target=set_policies, args=(store, "alice")),
        threading.Thread(target=set_policies, args=(other, "bob")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.close()

    current = store.current_policy()
    assert errors == []
    assert len(set(versions)) == 40
    assert current is not None
    assert current.version == max(versions)
    assert set(store.rule_states()) == {rule.name for rule in current.policy.rules}


def test_set_rule_state(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule(canary_percent=10)), "alice", NOW)
    later = NOW + timedelta(hours=2)

    updated = store.set_rule_state("low-disk", "active", "promoted", "bob", later)

    assert updated is not None
    assert updated.name == "low-disk"
    assert updated.stage == "active"
    assert updated.reason == "promoted"
    assert updated.changed_by == "bob"
    assert updated.changed_time == later
    assert store.rule_states()["low-disk"] == updated


def test_set_rule_state_unknown_rule(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)

    assert store.set_rule_state("missing", "paused", "", "bob", NOW) is None
    assert set(store.rule_states()) == {"low-disk"}


def test_set_rule_state_invalid_stage(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW)

    with pytest.raises(ValueError, match="invalid rule stage 'stopped'"):
        store.set_rule_state("low-disk", "stopped", "", "bob", NOW)

    assert store.rule_states()["low-disk"].stage == "active"


# Commands


def test_create_commands(store: Store) -> None:
    store.record_hello(OTHER_DEVICE, "0.3.0", NOW)
    store.record_hello(DEVICE, "0.3.0", NOW)
    expire = NOW + timedelta(hours=24)

    created = store.create_commands(
        clear_cache_action(), [OTHER_DEVICE, DEVICE, DEVICE], expire, "alice", NOW
    )

    assert [command.device_id for command in created] == [DEVICE, OTHER_DEVICE]
    assert len({command.command_id for command in created}) == 2
    for created_command in created:
        assert created_command.action == clear_cache_action()
        assert created_command.created_by == "alice"
        assert created_command.create_time == NOW
        assert created_command.expire_time == expire
        assert created_command.done_time is None
    assert store.pending_commands(DEVICE, NOW) == [created[0]]
    assert store.pending_commands(OTHER_DEVICE, NOW) == [created[1]]
    assert store.get_command(created[0].command_id) == created[0]


def test_create_commands_unknown_device(store: Store, database_url: str) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)

    with pytest.raises(UnknownDeviceError, match=OTHER_DEVICE) as raised:
        store.create_commands(
            clear_cache_action(),
            [DEVICE, OTHER_DEVICE],
            NOW + timedelta(hours=1),
            "alice",
            NOW,
        )

    assert raised.value.device_ids == (OTHER_DEVICE,)
    assert count_rows(database_url, commands) == 0


def test_create_commands_no_devices(store: Store) -> None:
    created = store.create_commands(
        clear_cache_action(), [], NOW + timedelta(hours=1), "alice", NOW
    )

    assert created == []


def test_create_commands_expire_not_after_now(store: Store) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)

    with pytest.raises(ValueError, match="is not after its create time"):
        store.create_commands(clear_cache_action(), [DEVICE], NOW, "alice", NOW)


def test_create_commands_empty_action(store: Store) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)

    with pytest.raises(ValueError, match="command action is empty"):
        store.create_commands(
            remediation_pb2.Action(), [DEVICE], NOW + timedelta(hours=1), "alice", NOW
        )


def test_pending_commands_expire(store: Store) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)
    expire = NOW + timedelta(hours=1)
    store.create_commands(clear_cache_action(), [DEVICE], expire, "alice", NOW)

    assert len(store.pending_commands(DEVICE, expire - timedelta(seconds=1))) == 1
    assert store.pending_commands(DEVICE, expire) == []


def test_pending_commands_oldest_first(store: Store) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)
    expire = NOW + timedelta(hours=24)
    later = store.create_commands(
        clear_cache_action(), [DEVICE], expire, "bob", NOW + timedelta(minutes=1)
    )
    earlier = store.create_commands(
        clear_cache_action(), [DEVICE], expire, "alice", NOW
    )

    pending = store.pending_commands(DEVICE, NOW + timedelta(minutes=2))

    assert pending == [*earlier, *later]


def test_command_to_message(store: Store) -> None:
    store.record_hello(DEVICE, "0.3.0", NOW)
    expire = NOW + timedelta(hours=24)
    (created,) = store.create_commands(
        clear_cache_action(), [DEVICE], expire, "alice", NOW
    )

    message = created.to_message()

    assert message.command_id == created.command_id
    assert message.action == clear_cache_action()
    assert message.expire_time.ToDatetime(tzinfo=UTC) == expire


def create_one_command(store: Store, device_id: str = DEVICE) -> CommandRecord:
    store.record_hello(device_id, "0.3.0", NOW)
    (created,) = store.create_commands(
        clear_cache_action(), [device_id], NOW + timedelta(hours=24), "alice", NOW
    )
    return created


def test_ingest_marks_command_done(store: Store) -> None:
    created = create_one_command(store)
    done_at = NOW + timedelta(minutes=3)
    entry = record("", SUCCEEDED, command_id=created.command_id)

    result = store.ingest_with_details(
        [incoming(report_with(1, entry), received_time=done_at)]
    )

    stored = store.get_command(created.command_id)
    assert result.done_command_ids == {created.command_id}
    assert result.rules == frozenset()
    assert result.remediation_devices == {DEVICE}
    assert stored is not None
    assert stored.done_time == done_at
    assert store.pending_commands(DEVICE, done_at) == []


def test_ingest_refused_command_done(store: Store) -> None:
    created = create_one_command(store)
    entry = record("", REFUSED, command_id=created.command_id)

    ingest_records(store, DEVICE, 1, entry)

    assert store.pending_commands(DEVICE, NOW) == []


def test_ingest_command_done_time_kept(store: Store) -> None:
    created = create_one_command(store)
    first = record("", SUCCEEDED, command_id=created.command_id)
    store.ingest([incoming(report_with(1, first), received_time=NOW)])

    later = NOW + timedelta(hours=1)
    result = store.ingest_with_details(
        [incoming(report_with(2, first), received_time=later)]
    )

    stored = store.get_command(created.command_id)
    assert stored is not None
    assert stored.done_time == NOW
    assert result.done_command_ids == frozenset()


def test_ingest_other_device_command(store: Store) -> None:
    created = create_one_command(store, OTHER_DEVICE)
    entry = record("", SUCCEEDED, command_id=created.command_id)

    result = store.ingest_with_details([incoming(report_with(1, entry), DEVICE)])

    assert result.done_command_ids == frozenset()
    assert store.pending_commands(OTHER_DEVICE, NOW) == [created]


def test_ingest_unknown_command_id(store: Store) -> None:
    entry = record("", FAILED, command_id="8d7f0a52-unknown")

    result = store.ingest_with_details([incoming(report_with(1, entry))])

    assert result.done_command_ids == frozenset()
    assert len(store.list_remediations(10)) == 1


# Ingest of records and policy status


def test_ingest_stores_records(store: Store) -> None:
    store.ingest(
        [
            incoming(
                report_pb2.Report(
                    sequence=1, host=report_pb2.HostFacts(hostname="pc-ops-017")
                )
            )
        ]
    )
    first = record("low-disk", SUCCEEDED, NOW, bytes_freed=3_750_000_000)
    second = record("restart-cups", FAILED, NOW + timedelta(seconds=30))

    result = store.ingest_with_details([incoming(report_with(2, first, second))])

    stored = store.list_remediations(10)
    assert result.committed == {DEVICE: 2}
    assert result.rules == {"low-disk", "restart-cups"}
    assert result.remediation_devices == {DEVICE}
    assert [item.record for item in stored] == [second, first]
    assert [(item.sequence, item.idx) for item in stored] == [(2, 1), (2, 0)]
    assert stored[0].device_id == DEVICE
    assert stored[0].hostname == "pc-ops-017"
    assert stored[0].receive_time == NOW
    assert stored[0].start_time == NOW + timedelta(seconds=30)


def test_ingest_repeated_report_adds_nothing(store: Store, database_url: str) -> None:
    report = report_with(1, record(), record(outcome=FAILED))
    store.ingest([incoming(report)])

    result = store.ingest_with_details(
        [incoming(report, received_time=NOW + timedelta(minutes=1))]
    )

    assert count_rows(database_url, remediations) == 2
    assert result.committed == {DEVICE: 1}
    assert result.rules == frozenset()
    assert result.remediation_devices == frozenset()


def test_ingest_repeat_in_batch_once(store: Store, database_url: str) -> None:
    report = report_with(1, record())

    result = store.ingest_with_details([incoming(report), incoming(report)])

    assert count_rows(database_url, remediations) == 1
    assert result.rules == {"low-disk"}


def test_ingest_without_records(store: Store) -> None:
    result = store.ingest_with_details([incoming(report_pb2.Report(sequence=1))])

    assert result.committed == {DEVICE: 1}
    assert result.rules == frozenset()
    assert result.remediation_devices == frozenset()
    assert store.list_remediations(10) == []


def test_ingest_record_without_start_time(store: Store) -> None:
    received = NOW + timedelta(minutes=7)

    store.ingest(
        [incoming(report_with(1, record(start_time=None)), received_time=received)]
    )

    (stored,) = store.list_remediations(10)
    assert stored.start_time == received
    assert not stored.record.HasField("start_time")


def test_ingest_record_invalid_start_time(store: Store, database_url: str) -> None:
    entry = record()
    entry.start_time.seconds = 253_402_300_800  # 10000-01-01, beyond datetime
    valid = incoming(report_with(1, record()), OTHER_DEVICE)

    with pytest.raises(ValueError, match="remediation record 0 of report 2 of device"):
        store.ingest([valid, incoming(report_with(2, entry))])

    assert store.count_reports() == 0
    assert count_rows(database_url, remediations) == 0


def test_ingest_record_columns(store: Store, database_url: str) -> None:
    entry = record(bytes_freed=2**64 - 1)
    entry.repeat_count = 4

    store.ingest([incoming(report_with(1, entry))])

    engine = create_engine(database_url)
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT rule, command_id, action, outcome, reason, unit, "
                "duration_ms, repeat_count, bytes_freed FROM remediations"
            )
        ).one()
    engine.dispose()
    (stored,) = store.list_remediations(10)
    assert tuple(row) == (
        "low-disk",
        "",
        "clear_cache",
        SUCCEEDED,
        "",
        "free bytes of /",
        1830,
        4,
        2**63 - 1,
    )
    assert stored.record.bytes_freed == 2**64 - 1


def status(
    applied: int, rejected: int = 0, reason: str = ""
) -> remediation_pb2.PolicyStatus:
    return remediation_pb2.PolicyStatus(
        applied_version=applied, rejected_version=rejected, rejected_reason=reason
    )


def test_ingest_policy_status(store: Store) -> None:
    rejected = status(3, 4, "rule 'low-disk': cache set 'music' is not known")

    store.ingest([incoming(report_with(1, status=rejected))])

    assert store.device_policy_status(DEVICE) == rejected


def test_policy_status_none_before_report(store: Store) -> None:
    store.ingest([incoming(report_pb2.Report(sequence=1))])

    assert store.device_policy_status(DEVICE) is None
    assert store.device_policy_status(OTHER_DEVICE) is None


def test_policy_status_default_policy(store: Store) -> None:
    store.ingest([incoming(report_with(1, status=status(0)))])

    assert store.device_policy_status(DEVICE) == status(0)


def test_policy_status_newest_wins(store: Store) -> None:
    store.ingest([incoming(report_with(3, status=status(5)))])

    store.ingest(
        [
            incoming(report_with(2, status=status(4))),
            incoming(report_with(4)),
        ]
    )

    assert store.device_policy_status(DEVICE) == status(5)


def test_policy_status_later_report_replaces(store: Store) -> None:
    store.ingest([incoming(report_with(1, status=status(4, 5, "invalid")))])

    store.ingest([incoming(report_with(2, status=status(6)))])

    assert store.device_policy_status(DEVICE) == status(6)


def test_policy_status_per_device(store: Store) -> None:
    store.ingest(
        [
            incoming(report_with(1, status=status(2)), DEVICE),
            incoming(report_with(1, status=status(3)), OTHER_DEVICE),
        ]
    )

    assert store.device_policy_status(DEVICE) == status(2)
    assert store.device_policy_status(OTHER_DEVICE) == status(3)


# Listing


def seed_records(store: Store) -> None:
    """Store seven records on three devices over three days."""
    ingest_records(
        store,
        DEVICE,
        1,
        record("low-disk", SUCCEEDED, NOW),
        record("low-disk", FAILED, NOW + timedelta(hours=1)),
    )
    ingest_records(
        store,
        OTHER_DEVICE,
        1,
        record("low-disk", SUCCEEDED, NOW + timedelta(days=1)),
        record("restart-cups", SKIPPED, NOW + timedelta(days=1)),
    )
    ingest_records(
        store,
        THIRD_DEVICE,
        1,
        record("restart-cups", SUCCEEDED, NOW + timedelta(days=2)),
        record("", SUCCEEDED, NOW + timedelta(days=2), command_id="c-1"),
    )
    ingest_records(
        store, DEVICE, 2, record("low-disk", DRY_RUN, NOW + timedelta(days=2))
    )


def keys(records: list[StoredRemediationRecord]) -> list[tuple[str, int, int]]:
    return [(item.device_id, item.sequence, item.idx) for item in records]


def test_list_remediations_newest_first(store: Store) -> None:
    seed_records(store)

    listed = store.list_remediations(100)

    assert keys(listed) == [
        (THIRD_DEVICE, 1, 1),
        (THIRD_DEVICE, 1, 0),
        (DEVICE, 2, 0),
        (OTHER_DEVICE, 1, 1),
        (OTHER_DEVICE, 1, 0),
        (DEVICE, 1, 1),
        (DEVICE, 1, 0),
    ]


def test_list_remediations_paging(store: Store) -> None:
    seed_records(store)
    expected = keys(store.list_remediations(100))

    pages: list[list[tuple[str, int, int]]] = []
    before = None
    while True:
        page = store.list_remediations(3, before)
        if not page:
            break
        pages.append(keys(page))
        before = page[-1].position

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [key for page in pages for key in page] == expected


def test_list_remediations_paging_microseconds(store: Store) -> None:
    start = NOW + timedelta(microseconds=123_457)
    ingest_records(store, DEVICE, 1, record(start_time=start), record(start_time=start))

    first = store.list_remediations(1)
    second = store.list_remediations(1, first[0].position)
    third = store.list_remediations(1, second[0].position)

    assert keys(first) == [(DEVICE, 1, 1)]
    assert keys(second) == [(DEVICE, 1, 0)]
    assert third == []


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"device_id": DEVICE}, [(DEVICE, 2, 0), (DEVICE, 1, 1), (DEVICE, 1, 0)]),
        ({"rule": "restart-cups"}, [(THIRD_DEVICE, 1, 0), (OTHER_DEVICE, 1, 1)]),
        ({"outcome": FAILED}, [(DEVICE, 1, 1)]),
        (
            {"since": NOW + timedelta(days=2)},
            [(THIRD_DEVICE, 1, 1), (THIRD_DEVICE, 1, 0), (DEVICE, 2, 0)],
        ),
        (
            {"rule": "low-disk", "outcome": SUCCEEDED},
            [(OTHER_DEVICE, 1, 0), (DEVICE, 1, 0)],
        ),
    ],
)
def test_list_remediations_filters(
    store: Store, filters: dict[str, object], expected: list[tuple[str, int, int]]
) -> None:
    seed_records(store)

    listed = store.list_remediations(100, None, **filters)  # type: ignore[arg-type]

    assert keys(listed) == expected


def test_list_remediations_negative_limit(store: Store) -> None:
    with pytest.raises(ValueError, match="limit must not be negative"):
        store.list_remediations(-1)


def test_list_remediations_naive_since(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.list_remediations(10, since=NOW.replace(tzinfo=None))


# Summaries


def summaries_by_rule(
    store: Store, **filters: object
) -> dict[str, ops_pb2.RuleSummary]:
    summaries = store.summarize_remediations(**filters)  # type: ignore[arg-type]
    return {summary.rule: summary for summary in summaries}


def test_summarize_remediations(store: Store) -> None:
    seed_records(store)

    summaries = store.summarize_remediations()

    assert [summary.rule for summary in summaries] == [
        "command",
        "low-disk",
        "restart-cups",
    ]
    low_disk = summaries[1]
    assert low_disk.runs == 3
    assert low_disk.succeeded == 2
    assert low_disk.failed == 1
    assert low_disk.skipped == 0
    assert low_disk.success_rate == pytest.approx(2 / 3)
    assert low_disk.devices == 2
    restart = summaries[2]
    assert restart.runs == 1
    assert restart.skipped == 1
    assert restart.success_rate == 1.0
    assert restart.devices == 2
    assert summaries[0].runs == 1
    assert summaries[0].devices == 1


def test_summarize_code_point_order(store: Store) -> None:
    names = ["diska", "disk_a", "disk-b"]
    ingest_records(store, DEVICE, 1, *(record(name) for name in names))

    summaries = store.summarize_remediations()

    assert [summary.rule for summary in summaries] == ["disk-b", "disk_a", "diska"]


def test_summarize_without_runs(store: Store) -> None:
    ingest_records(store, DEVICE, 1, record(outcome=SKIPPED), record(outcome=DRY_RUN))

    (summary,) = store.summarize_remediations()

    assert summary.runs == 0
    assert summary.skipped == 1
    assert summary.success_rate == 0.0
    assert summary.devices == 1


def test_summarize_filters(store: Store) -> None:
    seed_records(store)

    by_device = summaries_by_rule(store, device_id=DEVICE)
    since = summaries_by_rule(store, since=NOW + timedelta(days=1))

    assert set(by_device) == {"low-disk"}
    assert by_device["low-disk"].runs == 2
    assert by_device["low-disk"].devices == 1
    assert since["low-disk"].runs == 1
    assert since["low-disk"].succeeded == 1


def test_summarize_recurring_within_week(store: Store) -> None:
    ingest_records(
        store,
        DEVICE,
        1,
        record(outcome=SUCCEEDED, start_time=NOW),
        record(outcome=FAILED, start_time=NOW + timedelta(days=7)),
    )
    ingest_records(
        store,
        OTHER_DEVICE,
        1,
        record(outcome=SUCCEEDED, start_time=NOW),
        record(outcome=SUCCEEDED, start_time=NOW + timedelta(days=7, seconds=1)),
    )
    ingest_records(
        store,
        THIRD_DEVICE,
        1,
        record(outcome=FAILED, start_time=NOW),
        record(outcome=SUCCEEDED, start_time=NOW + timedelta(hours=1)),
    )

    (summary,) = store.summarize_remediations()

    assert summary.devices == 3
    assert summary.recurring_devices == 1


def test_summarize_recurring_ignores_skips(store: Store) -> None:
    ingest_records(
        store,
        DEVICE,
        1,
        record(outcome=SUCCEEDED, start_time=NOW),
        record(outcome=SKIPPED, start_time=NOW + timedelta(hours=1)),
        record(outcome=DRY_RUN, start_time=NOW + timedelta(hours=2)),
    )

    (summary,) = store.summarize_remediations()

    assert summary.recurring_devices == 0


def test_summarize_recurring_per_rule(store: Store) -> None:
    ingest_records(
        store,
        DEVICE,
        1,
        record("low-disk", SUCCEEDED, NOW),
        record("restart-cups", SUCCEEDED, NOW + timedelta(hours=1)),
        record("restart-cups", SUCCEEDED, NOW + timedelta(hours=2)),
    )

    summaries = summaries_by_rule(store)

    assert summaries["low-disk"].recurring_devices == 0
    assert summaries["restart-cups"].recurring_devices == 1


def test_summarize_recurring_counts_device_once(store: Store) -> None:
    ingest_records(
        store,
        DEVICE,
        1,
        *(
            record(outcome=SUCCEEDED, start_time=NOW + timedelta(hours=hour))
            for hour in range(4)
        ),
    )

    (summary,) = store.summarize_remediations()

    assert summary.runs == 4
    assert summary.recurring_devices == 1


# Rule statistics


def test_rule_statistics(store: Store) -> None:
    seed_records(store)

    statistics = store.rule_statistics(NOW + timedelta(days=1))

    assert set(statistics) == {"low-disk", "restart-cups"}
    low_disk = statistics["low-disk"]
    assert low_disk.runs == 3
    assert low_disk.failures == 1
    assert low_disk.runs_today == 1
    assert low_disk.last_outcomes == (SUCCEEDED, FAILED, SUCCEEDED)
    restart = statistics["restart-cups"]
    assert restart.runs == 1
    assert restart.failures == 0
    assert restart.last_outcomes == (SUCCEEDED,)


def test_rule_statistics_without_state(store: Store) -> None:
    seed_records(store)

    low_disk = store.rule_statistics(NOW)["low-disk"]

    assert low_disk.runs_since_change == 3
    assert low_disk.failures_since_change == 1
    assert low_disk.last_outcomes_since_change == low_disk.last_outcomes


def test_rule_statistics_since_change(store: Store) -> None:
    store.set_policy(policy_of(clear_cache_rule()), "alice", NOW - timedelta(days=1))
    ingest_records(
        store,
        DEVICE,
        1,
        record(outcome=FAILED, start_time=NOW),
        record(outcome=FAILED, start_time=NOW + timedelta(minutes=1)),
        record(outcome=SUCCEEDED, start_time=NOW + timedelta(minutes=3)),
    )
    store.set_rule_state(
        "low-disk", "active", "resumed", "bob", NOW + timedelta(minutes=2)
    )

    low_disk = store.rule_statistics(NOW)["low-disk"]

    assert low_disk.runs == 3
    assert low_disk.failures == 2
    assert low_disk.runs_since_change == 1
    assert low_disk.failures_since_change == 0
    assert low_disk.last_outcomes == (SUCCEEDED, FAILED, FAILED)
    assert low_disk.last_outcomes_since_change == (SUCCEEDED,)


def test_rule_statistics_outcome_cap(store: Store) -> None:
    outcomes = [FAILED if number % 3 == 0 else SUCCEEDED for number in range(1005)]
    records = [
        record(outcome=outcome, start_time=NOW + timedelta(seconds=number))
        for number, outcome in enumerate(outcomes)
    ]
    ingest_records(store, DEVICE, 1, *records)

    low_disk = store.rule_statistics(NOW)["low-disk"]

    assert low_disk.runs == 1005
    assert low_disk.failures == 335
    assert len(low_disk.last_outcomes) == RULE_STATS_OUTCOMES
    assert low_disk.last_outcomes == tuple(reversed(outcomes))[:RULE_STATS_OUTCOMES]


def test_rule_statistics_empty(store: Store) -> None:
    ingest_records(store, DEVICE, 1, record("", SUCCEEDED, command_id="c-1"))
    ingest_records(store, DEVICE, 2, record("low-disk", SKIPPED))

    assert store.rule_statistics(NOW) == {}


def test_rule_statistics_naive_day_start(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.rule_statistics(NOW.replace(tzinfo=None))


# Devices


def test_revoked_device_ids(store: Store) -> None:
    for device_id in (DEVICE, OTHER_DEVICE):
        key = auth.issue_node_key()
        store.enroll_device(
            device_id, "pc-ops-017", "0.3.0", key.credential_id, key.secret_hash, NOW
        )
    store.revoke_device(OTHER_DEVICE, NOW)

    revoked = store.revoked_device_ids([DEVICE, OTHER_DEVICE, THIRD_DEVICE])

    assert revoked == {OTHER_DEVICE}
