"""The agent's main loop: run each probe on its interval and spool reports.

Reports go to the spool whether or not the collector is reachable; the link
sends them when it can. The healing engine runs on a thread of its own: it
evaluates the self-healing rules at most every ``intervals.healing`` seconds
and runs operator commands as soon as they arrive, so that an action that
waits (a service's settle time) holds up neither the probes nor the reports.
Every time read and every sleep goes through ``agent.clock.clock``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from agent import __version__
from agent import clock as clock_module
from agent.config import AgentConfig
from agent.foreground import ForegroundDetector
from agent.healing.actions.base import LocalAllowlist
from agent.healing.conditions import ConditionEvaluator
from agent.healing.engine import HealingEngine
from agent.healing.policy import (
    PolicyError,
    PolicyStore,
    load_local_policy,
    policy_name,
    validate_policy,
)
from agent.link import Link
from agent.priority import release_free_heap
from agent.report import ReportBuilder
from agent.sections import SectionSource, UsageSource, read_safely
from agent.spool import SPOOL_FILE, Spool, describe
from agent.state import StateStore
from agent.text import count_text
from agent.usage.catalog import Catalog, CatalogError
from fleetmend.v1 import agent_pb2, remediation_pb2, report_pb2

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
DRAIN_SECONDS = 10.0
# Shutdown waits this long for the link and healing threads to end. An action
# that waits ends its wait at once, but a command it runs may take longer.
JOIN_SECONDS = 5.0
# The full report for a stream that opens at start waits at most this long,
# counted from the start, for the first reading of every section. It must stay
# below the link's ACK_TIMEOUT_SECONDS (45 s), which also bounds the wait for
# the welcome to be handled.
FIRST_READINGS_MAX_SECONDS = 30.0


@dataclass
class _Schedule:
    """Monotonic times at which each periodic job is next due."""

    due: dict[str, float] = field(default_factory=dict)

    def is_due(self, job: str, now: float) -> bool:
        return now >= self.due.get(job, 0.0)

    def next_in(self, job: str, now: float, seconds: float) -> None:
        self.due[job] = now + seconds


def local_allowlist(config: AgentConfig) -> LocalAllowlist:
    """Return what the laptop's settings let actions touch."""
    return LocalAllowlist(
        services=frozenset(config.healing_services),
        cache_sets=frozenset(config.healing_cache_sets),
    )


def local_policy(
    config: AgentConfig, allowlist: LocalAllowlist
) -> remediation_pb2.Policy:
    """Load the local policy; raise PolicyError if healing.policy_file is invalid.

    Invalid rules of the built-in policy (an action that this build lacks, a
    cache set outside the allowlist) are dropped with an error in the log, so
    the other rules still run.
    """
    policy = load_local_policy(config.healing_policy_file)
    problems = validate_policy(policy, allowlist)
    if not problems:
        return policy
    if config.healing_policy_file is not None:
        raise PolicyError(
            f"policy file {config.healing_policy_file} is invalid: "
            + "; ".join(problems)
        )
    for problem in problems:
        log.error("built-in policy: %s; the rule is left out", problem)
    valid = remediation_pb2.Policy(version=policy.version)
    for rule in policy.rules:
        single = remediation_pb2.Policy(rules=[rule])
        if not validate_policy(single, allowlist):
            valid.rules.append(rule)
    return valid


def policy_source(config: AgentConfig, policies: PolicyStore) -> str:
    """Name the policy in force: the fleet policy's version, a local file or built-in.

    The fleet policy is in force when the stored collector policy is the one
    that policies runs. PolicyStore falls back to the local policy when the
    stored one cannot be read or is invalid on this laptop.
    """
    policy = policies.policy
    try:
        stored = remediation_pb2.Policy.FromString(policies.path.read_bytes())
    except (OSError, DecodeError):
        stored = None
    if stored is not None and stored == policy:
        return policy_name(policy)
    if config.healing_policy_file is not None:
        return f"local policy file {config.healing_policy_file}"
    return "built-in policy"


def describe_policy(config: AgentConfig, policies: PolicyStore) -> str:
    """Return the policy in force, its number of rules and of refused rules."""
    policy, refused = policies.in_force()
    line = f"{policy_source(config, policies)}, {count_text(len(policy.rules), 'rule')}"
    if refused:
        line += f", {len(refused)} of them refused on this laptop"
    return line


