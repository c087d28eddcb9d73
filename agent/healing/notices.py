"""Notices that self-healing actions leave for the user.

A notice is a short title and an actionable body. Until a tray shows them, they
are stored in ``<state dir>/notices.json`` (owner-only, replaced atomically),
listed by ``fleetmend-agent notices``, and reported to the collector through the
remediation records of the rules that wrote them. The store keeps the newest
MAX_NOTICES. A file that is not valid JSON is replaced by the next notice added.
"""

from __future__ import annotations

import json
import logging
import textwrap
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from agent.healing.bounds import is_layout_character
from agent.state import write_private

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BODY_LENGTH",
    "MAX_NOTICES",
    "MAX_TITLE_LENGTH",
    "NOTICES_FILE",
    "Notice",
    "NoticeError",
    "NoticeStore",
    "check_notice_text",
    "render_notices",
]

NOTICES_FILE = "notices.json"
MAX_NOTICES = 100
# A notice must fit a desktop notification: a one-line title and a short body.
MAX_TITLE_LENGTH = 80
MAX_BODY_LENGTH = 500
# Width of a body line in render_notices, indent included.
RENDER_WIDTH = 88


class NoticeError(Exception):
    """The notices file cannot be read or is damaged; the message names the file."""


@dataclass(frozen=True)
class Notice:
    """One notice for the user."""

    notice_id: str
    title: str
    body: str
    # Name of the rule that wrote it; empty for an operator command.
    source_rule: str
    create_time: datetime


class NoticeStore:
    """The notices in the state dir, oldest first."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / NOTICES_FILE

    def add(self, title: str, body: str, source_rule: str, now: datetime) -> Notice:
        """Store a new notice, dropping the oldest beyond MAX_NOTICES, and return it."""
        notice = Notice(
            notice_id=uuid.uuid4().hex,
            title=title,
            body=body,
            source_rule=source_rule,
            create_time=now.astimezone(UTC),
        )
        notices = [*self.list(), notice][-MAX_NOTICES:]
        document = {"notices": [_to_json(item) for item in notices]}
        write_private(self.path, json.dumps(document, indent=2).encode("utf-8"))
        return notice

    def read(self) -> tuple[list[Notice], list[str]]:
        """Return the stored notices, oldest first, and why any entry was skipped.

        A missing file contains no notices. Raises NoticeError when the file
        cannot be read or is not a JSON object with a "notices" list.
        """
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NoticeError(
                f"notices file {self.path} cannot be read: {reason}"
            ) from exc
        try:
            document: Any = json.loads(text)
        except ValueError as exc:
            raise NoticeError(
                f"notices file {self.path} is damaged (not valid JSON: {exc}); "
                "the next notice replaces it"
            ) from exc
        items = document.get("notices") if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise NoticeError(
                f"notices file {self.path} is damaged (no list of notices); "
                "the next notice replaces it"
            )
        notices = []
        problems = []
        for position, item in enumerate(items, start=1):
            try:
                notices.append(_from_json(item))
            except KeyError as exc:
                problems.append(
                    f"entry {position} of {self.path} lacks the field {exc.args[0]}"
                )
            except (TypeError, ValueError) as exc:
                problems.append(f"entry {position} of {self.path} is damaged: {exc}")
        return notices, problems

    def list(self) -> list[Notice]:
        """Return the stored notices, oldest first, logging what read() reports.

        An unreadable or damaged file counts as one without notices.
        """
        try:
            notices, problems = self.read()
        except NoticeError as exc:
            logger.warning("ignoring notices: %s", exc)
            return []
        for problem in problems:
            logger.warning("ignoring a notice: %s", problem)
        return notices


def check_notice_text(title: str, body: str) -> list[str]:
    """Return what is wrong with a notice's title and body, for an action's validate.

    The title is one line of 1 to MAX_TITLE_LENGTH characters; the body has at
    most MAX_BODY_LENGTH characters and no control characters except newlines.
    """
    problems = []
    if not title.strip():
        problems.append("title is empty; give the notice a title")
    elif len(title) > MAX_TITLE_LENGTH:
        problems.append(
            f"title has {len(title)} characters, more than the maximum "
            f"{MAX_TITLE_LENGTH}; shorten it"
        )
    if any(_is_control(char) for char in title):
        problems.append("title contains a control character or newline")
    if len(body) > MAX_BODY_LENGTH:
        problems.append(
            f"body has {len(body)} characters, more than the maximum "
            f"{MAX_BODY_LENGTH}; shorten it"
        )
    if any(_is_control(char) for char in body if char != "\n"):
        problems.append("body contains a control character other than newline")
    for field, text in (("title", title), ("body", body)):
        if any(is_layout_character(char) for char in text):
            problems.append(
                f"{field} contains a line or paragraph separator (U+2028, U+2029) "
                "or a bidirectional formatting character (U+202A to U+202E, "
                "U+2066 to U+2069); remove it"
            )
    return problems


def _is_control(char: str) -> bool:
    return ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0


def render_notices(notices: list[Notice], tz: tzinfo | None = None) -> str:
    """Return notices as text for a terminal, newest first, in tz (default: local)."""
    if not notices:
        return "No notices.\n"
    lines = [f"{len(notices)} notice{'s' if len(notices) != 1 else ''}, newest first:"]
    for notice in reversed(notices):
        stamp = notice.create_time.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
        source = f" (from rule {notice.source_rule})" if notice.source_rule else ""
        lines.append("")
        lines.append(f"{stamp}  {notice.title}{source}")
        for line in notice.body.splitlines():
            lines.extend(
                textwrap.wrap(
                    line,
                    RENDER_WIDTH,
                    initial_indent="  ",
                    subsequent_indent="  ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
                or [""]
            )
    return "\n".join(lines) + "\n"


def _to_json(notice: Notice) -> dict[str, str]:
    item = asdict(notice)
    item["create_time"] = notice.create_time.isoformat()
    return item


def _from_json(item: Any) -> Notice:
    if not isinstance(item, dict):
        raise TypeError(f"expected a JSON object, got {json.dumps(item)[:40]}")
    create_time = datetime.fromisoformat(str(item["create_time"]))
    if create_time.tzinfo is None:
        raise ValueError(f"create_time {item['create_time']!r} has no time zone")
    return Notice(
        notice_id=str(item["notice_id"]),
        title=str(item["title"]),
        body=str(item["body"]),
        source_rule=str(item["source_rule"]),
        create_time=create_time,
    )
