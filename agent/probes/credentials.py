"""Password expiry of local Linux accounts, read with ``chage -l``.

The accounts come from /etc/passwd. chage reads /etc/shadow, so it needs root
for every account except the caller's own.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from agent.probes import ProbeError, ProbeErrorKind

logger = logging.getLogger(__name__)

__all__ = [
    "CHAGE_TIMEOUT_SECONDS",
    "NON_LOGIN_SHELLS",
    "CredentialReading",
    "CredentialScan",
    "PasswordExpiry",
    "parse_chage",
    "parse_login_accounts",
    "read_credentials",
]

# Shells that let nobody log in (nologin, false) and the special accounts whose
# shell is one command (sync, shutdown, halt), compared by file name.
NON_LOGIN_SHELLS = frozenset({"nologin", "false", "sync", "shutdown", "halt"})

CHAGE_TIMEOUT_SECONDS = 10.0

# The C locale keeps chage's labels and month names in English.
_C_LOCALE = {"LC_ALL": "C", "LANG": "C"}

_EXPIRY_LABEL = "Password expires"
_NEVER = "never"
_MUST_CHANGE = "password must be changed"

# chage prints "%b %d, %Y" ("Jan 03, 2022"), or "%Y-%m-%d" when run with -i.
# Month names are matched here instead of by strptime, whose %b follows the
# process locale.
_C_LOCALE_DATE = re.compile(r"([A-Z][a-z]{2}) (\d{2}), (\d{4})")
_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun")
        + ("Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}


class PasswordExpiry(Enum):
    NEVER = "never"
    AT_TIME = "at_time"
    # The password must be changed at the next login.
    MUST_CHANGE_NOW = "must_change_now"


@dataclass(frozen=True)
class CredentialReading:
    account: str
    expiry: PasswordExpiry
    # Set when expiry is AT_TIME: the first instant at which the password is
    # expired, in UTC.
    expire_time: datetime | None
    # The command that printed the expiry, for example "chage -l alice".
    source: str


@dataclass
class CredentialScan:
    credentials: list[CredentialReading] = field(default_factory=list)
    errors: list[ProbeError] = field(default_factory=list)


def parse_login_accounts(
    text: str, source: str = "/etc/passwd"
) -> tuple[list[str], list[ProbeError]]:
    """Return the accounts in passwd(5) content that have a login shell.

    An empty shell field counts as a login shell, because login then runs
    /bin/sh. NIS compat entries (names starting with + or -) are skipped. Each
    line without the seven fields adds an unparsed error.
    """
    accounts: list[str] = []
    errors: list[ProbeError] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(":")
        if len(fields) != 7 or not fields[0]:
            errors.append(
                ProbeError(
                    source=f"{source}:{number}",
                    kind=ProbeErrorKind.UNPARSED,
                    reason=f"expected 7 colon-separated fields, got {len(fields)}",
                )
            )
            continue
        account, shell = fields[0], fields[6].strip()
        if account.startswith(("+", "-")) or account in accounts:
            continue
        if shell and Path(shell).name in NON_LOGIN_SHELLS:
            continue
        accounts.append(account)
    return accounts, errors


def parse_chage(text: str, account: str) -> CredentialReading | ProbeError:
    """Parse the "Password expires" line of ``chage -l`` output in the C locale.

    The value is "never", "password must be changed" (the last change date is 0,
    as ``chage -d 0`` or ``passwd -e`` set it) or a date. chage prints the date
    with gmtime(), so it is a UTC calendar day. The current sources of shadow
    (isexpired()) and of pam_unix both count the password as expired from 00:00
    UTC of that day, which is the instant returned as expire_time.
    """
    source = f"chage -l {account}"
    # NOTE: the "Account expires" line is not read, because the Credential
    # message has no field for an account expiry.
    value = _field_value(text, _EXPIRY_LABEL)
    if value is None:
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNPARSED,
            reason=f"no {_EXPIRY_LABEL!r} line in the output",
        )

    if value == _NEVER:
        return CredentialReading(account, PasswordExpiry.NEVER, None, source)
    if value == _MUST_CHANGE:
        return CredentialReading(account, PasswordExpiry.MUST_CHANGE_NOW, None, source)

    expire_time = _parse_date(value)
    if expire_time is None:
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNPARSED,
            reason=f"unknown {_EXPIRY_LABEL!r} value {value!r}",
        )
    return CredentialReading(account, PasswordExpiry.AT_TIME, expire_time, source)


def read_credentials(
    passwd_path: Path = Path("/etc/passwd"), chage: str = "chage"
) -> CredentialScan:
    """Read the password expiry of every local account that has a login shell.

    ``chage`` is the executable to run, looked up on PATH unless it is a path. A
    chage run that fails for one account adds an error for that account and the
    scan goes on. A chage that cannot be started at all ends the scan with one
    error.
    """
    scan = CredentialScan()
    try:
        text = passwd_path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        scan.errors.append(
            ProbeError(
                source=str(passwd_path),
                kind=ProbeErrorKind.UNREADABLE,
                reason=f"cannot read: {error.strerror or error}",
            )
        )
        return scan

    accounts, errors = parse_login_accounts(text, str(passwd_path))
    scan.errors.extend(errors)
    # NOTE: without root, chage fails with "Permission denied." for every account
    # except the caller's own, so each of those becomes an error.
    for account in accounts:
        try:
            result = _run_chage(chage, account)
        except OSError as error:
            scan.errors.append(
                ProbeError(
                    source=chage,
                    kind=ProbeErrorKind.UNREADABLE,
                    reason=f"cannot run {chage}: {error.strerror or error}",
                )
            )
            break
        if isinstance(result, ProbeError):
            logger.debug("%s: %s", result.source, result.reason)
            scan.errors.append(result)
        else:
            scan.credentials.append(result)
    return scan


def _run_chage(chage: str, account: str) -> CredentialReading | ProbeError:
    """Run ``chage -l account`` and parse its output.

    Raises OSError when the executable cannot be started.
    """
    source = f"chage -l {account}"
    try:
        completed = subprocess.run(
            [chage, "-l", account],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            env={**os.environ, **_C_LOCALE},
            timeout=CHAGE_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNREADABLE,
            reason=f"timed out after {CHAGE_TIMEOUT_SECONDS:g} s",
        )

    if completed.returncode != 0:
        message = completed.stderr.strip().splitlines()
        detail = message[-1] if message else "no message on stderr"
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNREADABLE,
            reason=f"exit status {completed.returncode}: {detail}",
        )
    return parse_chage(completed.stdout, account)


def _field_value(text: str, label: str) -> str | None:
    for line in text.splitlines():
        name, separator, value = line.partition(":")
        if separator and name.strip() == label:
            return value.strip()
    return None


def _parse_date(value: str) -> datetime | None:
    if match := _C_LOCALE_DATE.fullmatch(value):
        month = _MONTHS.get(match[1])
        day, year = int(match[2]), int(match[3])
    elif match := _ISO_DATE.fullmatch(value):
        year, month, day = int(match[1]), int(match[2]), int(match[3])
    else:
        return None
    if month is None:
        return None
    try:
        return datetime(year, month, day, tzinfo=UTC)
    except ValueError:
        return None