def _services_backend() -> object | None:
    try:
        from agent.healing.services import backend_for_platform

        return backend_for_platform()
    except Exception as exc:  # noqa: BLE001 - no backend just disables the condition
        log.warning("no service manager backend: %s", exc)
        return None


def _cpu_sampler() -> object | None:
    try:
        from agent.healing.processes import CpuSampler

        return CpuSampler()
    except Exception as exc:  # noqa: BLE001 - no sampler just disables the condition
        log.warning("no process CPU sampler: %s", exc)
        return None


def build_engine(
    config: AgentConfig,
    builder: ReportBuilder,
    spool: Spool | None,
    usage: UsageSource,
    on_records: Callable[[], None] = lambda: None,
) -> HealingEngine:
    """Create the healing engine of an agent from its settings."""
    allowlist = local_allowlist(config)
    policies = PolicyStore(config.state_dir, local_policy(config, allowlist), allowlist)

    logged_error: list[str] = []

    def catalog() -> Catalog | None:
        try:
            return usage.catalog()
        except CatalogError as exc:
            # The engine asks often (every pass, and every few seconds while
            # a throttle is in place), so the same error is logged once.
            if str(exc) not in logged_error:
                logged_error[:] = [str(exc)]
                log.warning(
                    "no catalog, so process_cpu_above rules and the foreground "
                    "check for throttles are off: %s",
                    exc,
                )
            return None

    evaluator = ConditionEvaluator(
        services=_services_backend(),  # type: ignore[arg-type]
        cpu_sampler=_cpu_sampler(),  # type: ignore[arg-type]
        catalog=catalog,
    )
    foreground = ForegroundDetector(catalog)
    return HealingEngine(
        config.state_dir,
        policies,
        allowlist,
        builder,
        spool,
        evaluator,
        on_records=on_records,
        foreground_apps=foreground.foreground_apps,
        enabled=config.healing_enabled,
    )


