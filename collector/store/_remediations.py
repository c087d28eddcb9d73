"""Remediation records: extracted from reports, listed, summarized per rule."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from collector.store._model import (
    RULE_STATS_OUTCOMES,
    RemediationPosition,
    RuleStats,
    StoredRemediationRecord,
    microseconds_to_datetime,
)
from collector.store._schema import (
    MAX_BIGINT,
    UtcDateTime,
    commands,
    devices,
    remediations,
    rule_states,
)
from fleetmend.v1 import ops_pb2, remediation_pb2, report_pb2

SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
FAILED = remediation_pb2.REMEDIATION_OUTCOME_FAILED
SKIPPED = remediation_pb2.REMEDIATION_OUTCOME_SKIPPED
DRY_RUN = remediation_pb2.REMEDIATION_OUTCOME_DRY_RUN
REFUSED = remediation_pb2.REMEDIATION_OUTCOME_REFUSED
# Outcomes that count as a run of the action.
RUN_OUTCOMES = (SUCCEEDED, FAILED)

# A device counts as recurring for a rule when the rule ran on it again within
# this time after a run that succeeded.
RECURRENCE_WINDOW = timedelta(days=7)

# Summary label of the records of operator commands, which have no rule name.
# As a rule filter it selects those records.
COMMAND_SUMMARY_RULE = "command"


@dataclass(frozen=True)
class RemediationRow:
    """One Report.remediations entry, validated, as the row ingest inserts."""

    values: dict[str, Any]

    @property
    def rule(self) -> str:
        return str(self.values["rule"])

    @property
    def command_id(self) -> str:
        return str(self.values["command_id"])


def remediation_rows(
    device_id: str,
    sequence: int,
    report: report_pb2.Report,
    received_time: datetime,
) -> tuple[RemediationRow, ...]:
    """Return the rows of a report's remediation records.

    Raises ValueError for a record whose start_time or duration is out of range,
    or whose before or after is not a finite number.
    """
    rows: list[RemediationRow] = []
    for idx, record in enumerate(report.remediations):
        where = f"remediation record {idx} of report {sequence} of device {device_id}"
        start_time = received_time
        if record.HasField("start_time"):
            try:
                start_time = record.start_time.ToDatetime(tzinfo=UTC)
            except ValueError as error:
                raise ValueError(
                    f"{where} has an invalid start_time: {error}"
                ) from error
        try:
            duration_ms = record.duration.ToMilliseconds()
        except ValueError as error:
            raise ValueError(f"{where} has an invalid duration: {error}") from error
        # SQLite stores NaN as NULL, which the NOT NULL columns reject.
        for name, value in (("before", record.before), ("after", record.after)):
            if not math.isfinite(value):
                raise ValueError(
                    f"{where} has {name} {value}; expected a finite number"
                )
        rows.append(
            RemediationRow(
                {
                    "device_id": device_id,
                    "sequence": sequence,
                    "idx": idx,
                    "rule": record.rule,
                    "command_id": record.command_id,
                    "action": record.action.WhichOneof("kind") or "",
                    "outcome": int(record.outcome),
                    "reason": record.reason,
                    "before": record.before,
                    "after": record.after,
                    "unit": record.unit,
                    "start_time": start_time,
                    "duration_ms": duration_ms,
                    "repeat_count": record.repeat_count,
                    "bytes_freed": min(record.bytes_freed, MAX_BIGINT),
                    "record_pb": record.SerializeToString(),
                    "receive_time": received_time,
                }
            )
        )
    return tuple(rows)


def insert_rows(connection: Connection, rows: Sequence[RemediationRow]) -> None:
    """Insert remediation rows; a (device, sequence, idx) stored already is kept."""
    if not rows:
        return
    insert: sqlite.Insert | postgresql.Insert
    if connection.dialect.name == "postgresql":
        insert = postgresql.insert(remediations)
    else:
        insert = sqlite.insert(remediations)
    statement = insert.on_conflict_do_nothing(
        index_elements=[
            remediations.c.device_id,
            remediations.c.sequence,
            remediations.c.idx,
        ]
    )
    connection.execute(statement, [row.values for row in rows])


def mark_commands_done(
    connection: Connection, done: dict[tuple[str, str], datetime]
) -> set[str]:
    """Set done_time of the commands (device id, command id) not done yet.

    Returns the ids of the commands that this call marked done. A command id of
    another device is left alone, so that a device cannot complete another
    device's commands.
    """
    marked: set[str] = set()
    statement = (
        update(commands)
        .where(commands.c.command_id == bindparam("target_command_id"))
        .where(commands.c.device_id == bindparam("target_device_id"))
        .where(commands.c.done_time.is_(None))
        .values(done_time=bindparam("new_done_time", type_=UtcDateTime()))
        .returning(commands.c.command_id)
    )
    for (device_id, command_id), done_time in sorted(done.items()):
        result = connection.execute(
            statement,
            {
                "target_command_id": command_id,
                "target_device_id": device_id,
                "new_done_time": done_time,
            },
        )
        marked.update(result.scalars())
    return marked


def list_remediations(
    connection: Connection,
    limit: int,
    before: RemediationPosition | None,
    device_id: str,
    rule: str,
    outcome: int,
    since: datetime | None,
) -> list[StoredRemediationRecord]:
    """Return up to limit records before the position, newest start time first."""
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    query = (
        select(
            remediations.c.device_id,
            remediations.c.sequence,
            remediations.c.idx,
            remediations.c.record_pb,
            remediations.c.receive_time,
            remediations.c.start_time,
            devices.c.hostname,
        )
        .join(devices, devices.c.device_id == remediations.c.device_id)
        .where(*_filters(device_id, rule, outcome, since))
        .order_by(
            remediations.c.start_time.desc(),
            remediations.c.device_id.desc(),
            remediations.c.sequence.desc(),
            remediations.c.idx.desc(),
        )
        .limit(limit)
    )
    if before is not None:
        query = query.where(_before(before))

    stored: list[StoredRemediationRecord] = []
    for row in connection.execute(query).mappings():
        record = remediation_pb2.RemediationRecord()
        record.ParseFromString(row["record_pb"])
        stored.append(
            StoredRemediationRecord(
                device_id=row["device_id"],
                hostname=row["hostname"],
                sequence=int(row["sequence"]),
                idx=int(row["idx"]),
                record=record,
                receive_time=row["receive_time"],
                start_time=row["start_time"],
            )
        )
    return stored


def summarize_remediations(
    connection: Connection,
    device_id: str,
    rule: str,
    outcome: int,
    since: datetime | None,
) -> list[ops_pb2.RuleSummary]:
    """Return one summary per rule over the records that match, by rule name.

    The records of operator commands are summarized as the rule "command".
    skipped, refused and dry_runs count the records of their outcome, and a
    record whose repeat_count is above 1 counts as that many.
    """
    # NOTE: SetPolicy and current agents reject the rule name "command", but
    # an older agent's local policy can still use it. Such a rule gets a
    # second summary with the label of operator commands, and the rule filter
    # "command" does not select its records.
    filters = _filters(device_id, rule, outcome, since)
    counts = (
        select(
            remediations.c.rule,
            _count_outcome(SUCCEEDED).label("succeeded"),
            _count_outcome(FAILED).label("failed"),
            _count_with_repeats(SKIPPED).label("skipped"),
            _count_with_repeats(REFUSED).label("refused"),
            _count_with_repeats(DRY_RUN).label("dry_runs"),
            func.count(remediations.c.device_id.distinct()).label("devices"),
        )
        .where(*filters)
        .group_by(remediations.c.rule)
    )
    recurring = _recurring_devices(connection, filters)

    # Sorted here, by code point, because PostgreSQL would sort by the
    # database's locale.
    rows = sorted(connection.execute(counts).mappings(), key=lambda row: row["rule"])
    summaries: list[ops_pb2.RuleSummary] = []
    for row in rows:
        succeeded = int(row["succeeded"])
        failed = int(row["failed"])
        runs = succeeded + failed
        summaries.append(
            ops_pb2.RuleSummary(
                rule=row["rule"] or COMMAND_SUMMARY_RULE,
                runs=runs,
                succeeded=succeeded,
                failed=failed,
                skipped=int(row["skipped"]),
                refused=int(row["refused"]),
                dry_runs=int(row["dry_runs"]),
                success_rate=succeeded / runs if runs else 0.0,
                recurring_devices=recurring.get(row["rule"], 0),
                devices=int(row["devices"]),
            )
        )
    return summaries


def rule_statistics(
    connection: Connection, since_day_start: datetime
) -> dict[str, RuleStats]:
    """Return the run statistics of every rule that has runs, by rule name."""
    # NOTE: both queries read every run record of every rule, so their cost
    # grows with the stored history; nothing prunes old records yet.
    if since_day_start.utcoffset() is None:
        raise ValueError(
            f"since_day_start {since_day_start} is naive; pass a timezone-aware one"
        )
    is_run = remediations.c.outcome.in_(RUN_OUTCOMES)
    is_failure = remediations.c.outcome == FAILED
    current = or_(
        rule_states.c.rollout_time.is_(None),
        remediations.c.start_time >= rule_states.c.rollout_time,
    )
    since_change = or_(
        rule_states.c.changed_time.is_(None),
        remediations.c.start_time >= rule_states.c.changed_time,
    )
    totals = (
        select(
            remediations.c.rule,
            _count_if(current).label("runs"),
            _count_if(and_(current, is_failure)).label("failures"),
            _count_if(remediations.c.start_time >= since_day_start).label("today"),
            _count_if(since_change).label("runs_since_change"),
            _count_if(and_(since_change, is_failure)).label("failures_since_change"),
        )
        .select_from(
            remediations.outerjoin(
                rule_states, rule_states.c.name == remediations.c.rule
            )
        )
        .where(remediations.c.rule != "", is_run)
        .group_by(remediations.c.rule)
    )

    outcomes, outcomes_since_change = _latest_outcomes(connection)
    statistics: dict[str, RuleStats] = {}
    for row in connection.execute(totals).mappings():
        name = row["rule"]
        statistics[name] = RuleStats(
            runs=int(row["runs"]),
            failures=int(row["failures"]),
            runs_today=int(row["today"]),
            last_outcomes=tuple(outcomes.get(name, ())),
            runs_since_change=int(row["runs_since_change"]),
            failures_since_change=int(row["failures_since_change"]),
            last_outcomes_since_change=tuple(outcomes_since_change.get(name, ())),
        )
    return statistics


def _latest_outcomes(
    connection: Connection,
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Return the latest run outcomes per rule, newest first, all and since change.

    "All" means the runs of the rule's present definition, since its state's
    rollout_time.
    """
    rank = (
        func.row_number()
        .over(
            partition_by=remediations.c.rule,
            order_by=(
                remediations.c.start_time.desc(),
                remediations.c.receive_time.desc(),
                remediations.c.device_id.desc(),
                remediations.c.sequence.desc(),
                remediations.c.idx.desc(),
            ),
        )
        .label("rank")
    )
    ranked = (
        select(
            remediations.c.rule,
            remediations.c.outcome,
            remediations.c.start_time,
            rank,
        )
        .where(remediations.c.rule != "", remediations.c.outcome.in_(RUN_OUTCOMES))
        .subquery()
    )
    query = (
        select(
            ranked.c.rule,
            ranked.c.outcome,
            ranked.c.start_time,
            rule_states.c.changed_time,
            rule_states.c.rollout_time,
        )
        .select_from(ranked.outerjoin(rule_states, rule_states.c.name == ranked.c.rule))
        .where(ranked.c.rank <= RULE_STATS_OUTCOMES)
        .order_by(ranked.c.rule, ranked.c.rank)
    )
    outcomes: dict[str, list[int]] = {}
    outcomes_since_change: dict[str, list[int]] = {}
    for row in connection.execute(query).mappings():
        rollout_time = row["rollout_time"]
        if rollout_time is not None and row["start_time"] < rollout_time:
            continue
        outcomes.setdefault(row["rule"], []).append(int(row["outcome"]))
        changed_time = row["changed_time"]
        if changed_time is None or row["start_time"] >= changed_time:
            outcomes_since_change.setdefault(row["rule"], []).append(
                int(row["outcome"])
            )
    return outcomes, outcomes_since_change


