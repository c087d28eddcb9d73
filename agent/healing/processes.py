"""CPU use of catalogued applications' processes.

process_cpu_above and throttle_process measure with CpuSampler.

Processes belong to an application the same way as in usage sampling: psutil's
``Process.name()`` (the executable's file name), compared case-insensitively
with the catalog's process names for this operating system.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from agent import clock as clock_module
from agent.usage.catalog import CURRENT_OS, Catalog, OsName

logger = logging.getLogger(__name__)

__all__ = ["CpuSampler", "ProcessKey", "SystemCpu", "app_processes"]

ProcessIter = Callable[..., Iterator[psutil.Process]]


@dataclass(frozen=True)
class ProcessKey:
    """A process identity that survives pid reuse: the pid and its start time."""

    pid: int
    # psutil's Process.create_time(): seconds since the epoch.
    create_time: float


def app_processes(
    app_id: str,
    catalog: Catalog,
    os_name: OsName | None = CURRENT_OS,
    process_iter: ProcessIter = psutil.process_iter,
) -> list[psutil.Process]:
    """Return the running processes whose name is one of the app's process names.

    Returns an empty list for an app that the catalog does not contain or an
    OS that the catalog does not know.
    """
    app = catalog.get(app_id)
    if app is None or os_name is None:
        return []
    names = app.process_names(os_name)
    matched = []
    for process in process_iter(["name"]):
        # process_iter(["name"]) fills info, with None where the name was not
        # readable.
        name = process.info.get("name")
        if isinstance(name, str) and name.lower() in names:
            matched.append(process)
    return matched


def _cpu_seconds(processes: Iterable[psutil.Process]) -> dict[ProcessKey, float]:
    """Return user plus system CPU seconds of each process that is still readable."""
    seconds: dict[ProcessKey, float] = {}
    for process in processes:
        try:
            with process.oneshot():
                key = ProcessKey(process.pid, process.create_time())
                times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        seconds[key] = times.user + times.system
    return seconds


@dataclass
class _Sample:
    monotonic: float
    wall: float
    seconds: dict[ProcessKey, float]


class CpuSampler:
    """Percent of one CPU that an app's processes used between two calls."""

    def __init__(
        self,
        os_name: OsName | None = CURRENT_OS,
        process_iter: ProcessIter = psutil.process_iter,
    ) -> None:
        self.os_name = os_name
        self.process_iter = process_iter
        self._last: dict[str, _Sample] = {}

    def sample(self, app_id: str, catalog: Catalog) -> float:
        """Return the app's CPU use since the previous call for app_id, in percent.

        100 is one CPU fully busy, so a multi-threaded app can exceed 100. The
        first call for an app only starts the interval and returns 0.0. A
        process that started after the previous call counts with all its CPU
        time. A process that ended in between counts with nothing, because its
        last CPU time can no longer be read.
        """
        processes = app_processes(app_id, catalog, self.os_name, self.process_iter)
        current = _Sample(
            monotonic=clock_module.clock.monotonic(),
            wall=time.time(),
            seconds=_cpu_seconds(processes),
        )
        previous = self._last.get(app_id)
        self._last[app_id] = current
        if previous is None:
            return 0.0
        elapsed = current.monotonic - previous.monotonic
        if elapsed <= 0:
            return 0.0
        used = 0.0
        for key, seconds in current.seconds.items():
            if key in previous.seconds:
                used += max(0.0, seconds - previous.seconds[key])
            elif key.create_time >= previous.wall:
                used += seconds
        return 100.0 * used / elapsed

    def forget(self, app_id: str) -> None:
        """Drop the previous sample of app_id, so the next call starts anew."""
        self._last.pop(app_id, None)


class SystemCpu:
    """Percent of all CPUs busy between two calls of busy_percent."""

    def __init__(self) -> None:
        self._last = psutil.cpu_times()

    def busy_percent(self) -> float:
        """Return the busy share of all CPUs since the last call, in percent.

        Busy is neither idle nor waiting for I/O.
        """
        current = psutil.cpu_times()
        total = sum(current) - sum(self._last)
        idle = _idle_seconds(current) - _idle_seconds(self._last)
        self._last = current
        if total <= 0:
            return 0.0
        return max(0.0, min(100.0, 100.0 * (total - idle) / total))


def _idle_seconds(times: Any) -> float:
    return float(times.idle + getattr(times, "iowait", 0.0))
