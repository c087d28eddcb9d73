"""The ingest batcher on a real store: failed commits, bisection and their logs."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text

from collector._ingest import Batcher, is_data_error, is_database_error
from collector.store import IncomingReport, Store, StoreError
from fleetmend.v1 import report_pb2

T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)


def incoming(
    sequence: int, hostname: str = "lab", device_id: str | None = None
) -> IncomingReport:
    report = report_pb2.Report(
        sequence=sequence, host=report_pb2.HostFacts(hostname=hostname)
    )
    return IncomingReport(device_id or str(uuid.uuid4()), report, T0)


async def commit_together(
    batcher: Batcher, batch: Sequence[IncomingReport]
) -> list[BaseException | int]:
    """Submit the reports at once, so that they form one batch, and wait."""
    futures = [batcher.submit(item) for item in batch]
    batcher.start()
    await batcher.close()
    return [future.exception() or future.result() for future in futures]


def drop_reports_table(database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE reports"))
    engine.dispose()


def test_bad_sequence_fails_alone(store: Store) -> None:
    good = [incoming(1) for _ in range(9)]
    bad = incoming(2**64 - 1)
    batch = [*good[:4], bad, *good[4:]]
    batcher = Batcher(store)

    outcomes = asyncio.run(commit_together(batcher, batch))

    bad_outcome = outcomes.pop(4)
    assert isinstance(bad_outcome, ValueError)
    assert is_data_error(bad_outcome)
    assert outcomes == [1] * 9
    assert store.count_reports() == 9
    # The good reports were committed in halves of the failed batch.
    assert batcher.committed_batches > 1


def test_repeat_same_device_fails_alone(store: Store) -> None:
    device_id = str(uuid.uuid4())
    batch = [incoming(n, device_id=device_id) for n in (1, 2, 3)]
    batch.insert(1, incoming(2**63, device_id=device_id))

    outcomes = asyncio.run(commit_together(Batcher(store), batch))

    assert isinstance(outcomes[1], ValueError)
    assert all(isinstance(outcome, int) for outcome in [outcomes[0], *outcomes[2:]])
    assert store.count_reports(device_id) == 3
    assert store.committed_sequence(device_id) == 3


def test_database_error_fails_batch(
    store: Store, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    drop_reports_table(database_url)
    batcher = Batcher(store)

    with caplog.at_level(logging.ERROR, logger="collector"):
        outcomes = asyncio.run(
            commit_together(batcher, [incoming(1) for _ in range(8)])
        )

    errors = [outcome for outcome in outcomes if isinstance(outcome, StoreError)]
    assert len(errors) == 8
    assert all(is_database_error(error) for error in errors)
    # A database error is not bisected: the batch was tried once.
    assert batcher.committed_batches == 0
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1


async def commit_one_by_one(batcher: Batcher, count: int) -> None:
    batcher.start()
    for _ in range(count):
        future = batcher.submit(incoming(1))
        await asyncio.wait([future])
    await batcher.close()


def test_repeated_failure_one_line(
    store: Store, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    drop_reports_table(database_url)
    batcher = Batcher(store, repeat_log_interval_seconds=0)

    with caplog.at_level(logging.ERROR, logger="collector"):
        asyncio.run(commit_one_by_one(batcher, 4))

    records = [r for r in caplog.records if r.name == "collector._ingest"]
    assert len(records) == 4
    assert records[0].exc_info is not None
    repeats = records[1:]
    assert all(record.exc_info is None for record in repeats)
    assert all("failed again" in record.getMessage() for record in repeats)
    assert all("same error" in record.getMessage() for record in repeats)


def test_repeated_failure_counted(
    store: Store, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    drop_reports_table(database_url)
    batcher = Batcher(store, repeat_log_interval_seconds=3600)

    with caplog.at_level(logging.ERROR, logger="collector"):
        asyncio.run(commit_one_by_one(batcher, 5))

    records = [r for r in caplog.records if r.name == "collector._ingest"]
    assert len(records) == 1
    assert records[0].exc_info is not None


def test_recovery_logs_failure_count(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def fail_then_succeed() -> None:
        batcher = Batcher(store, repeat_log_interval_seconds=3600)
        batcher.start()
        for sequence in (2**63, 2**63, 1):
            await asyncio.wait([batcher.submit(incoming(sequence))])
        await batcher.close()

    with caplog.at_level(logging.INFO, logger="collector._ingest"):
        asyncio.run(fail_then_succeed())

    messages = [r.getMessage() for r in caplog.records if r.name == "collector._ingest"]
    assert "commits succeed again after 2 failed commits" in messages


def test_nul_hostname_fails_alone(postgres_database_url: str) -> None:
    # PostgreSQL text columns reject NUL characters, with a DataError.
    store = Store.open(postgres_database_url)
    try:
        store.migrate()
        batch = [incoming(1), incoming(1, hostname="a\x00b"), incoming(1)]

        outcomes = asyncio.run(commit_together(Batcher(store), batch))

        assert isinstance(outcomes[1], StoreError)
        assert is_data_error(outcomes[1])
        assert [outcomes[0], outcomes[2]] == [1, 1]
        assert store.count_reports() == 2
    finally:
        store.close()
