"""What an administrator reads first: diagnose, the run log, help and README.

diagnose and run go through the installed fleetmend-agent with a real TLS
collector, a real PolicyStore file and real spool. The foreground checks run
the fake loginctl and xprop of tests/fakes, which replay recorded output.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent.cli import main
from agent.foreground import THROTTLE_END, ForegroundDetector, X11Backend
from agent.healing.actions.base import LocalAllowlist
from agent.healing.policy import (
    PolicyStore,
    default_policy_text,
    policy_from_toml,
)
from agent.spool import Spool, describe
from agent.state import write_private
from agent.text import count_text
from collector.server import start_server_thread
from fleetmend.v1 import remediation_pb2, report_pb2
from tests.agent import test_agent_cli, test_foreground
from tests.agent.test_agent_cli import run_cli, words
from tests.agent.test_foreground import FakeTools, xprop_state
from tests.trust import enrollment_secret, remember_secret

# The fixtures that enroll tmp_path/state with a collector and that put the
# fake foreground tools in a folder.
enrolled = test_agent_cli.enrolled
fakes = test_foreground.fakes

CUPS = "cups.service"
AVAHI = "avahi-daemon.service"
FLEET_RULES = f"""
[[rules]]
name = "restart-cups"
condition.service_not_running = {{ service = "{CUPS}" }}
action.restart_service = {{ service = "{CUPS}", settle = "2s" }}
limits.cooldown = "60s"

