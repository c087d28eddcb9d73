"""fleetmend-agent's commands, settings checks and state lock, run for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ConfigError, check_collector_address, load_config
from agent.render import render_report
from agent.runtime import Agent
from agent.sections import SectionSource, UsageSource
from agent.spool import Spool
from agent.state import StateError, StateStore
from collector.server import start_server_thread
from collector.store import Store
from fleetmend.v1 import report_pb2
from tests.conftest import BIN_DIR, free_port
from tests.trust import enrollment_secret, remember_secret

# Node key of agents that never reach a collector.
OFFLINE_KEY = "offline-test-key"
BAD_CATALOG = '[apps.broken]\nprocesses.linux = ["x"]\n'


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMEND_")}
    config = tmp_path / "agent.toml"
    if not config.exists():
        config.write_text("[usage]\nresolve_hosts = false\n", encoding="utf-8")
    env["FLEETMEND_CONFIG"] = str(config)
    env.update(extra)
    return env


def run_cli(
    tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            str(BIN_DIR / "fleetmend-agent"),
            *args,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=agent_env(tmp_path, **env),
        capture_output=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def enrolled(tmp_path: Path, tls_dir: Path) -> str:
    """Enroll tmp_path/state with a real collector, stop it, return its address.

    Nothing listens on the address afterwards, so an agent run keeps retrying.
    """
    server = start_server_thread(
        f"sqlite:///{tmp_path / 'collector.db'}", tls_dir=tls_dir
    )
    try:
        result = run_cli(
            tmp_path,
            "enroll",
            "--collector",
            server.address,
            "--ca-file",
            str(tls_dir / "ca.pem"),
            FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
            FLEETMEND_KEY_STORE="file",
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    key_file = tmp_path / "state" / "node-key"
    remember_secret(key_file.read_text(encoding="utf-8").strip())
    return server.address


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[intervals]\nhost = 1.5\n", "expected a whole number, got 1.5"),
        ('[intervals]\nhost = "900"\n', "expected a whole number, got '900'"),
        ('state_dir = ""\n', "empty string"),
        ('[usage]\ncatalogs = "/x.toml"\n', "expected a list of file paths"),
        ("insecure = 1\n", "expected true or false"),
    ],
)
def test_file_values_need_their_type(tmp_path: Path, text: str, fragment: str) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_config(environ={}, config_file=config_file)

    assert fragment in str(info.value)


def test_env_interval_needs_digits() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"FLEETMEND_INTERVALS_HOST": "abc"}, privileged=False)

    assert "expected a whole number, got 'abc'" in str(info.value)
    assert "int()" not in str(info.value)


def test_non_utf8_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_bytes(b"\xff\xfe")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(environ={}, config_file=config_file)


def test_folder_as_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(environ={}, config_file=tmp_path)


def test_unknown_variables_listed() -> None:
    config = load_config(
        environ={"FLEETMEND_COLECTOR": "x:1", "FLEETMEND_CONFIG_X": ""},
        privileged=False,
    )

    assert config.unknown_variables == ["FLEETMEND_COLECTOR", "FLEETMEND_CONFIG_X"]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:50051:1",
        "http://127.0.0.1:50051",
        ":50051",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "127.0.0.1",
        "::1:50051",
    ],
)
def test_bad_collector_address(address: str) -> None:
    with pytest.raises(ValueError):
        check_collector_address(address)


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "[::1]:50051", "c.example:443"])
def test_good_collector_address(address: str) -> None:
    assert check_collector_address(address) == address


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"device_id": 5, "next_sequence": 1}', "device_id must be a UUID string"),
        ("[]", "expected a JSON object"),
        ('{"device_id": "not-a-uuid", "next_sequence": 1}', "is not a UUID"),
        (
            '{"device_id": "0b7e6c1e-8d3a-4f3e-9a63-7f3f2f0b6a10"}',
            "next_sequence must be a whole number",
        ),
        (
            '{"device_id": "0b7e6c1e-8d3a-4f3e-9a63-7f3f2f0b6a10", "next_sequence": 0}',
            "1 or more",
        ),
        ("", "not JSON"),
    ],
)
def test_damaged_identity_named(tmp_path: Path, content: str, fragment: str) -> None:
    store = StateStore(tmp_path)
    store.path.write_text(content, encoding="utf-8")

    with pytest.raises(StateError) as info:
        store.load_or_create()

    assert fragment in str(info.value)
    assert store.path.read_text(encoding="utf-8") == content


def test_file_as_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("", encoding="utf-8")

    with pytest.raises(StateError, match="is a file, not a folder"):
        StateStore(path).load_or_create()


def test_state_lock_held_by_other_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from agent.state import StateStore\n"
            "with StateStore(Path(sys.argv[1])).exclusive():\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"

        with pytest.raises(StateError) as info, StateStore(tmp_path).exclusive():
            pass

        assert f"pid {holder.pid}" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    with StateStore(tmp_path).exclusive():
        assert (tmp_path / "agent.lock").read_text().strip() == str(os.getpid())


@pytest.mark.usefixtures("enrolled")
def test_second_agent_on_same_state_dir(tmp_path: Path) -> None:
    # The enrolled collector is stopped, so the first agent keeps retrying.
    args = ["run"]
    first = subprocess.Popen(
        [
            str(BIN_DIR / "fleetmend-agent"),
            *args,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=agent_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = tmp_path / "state" / "agent.lock"
        deadline = time.monotonic() + 30
        while not lock.exists() or lock.read_text().strip() != str(first.pid):
            assert time.monotonic() < deadline, "first agent did not take the lock"
            time.sleep(0.1)

        second = run_cli(tmp_path, *args)

        assert second.returncode == 1
        assert b"another fleetmend-agent" in second.stderr
        assert b"Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def test_protobuf_output_parses(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "collect", "--format", "protobuf")

    report = report_pb2.Report.FromString(result.stdout)

    assert result.returncode == 0, result.stderr
    assert report.full
    assert report.host.kernel_version == os.uname().release
    assert report.usage.enabled


def test_collect_creates_no_state(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "collect")

    assert result.returncode == 0, result.stderr
    assert b"Full report of this computer" in result.stdout
    assert not (tmp_path / "state" / "identity.json").exists()
    assert not (tmp_path / "state" / "usage.db").exists()


def test_collect_bad_catalog_one_line(tmp_path: Path) -> None:
    catalog = tmp_path / "site.toml"
    catalog.write_text(BAD_CATALOG, encoding="utf-8")

    result = run_cli(tmp_path, "collect", FLEETMEND_USAGE_CATALOGS=str(catalog))

    assert result.returncode == 1
    assert b"usage section left out" in result.stderr
    assert b"Traceback" not in result.stderr
    assert b"Host " in result.stdout


def test_show_bad_catalog_one_line(tmp_path: Path) -> None:
    catalog = tmp_path / "site.toml"
    catalog.write_text(BAD_CATALOG, encoding="utf-8")

    result = run_cli(tmp_path, "show", FLEETMEND_USAGE_CATALOGS=str(catalog))

    assert result.returncode == 1
    assert str(catalog).encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_show_names_dns_lookups(tmp_path: Path) -> None:
    on = run_cli(tmp_path, "show", "--resolve-hosts")
    off = run_cli(tmp_path, "show", "--no-resolve-hosts")
    usage_off = run_cli(tmp_path, "show", "--no-usage")

    assert b"looks up the catalog's host" in on.stdout
    assert b"looks up the catalog's host" not in off.stdout
    assert b"Application usage: OFF" in usage_off.stdout


def test_diagnose_reports_problems(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "identity.json").write_text("{", encoding="utf-8")

    result = run_cli(tmp_path, "diagnose", FLEETMEND_INTERVAL_HOST="5")

    assert result.returncode == 1
    out = words(result.stdout)
    assert "identity file" in out
    assert "is damaged" in out
    assert (
        "FLEETMEND_INTERVAL_HOST is not an agent setting; did you mean "
        "FLEETMEND_INTERVALS_HOST (setting intervals.host)?" in out
    )


@pytest.mark.usefixtures("enrolled")
def test_diagnose_clean_setup(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "diagnose")

    assert result.returncode == 0, result.stdout
    assert b"no problems found" in result.stdout
    assert b"usage.resolve_hosts" in result.stdout


def test_exit_after_must_be_positive(tmp_path: Path) -> None:
    code = main(
        [
            "run",
            "--collector",
            "127.0.0.1:1",
            "--insecure",
            "--state-dir",
            str(tmp_path),
            "--exit-after",
            "0",
        ]
    )

    assert code == 2


def test_render_plurals_and_uptime() -> None:
    report = report_pb2.Report(full=True)
    report.host.hostname = "laptop"
    report.host.boot_time.GetCurrentTime()
    report.usage.enabled = True
    report.usage.window_days = 1
    report.usage.apps.add(app_id="sap_gui", hours_of_week=[9], minutes=[1])

    text = render_report(report)

    assert "up 0m" in text
    assert "Usage over 1 day: 1 application" in text
    assert "sap_gui: 1 minute in 1 hour of the week" in text


def test_agent_reports_while_offline(tmp_path: Path) -> None:
    config = load_config(
        flags={
            "collector": f"127.0.0.1:{free_port()}",
            "insecure": True,
            "state_dir": str(tmp_path / "state"),
        },
        environ={"FLEETMEND_INTERVALS_REPORT_MIN": "1"},
        privileged=False,
    )
    host = SectionSource(
        "host", "host", lambda: report_pb2.HostFacts(hostname="offline-laptop")
    )
    usage = UsageSource(False, [], tmp_path / "usage.db")
    agent = Agent(
        config,
        [host],
        usage,
        target=config.collector,
        node_key=OFFLINE_KEY,
        root_certificates=None,
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while agent.link.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.1)

        assert agent.link.pending >= 3
        assert not agent.link.connected
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.mark.usefixtures("enrolled")
def test_diagnose_shows_spool(tmp_path: Path) -> None:
    before = run_cli(tmp_path, "diagnose")
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    spool = Spool(tmp_path / "state" / "spool.db", 1 << 20)
    spool.put(report_pb2.Report(sequence=1))
    spool.put(report_pb2.Report(sequence=2))
    spool.close()

    after = run_cli(tmp_path, "diagnose")

    assert b"spool.db: not created yet" in before.stdout
    assert after.returncode == 0, after.stdout
    assert b"2 reports and 0 remediation records waiting" in after.stdout
    assert b"spool.max_bytes" in after.stdout


def test_diagnose_corrupt_spool(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "spool.db").write_bytes(b"garbage" * 100)

    result = run_cli(tmp_path, "diagnose", "--collector", "127.0.0.1:50051")

    assert result.returncode == 1
    assert "cannot be read" in words(result.stdout)
    assert (tmp_path / "state" / "spool.db").read_bytes() == b"garbage" * 100


def test_show_mentions_spool(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "show", "--no-usage")

    assert result.returncode == 0, result.stderr
    assert b"Reports wait in " in result.stdout
    assert b"spool.db (at most 16.0 MiB)" in result.stdout


# Replaces agent.clock.clock with one that runs SPEED times faster than real
# time, then runs the agent as `fleetmend-agent` would.
FAST_CLOCK_LAUNCHER = """
import sys, time
from datetime import timedelta
import agent.clock
from agent.cli import main

