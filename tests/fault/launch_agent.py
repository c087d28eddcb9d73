"""Run ``agent.cli.main`` in this process with an accelerated clock.

Usage: ``python tests/fault/launch_agent.py --accelerate 10 --fast 7200 --
run ...``. Everything after ``--`` goes to the agent's command line unchanged.
The clock is replaced here, before the agent starts, so no production flag
exists for it.

The clock runs at --accelerate simulated seconds per real second. SIGUSR1
switches it to --fast and SIGUSR2 back. A test thus lets a simulated day pass
in 12 s (at 7200) while the collector is down. It then lets the agent
reconnect at a slower rate, where the link's stall timeouts of tens of
simulated seconds still exceed a real round trip.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

# The launcher runs as a script, so the repository root is put on the path
# for ``tests`` and, in a checkout without an editable install, ``agent``.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent import clock as clock_module  # noqa: E402

# Maximum real time of one slice of wait(), so that a rate change takes
# effect within this many seconds.
WAIT_SLICE_SECONDS = 0.05


class AcceleratedClock(clock_module.Clock):
    """A clock that passes factor simulated seconds per real second.

    It starts at the real time. set_factor changes the rate from now on, and
    the simulated time keeps running from where it is.
    """

    def __init__(self, factor: float) -> None:
        self._lock = threading.Lock()
        self._factor = _checked(factor)
        self._real_mark = time.monotonic()
        self._simulated_mark = 0.0
        self._monotonic_start = self._real_mark
        self._wall_start = super().now()

    def set_factor(self, factor: float) -> None:
        with self._lock:
            self._simulated_mark = self._elapsed_locked()
            self._real_mark = time.monotonic()
            self._factor = _checked(factor)

    def _elapsed_locked(self) -> float:
        return self._simulated_mark + (time.monotonic() - self._real_mark) * (
            self._factor
        )

    def _elapsed(self) -> float:
        with self._lock:
            return self._elapsed_locked()

    def monotonic(self) -> float:
        return self._monotonic_start + self._elapsed()

    def now(self) -> datetime:
        return self._wall_start + timedelta(seconds=self._elapsed())

    def wait(self, event: threading.Event, seconds: float) -> bool:
        # Waits in short real slices and measures the remaining time on the
        # simulated clock, so that a rate change also shortens a wait that
        # has begun.
        deadline = self._elapsed() + max(0.0, seconds)
        while True:
            remaining = deadline - self._elapsed()
            if remaining <= 0:
                return event.is_set()
            with self._lock:
                factor = self._factor
            if event.wait(min(remaining / factor, WAIT_SLICE_SECONDS)):
                return True


def _checked(factor: float) -> float:
    if factor <= 0:
        raise ValueError(f"the acceleration factor must be above 0, got {factor}")
    return factor


def parse_arguments(argv: Sequence[str]) -> tuple[float, float, list[str]]:
    """Split argv into the two rates and the agent's arguments."""
    parser = argparse.ArgumentParser(
        prog="launch_agent.py",
        description="Run the agent with an accelerated clock, for tests.",
    )
    parser.add_argument(
        "--accelerate",
        type=float,
        default=3600.0,
        help="simulated seconds per real second at start and after SIGUSR2 "
        "(default 3600)",
    )
    parser.add_argument(
        "--fast",
        type=float,
        default=None,
        help="simulated seconds per real second after SIGUSR1 "
        "(default: the --accelerate rate)",
    )
    parser.add_argument("agent_arguments", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    agent_arguments = list(args.agent_arguments)
    if agent_arguments[:1] == ["--"]:
        agent_arguments = agent_arguments[1:]
    fast = args.accelerate if args.fast is None else args.fast
    return args.accelerate, fast, agent_arguments


def main(argv: Sequence[str] | None = None) -> int:
    normal, fast, agent_arguments = parse_arguments(
        sys.argv[1:] if argv is None else argv
    )
    accelerated = AcceleratedClock(normal)
    clock_module.clock = accelerated
    signal.signal(signal.SIGUSR1, lambda _s, _f: accelerated.set_factor(fast))
    signal.signal(signal.SIGUSR2, lambda _s, _f: accelerated.set_factor(normal))

    from agent.cli import main as agent_main

    return agent_main(agent_arguments)


if __name__ == "__main__":
    sys.exit(main())
