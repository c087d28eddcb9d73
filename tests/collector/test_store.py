"""Tests of collector.store on real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from collector.migrations import alembic_config
from collector.store import IncomingReport, Store, StoreError
from collector.store._schema import metadata
from fleetmend.v1 import ops_pb2, report_pb2

DEVICE = "5f0c7d2e-8a41-4c3b-9e0d-2b6f1a7c9d31"
OTHER_DEVICE = "9a3e51c4-0b7d-4f26-8c15-d4e2f6a8b073"
RECEIVED = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def host_facts(
    hostname: str = "pc-ops-017", free_bytes: int = 118_000_000_000
) -> report_pb2.HostFacts:
    return report_pb2.HostFacts(
        hostname=hostname,
        os_name="Debian GNU/Linux",
        os_version="13",
        kernel_version="6.12.48+deb13-amd64",
        architecture="x86_64",
        manufacturer="LENOVO",
        model="20KHCTO1WW",
        memory_bytes=16 * 2**30,
        volumes=[
            report_pb2.Volume(
                mount_point="/",
                device="/dev/nvme0n1p2",
                filesystem="ext4",
                total_bytes=250_000_000_000,
                free_bytes=free_bytes,
            )
        ],
    )


def nvme_disks(percentage_used: int = 28) -> report_pb2.DiskSection:
    """Return the disk section of a Toshiba KBG30ZMV256G as smartctl 7.2 reads it."""
    disk = report_pb2.Disk(
        name="nvme0n1",
        model="KBG30ZMV256G TOSHIBA",
        serial_number="Y8RS10N9KQ3P",
        firmware_version="ADHA0101",
        interface=report_pb2.DISK_INTERFACE_NVME,
        capacity_bytes=256_060_514_304,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        self_assessment=report_pb2.SELF_ASSESSMENT_PASSED,
        nvme_health=report_pb2.NvmeHealth(
            temperature_celsius=42,
            available_spare_percent=100,
            available_spare_threshold_percent=10,
            percentage_used=percentage_used,
            power_cycles=997,
            power_on_hours=5809,
            unsafe_shutdowns=67,
        ),
    )
    return report_pb2.DiskSection(disks=[disk])


def batteries() -> report_pb2.BatterySection:
    """Return a ThinkPad X1 Extreme battery: 69240 of 80400 mWh design."""
    battery = report_pb2.Battery(
        name="BAT0",
        manufacturer="Celxpert",
        model="5B10V98091",
        technology="Li-poly",
        capacity_unit=report_pb2.CAPACITY_UNIT_MICROWATT_HOURS,
        design_capacity=80_400_000,
        full_capacity=69_240_000,
        remaining_capacity=65_440_000,
        cycle_count=326,
        health_percent=86.1,
        status=report_pb2.BATTERY_STATUS_NOT_CHARGING,
    )
    return report_pb2.BatterySection(batteries=[battery])


def credentials() -> report_pb2.CredentialSection:
    credential = report_pb2.Credential(
        kind=report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
        account="alice",
        expiry=report_pb2.CREDENTIAL_EXPIRY_AT_TIME,
        source="chage -l alice",
    )
    credential.expire_time.FromDatetime(datetime(2026, 4, 14, tzinfo=UTC))
    return report_pb2.CredentialSection(credentials=[credential])


def usage() -> report_pb2.UsageSection:
    app = report_pb2.AppUsage(
        app_id="sap-gui", hours_of_week=[8, 9, 10, 32, 33], minutes=[41, 55, 12, 30, 47]
    )
    return report_pb2.UsageSection(enabled=True, apps=[app], window_days=28)


def full_report(
    sequence: int, *, hostname: str = "pc-ops-017", percentage_used: int = 28
) -> report_pb2.Report:
    report = report_pb2.Report(
        sequence=sequence,
        full=True,
        host=host_facts(hostname),
        disks=nvme_disks(percentage_used),
        batteries=batteries(),
        credentials=credentials(),
        usage=usage(),
    )
    report.collect_time.FromDatetime(RECEIVED - timedelta(seconds=2))
    return report


def incoming(
    report: report_pb2.Report,
    received_time: datetime = RECEIVED,
    device_id: str = DEVICE,
    *,
    clock_skewed: bool = False,
) -> IncomingReport:
    return IncomingReport(
        device_id=device_id,
        report=report,
        received_time=received_time,
        clock_skewed=clock_skewed,
    )


def stored_device(store: Store, device_id: str = DEVICE) -> ops_pb2.Device:
    device = store.get_device(device_id)
    assert device is not None
    return device


# Migrations


def test_migrate_empty_database(empty_store: Store) -> None:
    assert empty_store.pending_migrations() == [
        "0001",
        "0002",
        "0003",
        "0004",
        "0005",
        "0006",
    ]

    assert empty_store.migrate() == ["0001", "0002", "0003", "0004", "0005", "0006"]

    assert empty_store.pending_migrations() == []
    assert empty_store.count_reports() == 0


def test_migrate_twice(store: Store) -> None:
    assert store.migrate() == []


def test_migrate_concurrent(empty_store: Store, database_url: str) -> None:
    other = Store.open(database_url)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate(target: Store) -> None:
        try:
            results.append(target.migrate())
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=migrate, args=(target,))
        for target in (empty_store, other)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.close()

    assert errors == []
    assert sorted(results) == [[], ["0001", "0002", "0003", "0004", "0005", "0006"]]


def test_migrate_unknown_revision(store: Store, database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '7f3e9c21'"))
    engine.dispose()

    with pytest.raises(StoreError, match="revision 7f3e9c21") as pending_error:
        store.pending_migrations()
    with pytest.raises(StoreError, match="revision 7f3e9c21"):
        store.migrate()

    assert "newer collector" in str(pending_error.value)


def migrate_to(database_url: str, revision: str) -> None:
    """Upgrade or downgrade the database to revision, as an older collector would."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config(connection)
            current = MigrationContext.configure(connection).get_current_revision()
            if current is not None and int(current) > int(revision):
                command.downgrade(config, revision)
            else:
                command.upgrade(config, revision)
    finally:
        engine.dispose()