SPEED = 3600.0

class FastClock(agent.clock.Clock):
    def __init__(self):
        self.real_start = time.monotonic()
        self.wall_start = agent.clock.Clock().now()

    def _elapsed(self):
        return (time.monotonic() - self.real_start) * SPEED

    def monotonic(self):
        return self.real_start + self._elapsed()

    def now(self):
        return self.wall_start + timedelta(seconds=self._elapsed())

    def wait(self, event, seconds):
        return event.wait(max(0.0, seconds) / SPEED)

agent.clock.clock = FastClock()
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.usefixtures("enrolled")
def test_fast_clock_spools_hours(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FAST_CLOCK_LAUNCHER,
            "run",
            "--no-usage",
            "--state-dir",
            str(state_dir),
        ],
        env=agent_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # 10 real seconds are 10 simulated hours; a loaded machine can spend
    # several of them starting the interpreter before the first report.
    time.sleep(10)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    spool = Spool(state_dir / "spool.db", 1 << 24)
    reports = [record.report() for record in spool.pending(limit=10_000)]
    span = reports[-1].collect_time.ToDatetime() - reports[0].collect_time.ToDatetime()

    assert process.returncode == 0, stderr
    assert b"reports and 0 remediation records waiting" in stderr
    # At least two simulated hours at one report per 300 s.
    assert len(reports) >= 24
    assert span.total_seconds() >= 2 * 3600