def _recurring_devices(
    connection: Connection, filters: list[ColumnElement[bool]]
) -> dict[str, int]:
    """Count, per rule, devices where a successful run was followed by another.

    Each run is paired with the next run of the same rule on the same device
    (by start time), and the pair counts when it started within
    RECURRENCE_WINDOW after the success. Operator commands have no condition
    that could come back, so their records never count.
    """
    next_start = type_coerce(
        func.lead(remediations.c.start_time).over(
            partition_by=(remediations.c.rule, remediations.c.device_id),
            order_by=(
                remediations.c.start_time,
                remediations.c.sequence,
                remediations.c.idx,
            ),
        ),
        UtcDateTime(),
    ).label("next_start")
    runs = (
        select(
            remediations.c.rule,
            remediations.c.device_id,
            remediations.c.outcome,
            remediations.c.start_time,
            next_start,
        )
        .where(
            *filters,
            remediations.c.outcome.in_(RUN_OUTCOMES),
            remediations.c.rule != "",
        )
        .subquery()
    )
    query = (
        select(runs.c.rule, runs.c.device_id, runs.c.start_time, runs.c.next_start)
        .where(runs.c.outcome == SUCCEEDED)
        .where(runs.c.next_start.is_not(None))
    )
    # The window is compared here rather than in SQL because date arithmetic
    # differs between SQLite (text) and PostgreSQL (timestamptz).
    recurring: set[tuple[str, str]] = set()
    for row in connection.execute(query).mappings():
        if row["next_start"] - row["start_time"] <= RECURRENCE_WINDOW:
            recurring.add((row["rule"], row["device_id"]))
    return dict(Counter(rule_name for rule_name, _ in recurring))


