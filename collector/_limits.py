"""Limits of the collector: rates per device and address, and the fleet limits.

Reports per device, enrollments per source address and their log lines, and
the worker that applies the fleet limits of self-healing rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from collector import fleet
from collector._validation import ClockLimits
from collector.store import Store

logger = logging.getLogger(__name__)

# At the agent's default of one report per 300 s, a week offline is 2,016
# reports, which this burst and rate admit in about 5 s. A looping agent still
# cannot take over the batcher.
DEFAULT_REPORTS_PER_SECOND = 200.0
DEFAULT_REPORT_BURST = 1000
# Rejections by the rate limit are logged as one line per device at most this
# often, with their count.
RATE_LIMIT_LOG_INTERVAL_SECONDS = 60.0
# Enroll calls per source address. A fleet enrolls each device once, so this
# admits a site enrolling a lab behind one NAT address at a steady pace, while
# an attacker guessing the enrollment secret gets 10 guesses a minute.
DEFAULT_ENROLLS_PER_MINUTE = 10.0
DEFAULT_ENROLL_BURST = 10


@dataclass(frozen=True)
class IngestLimits:
    """Limits that the Connect handler applies to every device's reports."""

    # Sustained reports per second per device, over all its streams. A rate of
    # 0 turns the limit off.
    reports_per_second: float = DEFAULT_REPORTS_PER_SECOND
    # Reports a device may send at once before the sustained rate applies.
    report_burst: int = DEFAULT_REPORT_BURST
    clock: ClockLimits = field(default_factory=ClockLimits)

    def __post_init__(self) -> None:
        if not math.isfinite(self.reports_per_second) or self.reports_per_second < 0:
            raise ValueError(
                f"reports_per_second must be 0 or more, got {self.reports_per_second}"
            )
        if self.report_burst < 1:
            raise ValueError(
                f"report_burst must be at least 1, got {self.report_burst}"
            )


@dataclass
class _Bucket:
    tokens: float
    refill_time: float