def test_agent_numbers_past_spool(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    StateStore(state_dir).load_or_create()
    spool = Spool(state_dir / "spool.db", 1 << 20)
    spool.put(report_pb2.Report(sequence=50))
    spool.close()
    config = load_config(
        flags={
            "collector": f"127.0.0.1:{free_port()}",
            "insecure": True,
            "state_dir": str(state_dir),
        },
        environ={},
        privileged=False,
    )

    agent = Agent(
        config,
        [],
        UsageSource(False, [], tmp_path / "usage.db"),
        target=config.collector,
        node_key=OFFLINE_KEY,
        root_certificates=None,
    )

    assert agent.builder.next_sequence == 51


# -- self-healing commands ----------------------------------------------------------

DRY_RUN_POLICY = """
[[rules]]
name = "preview-temp"
dry_run = true
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.clear_cache = { cache_sets = ["user_temp"], older_than_days = 7 }

[[rules]]
name = "low-space"
condition.free_space_below = { mount_point = "/", bytes = 1 }
action.clear_cache = { cache_sets = ["thumbnails"] }
"""


def write_healing_config(tmp_path: Path, policy: str) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy, encoding="utf-8")
    (tmp_path / "agent.toml").write_text(
        f'[usage]\nresolve_hosts = false\n[healing]\npolicy_file = "{policy_file}"\n',
        encoding="utf-8",
    )


