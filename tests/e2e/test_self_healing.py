"""Self-healing end to end: a real collector, a real agent, policies and commands.

The agent runs this machine's probes with a local policy, then gets a policy
from the collector and an operator's command, and the operator reads the
records back with `fleetmend remediations`. Every action here is a notice or
a dry run, so nothing on the machine changes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from collector.store import Store, StoredRemediationRecord
from fleetmend.v1 import remediation_pb2
from tests.conftest import BIN_DIR
from tests.e2e.harness import (
    Collector,
    agent_command,
    agent_env,
    cli,
    enroll_agent,
)

LOCAL_POLICY = """
[[rules]]
name = "e2e-preview-temp"
dry_run = true
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.clear_cache = { cache_sets = ["user_temp"], older_than_days = 7 }
limits = { cooldown = "3600s" }

[[rules]]
name = "e2e-local-notice"
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.notify = { title = "Local rule", body = "The local policy ran." }
limits = { cooldown = "3600s" }
"""

COLLECTOR_POLICY = """
[[rules]]
name = "e2e-fleet-notice"
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.notify = { title = "Fleet rule", body = "The collector's policy ran." }
limits = { cooldown = "3600s" }
"""

Outcome = remediation_pb2.RemediationOutcome


def healing_env(tmp_path: Path) -> dict[str, str]:
    env = agent_env(tmp_path)
    del env["FLEETMEND_HEALING_ENABLED"]
    policy = tmp_path / "local-policy.toml"
    policy.write_text(LOCAL_POLICY, encoding="utf-8")
    Path(env["FLEETMEND_CONFIG"]).write_text(
        "[usage]\nresolve_hosts = false\n"
        "[intervals]\nreport_min = 1\nhealing = 1\n"
        f'[healing]\npolicy_file = "{policy}"\n',
        encoding="utf-8",
    )
    return env


def wait_for_records(
    collector: Collector,
    accept: Callable[[list[StoredRemediationRecord]], bool],
    timeout: float = 60,
) -> list[StoredRemediationRecord]:
    deadline = time.monotonic() + timeout
    records: list[StoredRemediationRecord] = []
    while time.monotonic() < deadline:
        with Store.open(collector.database_url) as store:
            records = store.list_remediations(limit=100)
        if accept(records):
            return records
        time.sleep(0.3)
    raise AssertionError(f"records never matched; last seen: {records}")


def rules_of(records: list[StoredRemediationRecord]) -> set[str]:
    return {stored.record.rule for stored in records}


@pytest.fixture
def running_agent(collector: Collector, tmp_path: Path) -> Iterator[Path]:
    enroll_agent(collector, tmp_path)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            agent_command(tmp_path / "agent", "--log-level", "info"),
            env=healing_env(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield tmp_path / "agent"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_local_policy_records_reach_collector(
    collector: Collector,
    running_agent: Path,
) -> None:
    records = wait_for_records(
        collector, lambda r: {"e2e-preview-temp", "e2e-local-notice"} <= rules_of(r)
    )

    by_rule = {stored.record.rule: stored.record for stored in records}
    assert by_rule["e2e-preview-temp"].outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert by_rule["e2e-local-notice"].outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED
    listed = cli(collector, "--json", "remediations")
    assert listed.returncode == 0, listed.stderr
    summaries = {s["rule"]: s for s in json.loads(listed.stdout)["summaries"]}
    assert "e2e-local-notice" in summaries


def test_collector_policy_and_command_run(
    collector: Collector,
    running_agent: Path,
    tmp_path: Path,
) -> None:
    wait_for_records(collector, lambda r: "e2e-local-notice" in rules_of(r))
    device_id = json.loads((running_agent / "identity.json").read_text("utf-8"))[
        "device_id"
    ]
    policy_file = tmp_path / "fleet-policy.toml"
    policy_file.write_text(COLLECTOR_POLICY, encoding="utf-8")

    set_policy = cli(collector, "policy", "set", str(policy_file))
    acted = cli(
        collector,
        "--json",
        "act",
        "notify",
        "--param",
        "title=From IT",
        "--param",
        "body=SAP is down until 15:00.",
        "--device",
        device_id,
    )
    records = wait_for_records(
        collector,
        lambda r: (
            "e2e-fleet-notice" in rules_of(r)
            and any(stored.record.command_id for stored in r)
        ),
    )
    notices = subprocess.run(
        [
            str(BIN_DIR / "fleetmend-agent"),
            "notices",
            "--state-dir",
            str(running_agent),
        ],
        env=healing_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    rules = cli(collector, "--json", "rules")

    assert set_policy.returncode == 0, set_policy.stderr
    assert acted.returncode == 0, acted.stderr
    command_ids = [c["command_id"] for c in json.loads(acted.stdout)["commands"]]
    commanded = [stored.record for stored in records if stored.record.command_id]
    assert [record.command_id for record in commanded] == command_ids
    assert commanded[0].outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED
    assert notices.returncode == 0, notices.stderr
    assert "SAP is down until 15:00." in notices.stdout
    assert "The collector's policy ran." in notices.stdout
    assert rules.returncode == 0, rules.stderr
    assert [r["name"] for r in json.loads(rules.stdout)["rules"]] == [
        "e2e-fleet-notice"
    ]
