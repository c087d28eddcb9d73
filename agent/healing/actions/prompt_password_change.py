"""The prompt_password_change action: a password expiry notice with IT's link.

The notice reads "Your password for ACCOUNT expires on DATE (in N days). Change
it now at URL." DATE is the expiry's date in the agent's local time zone.
``execute_for_credential`` builds it for a given account and expiry, such as
the one that the engine's condition found. ``execute`` uses the soonest expiry
of the local accounts that ``chage -l`` reports.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit

from agent import clock as clock_module
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
)
from agent.healing.actions.notify import store_notice
from agent.probes.credentials import CredentialReading, PasswordExpiry, read_credentials
from fleetmend.v1 import remediation_pb2

NAME = "prompt_password_change"

MAX_URL_LENGTH = 2048
UNIT = "days until expiry"


def validate(
    params: remediation_pb2.PromptPasswordChange, allowlist: LocalAllowlist
) -> list[str]:
    """Return what is wrong with the self-service URL, without touching the system."""
    url = params.self_service_url
    if not url:
        return ["self_service_url is empty; set IT's password change page"]
    if len(url) > MAX_URL_LENGTH:
        return [
            f"self_service_url has {len(url)} characters, more than the "
            f"maximum {MAX_URL_LENGTH}"
        ]
    if any(char.isspace() or ord(char) < 0x20 for char in url):
        return [f"self_service_url {url!r} contains whitespace"]
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return [f"self_service_url {url!r} is invalid ({exc})"]
    if parts.username is not None or parts.password is not None:
        # A user name or password in the link would be shown to the user and
        # could make a phishing page look like IT's.
        return [
            "self_service_url contains a user name or password before the host "
            "(user:password@); remove it"
        ]
    if parts.scheme != "https" or not host:
        return [
            f"self_service_url {url!r} is not an https:// URL with a host; "
            "use for example https://password.example.com/change"
        ]
    return []


def execute(
    params: remediation_pb2.PromptPasswordChange,
    context: ActionContext,
    *,
    source_rule: str = "",
    credentials: list[CredentialReading] | None = None,
) -> ActionResult:
    """Prompt for the local account whose password expires first.

    credentials defaults to a fresh ``chage -l`` scan of the local accounts. An
    account that must change its password at the next login comes first.
    SKIPPED when no password has an expiry.
    """
    problems = validate(params, context.allowlist)
    if problems:
        return ActionResult(Outcome.REMEDIATION_OUTCOME_REFUSED, "; ".join(problems))
    readings = (
        credentials if credentials is not None else read_credentials().credentials
    )
    soonest = _soonest(readings)
    if soonest is None:
        return ActionResult(
            Outcome.REMEDIATION_OUTCOME_SKIPPED,
            "no local account has a password that expires",
        )
    return execute_for_credential(
        params,
        context,
        soonest.account,
        soonest.expire_time,
        source_rule=source_rule,
    )


def execute_for_credential(
    params: remediation_pb2.PromptPasswordChange,
    context: ActionContext,
    account: str,
    expire_time: datetime | None,
    *,
    source_rule: str = "",
) -> ActionResult:
    """Store the password change notice for account.

    expire_time None means the password must be changed now (at the next
    login).
    """
    problems = validate(params, context.allowlist)
    if problems:
        return ActionResult(Outcome.REMEDIATION_OUTCOME_REFUSED, "; ".join(problems))
    title, body, days = password_notice(
        account, expire_time, params.self_service_url, clock_module.clock.now()
    )
    result = store_notice(context, title, body, source_rule)
    result.before = float(days)
    result.after = float(days)
    result.unit = UNIT
    result.details["account"] = account
    return result


def password_notice(
    account: str, expire_time: datetime | None, url: str, now: datetime
) -> tuple[str, str, int]:
    """Return the notice's title and body and the days left (negative: expired)."""
    if expire_time is None:
        return (
            "Change your password now",
            f"Your password for {account} must be changed now. Change it at {url}.",
            0,
        )
    expire_date = expire_time.astimezone().date()
    days = (expire_date - now.astimezone().date()).days
    if expire_time <= now:
        return (
            "Your password has expired",
            f"Your password for {account} expired on {expire_date.isoformat()}. "
            f"Change it now at {url}.",
            days,
        )
    if days == 0:
        span = "today"
    elif days == 1:
        span = "in 1 day"
    else:
        span = f"in {days} days"
    return (
        f"Your password expires {span}",
        f"Your password for {account} expires on {expire_date.isoformat()} "
        f"({span}). Change it now at {url}.",
        days,
    )


def _soonest(readings: list[CredentialReading]) -> CredentialReading | None:
    must_change = [r for r in readings if r.expiry == PasswordExpiry.MUST_CHANGE_NOW]
    if must_change:
        return must_change[0]
    timed = [
        (reading.expire_time, reading)
        for reading in readings
        if reading.expiry == PasswordExpiry.AT_TIME and reading.expire_time is not None
    ]
    return min(timed, key=lambda pair: pair[0])[1] if timed else None