def test_rules_dry_run_each_rule(tmp_path: Path) -> None:
    write_healing_config(tmp_path, DRY_RUN_POLICY)

    result = run_cli(tmp_path, "rules")

    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    policy_file = tmp_path / "policy.toml"
    assert out.startswith(f"Local policy {policy_file}, 2 rules. A dry run: ")
    assert "Rule preview-temp (dry-run rule)\n  condition met: / has " in out
    assert "  now: would dry-run its action and report the result" in out
    assert "Rule low-space\n  condition not met: / has " in out
    assert "action: clear_cache (cache_sets user_temp; older_than_days 7)" in out
    assert out.count("  dry run: would free ") == 2
    # Evaluating rules leaves no state behind: no spool, no healing state.
    assert not (tmp_path / "state" / "spool.db").exists()
    assert not (tmp_path / "state" / "healing.json").exists()


def test_rules_invalid_policy_file(tmp_path: Path) -> None:
    write_healing_config(
        tmp_path,
        '[[rules]]\nname = "r1"\ncondition.disk_failing = {}\n'
        'action.restart_service = { service = "sshd.service" }\n',
    )

    result = run_cli(tmp_path, "rules")

    assert result.returncode == 1
    error = result.stderr.decode().strip()
    assert len(error.splitlines()) == 1
    assert "policy.toml is invalid" in error
    assert "rule 'r1'" in error
    assert "sshd.service" in error


def test_rules_unparsable_policy_file(tmp_path: Path) -> None:
    write_healing_config(tmp_path, '[[rules]]\nname = "r1"\naction.shell = {}\n')

    result = run_cli(tmp_path, "rules")

    assert result.returncode == 1
    error = result.stderr.decode().strip()
    assert "policy.toml" in error
    assert "'r1'" in error
    assert "shell" in error


def test_show_describes_healing_records(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "show")

    assert result.returncode == 0, result.stderr.decode()
    out = " ".join(result.stdout.decode().split())
    assert "Self-healing: ON: a record of each time a rule" in out
    assert "Never the names or contents of deleted files." in out


