"""The agent's main loop: run each probe on its interval and spool reports.

Reports go to the spool whether or not the collector is reachable; the link
sends them when it can. The healing engine evaluates the self-healing rules
on the same thread after the probes, at most every ``intervals.healing``
seconds, and runs operator commands at the next tick after they arrive.
Every time read and every sleep goes through ``agent.clock.clock``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent import __version__
from agent import clock as clock_module
from agent.config import AgentConfig
from agent.healing.actions.base import LocalAllowlist
from agent.healing.conditions import ConditionEvaluator
from agent.healing.engine import HealingEngine
from agent.healing.policy import (
    PolicyError,
    PolicyStore,
    load_local_policy,
    validate_policy,
)
from agent.link import Link
from agent.report import ReportBuilder
from agent.sections import SectionSource, UsageSource, read_safely
from agent.spool import SPOOL_FILE, Spool, describe
from agent.state import StateStore
from agent.usage.catalog import Catalog, CatalogError
from fleetmend.v1 import agent_pb2, remediation_pb2, report_pb2

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

    def catalog() -> Catalog | None:
        try:
            return usage.catalog()
        except CatalogError as exc:
            log.warning("no catalog for process_cpu_above: %s", exc)
            return None

    evaluator = ConditionEvaluator(
        services=_services_backend(),  # type: ignore[arg-type]
        cpu_sampler=_cpu_sampler(),  # type: ignore[arg-type]
        catalog=catalog,
    )
    # NOTE: the agent cannot tell yet which application is in the
    # foreground, so throttle_process undoes throttles only when they expire
    # or when verification fails.
    return HealingEngine(
        config.state_dir,
        policies,
        allowlist,
        builder,
        spool,
        evaluator,
        on_records=on_records,
        enabled=config.healing_enabled,
    )


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

        self._heal(schedule, now)
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
        elif schedule.is_due("report", now) or self.builder.policy_status_changed():
            # A new policy status goes out at once, not at the next interval.
            self._send(full=False)
            schedule.next_in("report", now, self.config.interval("report_min"))

    def _heal(self, schedule: _Schedule, now: float) -> None:
        """Run commands that arrived and, when due, evaluate the rules."""
        try:
            self.healing.run_queued_commands()
            if schedule.is_due("healing", now):
                schedule.next_in("healing", now, self.config.interval("healing"))
                self.healing.evaluate()
        except Exception:
            # A failed evaluation must not stop the reports; it is tried
            # again at the next interval.
            log.exception("self-healing evaluation failed")

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