class DeviceRateLimiter:
    """A token bucket per key: reports per device id, or Enroll calls per address.

    A key starts with burst tokens and gains reports_per_second tokens a
    second, up to burst, and each call of try_acquire takes one. A rate of 0
    admits everything. The limiter is not thread-safe, because only the event
    loop calls it.
    """

    # Seconds between sweeps that forget refilled buckets. A full bucket is the
    # same as a new one, so memory grows with recently active devices only.
    SWEEP_INTERVAL_SECONDS = 60.0

    def __init__(
        self,
        reports_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = reports_per_second
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._next_sweep = clock() + self.SWEEP_INTERVAL_SECONDS

    def try_acquire(self, device_id: str) -> bool:
        """Take a token from the device's bucket; return False if it has none."""
        if self._rate == 0:
            return True
        now = self._clock()
        self._sweep(now)
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[device_id] = bucket
        else:
            self._refill(bucket, now)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def seconds_until_available(self, device_id: str) -> float:
        """Return the seconds until the key's bucket has a token again, 0 if now."""
        if self._rate == 0:
            return 0.0
        bucket = self._buckets.get(device_id)
        if bucket is None:
            return 0.0
        self._refill(bucket, self._clock())
        return max(0.0, (1 - bucket.tokens) / self._rate)

    def _refill(self, bucket: _Bucket, now: float) -> None:
        gained = (now - bucket.refill_time) * self._rate
        bucket.tokens = min(self._burst, bucket.tokens + gained)
        bucket.refill_time = now

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.SWEEP_INTERVAL_SECONDS
        for device_id, bucket in list(self._buckets.items()):
            self._refill(bucket, now)
            if bucket.tokens >= self._burst:
                del self._buckets[device_id]


@dataclass
class _Rejections:
    line_time: float
    unlogged: int = 0


class RateLimitLog:
    """Logs rate-limit rejections: one line per device per interval, with a count.

    The first rejection of a device is logged at once. Later ones within
    interval_seconds are counted and logged by the next rejection after the
    interval, or by flush().
    """

    def __init__(
        self,
        limits: IngestLimits,
        interval_seconds: float = RATE_LIMIT_LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._devices: dict[str, _Rejections] = {}

    def rejected(self, device_id: str, peer: str) -> None:
        now = self._clock()
        entry = self._devices.get(device_id)
        if entry is None:
            logger.warning(
                "device %s from %s exceeded the rate limit of %g reports per "
                "second (burst %d); ending its stream with RESOURCE_EXHAUSTED",
                device_id,
                peer,
                self._limits.reports_per_second,
                self._limits.report_burst,
            )
            self._devices[device_id] = _Rejections(line_time=now)
            return
        entry.unlogged += 1
        if now - entry.line_time >= self._interval_seconds:
            self._log_count(device_id, entry, now)

    def flush(self) -> None:
        """Log the counts that are due and forget devices quiet for an interval."""
        now = self._clock()
        for device_id, entry in list(self._devices.items()):
            if now - entry.line_time < self._interval_seconds:
                continue
            if entry.unlogged:
                self._log_count(device_id, entry, now)
            else:
                del self._devices[device_id]

    def _log_count(self, device_id: str, entry: _Rejections, now: float) -> None:
        logger.warning(
            "device %s exceeded the rate limit of %g reports per second %d more "
            "times in the last %.0f s",
            device_id,
            self._limits.reports_per_second,
            entry.unlogged,
            now - entry.line_time,
        )
        entry.line_time = now
        entry.unlogged = 0


# Batching


class LogThrottle:
    """Admits one log line per key per interval and counts the lines it holds back.

    Used for refusals that a client can repeat at will, such as calls with a
    forged credential, so that they cannot flood the log.
    """

    def __init__(
        self,
        interval_seconds: float = RATE_LIMIT_LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._entries: dict[str, _Rejections] = {}
        self._next_sweep = clock() + interval_seconds

    def admit(self, key: str) -> int | None:
        """Return None to hold a line back, else how many were held back before it."""
        now = self._clock()
        self._sweep(now)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Rejections(line_time=now)
            return 0
        if now - entry.line_time < self.interval_seconds:
            entry.unlogged += 1
            return None
        held_back = entry.unlogged
        entry.line_time = now
        entry.unlogged = 0
        return held_back

    def _sweep(self, now: float) -> None:
        # NOTE: a key quiet for two intervals is forgotten with its count, so
        # the lines held back last for it are never counted in the log.
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.interval_seconds
        for key, entry in list(self._entries.items()):
            if now - entry.line_time >= 2 * self.interval_seconds:
                del self._entries[key]


# Fleet limits of self-healing rules

# Shortest interval between two evaluations of the fleet limits, however often
# batches with remediation records commit.
FLEET_LIMITS_MIN_INTERVAL_SECONDS = 1.0
# Interval of the evaluations without new records, so that a rule paused by
# its daily budget resumes on the next UTC day even when no device reports.
FLEET_LIMITS_IDLE_INTERVAL_SECONDS = 60.0


class FleetLimitsWorker:
    """Evaluates the fleet limits of the current policy and stores the changes.

    request() requests an evaluation, for example after a batch with
    remediation records committed. A task on the event loop runs the
    evaluation in a worker thread, at most once per min_interval_seconds and
    at least once per idle_interval_seconds. Each StateChange is stored with
    changed_by "fleet limits" and logged, and on_changed is called on the
    event loop after an evaluation that changed a state.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        on_changed: Callable[[], None],
        *,
        min_interval_seconds: float = FLEET_LIMITS_MIN_INTERVAL_SECONDS,
        idle_interval_seconds: float = FLEET_LIMITS_IDLE_INTERVAL_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_changed = on_changed
        self._min_interval_seconds = min_interval_seconds
        self._idle_interval_seconds = idle_interval_seconds
        self._requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure_log = LogThrottle(clock=time.monotonic)
        self.evaluations = 0

    def start(self) -> None:
        """Start the evaluating task on the running event loop."""
        self._task = asyncio.create_task(self._run(), name="fleetmend-fleet-limits")

    def request(self) -> None:
        """Ask for an evaluation soon; call on the event loop."""
        self._requested.set()

    async def close(self) -> None:
        """Stop the task; an evaluation in its worker thread finishes first."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._requested.wait(), self._idle_interval_seconds
                )
            self._requested.clear()
            try:
                changes = await asyncio.to_thread(self.evaluate_once)
            except Exception as error:  # noqa: BLE001 - logged, retried next time
                held_back = self._failure_log.admit("evaluate")
                if held_back is not None:
                    logger.error(
                        "evaluating the fleet limits failed (%d failures not "
                        "logged since the previous line): %s",
                        held_back,
                        error,
                        exc_info=error,
                    )
                changes = []
            if changes:
                self._on_changed()
            await asyncio.sleep(self._min_interval_seconds)

    def evaluate_once(self) -> list[fleet.StateChange]:
        """Evaluate the fleet limits now, store and log the changes, return them.

        Runs in a worker thread. A rule whose state changed between the read
        and the write, for example by an operator, is left as it is and
        evaluated again next time.
        """
        self.evaluations += 1
        record = self._store.current_policy()
        if record is None:
            return []
        now = self._clock()
        states = self._store.rule_states()
        stats = self._store.rule_statistics(fleet.utc_day_start(now))
        changes = fleet.evaluate(record.policy, states, stats, now)
        if not changes:
            return []
        # NOTE: this check and the write below are two transactions, so an
        # operator's change in between is overwritten. The window is the
        # length of one write.
        latest = self._store.rule_states()
        applied = []
        for change in changes:
            if latest.get(change.rule) != states.get(change.rule):
                logger.info(
                    "rule %s changed while the fleet limits were evaluated; "
                    "evaluating it again next time",
                    change.rule,
                )
                continue
            stored = self._store.set_rule_state(
                change.rule, change.stage, change.reason, fleet.FLEET_LIMITS_ACTOR, now
            )
            if stored is None:
                continue
            level = logging.WARNING if change.stage == fleet.PAUSED else logging.INFO
            logger.log(
                level,
                "fleet limits changed rule %s of policy %d from %s to %s: %s",
                change.rule,
                record.version,
                change.previous_stage,
                change.stage,
                change.reason,
            )
            applied.append(change)
        return applied
