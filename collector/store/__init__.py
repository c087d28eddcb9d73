"""Storage of devices and their reports, through SQLAlchemy Core.

The store knows nothing of gRPC: it takes and returns fleetmend.v1 messages and
plain values. SQLite (WAL mode) is the default; PostgreSQL is selected by a
``postgresql+psycopg://`` URL. The schema is managed by Alembic migrations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from fleetmend.v1 import ops_pb2, report_pb2


@dataclass(frozen=True)
class IncomingReport:
    """A report received on a device's stream, not yet committed."""

    device_id: str
    report: report_pb2.Report
    received_time: datetime


class StoreError(Exception):
    """The database could not be opened, migrated or written."""


class Store:
    """CONTRACT ONLY: the store helper replaces this body with the implementation.

    Every method is thread-safe; the gRPC server calls them from a worker thread.
    """

    @classmethod
    def open(cls, url: str) -> Store:
        """Open the database at url; for SQLite, create the file's folder and enable WAL."""
        raise NotImplementedError

    def migrate(self) -> list[str]:
        """Apply pending Alembic migrations and return the revisions applied."""
        raise NotImplementedError

    def pending_migrations(self) -> list[str]:
        """Return the revisions not yet applied, oldest first."""
        raise NotImplementedError

    def record_hello(self, device_id: str, agent_version: str, seen_time: datetime) -> int:
        """Create the device if new, set its agent version and last-seen time.

        Returns the highest sequence number committed for the device (0 if none).
        """
        raise NotImplementedError

    def touch(self, device_ids: Sequence[str], seen_time: datetime) -> None:
        """Set the last-seen time of devices with an open stream."""
        raise NotImplementedError

    def ingest(self, batch: Sequence[IncomingReport]) -> dict[str, int]:
        """Commit a batch of reports in one transaction.

        A (device, sequence) pair already stored changes nothing. Each section of
        the device's latest state is replaced only by a report with a higher
        sequence number than the one that last set it, so reports may arrive in
        any order. Returns, per device in the batch, the highest sequence number
        now committed for it.
        """
        raise NotImplementedError

    def committed_sequence(self, device_id: str) -> int:
        """Return the highest committed sequence number of a device (0 if none)."""
        raise NotImplementedError

    def list_devices(
        self,
        *,
        limit: int,
        after_device_id: str = "",
        hostname: str = "",
        full: bool = False,
    ) -> list[ops_pb2.Device]:
        """Return up to limit devices with device_id > after_device_id, by device id.

        hostname filters by exact, case-insensitive hostname. Without full, only
        the summary fields and host are set; with full, every section is set.
        """
        raise NotImplementedError

    def get_device(self, device_id: str) -> ops_pb2.Device | None:
        """Return a device with every stored section, or None if unknown."""
        raise NotImplementedError

    def count_reports(self, device_id: str | None = None) -> int:
        """Return the number of stored reports, of one device or of all."""
        raise NotImplementedError

    def close(self) -> None:
        """Dispose of the engine and its connections."""
        raise NotImplementedError
