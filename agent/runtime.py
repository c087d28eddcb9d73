"""The agent's main loop: run each probe on its interval and spool reports.

Reports go to the spool whether or not the collector is reachable; the link
sends them when it can. Every time read and every sleep goes through
``agent.clock.clock``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent import __version__
from agent import clock as clock_module
from agent.config import AgentConfig
from agent.link import Link
from agent.report import ReportBuilder
from agent.sections import SectionSource, UsageSource, read_safely
from agent.spool import SPOOL_FILE, Spool, describe
from agent.state import StateStore
from fleetmend.v1 import agent_pb2, report_pb2

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
DRAIN_SECONDS = 10.0


@dataclass
class _Schedule:
    """Monotonic times at which each periodic job is next due."""

    due: dict[str, float] = field(default_factory=dict)

    def is_due(self, job: str, now: float) -> bool:
        return now >= self.due.get(job, 0.0)

    def next_in(self, job: str, now: float, seconds: float) -> None:
        self.due[job] = now + seconds


class Agent:
    """Own the probes, the report builder and the link of one agent process."""

    def __init__(
        self,
        config: AgentConfig,
        sources: Sequence[SectionSource],
        usage: UsageSource,
        *,
        target: str,
        node_key: str,
        root_certificates: bytes | None,
        insecure: bool = False,
    ) -> None:
        """Load the identity and the spool; the link connects to target when run."""
        self.config = config
        self.target = target
        self._sources = list(sources)
        self._usage = usage
        self._state = StateStore(config.state_dir)
        self.identity = self._state.load_or_create()
        self.builder = ReportBuilder(self._state, self.identity)
        self.spool = Spool(config.state_dir / SPOOL_FILE, config.spool_max_bytes)
        # An identity file that a full disk kept from being saved may lag
        # behind the reports already spooled.
        self.builder.skip_past(self.spool.max_sequence())
        self._sent_full = threading.Event()
        self.link = Link(
            target,
            agent_pb2.Hello(
                device_id=self.identity.device_id, agent_version=__version__
            ),
            self.spool,
            node_key=node_key,
            root_certificates=root_certificates,
            insecure=insecure,
            on_connected=self._connected,
        )

    def _connected(self, committed: int) -> report_pb2.Report:
        """Spool and return the full report that goes first on a new stream."""
        self.builder.skip_past(committed)
        report = self._spool_report(full=True, carry_dropped=True)
        self._sent_full.set()
        return report

    def run(self, stop: threading.Event, exit_after_acks: int | None = None) -> None:
        """Run until stop is set (or exit_after_acks reports are acknowledged)."""
        log.info(
            "agent %s starting: device %s, collector %s, state in %s",
            __version__,
            self.identity.device_id,
            self.target,
            self.config.state_dir,
        )
        log.info("%s", describe(self.spool.stats()))
        link_thread = threading.Thread(
            target=self.link.run, args=(stop,), name="fleetmend-link", daemon=True
        )
        link_thread.start()
        schedule = _Schedule()
        try:
            while not stop.is_set():
                self._tick(schedule, clock_module.clock.monotonic())
                if (
                    exit_after_acks is not None
                    and self.link.acked_reports >= exit_after_acks
                ):
                    log.info(
                        "%d reports acknowledged; exiting as asked",
                        self.link.acked_reports,
                    )
                    break
                clock_module.clock.wait(stop, TICK_SECONDS)
        finally:
            self._shut_down(stop, link_thread)

    def _tick(self, schedule: _Schedule, now: float) -> None:
        for source in self._sources:
            if schedule.is_due(source.section, now):
                reading = read_safely(source)
                if reading is not None:
                    self.builder.update(source.section, reading)
                schedule.next_in(
                    source.section, now, self.config.interval(source.interval)
                )

        if schedule.is_due("usage_sample", now):
            seconds = self.config.interval("usage_sample")
            try:
                self._usage.sample(minutes=max(1, round(seconds / 60)))
                self.builder.update("usage", self._usage.read())
            except Exception:
                log.exception(
                    "usage sampling failed; keeping the previous usage reading"
                )
            schedule.next_in("usage_sample", now, seconds)

        self._retry_spool()
        if self._sent_full.is_set():
            # The link just spooled and sent a full report for a new stream.
            self._sent_full.clear()
            schedule.next_in("full_report", now, self.config.interval("full_report"))
            schedule.next_in("report", now, self.config.interval("report_min"))
        elif schedule.is_due("full_report", now):
            self._send(full=True)
            schedule.next_in("full_report", now, self.config.interval("full_report"))
            schedule.next_in("report", now, self.config.interval("report_min"))
        elif schedule.is_due("report", now):
            self._send(full=False)
            schedule.next_in("report", now, self.config.interval("report_min"))

    def _retry_spool(self) -> None:
        try:
            if self.spool.retry_unspooled():
                self.link.wake()
        except sqlite3.Error:
            log.exception("writing held reports to spool %s failed", self.spool.path)

    def _spool_report(self, full: bool, carry_dropped: bool) -> report_pb2.Report:
        report = self.builder.build(full=full)
        self.spool.put(report, carry_dropped=carry_dropped)
        log.info(
            "report %d (%s, %d bytes) spooled%s",
            report.sequence,
            "full" if full else "delta",
            report.ByteSize(),
            f", carrying {report.dropped_reports} dropped reports"
            if report.dropped_reports
            else "",
        )
        return report

    def _send(self, full: bool) -> None:
        # The dropped count goes with the first report that can reach the
        # collector; the spool keeps it until that report is acknowledged.
        self._spool_report(full, carry_dropped=self.link.connected)
        self.link.wake()

    def _shut_down(self, stop: threading.Event, link_thread: threading.Thread) -> None:
        if self.link.pending and self.link.connected:
            log.info(
                "waiting up to %.0f s for %d reports to be acknowledged",
                DRAIN_SECONDS,
                self.link.pending,
            )
            self.link.wait_drained(DRAIN_SECONDS)
        stop.set()
        self.link.close()
        link_thread.join(timeout=5)
        stats = self.spool.stats()
        if stats.pending_reports:
            log.warning(
                "stopping with %d unacknowledged reports in spool %s; they are "
                "sent after the next start",
                stats.pending_reports,
                stats.path,
            )
        if stats.unspooled:
            log.error(
                "%d reports held in memory because the disk is full are lost",
                stats.unspooled,
            )
        if not link_thread.is_alive():
            self.spool.close()
        log.info("agent stopped")
