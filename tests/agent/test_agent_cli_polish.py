"""fleetmend-agent's rules, notices, help and variable warnings, run for real.

The CPU test runs a busy Python child through a symlink named "fmbusycli", so
psutil's Process.name() is that name and matches only the test catalog's
entry. The permission tests run the agent as user 65534 on a state folder of
root, as an employee would run it on the agent's /var/lib/fleetmend.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.cli import COMMANDS, main
from agent.config import load_config, unknown_variable_message
from agent.healing.conditions import ConditionEvaluator, Readings
from collector.server import start_server_thread
from fleetmend.v1 import remediation_pb2, report_pb2
from tests.agent.test_agent_cli import agent_env, run_cli, words
from tests.conftest import BIN_DIR
from tests.trust import enrollment_secret, remember_secret

NOBODY = 65534
APP_ID = "busycli"
PROCESS_NAME = "fmbusycli"
NOTICE = {
    "notice_id": "0f3c",
    "title": "Your password expires soon",
    "body": "Change it now.",
    "source_rule": "password-expiry-prompt",
    "create_time": "2026-03-02T09:30:00+00:00",
}

CPU_POLICY = f"""
[[rules]]
name = "throttle-busy"
condition.process_cpu_above = {{ app_id = "{APP_ID}", percent = 1, sustained = "300s" }}
action.throttle_process = {{ app_id = "{APP_ID}" }}
"""


# -- rules measures CPU use over an interval -----------------------------------------


@pytest.fixture
def busy_child(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Python busy loop whose process name is PROCESS_NAME; killed afterwards."""
    link = tmp_path / PROCESS_NAME
    link.symlink_to(sys.executable)
    child = subprocess.Popen([str(link), "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the test catalog names Linux processes",
)
def test_rules_measures_busy_process(
    tmp_path: Path, busy_child: subprocess.Popen[bytes]
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        f'[apps.{APP_ID}]\nname = "Busy test app"\n'
        f'processes.linux = ["{PROCESS_NAME}"]\n',
        encoding="utf-8",
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(CPU_POLICY, encoding="utf-8")
    (tmp_path / "agent.toml").write_text(
        f'[usage]\nresolve_hosts = false\ncatalogs = ["{catalog}"]\n'
        f'[healing]\npolicy_file = "{policy}"\n',
        encoding="utf-8",
    )

    result = run_cli(tmp_path, "rules")

    assert result.returncode == 0, result.stderr.decode()
    assert f"Measuring the CPU use of {APP_ID} for 1 s" in result.stderr.decode()
    out = words(result.stdout)
    match = re.search(rf"{APP_ID} uses (\d+) % of one CPU", out)
    assert match is not None, out
    assert int(match.group(1)) > 0
    assert "the rule acts once that lasts 5m" in out
    pids = re.search(r"\(pids ([0-9, ]+)\)", out)
    assert pids is not None, out
    assert str(busy_child.pid) in pids.group(1).split(", ")


def test_rules_skip_measuring_without_cpu_rule(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "rules")

    assert result.returncode == 0, result.stderr.decode()
    assert b"Measuring" not in result.stderr


def test_rules_lines_fit_terminal(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "rules")

    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("Built-in policy, ")
    assert [line for line in lines if len(line) > 88] == []
    assert not any("(version 0)" in line for line in lines)
    assert not any("REMEDIATION_OUTCOME" in line for line in lines)


def test_disk_condition_counts_in_words() -> None:
    evaluator = ConditionEvaluator()
    condition = remediation_pb2.Condition(disk_failing=remediation_pb2.DiskFailing())
    details = []
    for count in (0, 1, 2):
        section = report_pb2.DiskSection(
            disks=[
                report_pb2.Disk(
                    name=f"sd{i}", smart_state=report_pb2.SMART_STATE_AVAILABLE
                )
                for i in range(count)
            ]
        )
        result = evaluator.evaluate(
            "disks", condition, Readings(disks=section), datetime.now(UTC), 0.0
        )
        details.append(result.detail)

    assert details == [
        "no disk found",
        "the one disk that reports health data is not failing",
        "none of the 2 disks that report health data is failing",
    ]


# -- notices and damaged files ------------------------------------------------------


def write_notices(state_dir: Path, document: object) -> None:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    path = state_dir / "notices.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    path.chmod(0o600)


def test_notices_lists_stored_notice(tmp_path: Path) -> None:
    write_notices(tmp_path / "state", {"notices": [NOTICE]})

    result = run_cli(tmp_path, "notices", TZ="UTC")

    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == (
        "1 notice, newest first:\n"
        "\n"
        "2026-03-02 09:30 UTC  Your password expires soon "
        "(from rule password-expiry-prompt)\n"
        "  Change it now.\n"
    )


def test_notices_damaged_file_fails(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "notices.json").write_text("{broken", encoding="utf-8")

    result = run_cli(tmp_path, "notices")

    assert result.returncode == 1
    assert result.stdout == b""
    error = result.stderr.decode().strip()
    assert len(error.splitlines()) == 1
    assert str(tmp_path / "state" / "notices.json") in error
    assert "is damaged (not valid JSON" in error


def test_notices_damaged_entry_skipped(tmp_path: Path) -> None:
    write_notices(tmp_path / "state", {"notices": [NOTICE, {"title": "no id"}]})

    result = run_cli(tmp_path, "notices")

    assert result.returncode == 1
    assert b"Your password expires soon" in result.stdout
    error = result.stderr.decode()
    assert "fleetmend-agent: skipped: entry 2 of " in error
    assert "lacks the field" in error


# -- read-only commands as another user ----------------------------------------------


def run_as_nobody(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = agent_env(config.parent)
    env["FLEETMEND_CONFIG"] = str(config)
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            str(BIN_DIR / "fleetmend-agent"),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def root_state() -> Iterator[Path]:
    """A root-owned 0700 state folder with a notice, in a folder every user can enter.

    pytest's own temporary folder is root-only, so the user 65534 could not
    even reach it there.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = Path(tempfile.mkdtemp(prefix="fleetmend-cli-test-"))
    try:
        base.chmod(0o755)
        config = base / "agent.toml"
        config.write_text("[usage]\nresolve_hosts = false\n", encoding="utf-8")
        config.chmod(0o644)
        write_notices(base / "state", {"notices": [NOTICE]})
        yield base / "state"
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("command", ["notices", "rules", "show", "diagnose"])
def test_root_state_unreadable_named(root_state: Path, command: str) -> None:
    config = root_state.parent / "agent.toml"

    result = run_as_nobody(config, command, "--state-dir", str(root_state))

    assert result.returncode == 1
    assert result.stdout == ""
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert f"state folder {root_state} cannot be read by " in error
    assert f"(uid {NOBODY}): permission denied" in error
    assert f"sudo fleetmend-agent {command}" in error
    assert "Traceback" not in result.stderr


def test_root_state_file_unreadable_named(root_state: Path) -> None:
    root_state.chmod(0o755)
    config = root_state.parent / "agent.toml"

    result = run_as_nobody(config, "notices", "--state-dir", str(root_state))

    assert result.returncode == 1
    assert "No notices" not in result.stdout
    error = result.stderr.strip()
    assert f"state file {root_state / 'notices.json'} cannot be read" in error
    assert "sudo fleetmend-agent notices" in error


def test_root_reads_own_state(root_state: Path) -> None:
    config = root_state.parent / "agent.toml"

    result = subprocess.run(
        [str(BIN_DIR / "fleetmend-agent"), "notices", "--state-dir", str(root_state)],
        env={**agent_env(root_state.parent), "FLEETMEND_CONFIG": str(config)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "Your password expires soon" in result.stdout


# -- FLEETMEND_* variables of other programs ------------------------------------------

OPERATOR_VARIABLES = {
    "FLEETMEND_CA_FILE": "/etc/fleetmend/ca.pem",
    "FLEETMEND_TOKEN_FILE": "/home/admin/.fleetmend-token",
    "FLEETMEND_TEST_POSTGRES_URL": "postgresql://localhost/test",
}


def test_operator_variables_not_unknown() -> None:
    config = load_config(
        environ={**OPERATOR_VARIABLES, "FLEETMEND_COLECTOR": "x:1"}, privileged=False
    )

    assert config.unknown_variables == ["FLEETMEND_COLECTOR"]


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("FLEETMEND_COLECTOR", "did you mean FLEETMEND_COLLECTOR (setting collector)?"),
        (
            "FLEETMEND_INTERVAL_HOST",
            "did you mean FLEETMEND_INTERVALS_HOST (setting intervals.host)?",
        ),
        ("FLEETMEND_STATEDIR", "did you mean FLEETMEND_STATE_DIR (setting state_dir)?"),
        ("FLEETMEND_ENROL_SECRET", "did you mean FLEETMEND_ENROLL_SECRET?"),
        ("FLEETMEND_FOO", "check its spelling, or unset it"),
    ],
)
def test_unknown_variable_suggestion(name: str, suggestion: str) -> None:
    message = unknown_variable_message(name)

    assert message.startswith(f"environment variable {name} is not an agent setting")
    assert message.endswith(suggestion)


def test_diagnose_ignores_operator_variables(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "diagnose", FLEETMEND_COLECTOR="x:1", **OPERATOR_VARIABLES
    )

    out = words(result.stdout)
    for name in OPERATOR_VARIABLES:
        assert name not in out
    assert "did you mean FLEETMEND_COLLECTOR (setting collector)?" in out


def test_run_warns_only_for_typos(tmp_path: Path, tls_dir: Path) -> None:
    server = start_server_thread(
        f"sqlite:///{tmp_path / 'collector.db'}", tls_dir=tls_dir
    )
    try:
        enrolled = run_cli(
            tmp_path,
            "enroll",
            "--collector",
            server.address,
            "--ca-file",
            str(tls_dir / "ca.pem"),
            FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
            FLEETMEND_KEY_STORE="file",
        )
        assert enrolled.returncode == 0, enrolled.stderr
        remember_secret(
            (tmp_path / "state" / "node-key").read_text(encoding="utf-8").strip()
        )

        result = run_cli(
            tmp_path,
            "run",
            "--exit-after",
            "1",
            FLEETMEND_INTERVALS_HOTS="60",
            **OPERATOR_VARIABLES,
        )
    finally:
        server.stop()

    assert result.returncode == 0, result.stderr
    warnings = [
        line
        for line in result.stderr.decode().splitlines()
        if "is not an agent setting" in line
    ]
    assert len(warnings) == 1, warnings
    assert "FLEETMEND_INTERVALS_HOTS" in warnings[0]
    assert "did you mean FLEETMEND_INTERVALS_HOST" in warnings[0]


# -- help ------------------------------------------------------------------------------


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def options_without_help(text: str) -> list[str]:
    """Return the option entries of a --help text that have no description.

    argparse writes an entry as "  -x, --long VALUE   help" or, for a long
    option column, the help on the following, deeper indented lines.
    """
    section = text.split("\noptions:\n", 1)[1]
    lines = section.splitlines()
    missing = []
    for index, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        has_inline_help = re.search(r"\S\s{2,}\S", line.strip()) is not None
        following = lines[index + 1] if index + 1 < len(lines) else ""
        has_next_line_help = following.startswith(" " * 6)
        if not (has_inline_help or has_next_line_help):
            missing.append(line.strip())
    return missing


def test_top_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)

    for name, (summary, _) in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+\S", text, re.MULTILINE), name
        assert " ".join(summary.split()[:4]) in " ".join(text.split())
    assert options_without_help(text) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_describes_everything(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = help_text(capsys, command)

    description = text.split("\n\n")[1]
    assert not description.startswith("options:"), text
    assert len(description.split()) >= 8, description
    assert options_without_help(text) == []
    assert "--state-dir DIR" in text
    assert "STATE_DIR" not in text.replace("FLEETMEND_STATE_DIR", "")


def test_help_names_every_command() -> None:
    result = subprocess.run(
        [str(BIN_DIR / "fleetmend-agent"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert result.returncode == 0
    for name in ("collect", "show", "diagnose", "rules", "notices", "enroll", "run"):
        assert name in COMMANDS
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.MULTILINE), name
