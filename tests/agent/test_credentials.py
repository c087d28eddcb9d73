"""Credential probe through a fake chage that replays recordings, and the real one."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.probes import ProbeError, ProbeErrorKind
from agent.probes.credentials import (
    CredentialReading,
    CredentialScan,
    PasswordExpiry,
    parse_chage,
    parse_login_accounts,
    read_credentials,
)
from agent.wire.credentials import credentials_to_proto
from fleetmend.v1 import report_pb2

TESTS = Path(__file__).parents[1]
DATA = TESTS / "data" / "credentials"
FAKES = TESTS / "fakes"

# Account that each recording is replayed for, as named in the recorded session.
# The CentOS recording names no account, so it is replayed for root.
RECORDINGS = {
    "root": "chage_l_all_never_centos77_jc.txt",
    "myuser": "chage_l_dates_expires_inactive_testinfra637.txt",
    "bob": "chage_l_password_must_be_changed_rhcsa.txt",
    "operator1": "chage_l_password_must_be_changed_with_account_expiry_vn_training.txt",
    "nosuchuser": "chage_l_unknown_user_debian12.txt",
}

# System accounts as Debian (root, daemon, sync) and RHEL (shutdown, halt) ship
# them, a MySQL service account, and the accounts of the recordings.
PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
sync:x:4:65534:sync:/bin:/bin/sync
shutdown:x:6:0:shutdown:/sbin:/sbin/shutdown
halt:x:7:0:halt:/sbin:/sbin/halt
mysql:x:107:110:MySQL Server,,,:/nonexistent:/bin/false
myuser:x:1000:1000:My User:/home/myuser:/bin/bash
bob:x:1001:1001::/home/bob:/bin/zsh
operator1:x:1002:1002::/home/operator1:
"""

DAY = timedelta(days=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture
def recordings(tmp_path: Path) -> Path:
    """Folder of <account>.txt links to the recordings that the fake replays."""
    folder = tmp_path / "recordings"
    folder.mkdir()
    for account, name in RECORDINGS.items():
        (folder / f"{account}.txt").symlink_to(DATA / name)
    return folder


@pytest.fixture
def fake_chage(monkeypatch: pytest.MonkeyPatch, recordings: Path) -> Path:
    """Put the fake chage first on PATH, replaying the recordings."""
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CHAGE_RECORDINGS", str(recordings))
    return recordings


def run_fake(recordings: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAKES / "chage"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "FAKE_CHAGE_RECORDINGS": str(recordings)},
        check=False,
    )


def write_passwd(tmp_path: Path, text: str = PASSWD) -> Path:
    path = tmp_path / "passwd"
    path.write_text(text)
    return path


def by_account(scan: CredentialScan) -> dict[str, CredentialReading]:
    return {reading.account: reading for reading in scan.credentials}


def test_fake_replays_session_output(recordings: Path) -> None:
    result = run_fake(recordings, "-l", "myuser")

    assert result.returncode == 0
    assert result.stdout.splitlines()[0].startswith("Last password change")
    assert "# source" not in result.stdout


def test_fake_rejects_unknown_account(recordings: Path) -> None:
    result = run_fake(recordings, "-l", "mallory")

    assert result.returncode == 99
    assert "no recording for account 'mallory'" in result.stderr


def test_fake_rejects_other_argv(recordings: Path) -> None:
    result = run_fake(recordings, "-i", "-l", "myuser")

    assert result.returncode == 99
    assert "no recording for argv" in result.stderr


@pytest.mark.parametrize(
    ("account", "expiry", "expire_time"),
    [
        ("root", PasswordExpiry.NEVER, None),
        ("myuser", PasswordExpiry.AT_TIME, datetime(2022, 1, 3, tzinfo=UTC)),
        ("bob", PasswordExpiry.MUST_CHANGE_NOW, None),
        ("operator1", PasswordExpiry.MUST_CHANGE_NOW, None),
    ],
)
def test_parse_chage_recordings(
    recordings: Path,
    account: str,
    expiry: PasswordExpiry,
    expire_time: datetime | None,
) -> None:
    output = run_fake(recordings, "-l", account).stdout

    reading = parse_chage(output, account)

    assert reading == CredentialReading(
        account=account,
        expiry=expiry,
        expire_time=expire_time,
        source=f"chage -l {account}",
    )


def test_parse_chage_iso_date() -> None:
    text = (
        "Last password change\t\t\t\t\t: 2021-10-05\n"
        "Password expires\t\t\t\t\t: 2022-01-03\n"
    )

    reading = parse_chage(text, "myuser")

    assert isinstance(reading, CredentialReading)
    assert reading.expire_time == datetime(2022, 1, 3, tzinfo=UTC)


