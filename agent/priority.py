"""Lower the agent's CPU and I/O priority, so that it never competes with the user."""

from __future__ import annotations

import logging
import os
import sys

import psutil

log = logging.getLogger(__name__)

NICE_INCREMENT = 10


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
