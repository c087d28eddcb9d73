"""Plain-text helpers for what the agent and the collector print for people."""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls, which terminals act on (ESC and CSI start
# escape sequences, CR and LF move the cursor), and U+2028 and U+2029, on which
# str.splitlines breaks the lines of a report.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def count_text(count: int, noun: str, plural: str = "") -> str:
    """Return "1 rule" or "3 rules"; plural replaces noun + "s" where that is wrong."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural or noun + 's'}"


def format_bytes(count: float) -> str:
    """Return a byte count in binary units, such as "512 B" or "2.2 GiB"."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def escape_controls(text: str) -> str:
    """Replace each control character in text with a visible escape.

    Tab, LF and CR become \\t, \\n and \\r, and the others \\x1b or \\u2028 as
    Python writes them. A backslash stays as it is, so text that contains
    such an escape literally prints the same.
    """
    return CONTROL_CHARACTERS.sub(_visible_escape, text)


def _visible_escape(match: re.Match[str]) -> str:
    character = match.group()
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
