"""The throttle_process action: lower a background app's CPU and I/O priority.

The app's processes get a nice value 10 higher (at most 19) and the idle I/O
class on Linux (IOPRIO_CLASS_IDLE), very low I/O priority on Windows
(IOPRIO_VERYLOW), and only the nice value on macOS, where psutil has no I/O
priority. The old values are kept in ``<state dir>/throttles.json`` with each
process's pid and create time, so a pid that the OS has given to a new process
is never touched.

Verification: the app's CPU use, or the system-wide CPU use, fell by at least
VERIFY_MIN_DROP (relative) and VERIFY_MIN_DROP_POINTS between a window before
and a window after the change. A lower priority only takes CPU from a process
while other processes want that CPU, so on an idle machine verification fails
and the old priority is restored at once.

Undo restores the old priority when verification fails, when ``tick`` finds the
app in ``context.foreground_apps``, or when restore_after has passed. Any user may
lower a priority, but raising it back (a lower nice value, or leaving the idle
I/O class) needs root (CAP_SYS_NICE on Linux). An agent that does not run as
root therefore cannot undo, and its undo result is FAILED.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from agent import clock as clock_module
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
)
from agent.healing.bounds import check_duration_range, quote
from agent.healing.processes import CpuSampler, SystemCpu, app_processes
from agent.state import write_private
from agent.text import count_text
from agent.usage.catalog import CURRENT_OS, Catalog, OsName, load_catalog
from fleetmend.v1 import remediation_pb2

logger = logging.getLogger(__name__)

NAME = "throttle_process"

STATE_FILE = "throttles.json"

NICE_STEP = 10
MAX_NICE = 19
DEFAULT_RESTORE_AFTER = timedelta(hours=1)
MIN_RESTORE_AFTER = timedelta(minutes=1)
MAX_RESTORE_AFTER = timedelta(days=1)
# Length of each of the two measurement windows, before and after the change.
VERIFY_WINDOW_SECONDS = 5.0
# The fall of CPU use that counts as verified: at least 20 % less than before
# (relative), and at least one percentage point, so that a process that was
# nearly idle anyway does not count as throttled.
VERIFY_MIN_DROP = 0.2
VERIFY_MIN_DROP_POINTS = 1.0
# psutil.Process.create_time() is computed from the boot time and the
# process's start in clock ticks, so two readings may differ by a tick.
CREATE_TIME_TOLERANCE_SECONDS = 0.05

UNIT = "percent of one CPU"

_APP_ID_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Throttle:
    """One throttled process and the priority it had before."""

    app_id: str
    pid: int
    create_time: float
    old_nice: int
    # Linux: [ioclass, value]; Windows: [priority]; None where not changed.
    old_ionice: list[int] | None
    # ISO 8601 UTC times.
    start: str
    until: str
    # Name of the rule that throttled it; empty for an operator command.
    rule: str = ""


def validate(
    params: remediation_pb2.ThrottleProcess, allowlist: LocalAllowlist
) -> list[str]:
    """Return what is wrong with the parameters, without touching the system."""
    problems: list[str] = []
    if not _APP_ID_PATTERN.fullmatch(params.app_id):
        problems.append(
            f"app_id {quote(params.app_id)} is invalid; use the "
            "catalog id of the app (1 to 64 of a-z, 0-9, '_' and '-')"
        )
    if params.HasField("restore_after"):
        out_of_range = check_duration_range("restore_after", params.restore_after)
        if out_of_range:
            return problems + out_of_range
        span = params.restore_after.ToTimedelta()
        if not MIN_RESTORE_AFTER <= span <= MAX_RESTORE_AFTER:
            problems.append(
                f"restore_after {span.total_seconds():g} s is out "
                f"of range; use {MIN_RESTORE_AFTER.total_seconds():g} s to "
                f"{MAX_RESTORE_AFTER.total_seconds():g} s"
            )
    return problems


def execute(
    params: remediation_pb2.ThrottleProcess,
    context: ActionContext,
    *,
    catalog: Catalog | None = None,
    verify_window: float = VERIFY_WINDOW_SECONDS,
    os_name: OsName | None = CURRENT_OS,
    system: SystemCpu | None = None,
    stop: threading.Event | None = None,
    source_rule: str = "",
) -> ActionResult:
    """Lower the priority of the app's processes, verify that CPU use fell, or undo.

    catalog defaults to the shipped catalog, and system to a new SystemCpu. The
    action takes about twice verify_window seconds: one window to measure
    before and one after. context.stop (or stop, which overrides it) ends a
    window early. Set during the first window, it makes the action return
    SKIPPED without changing a priority. Set during the second, it makes the
    action undo the change and return FAILED. source_rule is stored with the
    throttle and returned in the undo result's details["rule"].

    Only a result that measured the app's CPU use sets unit. The others, the
    dry run included, leave it empty, so the engine records the value of the
    rule's condition instead.
    """
    problems = validate(params, context.allowlist)
    if problems:
        return ActionResult(Outcome.REMEDIATION_OUTCOME_REFUSED, "; ".join(problems))
    app_id = params.app_id
    catalog = catalog if catalog is not None else load_catalog()
    if catalog.get(app_id) is None:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_FAILED,
            f"app {app_id!r} is not in the catalog; add it to a catalog file",
        )
    store = ThrottleStore(context.state_dir / STATE_FILE)
    active = [entry for entry in store.load() if entry.app_id == app_id]
    if active:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_SKIPPED,
            f"app {app_id} is already throttled until {active[0].until}",
        )
    processes = app_processes(app_id, catalog, os_name)
    if not processes:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_SKIPPED, f"no process of app {app_id} runs"
        )
    if context.dry_run:
        pids = ", ".join(str(process.pid) for process in processes)
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_DRY_RUN,
            f"would raise the nice value by {NICE_STEP} (at most {MAX_NICE}) and "
            f"lower the I/O priority of app {app_id} (pids {pids})",
        )

    stop_event = stop if stop is not None else context.stop
    sampler = CpuSampler(os_name)
    system = system if system is not None else SystemCpu()
    system.busy_percent()
    sampler.sample(app_id, catalog)
    if clock_module.clock.wait(stop_event, verify_window):
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_SKIPPED,
            f"shutdown interrupted the measurement of app {app_id}'s CPU use "
            "before any priority was lowered",
        )
    before = sampler.sample(app_id, catalog)
    system_before = system.busy_percent()

    now = clock_module.clock.now()
    restore_after = (
        params.restore_after.ToTimedelta()
        if params.HasField("restore_after")
        else DEFAULT_RESTORE_AFTER
    )
    throttles, errors = _lower_priority(
        processes, app_id, now, now + restore_after, source_rule
    )
    if not throttles:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_FAILED,
            f"could not lower the priority of any process of app {app_id}: "
            + "; ".join(errors),
            # Nothing changed, so the value after is the one measured before.
            before=before,
            after=before,
            unit=UNIT,
        )
    store.save([*store.load(), *throttles])

    if clock_module.clock.wait(stop_event, verify_window):
        # A shortened window cannot verify the change, and an unverified
        # throttle is not left in place.
        undone = undo(context, app_id, "shutdown interrupted the verification")
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_FAILED,
            f"shutdown interrupted the verification of app {app_id}'s throttle; "
            f"{undone.reason}",
            before=before,
            after=before,
            unit=UNIT,
        )
    after = sampler.sample(app_id, catalog)
    system_after = system.busy_percent()
    details = {
        "pids": ", ".join(str(entry.pid) for entry in throttles),
        "system_cpu_before": f"{system_before:.1f} %",
        "system_cpu_after": f"{system_after:.1f} %",
    }
    if errors:
        details["errors"] = "; ".join(errors)
    if _fell(before, after) or _fell(system_before, system_after):
        throttled = count_text(len(throttles), "process", "processes")
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_SUCCEEDED,
            f"lowered the priority of {throttled} of app {app_id} "
            f"until {throttles[0].until}; its CPU use went from {before:.1f} % to "
            f"{after:.1f} %",
            before=before,
            after=after,
            unit=UNIT,
            details=details,
        )
    undone = undo(context, app_id, "verification failed")
    return ActionResult(
        Outcome.REMEDIATION_OUTCOME_FAILED,
        f"CPU use did not fall by {VERIFY_MIN_DROP:.0%} (app {app_id}: {before:.1f} % "
        f"to {after:.1f} %, system: {system_before:.1f} % to {system_after:.1f} %); "
        f"{undone.reason}",
        before=before,
        after=after,
        unit=UNIT,
        details=details,
    )


def tick(context: ActionContext, now: datetime) -> list[ActionResult]:
    """Undo the throttles whose time is up or whose app is in the foreground.

    Returns one result per app that was undone: UNDONE, or FAILED when a
    process's priority could not be restored.
    """
    store = ThrottleStore(context.state_dir / STATE_FILE)
    due: dict[str, str] = {}
    for entry in store.load():
        if entry.app_id in context.foreground_apps:
            due.setdefault(entry.app_id, "the app came to the foreground")
        elif datetime.fromisoformat(entry.until) <= now:
            due.setdefault(entry.app_id, f"restore_after ended at {entry.until}")
    return [undo(context, app_id, reason) for app_id, reason in due.items()]


def undo(context: ActionContext, app_id: str, why: str) -> ActionResult:
    """Restore the old priority of every throttled process of app_id.

    A process that has ended, or whose pid now belongs to another process (its
    create time differs), is left alone. The entries are removed whatever the
    outcome, because a restore that failed for lack of privilege would fail
    again on every tick.
    """
    store = ThrottleStore(context.state_dir / STATE_FILE)
    entries = store.load()
    mine = [entry for entry in entries if entry.app_id == app_id]
    store.save([entry for entry in entries if entry.app_id != app_id])
    restored, gone, errors = 0, 0, []
    for entry in mine:
        state = _restore(entry)
        if state == "restored":
            restored += 1
        elif state == "gone":
            gone += 1
        else:
            errors.append(state)
    summary = (
        f"restored the priority of {count_text(restored, 'process', 'processes')} "
        f"of app {app_id} ({why})"
    )
    if gone:
        summary += f"; {gone} had ended or their pid was reused, left alone"
    details = {
        "app_id": app_id,
        "rule": mine[0].rule if mine else "",
        "restored": str(restored),
        "left_alone": str(gone),
    }
    if errors:
        logger.warning("throttle_process undo for %s: %s", app_id, "; ".join(errors))
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_FAILED,
            f"{summary}; failed: " + "; ".join(errors),
            details=details,
        )
    logger.info("throttle_process: %s", summary)
    return ActionResult(Outcome.REMEDIATION_OUTCOME_UNDONE, summary, details=details)


def _lower_priority(
    processes: list[psutil.Process],
    app_id: str,
    start: datetime,
    until: datetime,
    rule: str = "",
) -> tuple[list[Throttle], list[str]]:
    throttles: list[Throttle] = []
    errors: list[str] = []
    for process in processes:
        try:
            create_time = process.create_time()
            old_nice = process.nice()
            old_ionice = _read_ionice(process)
            process.nice(min(old_nice + NICE_STEP, MAX_NICE))
            if old_ionice is not None:
                _set_low_ionice(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            errors.append(f"pid {process.pid}: access denied")
            continue
        throttles.append(
            Throttle(
                app_id=app_id,
                pid=process.pid,
                create_time=create_time,
                old_nice=int(old_nice),
                old_ionice=old_ionice,
                start=start.isoformat(),
                until=until.isoformat(),
                rule=rule,
            )
        )
    return throttles, errors


def _read_ionice(process: psutil.Process) -> list[int] | None:
    if sys.platform.startswith("linux"):
        ioclass, value = process.ionice()
        return [int(ioclass), int(value)]
    if sys.platform == "win32":
        return [int(process.ionice())]
    return None


def _set_low_ionice(process: psutil.Process) -> None:
    if sys.platform.startswith("linux"):
        process.ionice(psutil.IOPRIO_CLASS_IDLE)
    elif sys.platform == "win32":
        process.ionice(psutil.IOPRIO_VERYLOW)  # type: ignore[attr-defined]


def _restore(entry: Throttle) -> str:
    """Restore one process: return "restored", "gone" or the error in words."""
    try:
        process = psutil.Process(entry.pid)
        if (
            abs(process.create_time() - entry.create_time)
            > CREATE_TIME_TOLERANCE_SECONDS
        ):
            logger.info(
                "pid %d of app %s now belongs to another process; left alone",
                entry.pid,
                entry.app_id,
            )
            return "gone"
        process.nice(entry.old_nice)
        if entry.old_ionice is not None:
            _restore_ionice(process, entry.old_ionice)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return "gone"
    except psutil.AccessDenied:
        return (
            f"pid {entry.pid}: access denied while restoring nice {entry.old_nice}; "
            "raising a priority back needs root"
        )
    return "restored"


def _restore_ionice(process: psutil.Process, old: list[int]) -> None:
    if sys.platform.startswith("linux"):
        ioclass, value = old
        # psutil accepts a value only for the real-time and best-effort classes.
        if ioclass in (psutil.IOPRIO_CLASS_RT, psutil.IOPRIO_CLASS_BE):
            process.ionice(ioclass, value)
        else:
            process.ionice(ioclass)
    elif sys.platform == "win32":
        process.ionice(old[0])


def _fell(before: float, after: float) -> bool:
    return (
        after <= before * (1 - VERIFY_MIN_DROP)
        and before - after >= VERIFY_MIN_DROP_POINTS
    )


class ThrottleStore:
    """The active throttles, in a JSON file in the state dir (0600, atomic replace)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Throttle]:
        """Return the stored throttles; a missing or damaged file is empty."""
        try:
            document: Any = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s", self.path, exc)
            return []
        entries = document.get("throttles") if isinstance(document, dict) else None
        throttles = []
        for item in entries if isinstance(entries, list) else []:
            try:
                throttles.append(_throttle_from_json(item))
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("ignoring a damaged entry in %s: %s", self.path, exc)
        return throttles

    def save(self, throttles: list[Throttle]) -> None:
        """Replace the stored throttles."""
        document = {"throttles": [asdict(entry) for entry in throttles]}
        write_private(self.path, json.dumps(document, indent=2).encode("utf-8"))


def _throttle_from_json(item: dict[str, Any]) -> Throttle:
    old_ionice = item["old_ionice"]
    throttle = Throttle(
        app_id=str(item["app_id"]),
        pid=int(item["pid"]),
        create_time=float(item["create_time"]),
        old_nice=int(item["old_nice"]),
        old_ionice=None if old_ionice is None else [int(v) for v in old_ionice],
        start=str(item["start"]),
        until=str(item["until"]),
        rule=str(item.get("rule", "")),
    )
    datetime.fromisoformat(throttle.until)
    return throttle
