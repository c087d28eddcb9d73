"""The allowlist of self-healing actions: one module per Action oneof field.

Only the five modules named in ACTION_MODULES can run. A policy or command
whose Action selects anything else is rejected before any code runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol, cast

from google.protobuf.message import Message

from agent.healing.actions.base import ActionContext, ActionResult, LocalAllowlist
from fleetmend.v1 import remediation_pb2

# Action oneof field name -> module in this package that implements it.
ACTION_MODULES: dict[str, str] = {
    "clear_cache": "agent.healing.actions.clear_cache",
    "restart_service": "agent.healing.actions.restart_service",
    "throttle_process": "agent.healing.actions.throttle_process",
    "notify": "agent.healing.actions.notify",
    "prompt_password_change": "agent.healing.actions.prompt_password_change",
}


class ActionModule(Protocol):
    """The interface of an action module (see agent.healing.actions.base)."""

    NAME: str

    def validate(self, params: Message, allowlist: LocalAllowlist) -> list[str]: ...

    def execute(self, params: Message, context: ActionContext) -> ActionResult: ...


def action_name(action: remediation_pb2.Action) -> str:
    """Return the name of the action's oneof field, empty when none is set."""
    return action.WhichOneof("kind") or ""


def action_params(action: remediation_pb2.Action) -> Message:
    """Return the parameters message of the action's oneof field."""
    name = action_name(action)
    if not name:
        raise ValueError("the action has no kind set")
    return cast(Message, getattr(action, name))


def load_action(name: str) -> ActionModule:
    """Import and return the module of a known action; raise KeyError otherwise."""
    module_name = ACTION_MODULES[name]
    module: ModuleType = importlib.import_module(module_name)
    if getattr(module, "NAME", None) != name:
        raise ImportError(f"module {module_name} does not declare NAME = {name!r}")
    return cast(ActionModule, module)


def validate_action(
    action: remediation_pb2.Action, allowlist: LocalAllowlist
) -> list[str]:
    """Return what is wrong with an action and its parameters; empty when valid."""
    name = action_name(action)
    if not name:
        return [f"no action set; expected one of {', '.join(sorted(ACTION_MODULES))}"]
    if name not in ACTION_MODULES:
        return [
            f"action {name!r} is not one this agent has code for; expected one of "
            f"{', '.join(sorted(ACTION_MODULES))}"
        ]
    try:
        module = load_action(name)
    except ImportError as exc:
        return [f"action {name} is not available in this agent: {exc}"]
    problems = module.validate(action_params(action), allowlist)
    # Some actions name themselves in their messages already.
    return [
        problem if problem.startswith(f"{name}: ") else f"{name}: {problem}"
        for problem in problems
    ]
