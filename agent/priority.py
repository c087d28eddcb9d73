"""Keep the agent light on the user's computer.

The agent runs at low CPU and I/O priority, so that it never competes with the
user, and hands free heap memory back to the OS.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)

NICE_INCREMENT = 10

# glibc's malloc_trim, looked up at the first release_free_heap call; None
# where the C library has none (macOS, Windows, musl).
_malloc_trim: Callable[[int], int] | None = None
_malloc_trim_looked_up = False


def lower_priority(process: psutil.Process | None = None) -> list[str]:
    """Lower the CPU and I/O priority of process (default: this one).

    Returns what was changed, in words, for the log. A priority that the OS
    does not let us lower is logged and skipped.
    """
    process = process or psutil.Process()
    changes: list[str] = []

    try:
        if sys.platform == "win32":
            process.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
            changes.append("CPU priority below normal")
        else:
            os.nice(NICE_INCREMENT)
            changes.append(f"nice +{NICE_INCREMENT}")
    except (OSError, psutil.Error) as exc:
        log.warning("could not lower CPU priority: %s", exc)

    try:
        if sys.platform.startswith("linux"):
            process.ionice(psutil.IOPRIO_CLASS_IDLE)
            changes.append("I/O class idle")
        elif sys.platform == "win32":
            process.ionice(psutil.IOPRIO_VERYLOW)  # type: ignore[attr-defined]
            changes.append("I/O priority very low")
    except (OSError, psutil.Error, AttributeError) as exc:
        log.warning("could not lower I/O priority: %s", exc)

    return changes


def release_free_heap() -> bool:
    """Return the free pages of glibc's malloc arenas to the OS.

    glibc keeps memory that Python and gRPC freed in its arenas and gives
    back only the top of each heap. Called after each round of probes, it
    lowered the agent's RSS by about 0.7 MiB (bench/agent_process.py, glibc
    2.36). Returns False, and does nothing, where the C library has no
    malloc_trim.
    """
    global _malloc_trim, _malloc_trim_looked_up
    if not _malloc_trim_looked_up:
        _malloc_trim_looked_up = True
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):
                log.debug("the C library has no malloc_trim; free heap stays mapped")
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
