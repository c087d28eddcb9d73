"""Size and character bounds on what the collector sends and what records carry.

A compromised or faulty collector can send policies and commands with huge or
hostile strings. Validation rejects them with problems that quote at most
QUOTE_CHARS of the value, and records cap their text, so that no record or
report grows past the link's message limit.
"""

from __future__ import annotations

import re

from google.protobuf import duration_pb2

# Longest accepted values of names and paths in policies and commands.
MAX_SERVICE_NAME = 256
# A service name as systemd, launchd and the Windows service manager use
# them, and as healing.services in agent.toml accepts them.
SERVICE_NAME = re.compile(r"[A-Za-z0-9@._:\\-]{1,256}")
SERVICE_NAME_TEXT = "1 to 256 letters, digits and @._:-"
MAX_COMMAND_ID = 128
MAX_NAME = 256
MAX_PATH = 4096
MAX_RULES = 200
# A record's reason and a policy's rejected_reason are cut to this many characters.
MAX_REASON_CHARS = 1024
# A record's copy of the action is reduced to its kind above this many bytes.
MAX_RECORD_ACTION_BYTES = 4096
# Log lines quote this many characters of a refusal or rejection reason.
MAX_LOG_CHARS = 200
# Problems quote this many characters of a rejected value.
QUOTE_CHARS = 64

# Range of google.protobuf.Duration (about 10,000 years), from duration.proto.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999
# Range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59Z, from timestamp.proto.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799

# Characters that reorder or break displayed text: the line and paragraph
# separators and the bidirectional embeddings, overrides and isolates.
_LAYOUT_CHARACTERS = frozenset(
    ["\u2028", "\u2029"]
    + [chr(code) for code in range(0x202A, 0x202F)]
    + [chr(code) for code in range(0x2066, 0x206A)]
)


def truncate(text: str, limit: int) -> str:
    """Cut text to at most limit characters, ending with a marker when cut."""
    if len(text) <= limit:
        return text
    marker = f" ... [truncated, {len(text)} characters in all]"
    return text[: max(0, limit - len(marker))] + marker


def quote(value: str) -> str:
    """Return repr(value), shortened to QUOTE_CHARS characters of the value."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def is_control(char: str) -> bool:
    """Return True for a C0 or C1 control character or DEL."""
    return ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0


def is_layout_character(char: str) -> bool:
    """Return True for U+2028, U+2029 and the bidirectional formatting characters."""
    return char in _LAYOUT_CHARACTERS


def check_text(field: str, value: str, maximum: int) -> list[str]:
    """Return problems of a name or path: too long, or with control characters."""
    if len(value) > maximum:
        return [f"{field} has {len(value)} characters, more than the maximum {maximum}"]
    if any(is_control(char) for char in value):
        return [f"{field} {quote(value)} contains a control character such as NUL"]
    return []


def check_duration_range(field: str, duration: duration_pb2.Duration) -> list[str]:
    """Return problems of a Duration outside the range that protobuf defines."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        return [
            f"{field} has {seconds} seconds, outside the Duration range of "
            f"+-{MAX_DURATION_SECONDS}"
        ]
    if not -MAX_NANOS <= nanos <= MAX_NANOS:
        return [f"{field} has {nanos} nanos; expected -999999999 to 999999999"]
    if (seconds < 0 < nanos) or (nanos < 0 < seconds):
        return [f"{field} has seconds and nanos of different signs"]
    return []
