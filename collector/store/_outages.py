"""Declared outages of applications."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, RowMapping, insert, select

from collector.store._model import OutageRecord
from collector.store._schema import outages


def add_outage(
    connection: Connection,
    app_id: str,
    start_time: datetime,
    end_time: datetime,
    time_zone: str,
    message: str,
    declared_by: str,
    declare_time: datetime,
    affected_device_ids: Sequence[str],
) -> OutageRecord:
    """Insert an outage and return it with its new id.

    The affected device ids are stored sorted and without repeats.
    """
    for name, value in (
        ("start time", start_time),
        ("end time", end_time),
        ("declare time", declare_time),
    ):
        if value.utcoffset() is None:
            raise ValueError(
                f"outage {name} {value} is naive; pass a timezone-aware datetime"
            )
    if not app_id:
        raise ValueError("outage app id is empty")
    if end_time <= start_time:
        raise ValueError(
            f"outage end time {end_time.isoformat()} is not after its start time "
            f"{start_time.isoformat()}"
        )
    device_ids = tuple(sorted(set(affected_device_ids)))
    result = connection.execute(
        insert(outages).values(
            app_id=app_id,
            start_time=start_time,
            end_time=end_time,
            time_zone=time_zone,
            message=message,
            declared_by=declared_by,
            declare_time=declare_time,
            affected_device_ids=json.dumps(list(device_ids)),
        )
    )
    (outage_id,) = result.inserted_primary_key or (None,)
    if outage_id is None:
        raise RuntimeError("the database returned no id for the new outage")
    query = select(outages).where(outages.c.outage_id == outage_id)
    return _outage_record(connection.execute(query).mappings().one())


def list_outages(connection: Connection, end_after: datetime) -> list[OutageRecord]:
    """Return the outages that end after end_after, latest start first."""
    if end_after.utcoffset() is None:
        raise ValueError(f"end_after {end_after} is naive; pass a timezone-aware one")
    query = (
        select(outages)
        .where(outages.c.end_time > end_after)
        .order_by(outages.c.start_time.desc(), outages.c.outage_id.desc())
    )
    return [_outage_record(record) for record in connection.execute(query).mappings()]


def _outage_record(record: RowMapping) -> OutageRecord:
    device_ids = json.loads(record["affected_device_ids"])
    return OutageRecord(
        outage_id=int(record["outage_id"]),
        app_id=record["app_id"],
        start_time=record["start_time"],
        end_time=record["end_time"],
        time_zone=record["time_zone"],
        message=record["message"],
        declared_by=record["declared_by"],
        declare_time=record["declare_time"],
        affected_device_ids=tuple(str(device_id) for device_id in device_ids),
    )
