"""Probes: each reads one source and returns typed readings.

A probe module splits into pure parsers (text or bytes in, dataclasses out) and a
thin reader that runs the command or opens the file. Probes know nothing of the
wire format, the transport or the collector.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ProbeErrorKind(Enum):
    UNPARSED = "unparsed"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ProbeError:
    """A reading that could not be taken or parsed, with the reason in words."""

    source: str
    kind: ProbeErrorKind
    reason: str
