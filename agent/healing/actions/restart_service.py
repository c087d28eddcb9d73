"""The restart_service action: restart an allowlisted service and verify it stays up.

The service must be named in the laptop's own allowlist (``healing.services``),
whatever the policy contains. Verification: the service is active right after the
restart and still active after the settle time. Failed restarts are counted in
``<state dir>/service-restarts.json``; after max_failures of them within
failure_window the action stops restarting and returns ESCALATED, so that a
service that keeps crashing is handed to a person instead of being restarted
in a loop. A successful restart clears the count. A settle wait that the
agent's shutdown interrupts is FAILED but not counted, because it says nothing
about the service.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent import clock as clock_module
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
    allowlist_refusal_text,
)
from agent.healing.bounds import (
    MAX_SERVICE_NAME,
    SERVICE_NAME,
    SERVICE_NAME_TEXT,
    check_duration_range,
    check_text,
    quote,
)
from agent.healing.services import (
    LaunchdBackend,
    ServiceBackend,
    ServiceError,
    ServiceStatus,
    ServiceWaitInterrupted,
    SystemdBackend,
    WindowsScmBackend,
    backend_for_platform,
)
from agent.state import write_private
from agent.text import count_text
from fleetmend.v1 import remediation_pb2

logger = logging.getLogger(__name__)

NAME = "restart_service"

STATE_FILE = "service-restarts.json"

DEFAULT_SETTLE = timedelta(seconds=10)
MIN_SETTLE = timedelta(seconds=1)
MAX_SETTLE = timedelta(minutes=10)
DEFAULT_MAX_FAILURES = 3
MAX_FAILURES_RANGE = range(1, 11)
DEFAULT_FAILURE_WINDOW = timedelta(hours=1)
MIN_FAILURE_WINDOW = timedelta(minutes=1)
MAX_FAILURE_WINDOW = timedelta(days=1)

# Before and after values of a record: 1 when the service is active, else 0.
UNIT = "active"


def validate(
    params: remediation_pb2.RestartService, allowlist: LocalAllowlist
) -> list[str]:
    """Return what is wrong with the parameters, without touching the system."""
    problems: list[str] = []
    bad_name = check_text("service", params.service, MAX_SERVICE_NAME)
    if not params.service:
        problems.append("service is empty; name the service")
    elif bad_name:
        problems += bad_name
    elif not SERVICE_NAME.fullmatch(params.service):
        problems.append(
            f"service {quote(params.service)} is not a service name "
            f"({SERVICE_NAME_TEXT}), so no allowlist can permit it"
        )
    elif params.service not in allowlist.services:
        problems.append(
            allowlist_refusal_text(
                "service",
                [params.service],
                "healing.services",
                allowlist.services,
                "this rule",
            )
        )
    if params.HasField("settle"):
        out_of_range = check_duration_range("settle", params.settle)
        if out_of_range:
            return problems + out_of_range
        settle = params.settle.ToTimedelta()
        if not MIN_SETTLE <= settle <= MAX_SETTLE:
            problems.append(
                f"settle {_seconds(settle)} is out of range; "
                f"use {_seconds(MIN_SETTLE)} to {_seconds(MAX_SETTLE)}"
            )
    if params.max_failures and params.max_failures not in MAX_FAILURES_RANGE:
        problems.append(
            f"max_failures {params.max_failures} is out of range; "
            f"use {MAX_FAILURES_RANGE.start} to {MAX_FAILURES_RANGE.stop - 1}, "
            f"or 0 for the default {DEFAULT_MAX_FAILURES}"
        )
    if params.HasField("failure_window"):
        out_of_range = check_duration_range("failure_window", params.failure_window)
        if out_of_range:
            return problems + out_of_range
        window = params.failure_window.ToTimedelta()
        if not MIN_FAILURE_WINDOW <= window <= MAX_FAILURE_WINDOW:
            problems.append(
                f"failure_window {_seconds(window)} is out of "
                f"range; use {_seconds(MIN_FAILURE_WINDOW)} to "
                f"{_seconds(MAX_FAILURE_WINDOW)}"
            )
    return problems


def execute(
    params: remediation_pb2.RestartService,
    context: ActionContext,
    *,
    backend: ServiceBackend | None = None,
    stop: threading.Event | None = None,
) -> ActionResult:
    """Restart the service if it is not active, and verify that it stays active.

    backend defaults to the one for this operating system. stop defaults to
    context.stop. When it is set during the settle time, the wait ends early
    (the agent is shutting down) and the result is FAILED.
    """
    problems = validate(params, context.allowlist)
    if problems:
        return ActionResult(Outcome.REMEDIATION_OUTCOME_REFUSED, "; ".join(problems))
    name = params.service
    settle = params.settle.ToTimedelta() if params.HasField("settle") else None
    settle = settle or DEFAULT_SETTLE
    max_failures = params.max_failures or DEFAULT_MAX_FAILURES
    window = (
        params.failure_window.ToTimedelta()
        if params.HasField("failure_window")
        else DEFAULT_FAILURE_WINDOW
    )
    try:
        backend = backend or backend_for_platform()
        before = backend.status(name)
    except ServiceError as exc:
        # No status was read, so the result has no unit and no values.
        return ActionResult(Outcome.REMEDIATION_OUTCOME_FAILED, str(exc))
    if before.active:
        return _result(
            Outcome.REMEDIATION_OUTCOME_SKIPPED,
            f"service {name} is already active ({before.state})",
            before,
            before,
        )

    failures = FailureLog(context.state_dir / STATE_FILE)
    now = clock_module.clock.now()
    recent = failures.recent(name, now, window)
    if len(recent) >= max_failures:
        return _result(
            Outcome.REMEDIATION_OUTCOME_ESCALATED,
            f"service {name} failed to restart {count_text(len(recent), 'time')} "
            "within "
            f"{_seconds(window)} (max_failures {max_failures}); not restarting "
            f"again before {(recent[0] + window).isoformat()}, a person must look "
            "at it",
            before,
            before,
        )

    if context.dry_run:
        return _result(
            Outcome.REMEDIATION_OUTCOME_DRY_RUN,
            f"would run `{describe_restart(backend, name)}` because service {name} "
            f"is {before.state}, then check that it stays active for "
            f"{_seconds(settle)}",
            before,
            before,
        )

    stop = stop or context.stop
    outcome, reason, after, interrupted = _restart_and_verify(
        backend, name, settle, stop
    )
    if outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED:
        failures.clear(name)
    elif interrupted:
        reason = f"{reason} (not counted as a failed restart)"
    else:
        failures.add(name, clock_module.clock.now(), window)
        count = len(failures.recent(name, clock_module.clock.now(), window))
        reason = f"{reason} (failed restart {count} of {max_failures} allowed)"
    logger.info("restart_service %s: %s", name, reason)
    return _result(outcome, reason, before, after)


def _restart_and_verify(
    backend: ServiceBackend,
    name: str,
    settle: timedelta,
    stop: threading.Event,
) -> tuple[Outcome.ValueType, str, ServiceStatus | None, bool]:
    """Restart, then check that the service is active now and after settle.

    Return the outcome, the reason, the last status read and whether stop
    interrupted the settle wait.
    """
    failed = Outcome.REMEDIATION_OUTCOME_FAILED
    try:
        backend.restart(name, stop=stop)
        just_after = backend.status(name)
    except ServiceWaitInterrupted as exc:
        return failed, str(exc), None, True
    except ServiceError as exc:
        return failed, str(exc), None, False
    if not just_after.active:
        reason = f"service {name} is {just_after.state} right after the restart"
        return failed, reason, just_after, False
    if clock_module.clock.wait(stop, settle.total_seconds()):
        reason = f"the settle wait for service {name} was interrupted by shutdown"
        return failed, reason, just_after, True
    try:
        settled = backend.status(name)
    except ServiceError as exc:
        return failed, str(exc), just_after, False
    if not settled.active:
        reason = (
            f"service {name} was active after the restart but is {settled.state} "
            f"after {_seconds(settle)}"
        )
        return failed, reason, settled, False
    reason = (
        f"restarted service {name}; still active ({settled.state}) after "
        f"{_seconds(settle)}"
    )
    return Outcome.REMEDIATION_OUTCOME_SUCCEEDED, reason, settled, False


def describe_restart(backend: ServiceBackend, name: str) -> str:
    """Return the command line that backend.restart(name) runs, for a dry run."""
    if isinstance(backend, SystemdBackend):
        return f"{backend.systemctl} restart -- {name}"
    if isinstance(backend, LaunchdBackend):
        return f"{backend.launchctl} kickstart -k {backend.domain}/{name}"
    if isinstance(backend, WindowsScmBackend):
        return f"{backend.sc} stop {name}; {backend.sc} start {name}"
    return f"{type(backend).__name__}.restart({name!r})"


class FailureLog:
    """Times of failed restarts per service, in a JSON file in the state dir."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def recent(self, name: str, now: datetime, window: timedelta) -> list[datetime]:
        """Return the failure times of name within window before now, oldest first."""
        times = self._load().get(name, [])
        return sorted(time for time in times if now - window < time <= now)

    def add(self, name: str, when: datetime, window: timedelta) -> None:
        """Record a failure and drop the ones older than window."""
        data = self._load()
        data[name] = [*self.recent(name, when, window), when]
        self._save(data)

    def clear(self, name: str) -> None:
        """Forget the failures of name."""
        data = self._load()
        if data.pop(name, None) is not None:
            self._save(data)

    def _load(self) -> dict[str, list[datetime]]:
        try:
            document: Any = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A damaged file loses the count, which at worst allows
            # max_failures more restarts; it must not stop every restart.
            logger.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        services = document.get("services") if isinstance(document, dict) else None
        if not isinstance(services, dict):
            return {}
        return {
            str(name): _parse_times(times)
            for name, times in services.items()
            if isinstance(times, list)
        }

    def _save(self, data: dict[str, list[datetime]]) -> None:
        services = {
            name: [time.isoformat() for time in times] for name, times in data.items()
        }
        payload = json.dumps({"services": services}, indent=2, sort_keys=True)
        write_private(self.path, payload.encode("utf-8"))


def _parse_times(values: list[Any]) -> list[datetime]:
    times = []
    for value in values:
        try:
            time = datetime.fromisoformat(str(value))
        except ValueError:
            continue
        if time.tzinfo is not None:
            times.append(time)
    return times


def _result(
    outcome: Outcome.ValueType,
    reason: str,
    before: ServiceStatus,
    after: ServiceStatus | None,
) -> ActionResult:
    details = {"state_before": before.state}
    if before.detail:
        details["detail_before"] = before.detail
    if after is not None:
        details["state_after"] = after.state
        if after.detail:
            details["detail_after"] = after.detail
    if after is None:
        # The status after the restart was not read. A record has no way to
        # mark one value as unknown, so it carries neither.
        return ActionResult(outcome, reason, details=details)
    return ActionResult(
        outcome,
        reason,
        before=1.0 if before.active else 0.0,
        after=1.0 if after.active else 0.0,
        unit=UNIT,
        details=details,
    )


def _seconds(span: timedelta) -> str:
    return f"{span.total_seconds():g} s"
