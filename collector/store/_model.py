"""Values that cross the store's public interface."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fleetmend.v1 import report_pb2


@dataclass(frozen=True)
class IncomingReport:
    """A report received on a device's stream, not yet committed."""

    device_id: str
    report: report_pb2.Report
    received_time: datetime
    # True when the report's collect_time is not to be trusted; the store then
    # dates the device's last report by received_time.
    clock_skewed: bool = False


class StoreError(Exception):
    """The database could not be opened, migrated or written."""
