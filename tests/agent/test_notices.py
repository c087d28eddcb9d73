"""NoticeStore, render_notices, and the notify and prompt_password_change actions."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent import clock as clock_module
from agent.healing.actions import notify, prompt_password_change
from agent.healing.actions.base import ActionContext, LocalAllowlist, Outcome
from agent.healing.notices import (
    MAX_NOTICES,
    NoticeError,
    NoticeStore,
    check_notice_text,
    render_notices,
)
from agent.probes.credentials import CredentialReading, PasswordExpiry
from fleetmend.v1 import remediation_pb2

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
URL = "https://password.example.com/change"


class FixedClock(clock_module.Clock):
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.is_set()


@pytest.fixture(autouse=True)
def utc_and_fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FixedClock]:
    """Run in UTC, so local dates in the messages are UTC dates."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    clock = FixedClock(NOW)
    monkeypatch.setattr(clock_module, "clock", clock)
    yield clock
    monkeypatch.undo()
    time.tzset()


def context(state_dir: Path, dry_run: bool = False) -> ActionContext:
    return ActionContext(
        state_dir=state_dir, allowlist=LocalAllowlist(), dry_run=dry_run
    )


def reading(
    account: str, expire_time: datetime | None, expiry: PasswordExpiry
) -> CredentialReading:
    return CredentialReading(account, expiry, expire_time, f"chage -l {account}")


# NoticeStore


def test_store_add_and_list(tmp_path: Path) -> None:
    store = NoticeStore(tmp_path)
    first = store.add("Disk failing", "Back up your files now.", "disk-failing", NOW)
    second = store.add("Battery worn", "Ask IT for a new battery.", "", NOW)
    notices = store.list()
    assert [notice.notice_id for notice in notices] == [
        first.notice_id,
        second.notice_id,
    ]
    assert notices[0].title == "Disk failing"
    assert notices[0].body == "Back up your files now."
    assert notices[0].source_rule == "disk-failing"
    assert notices[0].create_time == NOW


def test_store_file_is_private(tmp_path: Path) -> None:
    NoticeStore(tmp_path).add("Title", "Body", "", NOW)
    path = tmp_path / "notices.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["notices.json"]


def test_store_keeps_newest(tmp_path: Path) -> None:
    store = NoticeStore(tmp_path)
    for number in range(MAX_NOTICES + 5):
        store.add(f"Notice {number}", "", "", NOW + timedelta(minutes=number))
    notices = store.list()
    assert len(notices) == MAX_NOTICES
    assert notices[0].title == "Notice 5"
    assert notices[-1].title == f"Notice {MAX_NOTICES + 4}"


def test_store_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "notices.json").write_text("{broken")
    store = NoticeStore(tmp_path)
    assert store.list() == []
    store.add("New", "", "", NOW)
    assert [notice.title for notice in store.list()] == ["New"]


def test_store_skips_damaged_entry(tmp_path: Path) -> None:
    good = {
        "notice_id": "a",
        "title": "Good",
        "body": "",
        "source_rule": "",
        "create_time": NOW.isoformat(),
    }
    naive = {**good, "notice_id": "b", "create_time": "2026-03-02T09:30:00"}
    document = {"notices": [good, {"title": "no id"}, naive]}
    (tmp_path / "notices.json").write_text(json.dumps(document))
    assert [notice.notice_id for notice in NoticeStore(tmp_path).list()] == ["a"]


# render_notices


def test_render_empty() -> None:
    assert render_notices([]) == "No notices.\n"


def test_render_newest_first(tmp_path: Path) -> None:
    store = NoticeStore(tmp_path)
    store.add("Older", "First line.\nSecond line.", "rule-a", NOW)
    store.add("Newer", "Do this.", "", NOW + timedelta(hours=1))
    assert render_notices(store.list()) == (
        "2 notices, newest first:\n"
        "\n"
        "2026-03-02 10:30 UTC  Newer\n"
        "  Do this.\n"
        "\n"
        "2026-03-02 09:30 UTC  Older (from rule rule-a)\n"
        "  First line.\n"
        "  Second line.\n"
    )


def test_render_in_given_zone(tmp_path: Path) -> None:
    store = NoticeStore(tmp_path)
    store.add("Title", "Body.", "", NOW)
    berlin = timezone(timedelta(hours=1), "CET")

    text = render_notices(store.list(), tz=berlin)

    assert "2026-03-02 10:30 CET  Title\n" in text


