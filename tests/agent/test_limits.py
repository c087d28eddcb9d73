"""Local limits of self-healing rules: quiet hours, cooldown, daily cap, consent."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.healing.limits import (
    CONSENT_REASON,
    STATE_FILE,
    HealingState,
    Limits,
    RuleState,
    quiet_span,
)
from fleetmend.v1 import remediation_pb2

BERLIN = ZoneInfo("Europe/Berlin")


def rule(
    cooldown: int | None = None,
    max_runs: int = 0,
    quiet: tuple[tuple[int, int], ...] = (),
    consent: bool = False,
    dry_run: bool = False,
) -> remediation_pb2.Rule:
    message = remediation_pb2.Rule(name="r1", dry_run=dry_run)
    message.condition.disk_failing.SetInParent()
    message.action.notify.title = "t"
    if cooldown is not None:
        message.limits.cooldown.seconds = cooldown
    message.limits.max_runs_per_day = max_runs
    message.limits.require_consent = consent
    for start, end in quiet:
        message.limits.quiet_hours.add(start_hour=start, end_hour=end)
    return message


@pytest.mark.parametrize(
    ("hour", "inside"),
    [
        (21, False),
        (22, True),
        (23, True),
        (0, True),
        (6, True),
        (7, False),
        (12, False),
    ],
)
def test_quiet_span_crosses_midnight(hour: int, inside: bool) -> None:
    spans = [remediation_pb2.QuietHours(start_hour=22, end_hour=7)]
    local = datetime(2026, 3, 10, hour, 30, tzinfo=BERLIN)

    assert (quiet_span(spans, local) is not None) is inside


@pytest.mark.parametrize(
    ("hour", "inside"), [(8, False), (9, True), (16, True), (17, False)]
)
def test_quiet_span_within_day(hour: int, inside: bool) -> None:
    spans = [remediation_pb2.QuietHours(start_hour=9, end_hour=17)]
    local = datetime(2026, 3, 10, hour, 0, tzinfo=BERLIN)

    assert (quiet_span(spans, local) is not None) is inside


def test_quiet_hours_use_local_time() -> None:
    limits = Limits(tz=BERLIN)
    quiet = rule(quiet=((22, 7),))
    # 21:30 UTC is 22:30 in Berlin in winter (UTC+1).
    now = datetime(2026, 1, 15, 21, 30, tzinfo=UTC)

    reason = limits.skip_reason(quiet, RuleState(), now)

    assert reason == "quiet hours 22:00 to 07:00 (local time)"
    assert Limits(tz=UTC).skip_reason(quiet, RuleState(), now) == ""


def test_cooldown_default_and_set() -> None:
    limits = Limits(tz=UTC)
    now = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    state = RuleState(runs=[now - timedelta(minutes=30)])

    assert limits.skip_reason(rule(), state, now).startswith("cooldown of 3600 s")
    assert limits.skip_reason(rule(cooldown=600), state, now) == ""
    # The reason stays the same while the cooldown lasts, so repeats count.
    later = now + timedelta(minutes=20)
    assert limits.skip_reason(rule(), state, later) == limits.skip_reason(
        rule(), state, now
    )
    assert limits.skip_reason(rule(), state, now + timedelta(minutes=31)) == ""


def test_daily_cap_counts_local_day() -> None:
    limits = Limits(tz=BERLIN)
    # Three runs on 15 January, Berlin time; the first is 14 January in UTC.
    runs = [
        datetime(2026, 1, 14, 23, 30, tzinfo=UTC),
        datetime(2026, 1, 15, 9, 0, tzinfo=UTC),
        datetime(2026, 1, 15, 12, 0, tzinfo=UTC),
    ]
    state = RuleState(runs=runs)
    capped = rule(cooldown=0)

    evening = datetime(2026, 1, 15, 20, 0, tzinfo=UTC)
    assert limits.skip_reason(capped, state, evening) == (
        "daily cap: 3 runs today (local time), at most 3"
    )
    # 23:30 UTC is 00:30 of the next day in Berlin.
    next_day = datetime(2026, 1, 15, 23, 30, tzinfo=UTC)
    assert limits.skip_reason(capped, state, next_day) == ""
    assert limits.skip_reason(rule(cooldown=0, max_runs=4), state, evening) == ""


def test_consent_needed_without_tray() -> None:
    now = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

    assert Limits(tz=UTC).skip_reason(rule(consent=True), RuleState(), now) == (
        CONSENT_REASON
    )
    assert (
        Limits(tz=UTC, consent_available=True).skip_reason(
            rule(consent=True), RuleState(), now
        )
        == ""
    )


def test_dry_run_ignores_quiet_hours_and_consent() -> None:
    limits = Limits(tz=UTC)
    now = datetime(2026, 1, 15, 23, 0, tzinfo=UTC)
    dry = rule(quiet=((22, 7),), consent=True, dry_run=True)

    assert limits.skip_reason(dry, RuleState(), now) == ""
    state = RuleState(runs=[now - timedelta(minutes=1)])
    assert limits.skip_reason(dry, state, now).startswith("cooldown")


def test_state_round_trip(tmp_path: Path) -> None:
    now = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    state = HealingState.load(tmp_path)
    entry = state.rule("r1")
    entry.runs.append(now - timedelta(hours=2))
    entry.runs.append(now - timedelta(days=40))
    entry.last_skip_reason = "cooldown"
    entry.pending = remediation_pb2.RemediationRecord(rule="r1", repeat_count=4)
    entry.pending_since = now
    state.commands["c-new"] = now
    state.commands["c-old"] = now - timedelta(days=31)

    state.save(now)

    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = HealingState.load(tmp_path)
    again = loaded.rule("r1")
    assert again.runs == [now - timedelta(hours=2)]
    assert again.last_skip_reason == "cooldown"
    assert again.pending is not None
    assert again.pending.repeat_count == 4
    assert again.pending_since == now
    assert set(loaded.commands) == {"c-new"}


def test_damaged_state_starts_empty(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"rules": {"r1": {"runs": [5]}}}))

    state = HealingState.load(tmp_path)

    assert state.rules == {}