def test_parse_chage_unknown_value() -> None:
    """chage prints "future" where the day number overflows a time_t."""
    text = (
        "Last password change\t\t\t\t\t: Oct 05, 2021\n"
        "Password expires\t\t\t\t\t: future\n"
    )

    result = parse_chage(text, "myuser")

    assert isinstance(result, ProbeError)
    assert result.kind is ProbeErrorKind.UNPARSED
    assert result.source == "chage -l myuser"
    assert "'future'" in result.reason


def test_parse_chage_no_expiry_line() -> None:
    text = (DATA / RECORDINGS["nosuchuser"]).read_text().splitlines()[-1]

    result = parse_chage(text, "nosuchuser")

    assert isinstance(result, ProbeError)
    assert result.kind is ProbeErrorKind.UNPARSED
    assert "'Password expires'" in result.reason


def test_parse_chage_bad_month() -> None:
    result = parse_chage("Password expires\t: Foo 03, 2022\n", "myuser")

    assert isinstance(result, ProbeError)
    assert "'Foo 03, 2022'" in result.reason


def test_login_accounts_shells() -> None:
    accounts, errors = parse_login_accounts(PASSWD)

    assert accounts == ["root", "myuser", "bob", "operator1"]
    assert errors == []


def test_login_accounts_bad_line() -> None:
    text = "root:x:0:0:root:/root:/bin/bash\n+::::::\nbroken line\n"

    accounts, errors = parse_login_accounts(text, "/etc/passwd")

    assert accounts == ["root"]
    assert len(errors) == 1
    assert errors[0].source == "/etc/passwd:3"
    assert errors[0].kind is ProbeErrorKind.UNPARSED


def test_read_credentials_fake(tmp_path: Path, fake_chage: Path) -> None:
    scan = read_credentials(write_passwd(tmp_path))

    readings = by_account(scan)
    assert scan.errors == []
    assert sorted(readings) == ["bob", "myuser", "operator1", "root"]
    assert readings["root"].expiry is PasswordExpiry.NEVER
    assert readings["myuser"].expiry is PasswordExpiry.AT_TIME
    assert readings["myuser"].expire_time == datetime(2022, 1, 3, tzinfo=UTC)
    assert readings["bob"].expiry is PasswordExpiry.MUST_CHANGE_NOW
    assert readings["operator1"].expiry is PasswordExpiry.MUST_CHANGE_NOW


def test_read_credentials_one_failing(tmp_path: Path, fake_chage: Path) -> None:
    passwd = write_passwd(
        tmp_path, PASSWD + "nosuchuser:x:1003:1003::/home/nosuchuser:/bin/bash\n"
    )

    scan = read_credentials(passwd)

    assert sorted(by_account(scan)) == ["bob", "myuser", "operator1", "root"]
    assert len(scan.errors) == 1
    assert scan.errors[0].source == "chage -l nosuchuser"
    assert scan.errors[0].kind is ProbeErrorKind.UNREADABLE
    assert scan.errors[0].reason == (
        "exit status 1: chage: user 'nosuchuser' does not exist in /etc/passwd"
    )


def test_read_credentials_chage_missing(tmp_path: Path) -> None:
    missing = str(tmp_path / "bin" / "chage")

    scan = read_credentials(write_passwd(tmp_path), chage=missing)

    assert scan.credentials == []
    assert len(scan.errors) == 1
    assert scan.errors[0].source == missing
    assert scan.errors[0].kind is ProbeErrorKind.UNREADABLE


def test_read_credentials_passwd_missing(tmp_path: Path) -> None:
    scan = read_credentials(tmp_path / "passwd")

    assert scan.credentials == []
    assert [error.kind for error in scan.errors] == [ProbeErrorKind.UNREADABLE]


def test_chage_runs_in_c_locale(tmp_path: Path) -> None:
    """The environment that chage sees, captured by a script in its place."""
    capture = tmp_path / "environment"
    script = tmp_path / "chage"
    script.write_text(f'#!/bin/sh\nenv > "{capture}"\nexit 1\n')
    script.chmod(0o755)

    read_credentials(write_passwd(tmp_path, "root:x:0:0::/root:/bin/sh\n"), str(script))

    environment = capture.read_text().splitlines()
    assert "LC_ALL=C" in environment
    assert "LANG=C" in environment


