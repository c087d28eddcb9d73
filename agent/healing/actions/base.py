"""The interface that every self-healing action implements.

Each action is a module in this package with a NAME, the oneof field name of
fleetmend.v1.Action that selects it, and two functions:

- ``validate(params, allowlist) -> list[str]`` returns what is wrong with the
  parameters (empty when they are valid), without touching the system. A
  problem rejects the whole policy, except a service or cache set outside
  the allowlist, which only refuses that rule (agent.healing.policy).
- ``execute(params, context) -> ActionResult`` checks that the action is still
  needed (precheck), makes the change unless context.dry_run is set, verifies
  it, and returns the outcome. It raises nothing for a failure of the system it
  acts on: that is a FAILED result with the reason. An action that waits ends
  its wait when context.stop is set.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleetmend.v1 import remediation_pb2

Outcome = remediation_pb2.RemediationOutcome


@dataclass(frozen=True)
class LocalAllowlist:
    """The actions that the laptop's settings permit, whatever the policy requests."""

    # Services that restart_service may restart, by the name their service
    # manager uses (for example "cups.service", "com.apple.cupsd", "Spooler").
    services: frozenset[str] = frozenset()
    # Cache sets that clear_cache may clear; empty means every known set.
    cache_sets: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ActionContext:
    """The folder, allowlist and mode in which an action runs."""

    state_dir: Path
    allowlist: LocalAllowlist
    dry_run: bool = False
    # Catalog application ids that are in the foreground now, for
    # throttle_process's undo.
    foreground_apps: frozenset[str] = frozenset()
    # The agent's stop event, set when it shuts down.
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class ActionResult:
    """The result of an action: its outcome, the reason and the measured values."""

    outcome: Outcome.ValueType
    reason: str = ""
    # The value the action set out to change, before and after, in unit; for
    # clear_cache, free bytes of the volume.
    before: float = 0.0
    after: float = 0.0
    unit: str = ""
    bytes_freed: int = 0
    # Anything else worth showing to an operator, in words.
    details: dict[str, str] = field(default_factory=dict)


def allowlist_refusal_text(
    noun: str,
    names: Sequence[str],
    setting: str,
    allowed: Iterable[str],
    subject: str,
) -> str:
    """Return why this device's settings keep subject from using names.

    noun is singular ("service", "cache set"), setting the agent.toml key that
    lists the permitted ones, and subject what the fix lets run ("this rule",
    "this command"). Rules, dry runs and commands all word a refusal this way,
    because operators read every one of them at the collector.
    """
    one = len(names) == 1
    listed = ", ".join(names)
    allowed_text = ", ".join(sorted(allowed)) or "none"
    return (
        f"{noun if one else noun + 's'} {listed} {'is' if one else 'are'} not in "
        f"{setting} in this device's agent.toml (allowed: {allowed_text}); add "
        f"{'it' if one else 'them'} there and restart the agent to let {subject} run"
    )
