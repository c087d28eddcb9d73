"""No secret that the suite created appears in a log of its agents and collectors.

This module runs after every other test of the session (see RUN_LAST_MODULES
in tests/conftest.py). It reads the session log, which contains every agent and
collector log record of the test process, and every ``*.log`` file that the
tests' subprocesses wrote under the session's temporary folder. It looks for
each secret that tests/trust.py handed out and for anything shaped like a
Fleetmend secret or a PEM private key, so that secrets made elsewhere are
caught too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import SESSION_LOG_NAME
from tests.trust import CREATED_SECRETS

SECRET_SHAPES = (
    re.compile(r"fm[kt]1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}"),
    re.compile(r"fme1\.[A-Za-z0-9_-]{43}"),
    re.compile(r"PRIVATE KEY"),
)


def _log_files(base: Path) -> list[Path]:
    files = [base / SESSION_LOG_NAME]
    files.extend(path for path in base.rglob("*.log") if path.is_file())
    return [path for path in files if path.exists()]


def _leaks(text: str) -> list[str]:
    found = [
        f"a created secret ({secret[:5]}…)"
        for secret in CREATED_SECRETS
        if secret in text
    ]
    for shape in SECRET_SHAPES:
        match = shape.search(text)
        if match is not None:
            found.append(f"text shaped like a secret ({match.group()[:5]}…)")
    return found


def test_logs_hold_no_secret(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    files = _log_files(base)
    assert files, f"no log files under {base}"
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        problems.extend(f"{path}: {leak}" for leak in _leaks(text))
    assert not problems, "\n".join(problems)


def test_leak_check_finds_a_planted_secret(tmp_path: Path) -> None:
    # The check itself must be able to fail: a log line with a node key of
    # the right shape is reported, and so is a registered secret.
    key = "fmk1." + "0" * 16 + "." + "A" * 43
    assert _leaks(f"stream opened with {key}")
    CREATED_SECRETS.add("fme1.planted-for-this-test")
    try:
        assert _leaks("secret fme1.planted-for-this-test in a message")
    finally:
        CREATED_SECRETS.discard("fme1.planted-for-this-test")
