"""The notify action: store a notice for the user.

The notice goes to ``<state dir>/notices.json`` (see agent.healing.notices),
where ``fleetmend-agent notices`` lists it; the engine's remediation record
reports it to the collector. Verification: the notice is in the store when it
is read back.
"""

from __future__ import annotations

from agent import clock as clock_module
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
)
from agent.healing.notices import NoticeStore, check_notice_text
from fleetmend.v1 import remediation_pb2

NAME = "notify"


def validate(params: remediation_pb2.Notify, allowlist: LocalAllowlist) -> list[str]:
    """Return what is wrong with the title and body, without touching the system."""
    return check_notice_text(params.title, params.body)


def execute(
    params: remediation_pb2.Notify, context: ActionContext, *, source_rule: str = ""
) -> ActionResult:
    """Store the notice, unless this is a dry run, and check that it was stored."""
    problems = validate(params, context.allowlist)
    if problems:
        return ActionResult(Outcome.REMEDIATION_OUTCOME_REFUSED, "; ".join(problems))
    return store_notice(context, params.title, params.body, source_rule)


def store_notice(
    context: ActionContext, title: str, body: str, source_rule: str
) -> ActionResult:
    """Add a notice to the state dir's store and verify it by reading it back."""
    if context.dry_run:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_DRY_RUN,
            f"would show the notice {title!r}: {body}",
        )
    store = NoticeStore(context.state_dir)
    try:
        notice = store.add(title, body, source_rule, clock_module.clock.now())
    except OSError as exc:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_FAILED,
            f"cannot write {store.path}: {exc.strerror or exc}",
        )
    if notice.notice_id not in {stored.notice_id for stored in store.list()}:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_FAILED,
            f"the notice {title!r} is missing from {store.path} after writing it",
        )
    return ActionResult(
        Outcome.REMEDIATION_OUTCOME_SUCCEEDED,
        f"stored the notice {title!r} for the user",
        details={"notice_id": notice.notice_id, "body": body},
    )