def shadow_days(day: datetime) -> int:
    return (day - EPOCH) // DAY


def write_chroot(root: Path, shadow: Mapping[str, str]) -> None:
    """Write etc/passwd and etc/shadow for `chage -R root`."""
    (root / "etc").mkdir(parents=True)
    passwd = "".join(
        f"{account}:x:{2000 + index}:{2000 + index}::/home/{account}:/bin/bash\n"
        for index, account in enumerate(shadow)
    )
    (root / "etc/passwd").write_text(passwd)
    (root / "etc/shadow").write_text(
        "".join(f"{account}:!:{fields}\n" for account, fields in shadow.items())
    )
    (root / "etc/shadow").chmod(0o600)


@pytest.mark.skipif(shutil.which("chage") is None, reason="chage is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="chage -R needs root to chroot")
def test_real_chage_prints_utc_day(tmp_path: Path) -> None:
    """The real chage, chrooted into a fixture, in a time zone 12 hours behind UTC.

    00:00 UTC is noon of the day before in that zone, so a date printed in local
    time would be one day early. The expire time must be 00:00 UTC of day
    lastchg + max.
    """
    last_change = datetime(2024, 10, 4, tzinfo=UTC)
    root = tmp_path / "root"
    write_chroot(
        root,
        {
            "alice": f"{shadow_days(last_change)}:0:90:7:::",
            "carol": "0:0:99999:7:::",
            "dave": f"{shadow_days(last_change)}:0:99999:7:::",
        },
    )
    wrapper = tmp_path / "chage"
    wrapper.write_text(f'#!/bin/sh\nexec chage -R "{root}" "$@"\n')
    wrapper.chmod(0o755)

    with pytest.MonkeyPatch.context() as patch:
        # A POSIX TZ string needs no zone file inside the chroot.
        patch.setenv("TZ", "AOE+12")
        scan = read_credentials(root / "etc/passwd", str(wrapper))

    readings = by_account(scan)
    assert scan.errors == []
    assert readings["alice"].expire_time == last_change + 90 * DAY
    assert readings["carol"].expiry is PasswordExpiry.MUST_CHANGE_NOW
    assert readings["dave"].expiry is PasswordExpiry.NEVER


def expected_from_shadow(fields: list[str]) -> tuple[PasswordExpiry, datetime | None]:
    """Expiry of a shadow(5) entry by the rules chage prints it with."""
    last_change, maximum = fields[2], fields[4]
    if last_change == "0":
        return PasswordExpiry.MUST_CHANGE_NOW, None
    if not last_change or not maximum or int(maximum) < 0 or int(maximum) >= 10000:
        return PasswordExpiry.NEVER, None
    return PasswordExpiry.AT_TIME, EPOCH + (int(last_change) + int(maximum)) * DAY


@pytest.mark.skipif(shutil.which("chage") is None, reason="chage is not installed")
@pytest.mark.skipif(
    not os.access("/etc/shadow", os.R_OK), reason="/etc/shadow is not readable"
)
def test_read_credentials_this_machine() -> None:
    scan = read_credentials()

    shadow = {
        line.split(":")[0]: line.split(":")
        for line in Path("/etc/shadow").read_text().splitlines()
        if line
    }
    assert scan.errors == []
    assert "root" in by_account(scan)
    for reading in scan.credentials:
        expected = expected_from_shadow(shadow[reading.account])
        assert (reading.expiry, reading.expire_time) == expected, reading.account


def test_wire_credentials(tmp_path: Path, fake_chage: Path) -> None:
    passwd = write_passwd(
        tmp_path, PASSWD + "nosuchuser:x:1003:1003::/home/nosuchuser:/bin/bash\n"
    )

    section = credentials_to_proto(read_credentials(passwd))

    messages = {message.account: message for message in section.credentials}
    for message in messages.values():
        assert message.kind == report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD
        assert message.source == f"chage -l {message.account}"
    assert messages["myuser"].expiry == report_pb2.CREDENTIAL_EXPIRY_AT_TIME
    assert messages["myuser"].expire_time.ToDatetime(tzinfo=UTC) == datetime(
        2022, 1, 3, tzinfo=UTC
    )
    assert messages["root"].expiry == report_pb2.CREDENTIAL_EXPIRY_NEVER
    assert not messages["root"].HasField("expire_time")
    assert messages["bob"].expiry == report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW
    assert [error.source for error in section.errors] == ["chage -l nosuchuser"]
    assert section.errors[0].kind == report_pb2.PROBE_ERROR_KIND_UNREADABLE
