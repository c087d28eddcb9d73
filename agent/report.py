"""Assemble full and delta reports from the latest section readings.

A delta carries only the sections whose serialized form differs from what the
previous report carried; a quiet delta (nothing changed) carries only the
sequence number and the time. The policy status counts as a section: full
reports carry it, and a delta carries it when it changed. Remediation records
go in reports of their own (build_remediations), numbered in the same
sequence.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from datetime import datetime

from google.protobuf.message import Message

from agent import clock as clock_module
from agent.state import Identity, StateError, StateStore
from fleetmend.v1 import remediation_pb2, report_pb2

log = logging.getLogger(__name__)

# Report fields that hold a section, in wire order.
SECTIONS = ("host", "disks", "batteries", "credentials", "usage")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


class ReportBuilder:
    """Keep the latest reading of each section and number the reports built from them.

    All methods are thread-safe.
    """

    def __init__(
        self,
        state: StateStore,
        identity: Identity,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Build reports for identity; clock None reads ``agent.clock.clock``."""
        self._state = state
        self._identity = identity
        self._clock = clock
        self._lock = threading.Lock()
        self._current: dict[str, Message] = {}
        self._last_sent: dict[str, bytes] = {}
        self._unsaved = False
        self._policy_status: remediation_pb2.PolicyStatus | None = None
        self._sent_policy_status: bytes | None = None

    def _save(self) -> None:
        """Persist the identity; on a full disk keep numbering and retry later.

        The caller holds the lock. After a crash with an unsaved number, the
        agent moves past the spool's highest sequence and the collector's
        committed one, so that a number already spooled or sent is not reused.
        """
        try:
            self._state.save(self._identity)
        except StateError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno != errno.ENOSPC:
                raise
            if not self._unsaved:
                log.error("%s; numbering reports in memory until space returns", exc)
            self._unsaved = True
            return
        if self._unsaved:
            log.info("identity file %s is written again", self._state.path)
        self._unsaved = False

    def _now(self) -> datetime:
        if self._clock is not None:
            return self._clock()
        return clock_module.clock.now()

    @property
    def next_sequence(self) -> int:
        return self._identity.next_sequence

    def skip_past(self, committed: int) -> None:
        """Move the next sequence number past one the collector has already committed.

        This happens when the identity file was restored from an older copy;
        without it, new reports would be taken for duplicates and dropped.
        """
        with self._lock:
            if committed >= self._identity.next_sequence:
                self._identity.next_sequence = committed + 1
                self._save()

    def update(self, section: str, message: Message) -> None:
        """Store the latest reading of a section."""
        if section not in SECTIONS:
            raise ValueError(f"unknown report section {section!r}")
        with self._lock:
            self._current[section] = message

    def latest(self, section: str) -> Message | None:
        """Return the latest reading of a section, None before the first one."""
        if section not in SECTIONS:
            raise ValueError(f"unknown report section {section!r}")
        with self._lock:
            return self._current.get(section)

    def set_policy_status(self, status: remediation_pb2.PolicyStatus) -> None:
        """Store which policy the agent runs, for the next report."""
        with self._lock:
            self._policy_status = remediation_pb2.PolicyStatus()
            self._policy_status.CopyFrom(status)

    def policy_status_changed(self) -> bool:
        """Return True if the policy status differs from the one last reported."""
        with self._lock:
            return (
                self._policy_status is not None
                and _serialize(self._policy_status) != self._sent_policy_status
            )

    def build_remediations(
        self, records: list[remediation_pb2.RemediationRecord]
    ) -> report_pb2.Report:
        """Number and return a report that carries only remediation records."""
        with self._lock:
            sequence = self._identity.next_sequence
            self._identity.next_sequence = sequence + 1
            self._save()
            report = report_pb2.Report(sequence=sequence)
            report.collect_time.FromDatetime(self._now())
            report.remediations.extend(records)
            return report

    def changed_sections(self) -> list[str]:
        """Return the sections whose latest reading differs from the last report."""
        with self._lock:
            return [
                name
                for name, message in self._current.items()
                if self._last_sent.get(name) != _serialize(message)
            ]

    def snapshot(self) -> report_pb2.Report:
        """Return a full report of the latest readings without numbering it."""
        with self._lock:
            report = report_pb2.Report(full=True)
            report.collect_time.FromDatetime(self._now())
            for name, message in self._current.items():
                getattr(report, name).CopyFrom(message)
            return report

    def build(self, full: bool, dropped_reports: int = 0) -> report_pb2.Report:
        """Number and return the next report; the sequence is persisted first.

        Persisting before the report leaves the builder means that a crash can
        skip a sequence number but never reuse one. dropped_reports is the
        count of reports that the spool dropped and no earlier report carried.
        """
        with self._lock:
            sequence = self._identity.next_sequence
            self._identity.next_sequence = sequence + 1
            self._save()

            report = report_pb2.Report(
                sequence=sequence, full=full, dropped_reports=dropped_reports
            )
            report.collect_time.FromDatetime(self._now())
            for name in SECTIONS:
                message = self._current.get(name)
                if message is None:
                    continue
                data = _serialize(message)
                if full or self._last_sent.get(name) != data:
                    getattr(report, name).CopyFrom(message)
                    self._last_sent[name] = data
            if self._policy_status is not None:
                data = _serialize(self._policy_status)
                if full or self._sent_policy_status != data:
                    report.policy_status.CopyFrom(self._policy_status)
                    # An all-default status (the built-in policy) is still sent.
                    report.policy_status.SetInParent()
                    self._sent_policy_status = data
            return report