def test_render_wraps_long_body(tmp_path: Path) -> None:
    store = NoticeStore(tmp_path)
    body = "Back up your files now. " * 12 + "\n\nThen call IT."
    store.add("Disk failing", body, "", NOW)

    lines = render_notices(store.list()).splitlines()

    body_lines = lines[3:]
    assert len(body_lines) > 3
    assert all(len(line) <= 88 for line in body_lines)
    assert all(line.startswith("  ") for line in body_lines if line)
    assert "" in body_lines
    assert body_lines[-1] == "  Then call IT."


# NoticeStore.read, which the notices command uses


def test_read_reports_damaged_entry(tmp_path: Path) -> None:
    good = {
        "notice_id": "a",
        "title": "Good",
        "body": "",
        "source_rule": "",
        "create_time": NOW.isoformat(),
    }
    document = {"notices": [good, {"title": "no id"}, "text"]}
    (tmp_path / "notices.json").write_text(json.dumps(document))

    notices, problems = NoticeStore(tmp_path).read()

    assert [notice.notice_id for notice in notices] == ["a"]
    assert len(problems) == 2
    assert problems[0].startswith("entry 2 of ")
    assert "lacks the field" in problems[0]
    assert problems[1].startswith("entry 3 of ")
    assert "expected a JSON object" in problems[1]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{broken", "is damaged (not valid JSON"),
        ('{"notices": 5}', "is damaged (no list of notices)"),
        ("[]", "is damaged (no list of notices)"),
    ],
)
def test_read_damaged_file_raises(tmp_path: Path, content: str, fragment: str) -> None:
    (tmp_path / "notices.json").write_text(content)

    with pytest.raises(NoticeError) as raised:
        NoticeStore(tmp_path).read()

    message = str(raised.value)
    assert str(tmp_path / "notices.json") in message
    assert fragment in message
    assert "the next notice replaces it" in message


def test_read_folder_as_file_raises(tmp_path: Path) -> None:
    (tmp_path / "notices.json").mkdir()

    with pytest.raises(NoticeError) as raised:
        NoticeStore(tmp_path).read()

    assert "cannot be read: Is a directory" in str(raised.value)


# check_notice_text and notify


@pytest.mark.parametrize(
    ("title", "body", "text"),
    [
        ("", "body", "title is empty"),
        ("   ", "body", "title is empty"),
        ("x" * 81, "", "title has 81 characters, more than the maximum 80"),
        ("two\nlines", "", "title contains a control character"),
        ("ok", "y" * 501, "body has 501 characters, more than the maximum 500"),
        ("ok", "bell\a", "body contains a control character other than newline"),
    ],
)
def test_notice_text_rejected(title: str, body: str, text: str) -> None:
    problems = check_notice_text(title, body)
    assert len(problems) == 1
    assert text in problems[0]


def test_notice_text_accepts_bounds() -> None:
    assert check_notice_text("x" * 80, "line\n" * 100) == []


def test_notify_stores_notice(tmp_path: Path) -> None:
    params = remediation_pb2.Notify(
        title="Disk failing", body="Back up your files now."
    )
    result = notify.execute(params, context(tmp_path), source_rule="disk-failing")
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    notices = NoticeStore(tmp_path).list()
    assert [notice.title for notice in notices] == ["Disk failing"]
    assert notices[0].source_rule == "disk-failing"
    assert result.details["notice_id"] == notices[0].notice_id


def test_notify_dry_run_stores_nothing(tmp_path: Path) -> None:
    params = remediation_pb2.Notify(title="Disk failing", body="Back up.")
    result = notify.execute(params, context(tmp_path, dry_run=True))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert "would show the notice 'Disk failing'" in result.reason
    assert not (tmp_path / "notices.json").exists()


def test_notify_refuses_invalid(tmp_path: Path) -> None:
    result = notify.execute(remediation_pb2.Notify(title=""), context(tmp_path))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert not (tmp_path / "notices.json").exists()