[[rules]]
name = "restart-avahi"
condition.service_not_running = {{ service = "{AVAHI}" }}
action.restart_service = {{ service = "{AVAHI}", settle = "2s" }}
limits.cooldown = "60s"
"""

# loginctl's stderr where no system bus is reachable, in the fake's format.
LOGINCTL_NO_BUS = """\
# origin: `LC_ALL=C loginctl list-sessions --no-legend`, systemd 252.38-1~deb12u1
# shows: stderr on Debian 12 in a container whose init is not systemd (no bus)
# kept: both stderr lines as printed
# exit status: 1
# stream: stderr
System has not been booted with systemd as init system (PID 1). Can't operate.
Failed to connect to bus: Host is down
"""

REPO = Path(__file__).resolve().parents[2]


def built_in_rule_count() -> int:
    return len(policy_from_toml(default_policy_text(), "built-in").rules)


def write_agent_toml(tmp_path: Path, services: list[str]) -> None:
    names = ", ".join(f'"{name}"' for name in services)
    (tmp_path / "agent.toml").write_text(
        f"[usage]\nresolve_hosts = false\n[healing]\nservices = [{names}]\n",
        encoding="utf-8",
    )


def fleet_policy() -> remediation_pb2.Policy:
    policy = policy_from_toml(FLEET_RULES, "collector")
    policy.version = 9
    policy.fleet_version = 4
    return policy


# -- the foreground line ----------------------------------------------------------


def test_foreground_no_bus_in_words(fakes: FakeTools, tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    (recordings / "loginctl-list-sessions-no-bus.txt").write_text(
        LOGINCTL_NO_BUS, encoding="utf-8"
    )
    fakes.set(loginctl={"list": "loginctl-list-sessions-no-bus"})
    environ = {"PATH": fakes.path, "FAKE_FOREGROUND_RECORDINGS": str(recordings)}
    detector = ForegroundDetector(lambda: None, X11Backend(environ=environ, euid=0))

    assert detector.foreground_apps() == frozenset()
    assert detector.status() == (
        "unavailable: no graphical session found (loginctl: Failed to connect to "
        "bus: Host is down); a throttle ends when restore_after passes (default "
        "1 hour) or its verification fails"
    )
    assert [call["argv"] for call in fakes.calls("loginctl")] == [
        ["list-sessions", "--no-legend"]
    ]


def test_foreground_real_loginctl_without_bus() -> None:
    try:
        probe = subprocess.run(
            ["loginctl", "list-sessions", "--no-legend"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("loginctl is not installed")
    if probe.returncode == 0 or "Failed to connect to bus" not in probe.stderr:
        pytest.skip("loginctl reaches a system bus here")
    environ = {"PATH": "/usr/bin:/bin"}
    detector = ForegroundDetector(lambda: None, X11Backend(environ=environ, euid=0))

    status = detector.status()

    assert status.startswith(
        "unavailable: no graphical session found (loginctl: Failed to connect to bus"
    )
    assert status.endswith(f"); {THROTTLE_END}")


def test_foreground_available_names_source(fakes: FakeTools) -> None:
    fakes.set(xprop=xprop_state(root="xprop-active-window-notype-none"))
    backend = X11Backend(environ={"PATH": fakes.path, "DISPLAY": ":77"})
    detector = ForegroundDetector(lambda: None, backend)

    assert detector.status() == (
        "available: X11 display :77 from the agent's DISPLAY (xprop)"
    )


# -- the policy line ---------------------------------------------------------------


@pytest.mark.usefixtures("enrolled")
def test_diagnose_clean_names_built_in(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "diagnose")

    assert result.returncode == 0, result.stdout.decode()
    lines = result.stdout.decode().splitlines()
    expected = f"self-healing policy: built-in policy, {built_in_rule_count()} rules"
    assert expected in lines
    assert "no problems found" in lines


@pytest.mark.usefixtures("enrolled")
def test_diagnose_refused_rule_is_problem(tmp_path: Path) -> None:
    write_agent_toml(tmp_path, [AVAHI])
    allowlist = LocalAllowlist(services=frozenset({AVAHI}))
    store = PolicyStore(tmp_path / "state", remediation_pb2.Policy(), allowlist)
    assert store.apply(fleet_policy()) == []

    result = run_cli(tmp_path, "diagnose")

    out = result.stdout.decode()
    assert result.returncode == 1, out
    assert (
        "self-healing policy: fleet policy version 4 (generation 9), 2 rules, 1 of "
        "them refused on this laptop (fleetmend-agent rules shows why)"
    ) in out.splitlines()
    assert "no problems found" not in out
    problems = words(result.stdout).split("problems:", 1)[1]
    assert "self-healing rule restart-cups is refused on this laptop" in problems
    assert CUPS in problems
    assert "restart-avahi" not in problems


@pytest.mark.usefixtures("enrolled")
def test_diagnose_rejected_stored_policy(tmp_path: Path) -> None:
    # A policy file that an earlier agent build accepted, now invalid: the
    # rule name breaks the name rule.
    stored = fleet_policy()
    stored.rules[0].name = "Restart CUPS"
    state = tmp_path / "state"
    write_private(state / "policy.pb", stored.SerializeToString())

    result = run_cli(tmp_path, "diagnose")

    out = words(result.stdout)
    assert result.returncode == 1, out
    assert (
        f"self-healing policy: built-in policy, {built_in_rule_count()} rules, "
        "because the stored fleet policy is rejected"
    ) in out
    problems = out.split("problems:", 1)[1]
    assert "fleet policy version 4 (generation 9) stored in" in problems
    assert "is rejected on this laptop" in problems
    assert "name must be 1 to 64" in problems
    assert "the local policy runs until the collector sends a valid one" in problems
    # diagnose states the rejection itself; PolicyStore's log line stays out.
    assert b"ERROR" not in result.stderr


def test_diagnose_built_in_rule_left_out(tmp_path: Path) -> None:
    # The built-in clear-caches-low-space rule clears the browser and
    # thumbnails cache sets, which this allowlist leaves out.
    (tmp_path / "agent.toml").write_text(
        '[usage]\nresolve_hosts = false\n[healing]\ncache_sets = ["user_temp"]\n',
        encoding="utf-8",
    )

    result = run_cli(tmp_path, "diagnose")

    out = words(result.stdout)
    assert result.returncode == 1
    problems = out.split("problems:", 1)[1]
    assert "built-in policy: rule 'clear-caches-low-space'" in problems
    assert "the rule is left out" in problems
    assert f"{built_in_rule_count()} rules" not in out


def test_diagnose_invalid_local_policy(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[[rules]]\nname = "Bad Name"\n', encoding="utf-8")
    (tmp_path / "agent.toml").write_text(
        f'[usage]\nresolve_hosts = false\n[healing]\npolicy_file = "{policy_file}"\n',
        encoding="utf-8",
    )

    result = run_cli(tmp_path, "diagnose")

    out = words(result.stdout)
    assert result.returncode == 1
    assert "self-healing policy: none, the local policy is invalid" in out
    assert f"policy file {policy_file} is invalid" in out.split("problems:", 1)[1]


# -- the run log ---------------------------------------------------------------


def test_run_log_names_policy_and_counts(tmp_path: Path, tls_dir: Path) -> None:
    server = start_server_thread(
        f"sqlite:///{tmp_path / 'collector.db'}", tls_dir=tls_dir
    )
    try:
        enrolled_result = run_cli(
            tmp_path,
            "enroll",
            "--collector",
            server.address,
            "--ca-file",
            str(tls_dir / "ca.pem"),
            FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
            FLEETMEND_KEY_STORE="file",
        )
        assert enrolled_result.returncode == 0, enrolled_result.stderr
        remember_secret(
            (tmp_path / "state" / "node-key").read_text(encoding="utf-8").strip()
        )
        result = run_cli(tmp_path, "run", "--exit-after", "1")
    finally:
        server.stop()

    log = result.stderr.decode()
    assert result.returncode == 0, log
    assert (
        f"self-healing policy in force: built-in policy, {built_in_rule_count()} rules"
        in log
    )
    final = re.search(
        r"(\d+) routine reports? and (\d+) reports? of remediation records "
        r"acknowledged; exiting because --exit-after 1 counts routine reports",
        log,
    )
    assert final is not None, log
    assert int(final[1]) >= 1


# -- plurals -------------------------------------------------------------------


def test_counted_singular_and_plural() -> None:
    assert count_text(1, "report") == "1 report"
    assert count_text(0, "report") == "0 reports"
    assert count_text(2, "remediation record") == "2 remediation records"
    assert count_text(3, "entry", "entries") == "3 entries"


def test_spool_describe_one_report(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.put(report_pb2.Report(sequence=1))

    line = describe(spool.stats())

    assert "1 report and 0 remediation records waiting" in line
    assert "0 reports dropped by the cap" in line
    assert "1 reports" not in line


# -- options per command ---------------------------------------------------------


def help_options(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return set(re.findall(r"^  (--[a-z-]+)", capsys.readouterr().out, re.MULTILINE))


@pytest.mark.parametrize(
    ("command", "present", "absent"),
    [
        ("collect", {"--usage", "--resolve-hosts"}, {"--collector", "--insecure"}),
        ("notices", set(), {"--collector", "--insecure", "--usage", "--resolve-hosts"}),
        ("rules", set(), {"--collector", "--insecure", "--usage", "--resolve-hosts"}),
        ("enroll", {"--collector", "--insecure"}, {"--usage", "--resolve-hosts"}),
        ("run", {"--collector", "--insecure", "--usage", "--resolve-hosts"}, set()),
        ("show", {"--collector", "--usage", "--resolve-hosts"}, set()),
        ("diagnose", {"--collector", "--usage", "--resolve-hosts"}, set()),
    ],
)
def test_command_lists_own_options(
    command: str,
    present: set[str],
    absent: set[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = help_options(command, capsys)

    assert {"--config", "--state-dir", "--log-level"} <= options
    assert present <= options
    assert not absent & options


def test_collect_rejects_collector(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--collector", "127.0.0.1:1"])

    assert exit_info.value.code == 2
    assert "unrecognized arguments: --collector" in capsys.readouterr().err


# -- README ----------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_first_commands_name_dns() -> None:
    section = readme_section("First commands")

    assert "--no-resolve-hosts" in section
    assert "make no DNS look-ups" in section


def test_readme_two_setup_commands() -> None:
    section = readme_section("Set up on a fresh machine")
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]

    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make run", "make test"]