def _filters(
    device_id: str, rule: str, outcome: int, since: datetime | None
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if device_id:
        filters.append(remediations.c.device_id == device_id)
    if rule == COMMAND_SUMMARY_RULE:
        filters.append(remediations.c.rule == "")
    elif rule:
        filters.append(remediations.c.rule == rule)
    if outcome:
        filters.append(remediations.c.outcome == outcome)
    if since is not None:
        if since.utcoffset() is None:
            raise ValueError(f"since {since} is naive; pass a timezone-aware datetime")
        filters.append(remediations.c.start_time >= since)
    return filters


def _before(position: RemediationPosition) -> ColumnElement[bool]:
    """Return the condition "comes after position in newest-first order"."""
    start_microseconds, device_id, sequence, idx = position
    start_time = literal(microseconds_to_datetime(start_microseconds), UtcDateTime())
    columns = remediations.c
    return or_(
        columns.start_time < start_time,
        and_(columns.start_time == start_time, columns.device_id < device_id),
        and_(
            columns.start_time == start_time,
            columns.device_id == device_id,
            columns.sequence < sequence,
        ),
        and_(
            columns.start_time == start_time,
            columns.device_id == device_id,
            columns.sequence == sequence,
            columns.idx < idx,
        ),
    )


def _count_outcome(outcome: int) -> ColumnElement[int]:
    return _count_if(remediations.c.outcome == outcome)


def _count_with_repeats(outcome: int) -> ColumnElement[int]:
    """Return the number of events in the records of outcome, with their repeats.

    The agent writes the first skip or refusal of a reason as a record with
    repeat_count 0, and the repeats that follow as one record whose
    repeat_count counts them.
    """
    is_outcome = remediations.c.outcome == outcome
    events = case(
        (
            and_(is_outcome, remediations.c.repeat_count > 1),
            remediations.c.repeat_count,
        ),
        (is_outcome, 1),
        else_=0,
    )
    return func.coalesce(func.sum(events), 0)


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)