class Agent:
    """Own the probes, the report builder, the link and the healing engine of an agent.

    The main loop reads the probes and spools reports, the link thread spools
    the full report that opens each stream, and the healing thread runs the
    engine. Until every section has its first reading (or
    ``first_readings_timeout`` seconds from the start have passed), that full
    report waits, so that the collector gets every section at once. A section
    first read after a full report went out without it is sent in a delta at
    once, not at the next ``intervals.report_min``.
    """

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
        first_readings_timeout: float = FIRST_READINGS_MAX_SECONDS,
    ) -> None:
        """Load the identity and the spool; the link connects to target when run."""
        self.config = config
        self.target = target
        self._sources = list(sources)
        self._usage = usage
        self._first_readings_timeout = first_readings_timeout
        self._started = clock_module.clock.monotonic()
        self._stop = threading.Event()
        # Sections whose probe has not run once yet. _full_lock guards it.
        self._unread = {source.section for source in self._sources} | {"usage"}
        self._first_readings = threading.Event()
        self._logged_late_readings = False
        # Full reports spooled by either thread, the last of them, and how
        # many of them the link spooled for a new stream (the main loop
        # compares that count with the one it saw last). Both threads hold
        # _full_lock to decide on and spool a full report, so that the two
        # do not spool one each.
        self._full_lock = threading.Lock()
        self._full_reports = 0
        self._last_full: report_pb2.Report | None = None
        self._link_full_reports = 0
        self._link_full_reports_seen = 0
        self._state = StateStore(config.state_dir)
        self.identity = self._state.load_or_create()
        self.builder = ReportBuilder(self._state, self.identity)
        self.spool = Spool(config.state_dir / SPOOL_FILE, config.spool_max_bytes)
        # An identity file that a full disk kept from being saved may lag
        # behind the reports already spooled.
        self.builder.skip_past(self.spool.max_sequence())
        self.healing = build_engine(
            config, self.builder, self.spool, usage, on_records=self._wake_link
        )
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
            on_policy=self.healing.apply_policy,
            on_command=self.healing.submit_command,
            policy_version=lambda: self.healing.policies.applied_version,
        )

    def _wake_link(self) -> None:
        # The engine may write records before the link exists.
        link = getattr(self, "link", None)
        if link is not None:
            link.wake()

    def _connected(self, committed: int) -> report_pb2.Report:
        """Spool and return the full report that goes first on a new stream.

        Runs on the link thread. At start it first waits for the first
        readings (see _wait_for_first_readings).
        """
        self.builder.skip_past(committed)
        with self._full_lock:
            full_reports_before = self._full_reports
        self._wait_for_first_readings()
        with self._full_lock:
            last_full = self._last_full
            if self._full_reports > full_reports_before and last_full is not None:
                # The main loop spooled a full report of the first readings
                # while this welcome waited, after skip_past, so that report
                # opens the stream.
                report = last_full
            else:
                report = self._spool_full(carry_dropped=True)
            self._link_full_reports += 1
        return report

    def _wait_for_first_readings(self) -> None:
        """Wait for the first readings, until the start bound passes or stop is set."""
        if self._first_readings.is_set():
            return
        with self._full_lock:
            unread = ", ".join(sorted(self._unread))
        log.debug(
            "connected before the first reading of sections %s; the full report "
            "waits for them, at most until %.0f s after the start",
            unread,
            self._first_readings_timeout,
        )
        clock = clock_module.clock
        deadline = self._started + self._first_readings_timeout
        while not self._first_readings.is_set() and not self._stop.is_set():
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                with self._full_lock:
                    unread = ", ".join(sorted(self._unread))
                # A probe that hangs for good would repeat this at every
                # reconnect, so only the first time is a warning.
                level = logging.DEBUG if self._logged_late_readings else logging.WARNING
                self._logged_late_readings = True
                log.log(
                    level,
                    "sections %s have no first reading %.0f s after the start; "
                    "the full report goes without them, and a delta carries "
                    "them as soon as they are read",
                    unread,
                    self._first_readings_timeout,
                )
                return
            clock.wait(self._first_readings, min(remaining, TICK_SECONDS))

    def run(self, stop: threading.Event, exit_after_acks: int | None = None) -> None:
        """Run until stop is set (or exit_after_acks reports are acknowledged)."""
        self._started = clock_module.clock.monotonic()
        self._stop = stop
        log.info(
            "agent %s starting: device %s, collector %s, state in %s",
            __version__,
            self.identity.device_id,
            self.target,
            self.config.state_dir,
        )
        log.info("%s", describe(self.spool.stats()))
        healing_state = "" if self.config.healing_enabled else " (self-healing is off)"
        log.info(
            "self-healing policy in force: %s%s",
            describe_policy(self.config, self.healing.policies),
            healing_state,
        )
        link_thread = threading.Thread(
            target=self.link.run, args=(stop,), name="fleetmend-link", daemon=True
        )
        link_thread.start()
        healing_thread = threading.Thread(
            target=self.healing.run,
            args=(stop, self.config.interval("healing")),
            name="fleetmend-healing",
            daemon=True,
        )
        schedule = _Schedule()
        try:
            while not stop.is_set():
                self._tick(schedule, clock_module.clock.monotonic())
                if healing_thread.ident is None:
                    # Started after the first pass over the probes, so that
                    # the first evaluation sees their first readings.
                    healing_thread.start()
                if (
                    exit_after_acks is not None
                    and self.link.acked_reports >= exit_after_acks
                ):
                    log.info(
                        "%s and %s of remediation records acknowledged; exiting "
                        "because --exit-after %d counts routine reports",
                        count_text(self.link.acked_reports, "routine report"),
                        count_text(self.link.acked_remediations, "report"),
                        exit_after_acks,
                    )
                    break
                clock_module.clock.wait(stop, TICK_SECONDS)
        finally:
            self._shut_down(stop, link_thread, healing_thread)

    def _tick(self, schedule: _Schedule, now: float) -> None:
        self._read_sections(schedule, now)
        missed_sections = self._note_first_readings()
        self._retry_spool()
        self._report(schedule, now, send_delta=missed_sections)

    def _read_sections(self, schedule: _Schedule, now: float) -> None:
        """Run each probe that is due, then sample usage if that is due."""
        read_any = False
        for source in self._sources:
            if schedule.is_due(source.section, now):
                read_any = True
                reading = read_safely(source)
                if reading is not None:
                    self.builder.update(source.section, reading)
                self._mark_read(source.section)
                schedule.next_in(
                    source.section, now, self.config.interval(source.interval)
                )

        if schedule.is_due("usage_sample", now):
            read_any = True
            seconds = self.config.interval("usage_sample")
            try:
                self._usage.sample(minutes=max(1, round(seconds / 60)))
                self.builder.update("usage", self._usage.read())
            except Exception:
                log.exception(
                    "usage sampling failed; keeping the previous usage reading"
                )
            self._mark_read("usage")
            schedule.next_in("usage_sample", now, seconds)

        if read_any:
            # Probes leave freed memory in the C heap; give it back to the OS.
            release_free_heap()

    def _mark_read(self, section: str) -> None:
        # A probe that failed counts as read, because waiting cannot help.
        if not self._first_readings.is_set():
            with self._full_lock:
                self._unread.discard(section)

    def _note_first_readings(self) -> bool:
        """Mark the first readings done once every section was read.

        Return True if a full report went out before then, so that the
        sections that it lacked must be sent now.
        """
        if self._first_readings.is_set():
            return False
        with self._full_lock:
            if self._unread:
                return False
            missed = self._full_reports > 0
        self._first_readings.set()
        if missed:
            log.info(
                "every section has its first reading; a delta now carries the "
                "sections that the first full report lacked"
            )
        return missed

    def _report(self, schedule: _Schedule, now: float, send_delta: bool) -> None:
        """Spool the full or delta report that is due, if any, and wake the link."""
        spooled = False
        with self._full_lock:
            if self._link_full_reports != self._link_full_reports_seen:
                # The link spooled and sent a full report for a new stream,
                # which counts as the scheduled one.
                self._link_full_reports_seen = self._link_full_reports
                schedule.next_in(
                    "full_report", now, self.config.interval("full_report")
                )
                schedule.next_in("report", now, self.config.interval("report_min"))
            if schedule.is_due("full_report", now):
                # The dropped count goes with the first report that can reach
                # the collector; the spool keeps it until that report is
                # acknowledged.
                self._spool_full(carry_dropped=self.link.connected)
                spooled = True
                schedule.next_in(
                    "full_report", now, self.config.interval("full_report")
                )
                schedule.next_in("report", now, self.config.interval("report_min"))
            elif (
                send_delta
                or schedule.is_due("report", now)
                or self.builder.policy_status_changed()
            ):
                # A new policy status goes out at once, not at the next interval.
                self._spool_report(full=False, carry_dropped=self.link.connected)
                spooled = True
                schedule.next_in("report", now, self.config.interval("report_min"))
        if spooled:
            self.link.wake()

    def _retry_spool(self) -> None:
        try:
            if self.spool.retry_unspooled():
                self.link.wake()
        except sqlite3.Error:
            log.exception("writing held reports to spool %s failed", self.spool.path)

    def _spool_full(self, carry_dropped: bool) -> report_pb2.Report:
        """Spool a full report and remember it. The caller holds _full_lock."""
        report = self._spool_report(full=True, carry_dropped=carry_dropped)
        self._full_reports += 1
        self._last_full = report
        return report

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

    def _shut_down(
        self,
        stop: threading.Event,
        link_thread: threading.Thread,
        healing_thread: threading.Thread,
    ) -> None:
        # A stop set from outside ends an action's wait at once, and the
        # healing thread sees it as soon as it is woken.
        self.healing.wake()
        if self.link.pending and self.link.connected:
            log.info(
                "waiting up to %.0f s for %s to be acknowledged",
                DRAIN_SECONDS,
                count_text(self.link.pending, "report"),
            )
            self.link.wait_drained(DRAIN_SECONDS)
        stop.set()
        self.healing.wake()
        self.link.close()
        link_thread.join(timeout=JOIN_SECONDS)
        if healing_thread.ident is not None:
            healing_thread.join(timeout=JOIN_SECONDS)
        if healing_thread.is_alive():
            log.warning(
                "self-healing is still running an action %.0f s after the stop; "
                "it ends with the process",
                JOIN_SECONDS,
            )
        stats = self.spool.stats()
        if stats.pending_reports:
            log.warning(
                "stopping with %s in spool %s; they are sent after the next start",
                count_text(stats.pending_reports, "unacknowledged report"),
                stats.path,
            )
        if stats.unspooled:
            log.error(
                "lost %s held in memory because the disk is full",
                count_text(stats.unspooled, "record"),
            )
        if not link_thread.is_alive() and not healing_thread.is_alive():
            self.spool.close()
        log.info("agent stopped")