def test_notify_unwritable_state_dir(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    params = remediation_pb2.Notify(title="Title", body="Body")
    result = notify.execute(params, context(missing))
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "cannot write" in result.reason


# prompt_password_change


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("", "self_service_url is empty"),
        ("http://password.example.com/", "is not an https:// URL with a host"),
        ("https:///change", "is not an https:// URL with a host"),
        ("password.example.com/change", "is not an https:// URL with a host"),
        ("https://pass word.example.com/", "contains whitespace"),
        ("https://[::1/", "is invalid"),
        ("https://example.com/" + "a" * 2048, "more than the maximum 2048"),
    ],
)
def test_password_url_rejected(url: str, text: str) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=url)
    problems = prompt_password_change.validate(params, LocalAllowlist())
    assert len(problems) == 1
    assert text in problems[0]


def test_password_url_accepted() -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=URL)
    assert prompt_password_change.validate(params, LocalAllowlist()) == []


def test_password_notice_text(tmp_path: Path) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=URL)
    expire = datetime(2026, 3, 16, 0, 0, tzinfo=UTC)
    result = prompt_password_change.execute_for_credential(
        params, context(tmp_path), "alice", expire, source_rule="password-expiry"
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    assert result.before == 14.0
    assert result.unit == "days until expiry"
    [notice] = NoticeStore(tmp_path).list()
    assert notice.title == "Your password expires in 14 days"
    assert notice.body == (
        "Your password for alice expires on 2026-03-16 (in 14 days). "
        "Change it now at https://password.example.com/change."
    )
    assert notice.source_rule == "password-expiry"


@pytest.mark.parametrize(
    ("expire", "title", "body_start"),
    [
        (
            datetime(2026, 3, 2, 18, 0, tzinfo=UTC),
            "Your password expires today",
            "Your password for alice expires on 2026-03-02 (today).",
        ),
        (
            datetime(2026, 3, 3, 8, 0, tzinfo=UTC),
            "Your password expires in 1 day",
            "Your password for alice expires on 2026-03-03 (in 1 day).",
        ),
        (
            datetime(2026, 2, 27, 0, 0, tzinfo=UTC),
            "Your password has expired",
            "Your password for alice expired on 2026-02-27.",
        ),
        (
            None,
            "Change your password now",
            "Your password for alice must be changed now.",
        ),
    ],
)
def test_password_notice_spans(
    expire: datetime | None, title: str, body_start: str
) -> None:
    got_title, body, _ = prompt_password_change.password_notice(
        "alice", expire, URL, NOW
    )
    assert got_title == title
    assert body.startswith(body_start)
    assert body.endswith(f"{URL}.")


def test_password_soonest_expiry(tmp_path: Path) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=URL)
    readings = [
        reading("bob", datetime(2026, 4, 1, tzinfo=UTC), PasswordExpiry.AT_TIME),
        reading("carol", None, PasswordExpiry.NEVER),
        reading("alice", datetime(2026, 3, 10, tzinfo=UTC), PasswordExpiry.AT_TIME),
    ]
    result = prompt_password_change.execute(
        params, context(tmp_path), credentials=readings
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    assert result.details["account"] == "alice"
    [notice] = NoticeStore(tmp_path).list()
    assert "for alice expires on 2026-03-10 (in 8 days)" in notice.body


def test_password_must_change_first(tmp_path: Path) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=URL)
    readings = [
        reading("alice", datetime(2026, 3, 10, tzinfo=UTC), PasswordExpiry.AT_TIME),
        reading("dave", None, PasswordExpiry.MUST_CHANGE_NOW),
    ]
    result = prompt_password_change.execute(
        params, context(tmp_path), credentials=readings
    )
    assert result.details["account"] == "dave"


def test_password_nothing_expires(tmp_path: Path) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=URL)
    readings = [reading("carol", None, PasswordExpiry.NEVER)]
    result = prompt_password_change.execute(
        params, context(tmp_path), credentials=readings
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert not (tmp_path / "notices.json").exists()


def test_password_dry_run(tmp_path: Path) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=URL)
    expire = datetime(2026, 3, 16, tzinfo=UTC)
    result = prompt_password_change.execute_for_credential(
        params, context(tmp_path, dry_run=True), "alice", expire
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert "Your password for alice expires on 2026-03-16" in result.reason
    assert not (tmp_path / "notices.json").exists()


def test_password_refuses_http(tmp_path: Path) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url="http://x.example/")
    result = prompt_password_change.execute_for_credential(
        params, context(tmp_path), "alice", NOW
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