def test_notices_empty_state(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "notices")

    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""


def test_run_invalid_policy_file(tmp_path: Path, enrolled: str) -> None:
    write_healing_config(
        tmp_path,
        '[[rules]]\nname = "r1"\ncondition.disk_failing = {}\n'
        'action.notify = { title = "" }\n',
    )

    result = run_cli(tmp_path, "run", "--log-level", "error")

    assert result.returncode == 1
    error = result.stderr.decode().strip().splitlines()
    assert error[-1].startswith("fleetmend-agent: policy file ")
    assert "rule 'r1'" in error[-1]
    assert "title" in error[-1]


# -- the first report of a run -----------------------------------------------------


def test_run_first_report_has_every_section(tmp_path: Path, tls_dir: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'collector.db'}"
    server = start_server_thread(database_url, tls_dir=tls_dir)
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

        # The run ends after the first routine report is acknowledged, long
        # before intervals.report_min (300 s) would send a second one, so the
        # sections below all came in that report.
        result = run_cli(tmp_path, "run", "--exit-after", "1")
    finally:
        server.stop()
    identity = json.loads((tmp_path / "state" / "identity.json").read_text())
    store = Store.open(database_url)
    try:
        device = store.get_device(identity["device_id"])
    finally:
        store.close()

    assert result.returncode == 0, result.stderr
    assert device is not None
    for section in ("host", "disks", "batteries", "credentials", "usage"):
        assert device.HasField(section), section


# -- the collector that show and diagnose name -------------------------------------


def words(output: bytes) -> str:
    """Return output with each run of whitespace, line breaks included, as one space."""
    return " ".join(output.decode().split())


def collector_row(diagnose_output: bytes) -> str:
    """Return the settings row of collector in diagnose's output."""
    lines = diagnose_output.decode().splitlines()
    return next(line for line in lines if line.startswith("  collector "))


def test_show_names_enrolled_collector(tmp_path: Path, enrolled: str) -> None:
    enrollment_file = tmp_path / "state" / "enrollment.json"

    result = run_cli(tmp_path, "show", "--no-usage")

    assert result.returncode == 0, result.stderr
    first_paragraph = result.stdout.decode().split("\n\n")[0]
    assert " ".join(first_paragraph.split()) == (
        f"This Fleetmend agent sends reports to: {enrolled} (from the enrollment "
        f"in {enrollment_file})"
    )


def test_diagnose_names_enrolled_collector(tmp_path: Path, enrolled: str) -> None:
    enrollment_file = tmp_path / "state" / "enrollment.json"

    result = run_cli(tmp_path, "diagnose")

    row = collector_row(result.stdout)
    assert json.dumps(enrolled) in row
    assert f"enrollment {enrollment_file}" in row
    assert "default" not in row
    assert b"note: run uses collector" not in result.stdout
    assert result.returncode == 0, result.stdout


@pytest.mark.usefixtures("enrolled")
def test_collector_setting_beats_enrollment(tmp_path: Path) -> None:
    other = "127.0.0.1:1"

    by_flag = run_cli(tmp_path, "show", "--no-usage", "--collector", other)
    by_env = run_cli(tmp_path, "show", "--no-usage", FLEETMEND_COLLECTOR=other)
    diagnose = run_cli(tmp_path, "diagnose", "--collector", other)

    assert f"sends reports to: {other} (set by --collector)" in words(by_flag.stdout)
    assert f"sends reports to: {other} (set by FLEETMEND_COLLECTOR)" in words(
        by_env.stdout
    )
    row = collector_row(diagnose.stdout)
    assert json.dumps(other) in row
    assert " flag " in row
    assert f"note: run uses collector {other}".encode() in diagnose.stdout