def seed_revision_0001(database_url: str) -> None:
    """Write one device and two reports with the columns of revision 0001."""
    report = full_report(2)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO devices (device_id, hostname, hostname_key, "
                    "agent_version, first_seen, last_seen, committed_sequence, "
                    "host_pb, host_sequence) VALUES (:id, 'pc-ops-017', "
                    "'pc-ops-017', '0.1.0', :seen, :seen, 2, :host, 2)"
                ),
                {
                    "id": DEVICE,
                    "seen": RECEIVED.replace(tzinfo=None),
                    "host": report.host.SerializeToString(),
                },
            )
            for sequence in (1, 2):
                connection.execute(
                    text(
                        "INSERT INTO reports (device_id, sequence, received_time, "
                        "is_full, payload) VALUES (:id, :sequence, :seen, :full, "
                        ":payload)"
                    ),
                    {
                        "id": DEVICE,
                        "sequence": sequence,
                        "seen": RECEIVED.replace(tzinfo=None),
                        "full": sequence == 2,
                        "payload": full_report(sequence).SerializeToString(),
                    },
                )
    finally:
        engine.dispose()


def test_migrate_from_0001_keeps_data(empty_store: Store, database_url: str) -> None:
    migrate_to(database_url, "0001")
    seed_revision_0001(database_url)

    applied = empty_store.migrate()

    device = stored_device(empty_store)
    assert applied == ["0002", "0003", "0004", "0005", "0006"]
    assert empty_store.count_reports(DEVICE) == 2
    assert device.hostname == "pc-ops-017"
    assert device.committed_sequence == 2
    assert device.host == host_facts()
    assert device.dropped_reports == 0
    assert not device.HasField("clock_offset")
    assert not device.clock_skewed


def test_migrate_from_0001_then_ingest(empty_store: Store, database_url: str) -> None:
    migrate_to(database_url, "0001")
    seed_revision_0001(database_url)
    empty_store.migrate()
    resent = full_report(2)
    resent.dropped_reports = 9
    newer = full_report(3)
    newer.dropped_reports = 4

    committed = empty_store.ingest([incoming(resent), incoming(newer)])

    assert committed == {DEVICE: 3}
    assert empty_store.count_reports(DEVICE) == 3
    assert stored_device(empty_store).dropped_reports == 4


def test_migrate_from_0001_flags_false(empty_store: Store, database_url: str) -> None:
    migrate_to(database_url, "0001")
    seed_revision_0001(database_url)
    empty_store.migrate()

    engine = create_engine(database_url)
    with engine.connect() as connection:
        flags = connection.execute(
            text("SELECT clock_skewed FROM reports ORDER BY sequence")
        ).all()
    engine.dispose()

    assert [bool(flag) for (flag,) in flags] == [False, False]


