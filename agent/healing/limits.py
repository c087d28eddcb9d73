"""A rule's local limits (cooldown, runs per day, quiet hours, consent) and their state.

The state lives in ``<state dir>/healing.json`` (0600, replaced atomically).
For each rule it contains the times its action ran, the reason of its latest
skip, a skip record that waits while the same reason repeats, and whether
repeated failures stopped it. It also contains the ids of operator commands
already run or refused, the newest MAX_COMMAND_IDS of each. Days and hours are
local time of the computer; times are stored in UTC.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from agent.healing.policy import duration_seconds
from agent.state import write_private
from fleetmend.v1 import remediation_pb2

log = logging.getLogger(__name__)

STATE_FILE = "healing.json"

DEFAULT_COOLDOWN_SECONDS = 3600.0
DEFAULT_MAX_RUNS_PER_DAY = 3
# Command ids are kept this long, longer than any command's time to live.
COMMAND_ID_RETENTION = timedelta(days=30)
# Command ids kept of each kind (run, refused), newest first, so that a
# collector sending many commands cannot grow healing.json without bound.
MAX_COMMAND_IDS = 1000
# Run times older than this are never needed for a cooldown or a daily cap.
RUN_RETENTION = timedelta(days=31)

CONSENT_REASON = "needs the user's consent, and no tray is running"


@dataclass
class RuleState:
    """The state of one rule between evaluations."""

    runs: list[datetime] = field(default_factory=list)
    last_skip_reason: str = ""
    # A skip record whose reason repeats; written with its count when the
    # reason changes, the rule acts, or a day has passed since it started.
    pending: remediation_pb2.RemediationRecord | None = None
    pending_since: datetime | None = None
    # Set when repeated failures stopped the rule until its policy changes.
    stopped_reason: str = ""
    stopped_policy_version: int = 0


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


class HealingState:
    """The contents of healing.json; save() writes them back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rules: dict[str, RuleState] = {}
        self.commands: dict[str, datetime] = {}
        self.refused_commands: dict[str, datetime] = {}

    def known_command_time(self, command_id: str) -> datetime | None:
        """Return when a command id was run or refused, None for a new id."""
        return self.commands.get(command_id) or self.refused_commands.get(command_id)

    @classmethod
    def load(cls, state_dir: Path) -> HealingState:
        """Read healing.json; a missing or damaged file gives an empty state."""
        state = cls(state_dir / STATE_FILE)
        try:
            data = json.loads(state.path.read_text(encoding="utf-8"))
            state._parse(data)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Without the run times a rule may act again before its cooldown
            # ends and up to its daily cap again. The next save rewrites the file.
            log.error(
                "healing state %s is damaged (%s); starting empty", state.path, exc
            )
            state.rules.clear()
            state.commands.clear()
            state.refused_commands.clear()
        return state

    def _parse(self, data: dict[str, Any]) -> None:
        for name, entry in data.get("rules", {}).items():
            rule = RuleState(
                runs=[_time(t) for t in entry.get("runs", [])],
                last_skip_reason=str(entry.get("last_skip_reason", "")),
                stopped_reason=str(entry.get("stopped_reason", "")),
                stopped_policy_version=int(entry.get("stopped_policy_version", 0)),
            )
            pending = entry.get("pending")
            if pending:
                rule.pending = remediation_pb2.RemediationRecord.FromString(
                    base64.b64decode(pending["record"])
                )
                rule.pending_since = _time(pending["since"])
            self.rules[name] = rule
        for command_id, text in data.get("commands", {}).items():
            self.commands[command_id] = _time(text)
        for command_id, text in data.get("refused_commands", {}).items():
            self.refused_commands[command_id] = _time(text)

    def rule(self, name: str) -> RuleState:
        """Return the state of a rule, created empty on first use."""
        return self.rules.setdefault(name, RuleState())

    def save(self, now: datetime) -> None:
        """Drop what no limit needs any more and write the file."""
        for rule in self.rules.values():
            rule.runs = [t for t in rule.runs if now - t < RUN_RETENTION]
        self.commands = _recent_ids(self.commands, now)
        self.refused_commands = _recent_ids(self.refused_commands, now)
        data: dict[str, Any] = {"rules": {}, "commands": {}}
        for name, rule in self.rules.items():
            entry: dict[str, Any] = {
                "runs": [t.isoformat() for t in rule.runs],
                "last_skip_reason": rule.last_skip_reason,
            }
            if rule.stopped_reason:
                entry["stopped_reason"] = rule.stopped_reason
                entry["stopped_policy_version"] = rule.stopped_policy_version
            if rule.pending is not None and rule.pending_since is not None:
                entry["pending"] = {
                    "record": base64.b64encode(
                        rule.pending.SerializeToString(deterministic=True)
                    ).decode("ascii"),
                    "since": rule.pending_since.isoformat(),
                }
            data["rules"][name] = entry
        data["commands"] = {k: v.isoformat() for k, v in self.commands.items()}
        data["refused_commands"] = {
            k: v.isoformat() for k, v in self.refused_commands.items()
        }
        write_private(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


def _recent_ids(ids: dict[str, datetime], now: datetime) -> dict[str, datetime]:
    """Keep the newest MAX_COMMAND_IDS ids younger than COMMAND_ID_RETENTION."""
    recent = sorted(
        (
            (when, command_id)
            for command_id, when in ids.items()
            if now - when < COMMAND_ID_RETENTION
        ),
        reverse=True,
    )[:MAX_COMMAND_IDS]
    return {command_id: when for when, command_id in reversed(recent)}


def quiet_span(
    spans: list[remediation_pb2.QuietHours], local: datetime
) -> remediation_pb2.QuietHours | None:
    """Return the first span [start_hour, end_hour) that contains the local time.

    A span whose end is before its start crosses midnight: 22 to 7 covers
    22:00 to 06:59.
    """
    hour = local.hour
    for span in spans:
        start, end = span.start_hour, span.end_hour
        if start < end and start <= hour < end:
            return span
        if start > end and (hour >= start or hour < end):
            return span
    return None


def cooldown_seconds(limits: remediation_pb2.RuleLimits) -> float:
    """Return the rule's cooldown, the default when it is not set."""
    if limits.HasField("cooldown"):
        return duration_seconds(limits.cooldown)
    return DEFAULT_COOLDOWN_SECONDS


def max_runs_per_day(limits: remediation_pb2.RuleLimits) -> int:
    """Return the rule's daily cap, the default when it is 0."""
    return limits.max_runs_per_day or DEFAULT_MAX_RUNS_PER_DAY


@dataclass(frozen=True)
class Limits:
    """Decide whether a rule may act now; tz None means the computer's local zone."""

    tz: tzinfo | None = None
    # True once a tray can ask the user; until then consent is never given.
    consent_available: bool = False

    def local(self, now: datetime) -> datetime:
        return now.astimezone(self.tz)

    def skip_reason(
        self, rule: remediation_pb2.Rule, state: RuleState, now: datetime
    ) -> str:
        """Return why the rule may not act at now (aware), or "" if it may.

        A dry run changes nothing, so quiet hours and consent do not apply to
        it, but cooldown and the daily cap do, which bounds its records.
        """
        limits = rule.limits
        local = self.local(now)
        if not rule.dry_run:
            span = quiet_span(list(limits.quiet_hours), local)
            if span is not None:
                return (
                    f"quiet hours {span.start_hour:02d}:00 to "
                    f"{span.end_hour:02d}:00 (local time)"
                )
            if limits.require_consent and not self.consent_available:
                return CONSENT_REASON
        if state.runs:
            last = max(state.runs)
            cooldown = cooldown_seconds(limits)
            elapsed = (now - last).total_seconds()
            if elapsed < cooldown:
                # The reason names the last run, not the time left, so that
                # repeats of the same skip have the same reason.
                return (
                    f"cooldown of {cooldown:.0f} s since the last run at "
                    f"{last.isoformat(timespec='seconds')}"
                )
        day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        today = sum(1 for t in state.runs if self.local(t) >= day_start)
        cap = max_runs_per_day(limits)
        if today >= cap:
            return f"daily cap: {today} runs today (local time), at most {cap}"
        return ""