def test_plaintext_enrollment_shown(tmp_path: Path, tls_dir: Path) -> None:
    server = start_server_thread(
        f"sqlite:///{tmp_path / 'collector.db'}", tls_dir=tls_dir, insecure=True
    )
    try:
        enrolled = run_cli(
            tmp_path,
            "enroll",
            "--collector",
            server.address,
            "--insecure",
            FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
            FLEETMEND_KEY_STORE="file",
        )
    finally:
        server.stop()
    assert enrolled.returncode == 0, enrolled.stderr
    remember_secret(
        (tmp_path / "state" / "node-key").read_text(encoding="utf-8").strip()
    )
    enrollment_file = tmp_path / "state" / "enrollment.json"

    result = run_cli(tmp_path, "diagnose")

    lines = result.stdout.decode().splitlines()
    insecure_row = next(line for line in lines if line.startswith("  insecure "))
    assert "true" in insecure_row
    assert f"enrollment {enrollment_file}" in insecure_row
    assert json.dumps(server.address) in collector_row(result.stdout)


def test_show_without_collector(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "show", "--no-usage")

    assert result.returncode == 0, result.stderr
    assert (
        "sends reports to: no collector set; enroll with fleetmend-agent enroll "
        "--collector HOST:PORT" in words(result.stdout)
    )


def test_show_damaged_enrollment(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "enrollment.json").write_text("{", encoding="utf-8")

    show = run_cli(tmp_path, "show", "--no-usage")
    diagnose = run_cli(tmp_path, "diagnose")

    assert show.returncode == 0, show.stderr
    assert b"no collector set" in show.stdout
    assert "unusable: enrollment file" in words(show.stdout)
    assert diagnose.returncode == 1
    assert "is damaged (not JSON" in words(diagnose.stdout)
    assert '""' in collector_row(diagnose.stdout)


# -- a closed stdout ------------------------------------------------------------------


def run_into_closed_pipe(
    tmp_path: Path, *args: str, reader: tuple[str, ...] = ("head", "-c", "100")
) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Run fleetmend-agent with stdout on a pipe whose reader already exited.

    The test writes 100 bytes into the pipe first, so that ``head -c 100`` reads
    them and exits before the agent writes anything; every write of the agent
    then fails with EPIPE. Return the agent's result and what the reader read.
    """
    read_end, write_end = os.pipe()
    try:
        head = subprocess.Popen(reader, stdin=read_end, stdout=subprocess.PIPE)
        os.close(read_end)
        read_end = -1
        os.write(write_end, b"x" * 100)
        head_output, _ = head.communicate(timeout=30)
        result = subprocess.run(
            [
                str(BIN_DIR / "fleetmend-agent"),
                *args,
                "--state-dir",
                str(tmp_path / "state"),
            ],
            env=agent_env(tmp_path),
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    finally:
        if read_end != -1:
            os.close(read_end)
        os.close(write_end)
    return result, head_output


@pytest.mark.parametrize(
    "args",
    [
        ("collect",),
        ("collect", "--format", "json"),
        ("collect", "--format", "protobuf"),
        ("show",),
        ("diagnose",),
        ("rules",),
        ("notices",),
    ],
    ids=" ".join,
)
def test_closed_stdout_exits_quietly(tmp_path: Path, args: tuple[str, ...]) -> None:
    result, head_output = run_into_closed_pipe(tmp_path, *args)

    assert head_output == b"x" * 100
    assert result.stderr == b""
    assert result.returncode == 141


def test_head_of_json_collect(tmp_path: Path) -> None:
    # The pipeline `collect --format json | head -c 100`: head may exit before
    # or after the agent writes, so the agent exits 0 or 141, never with a
    # traceback.
    agent = subprocess.Popen(
        [
            str(BIN_DIR / "fleetmend-agent"),
            "collect",
            "--format",
            "json",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=agent_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert agent.stdout is not None
    assert agent.stderr is not None
    head = subprocess.Popen(
        ["head", "-c", "100"], stdin=agent.stdout, stdout=subprocess.PIPE
    )
    agent.stdout.close()
    head_output, _ = head.communicate(timeout=120)
    agent_errors = agent.stderr.read()
    agent.stderr.close()
    code = agent.wait(timeout=120)

    assert len(head_output) == 100
    assert head_output.startswith(b"{")
    assert code in (0, 141)
    assert b"Traceback" not in agent_errors
    assert b"BrokenPipeError" not in agent_errors
