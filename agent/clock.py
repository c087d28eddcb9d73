"""The agent's one source of time: wall clock, monotonic clock and sleeps.

The runtime, the link, the spool and the report builder read the module
attribute ``clock`` at each call, so a test launcher can assign an accelerated
``Clock`` subclass before it calls ``agent.cli.main`` and let hours of
intervals pass in seconds.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime


class Clock:
    """System time: ``time.monotonic``, ``datetime.now(UTC)`` and ``Event.wait``."""

    def monotonic(self) -> float:
        """Return seconds from an arbitrary start that never go backwards."""
        return time.monotonic()

    def now(self) -> datetime:
        """Return the current time as an aware UTC datetime."""
        return datetime.now(UTC)

    def local_now(self) -> datetime:
        """Return now() as an aware datetime in the device's local time zone.

        A subclass that overrides now() moves this time as well.
        """
        return self.now().astimezone()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait up to seconds for event; return True if it was set."""
        return event.wait(max(0.0, seconds))


clock = Clock()