def test_schema_matches_migrations(store: Store, database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    engine.dispose()

    assert differences == []


def test_downgrade_0002_keeps_reports(store: Store, database_url: str) -> None:
    store.ingest([incoming(full_report(1)), incoming(full_report(2))])

    migrate_to(database_url, "0001")

    assert store.pending_migrations() == ["0002", "0003", "0004", "0005", "0006"]
    assert store.count_reports(DEVICE) == 2


def test_migrate_from_0002_keeps_data(empty_store: Store, database_url: str) -> None:
    migrate_to(database_url, "0001")
    seed_revision_0001(database_url)
    migrate_to(database_url, "0002")

    applied = empty_store.migrate()

    device = stored_device(empty_store)
    assert applied == ["0003", "0004", "0005", "0006"]
    assert empty_store.count_reports(DEVICE) == 2
    assert device.committed_sequence == 2
    assert device.host == host_facts()
    assert empty_store.revoke_device(DEVICE, RECEIVED) == 0


def test_downgrade_0003_keeps_reports(store: Store, database_url: str) -> None:
    store.ingest([incoming(full_report(1)), incoming(full_report(2))])
    store.append_audit(RECEIVED, "alice", None, "RevokeDevice", "{}", "OK", "")

    migrate_to(database_url, "0002")

    assert store.pending_migrations() == ["0003", "0004", "0005", "0006"]
    assert store.count_reports(DEVICE) == 2
    assert store.migrate() == ["0003", "0004", "0005", "0006"]
    assert store.list_audit(10) == []


def test_ingest_before_migrate(empty_store: Store) -> None:
    with pytest.raises(StoreError, match="storing a batch of 1 reports failed"):
        empty_store.ingest([incoming(full_report(1))])


# Opening


@pytest.mark.parametrize(
    "url",
    [
        "not a database url",
        "mysql+pymysql://fleet:s3cret-pw@127.0.0.1/fleetmend",
        "postgresql+psycopg2://fleet:s3cret-pw@127.0.0.1/fleetmend",
        "sqlite://",
        "sqlite:///:memory:",
    ],
)
def test_open_invalid_url(url: str) -> None:
    with pytest.raises(StoreError) as error:
        Store.open(url)

    assert "sqlite:///PATH" in str(error.value)
    assert "s3cret-pw" not in str(error.value)


def test_open_unreachable_postgres() -> None:
    # A bound socket that does not listen refuses connections, so the test
    # needs no server and aims only at a port it owns.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        url = f"postgresql+psycopg://fleet:s3cret-pw@127.0.0.1:{port}/fleetmend"

        with pytest.raises(StoreError) as error:
            Store.open(url)

    message = str(error.value)
    assert f"postgresql+psycopg://fleet:***@127.0.0.1:{port}/fleetmend" in message
    assert "s3cret-pw" not in message
    assert "OperationalError" in message


def test_open_sqlite_parent_is_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")

    with pytest.raises(StoreError, match="cannot create SQLite database"):
        Store.open(f"sqlite:///{blocker}/store.db")


def test_open_sqlite_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not an SQLite database\n" * 100)

    with pytest.raises(StoreError, match="cannot open database"):
        Store.open(f"sqlite:///{path}")


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_open_sqlite_private_files(tmp_path: Path) -> None:
    path = tmp_path / "state" / "collector" / "store.db"

    with Store.open(f"sqlite:///{path}") as store:
        store.migrate()

    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_sqlite_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with Store.open(f"sqlite:///{path}") as store:
        store.migrate()

    # journal_mode=WAL is stored in the file; the other pragmas are per
    # connection, so they are checked through the store's own behaviour.
    connection = sqlite3.connect(path)
    try:
        (journal_mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    finally:
        connection.close()
    assert journal_mode == "wal"


def test_sqlite_foreign_keys(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.migrate()
        engine = store._engine
        with engine.connect() as connection:
            foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
            synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar()
            busy_timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()

    assert foreign_keys == 1
    assert synchronous == 2  # FULL
    assert busy_timeout == 30_000


# Ingest


def test_ingest_creates_device(store: Store) -> None:
    committed = store.ingest([incoming(full_report(1))])

    device = stored_device(store)
    assert committed == {DEVICE: 1}
    assert device.hostname == "pc-ops-017"
    assert device.committed_sequence == 1
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == RECEIVED - timedelta(
        seconds=2
    )
    assert device.disks == nvme_disks()
    assert device.batteries == batteries()
    assert device.credentials == credentials()
    assert device.usage == usage()


def test_ingest_duplicate(store: Store) -> None:
    store.ingest([incoming(full_report(1))])
    before = stored_device(store)
    # Same (device, sequence), other content and a later receive time.
    resent = full_report(1, hostname="renamed", percentage_used=99)

    committed = store.ingest([incoming(resent, RECEIVED + timedelta(hours=1))])

    assert committed == {DEVICE: 1}
    assert store.count_reports() == 1
    assert stored_device(store) == before


def test_ingest_duplicate_in_batch(store: Store) -> None:
    first = full_report(1)
    repeat = full_report(1, hostname="renamed")

    store.ingest([incoming(first), incoming(repeat)])

    assert store.count_reports() == 1
    assert stored_device(store).hostname == "pc-ops-017"


def test_ingest_out_of_order(store: Store) -> None:
    newer = full_report(5, percentage_used=30)
    older = report_pb2.Report(
        sequence=3, disks=nvme_disks(percentage_used=10), batteries=batteries()
    )
    older.batteries.batteries[0].health_percent = 95.0
    older.collect_time.FromDatetime(RECEIVED - timedelta(hours=1))

    store.ingest([incoming(newer)])
    committed = store.ingest([incoming(older, RECEIVED + timedelta(minutes=1))])

    device = stored_device(store)
    assert committed == {DEVICE: 5}
    assert store.count_reports() == 2
    assert device.disks.disks[0].nvme_health.percentage_used == 30
    assert device.batteries.batteries[0].health_percent == 86.1
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == RECEIVED - timedelta(
        seconds=2
    )


def test_ingest_older_report_fills_unset_section(store: Store) -> None:
    # Each section keeps the sequence of the report that set it, so an older
    # report still sets a section that no newer report carried.
    store.ingest([incoming(report_pb2.Report(sequence=7, host=host_facts()))])
    store.ingest([incoming(report_pb2.Report(sequence=4, disks=nvme_disks(41)))])

    device = stored_device(store)
    assert device.disks.disks[0].nvme_health.percentage_used == 41
    assert device.committed_sequence == 7


def test_ingest_empty_section_replaces(store: Store) -> None:
    removed = report_pb2.Report(sequence=2, batteries=report_pb2.BatterySection())

    store.ingest([incoming(full_report(1))])
    store.ingest([incoming(removed)])

    device = stored_device(store)
    assert device.HasField("batteries")
    assert len(device.batteries.batteries) == 0
    assert device.disks == nvme_disks()


def test_ingest_absent_section_kept(store: Store) -> None:
    delta = report_pb2.Report(sequence=2, host=host_facts(free_bytes=90_000_000_000))

    store.ingest([incoming(full_report(1))])
    store.ingest([incoming(delta)])

    device = stored_device(store)
    assert device.host.volumes[0].free_bytes == 90_000_000_000
    assert device.batteries == batteries()
    assert device.usage == usage()


def test_ingest_unset_sections_absent(store: Store) -> None:
    store.ingest([incoming(report_pb2.Report(sequence=1, host=host_facts()))])

    device = stored_device(store)
    assert device.HasField("host")
    assert not device.HasField("disks")
    assert not device.HasField("batteries")
    assert not device.HasField("credentials")
    assert not device.HasField("usage")


def test_ingest_report_without_collect_time(store: Store) -> None:
    store.ingest([incoming(report_pb2.Report(sequence=1, host=host_facts()))])

    device = stored_device(store)
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == RECEIVED


def test_committed_sequence(store: Store) -> None:
    assert store.committed_sequence(DEVICE) == 0

    committed = store.ingest(
        [incoming(report_pb2.Report(sequence=sequence)) for sequence in (2, 1, 4)]
    )

    assert committed == {DEVICE: 4}
    assert store.committed_sequence(DEVICE) == 4
    assert stored_device(store).committed_sequence == 4


def test_ingest_per_device_result(store: Store) -> None:
    store.ingest([incoming(full_report(3))])

    committed = store.ingest(
        [
            incoming(full_report(3)),
            incoming(full_report(8), device_id=OTHER_DEVICE),
        ]
    )

    assert committed == {DEVICE: 3, OTHER_DEVICE: 8}


def test_ingest_empty_batch(store: Store) -> None:
    assert store.ingest([]) == {}


def test_count_reports(store: Store) -> None:
    store.ingest(
        [
            incoming(full_report(1)),
            incoming(report_pb2.Report(sequence=2)),
            incoming(full_report(1), device_id=OTHER_DEVICE),
        ]
    )

    assert store.count_reports() == 3
    assert store.count_reports(DEVICE) == 2
    assert store.count_reports(OTHER_DEVICE) == 1
    assert store.count_reports("unknown") == 0


@pytest.mark.parametrize("sequence", [0, 2**63])
def test_ingest_invalid_sequence(store: Store, sequence: int) -> None:
    batch = [incoming(full_report(1)), incoming(report_pb2.Report(sequence=sequence))]

    with pytest.raises(ValueError, match=f"sequence {sequence}"):
        store.ingest(batch)

    assert store.count_reports() == 0
    assert store.get_device(DEVICE) is None


def test_ingest_naive_received_time(store: Store) -> None:
    naive = incoming(full_report(1), received_time=RECEIVED.replace(tzinfo=None))

    with pytest.raises(ValueError, match="naive"):
        store.ingest([naive])

    assert store.count_reports() == 0


def test_ingest_largest_sequence(store: Store) -> None:
    committed = store.ingest([incoming(report_pb2.Report(sequence=2**63 - 1))])

    assert committed == {DEVICE: 2**63 - 1}


def report_dropping(sequence: int, dropped: int) -> report_pb2.Report:
    report = full_report(sequence)
    report.dropped_reports = dropped
    return report


def test_ingest_dropped_reports_summed(store: Store) -> None:
    store.ingest([incoming(report_dropping(1, 3))])

    store.ingest([incoming(report_dropping(3, 5)), incoming(report_dropping(2, 0))])

    assert stored_device(store).dropped_reports == 8


def test_ingest_dropped_duplicate_once(store: Store) -> None:
    store.ingest([incoming(report_dropping(1, 3))])

    store.ingest([incoming(report_dropping(1, 3))])
    store.ingest([incoming(report_dropping(2, 4)), incoming(report_dropping(2, 4))])

    assert stored_device(store).dropped_reports == 7


def test_ingest_dropped_saturates(store: Store) -> None:
    store.ingest([incoming(report_dropping(1, 2**63 - 5))])
    store.ingest([incoming(report_dropping(2, 10))])

    assert stored_device(store).dropped_reports == 2**63 - 1


def test_ingest_dropped_uint64_max(store: Store) -> None:
    store.ingest([incoming(report_dropping(1, 2**64 - 1))])

    assert stored_device(store).dropped_reports == 2**63 - 1


def stored_flags(database_url: str) -> dict[int, bool]:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT sequence, clock_skewed FROM reports"))
        flags = {int(sequence): bool(flag) for sequence, flag in rows}
    engine.dispose()
    return flags


def test_ingest_skewed_flag_stored(store: Store, database_url: str) -> None:
    store.ingest(
        [incoming(full_report(1)), incoming(full_report(2), clock_skewed=True)]
    )

    assert stored_flags(database_url) == {1: False, 2: True}


def test_ingest_skewed_dated_by_receipt(store: Store) -> None:
    report = full_report(1)
    report.collect_time.FromDatetime(RECEIVED + timedelta(days=400))

    store.ingest([incoming(report, clock_skewed=True)])

    device = stored_device(store)
    assert device.clock_skewed
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == RECEIVED


def test_ingest_older_skewed_keeps_flag(store: Store) -> None:
    store.ingest([incoming(full_report(5))])

    store.ingest([incoming(full_report(4), clock_skewed=True)])

    device = stored_device(store)
    assert not device.clock_skewed
    assert device.last_report_time.ToDatetime(tzinfo=UTC) == RECEIVED - timedelta(
        seconds=2
    )


def test_ingest_newer_report_clears_flag(store: Store) -> None:
    store.ingest([incoming(full_report(1), clock_skewed=True)])

    store.ingest([incoming(full_report(2))])

    assert not stored_device(store).clock_skewed


def test_ingest_skewed_report_sets_flag(store: Store) -> None:
    store.record_hello(
        DEVICE, "0.1.0", RECEIVED, clock_offset=timedelta(0), clock_skewed=False
    )

    store.ingest([incoming(full_report(1), clock_skewed=True)])

    device = stored_device(store)
    assert device.clock_skewed
    assert device.clock_offset.ToTimedelta() == timedelta(0)


# Last-seen times


def test_last_seen_never_moves_back(store: Store) -> None:
    later = RECEIVED + timedelta(minutes=10)

    store.ingest([incoming(full_report(1), later)])
    store.ingest([incoming(report_pb2.Report(sequence=2), RECEIVED)])

    device = stored_device(store)
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == later
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == later


def test_last_seen_latest_in_batch(store: Store) -> None:
    times = [RECEIVED + timedelta(seconds=offset) for offset in (5, 30, 12)]

    store.ingest(
        [
            incoming(report_pb2.Report(sequence=index + 1), time)
            for index, time in enumerate(times)
        ]
    )

    device = stored_device(store)
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == max(times)
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == min(times)


def test_times_returned_in_utc(store: Store) -> None:
    berlin_summer = timezone(timedelta(hours=2))
    received = datetime(2026, 7, 1, 11, 0, 0, 123456, tzinfo=berlin_summer)

    store.ingest([incoming(full_report(1), received)])

    last_seen = stored_device(store).last_seen_time.ToDatetime(tzinfo=UTC)
    assert last_seen == received
    assert last_seen.hour == 9
    assert last_seen.microsecond == 123456


def test_record_hello_new_device(store: Store) -> None:
    committed = store.record_hello(DEVICE, "0.1.0", RECEIVED)

    device = stored_device(store)
    assert committed == 0
    assert device.agent_version == "0.1.0"
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED
    assert not device.HasField("host")


def test_record_hello_known_device(store: Store) -> None:
    store.ingest([incoming(full_report(6))])

    committed = store.record_hello(DEVICE, "0.2.0", RECEIVED + timedelta(hours=2))
    store.record_hello(DEVICE, "0.2.1", RECEIVED - timedelta(days=1))

    device = stored_device(store)
    assert committed == 6
    assert device.agent_version == "0.2.1"
    assert device.last_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED + timedelta(hours=2)
    assert device.first_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED


def test_record_hello_clock_offset(store: Store) -> None:
    offset = timedelta(minutes=-42, microseconds=-250)

    store.record_hello(
        DEVICE, "0.1.0", RECEIVED, clock_offset=offset, clock_skewed=True
    )

    device = stored_device(store)
    assert device.clock_offset.ToTimedelta() == offset
    assert device.clock_skewed


def test_record_hello_replaces_offset(store: Store) -> None:
    store.record_hello(
        DEVICE, "0.1.0", RECEIVED, clock_offset=timedelta(hours=3), clock_skewed=True
    )

    store.record_hello(
        DEVICE, "0.1.0", RECEIVED, clock_offset=timedelta(seconds=2), clock_skewed=False
    )

    device = stored_device(store)
    assert device.clock_offset.ToTimedelta() == timedelta(seconds=2)
    assert not device.clock_skewed


def test_record_hello_without_offset(store: Store) -> None:
    store.record_hello(
        DEVICE, "0.1.0", RECEIVED, clock_offset=timedelta(hours=3), clock_skewed=True
    )

    store.record_hello(DEVICE, "0.1.0", RECEIVED)

    device = stored_device(store)
    assert not device.HasField("clock_offset")
    assert not device.clock_skewed


def test_record_hello_offset_too_large(store: Store) -> None:
    with pytest.raises(ValueError, match="64 bits"):
        store.record_hello(
            DEVICE, "0.1.0", RECEIVED, clock_offset=timedelta(days=999_999_999)
        )


def test_touch(store: Store) -> None:
    store.record_hello(DEVICE, "0.1.0", RECEIVED)
    store.record_hello(OTHER_DEVICE, "0.1.0", RECEIVED + timedelta(hours=3))
    touched = RECEIVED + timedelta(hours=1)

    store.touch([DEVICE, OTHER_DEVICE, "never-seen"], touched)

    assert stored_device(store).last_seen_time.ToDatetime(tzinfo=UTC) == touched
    assert stored_device(store, OTHER_DEVICE).last_seen_time.ToDatetime(
        tzinfo=UTC
    ) == RECEIVED + timedelta(hours=3)
    assert store.get_device("never-seen") is None


def test_touch_naive_time(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.touch([DEVICE], datetime(2026, 3, 2, 9, 30))


# Queries


def test_list_devices_paging(store: Store) -> None:
    device_ids = [f"{index:02d}-device" for index in range(5)]
    store.ingest(
        [incoming(full_report(1), device_id=device_id) for device_id in device_ids]
    )

    first = store.list_devices(limit=2)
    second = store.list_devices(limit=2, after_device_id=first[-1].device_id)
    third = store.list_devices(limit=2, after_device_id=second[-1].device_id)
    after_last = store.list_devices(limit=2, after_device_id=third[-1].device_id)

    assert [device.device_id for device in first] == device_ids[0:2]
    assert [device.device_id for device in second] == device_ids[2:4]
    assert [device.device_id for device in third] == device_ids[4:5]
    assert after_last == []


def test_list_devices_byte_order(store: Store) -> None:
    device_ids = ["b-device", "B-device", "a-device", "Z-device"]
    for device_id in device_ids:
        store.record_hello(device_id, "0.1.0", RECEIVED)

    listed = [device.device_id for device in store.list_devices(limit=10)]

    assert listed == ["B-device", "Z-device", "a-device", "b-device"]


def test_list_devices_hostname(store: Store) -> None:
    store.ingest(
        [
            incoming(full_report(1, hostname="PC-OPS-017")),
            incoming(full_report(1, hostname="pc-ops-0170"), device_id=OTHER_DEVICE),
        ]
    )

    matched = store.list_devices(limit=10, hostname="pc-ops-017")
    unmatched = store.list_devices(limit=10, hostname="pc-ops-01")

    assert [device.device_id for device in matched] == [DEVICE]
    assert matched[0].hostname == "PC-OPS-017"
    assert unmatched == []


def test_list_devices_hostname_renamed(store: Store) -> None:
    store.ingest([incoming(full_report(1, hostname="old-name"))])
    store.ingest([incoming(report_pb2.Report(sequence=2, host=host_facts("NEW-name")))])

    assert store.list_devices(limit=10, hostname="old-name") == []
    assert len(store.list_devices(limit=10, hostname="new-name")) == 1


def test_list_devices_summary(store: Store) -> None:
    store.ingest([incoming(full_report(1))])

    (summary,) = store.list_devices(limit=10)
    (full,) = store.list_devices(limit=10, full=True)

    assert summary.HasField("host")
    assert summary.committed_sequence == 1
    assert summary.HasField("last_seen_time")
    assert not summary.HasField("disks")
    assert not summary.HasField("batteries")
    assert full == stored_device(store)


def test_list_devices_negative_limit(store: Store) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.list_devices(limit=-1)


def test_get_device_unknown(store: Store) -> None:
    assert store.get_device("00000000-0000-0000-0000-000000000000") is None


# Concurrency


def _batches(sequences: range) -> Iterator[list[IncomingReport]]:
    """Yield one batch per sequence number, with one report for each of 10 devices."""
    device_ids = [f"device-{index}" for index in range(10)]
    for sequence in sequences:
        yield [
            incoming(
                report_pb2.Report(
                    sequence=sequence, host=host_facts(free_bytes=sequence)
                ),
                RECEIVED + timedelta(seconds=sequence),
                device_id,
            )
            for device_id in device_ids
        ]


def test_concurrent_ingest(store: Store) -> None:
    errors: list[BaseException] = []

    def ingest_all(sequences: range) -> None:
        try:
            for batch in _batches(sequences):
                store.ingest(batch)
        except BaseException as error:
            errors.append(error)

    # One thread counts up from 1 to 30, the other down from 40 to 11, so they
    # create the same devices at once, both send 11 to 30 and the newest
    # sequence arrives early.
    threads = [
        threading.Thread(target=ingest_all, args=(sequences,))
        for sequences in (range(1, 31), range(40, 10, -1))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert store.count_reports() == 10 * 40
    for index in range(10):
        device = stored_device(store, f"device-{index}")
        assert device.committed_sequence == 40
        assert device.host.volumes[0].free_bytes == 40
        assert device.last_seen_time.ToDatetime(tzinfo=UTC) == RECEIVED + timedelta(
            seconds=40
        )
