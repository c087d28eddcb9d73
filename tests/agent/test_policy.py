"""Self-healing policies: TOML parsing, validation, the stored collector policy."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.healing.actions import ACTION_MODULES, action_name, validate_action
from agent.healing.actions.base import LocalAllowlist
from agent.healing.limits import STATE_FILE, HealingState
from agent.healing.policy import (
    POLICY_FILE,
    PolicyError,
    PolicyStore,
    default_policy_text,
    policy_from_toml,
    validate_policy,
)
from fleetmend.v1 import remediation_pb2

ALLOWLIST = LocalAllowlist(services=frozenset({"cups.service"}))

VALID = """
version = 7

[[rules]]
name = "restart-cups"
condition.service_not_running = { service = "cups.service" }
action.restart_service = { service = "cups.service", settle = "5s" }
limits.cooldown = "600s"
limits.max_runs_per_day = 4
limits.quiet_hours = [{ start_hour = 22, end_hour = 7 }]
"""


def rule_toml(condition: str, action: str, limits: str = "") -> str:
    text = f'[[rules]]\nname = "r1"\n{condition}\n{action}\n'
    return text + (f"{limits}\n" if limits else "")


def test_valid_policy_parses() -> None:
    policy = policy_from_toml(VALID, "site.toml")

    assert policy.version == 7
    assert len(policy.rules) == 1
    rule = policy.rules[0]
    assert rule.condition.service_not_running.service == "cups.service"
    assert rule.action.restart_service.settle.seconds == 5
    assert rule.limits.cooldown.seconds == 600
    assert rule.limits.quiet_hours[0].start_hour == 22
    assert validate_policy(policy, ALLOWLIST) == []


def test_default_policy_is_valid() -> None:
    policy = policy_from_toml(default_policy_text(), "default_policy.toml")

    assert policy.version == 0
    assert validate_policy(policy, LocalAllowlist()) == []
    assert any(rule.dry_run for rule in policy.rules)
    actions = {action_name(rule.action) for rule in policy.rules}
    assert {"clear_cache", "notify"} <= actions
    conditions = {rule.condition.WhichOneof("kind") for rule in policy.rules}
    assert {
        "free_space_below",
        "credential_expiring_within",
        "disk_failing",
        "battery_health_below",
    } <= conditions


def test_unknown_action_names_rule_and_field() -> None:
    text = rule_toml(
        "condition.disk_failing = {}", 'action.run_script = { path = "/tmp/x.sh" }'
    )

    with pytest.raises(PolicyError) as error:
        policy_from_toml(text, "evil.toml")

    message = str(error.value)
    assert "evil.toml" in message
    assert "'r1'" in message
    assert "run_script" in message


def test_invalid_toml_names_file() -> None:
    with pytest.raises(PolicyError) as error:
        policy_from_toml("[[rules]\nname = 1", "broken.toml")

    assert "broken.toml is not valid TOML" in str(error.value)


def test_wrong_duration_names_field() -> None:
    text = rule_toml(
        "condition.disk_failing = {}",
        'action.notify = { title = "t", body = "b" }',
        'limits = { cooldown = "an hour" }',
    )

    with pytest.raises(PolicyError) as error:
        policy_from_toml(text, "site.toml")

    assert "'r1'" in str(error.value)
    assert "cooldown" in str(error.value)


def test_action_without_code_rejected() -> None:
    # A name that the proto does not have cannot be parsed; one that is set
    # but empty (no oneof) is rejected by validation.
    policy = remediation_pb2.Policy()
    rule = policy.rules.add(name="empty-action")
    rule.condition.disk_failing.SetInParent()

    problems = validate_policy(policy, ALLOWLIST)

    assert problems == ["rule 'empty-action': action: no action set"]


@pytest.mark.parametrize(
    ("condition", "action", "limits", "expected"),
    [
        (
            'condition.free_space_below = { mount_point = "home", ratio = 0.1 }',
            'action.notify = { title = "t", body = "b" }',
            "",
            "mount_point 'home' is not an absolute path",
        ),
        (
            'condition.free_space_below = { mount_point = "/", ratio = 1.5 }',
            'action.notify = { title = "t", body = "b" }',
            "",
            "ratio is 1.5; expected a ratio from 0 to 1",
        ),
        (
            'condition.free_space_below = { mount_point = "/" }',
            'action.notify = { title = "t", body = "b" }',
            "",
            "needs ratio or bytes above 0",
        ),
        (
            'condition.process_cpu_above = { app_id = "dropbox", percent = 5000 }',
            'action.throttle_process = { app_id = "dropbox" }',
            "",
            "percent is 5000",
        ),
        (
            "condition.battery_health_below = { ratio = -0.5 }",
            'action.notify = { title = "t", body = "b" }',
            "",
            "ratio is -0.5",
        ),
        (
            'condition.credential_expiring_within = { within = "99999999s" }',
            'action.notify = { title = "t", body = "b" }',
            "",
            "within is 99999999 s, more than the maximum 31622400 s",
        ),
        (
            'condition.credential_expiring_within = { within = "3600s", kind = "pin" }',
            'action.notify = { title = "t", body = "b" }',
            "",
            "kind 'pin' is not one of",
        ),
        (
            "condition.disk_failing = {}",
            'action.notify = { title = "t", body = "b" }',
            "limits = { quiet_hours = [{ start_hour = 22, end_hour = 24 }] }",
            "end_hour is 24; expected an hour from 0 to 23",
        ),
        (
            "condition.disk_failing = {}",
            'action.notify = { title = "t", body = "b" }',
            "limits = { quiet_hours = [{ start_hour = 3, end_hour = 3 }] }",
            "an empty span",
        ),
        (
            "condition.disk_failing = {}",
            'action.notify = { title = "t", body = "b" }',
            'limits = { cooldown = "-5s" }',
            "limits.cooldown is negative",
        ),
        (
            "condition.disk_failing = {}",
            'action.notify = { title = "t", body = "b" }',
            'limits = { cooldown = "9999999s" }',
            "more than the maximum",
        ),
        (
            "condition.disk_failing = {}",
            'action.notify = { title = "t", body = "b" }',
            "limits = { max_runs_per_day = 100000 }",
            "max_runs_per_day is 100000",
        ),
        (
            "condition.disk_failing = {}",
            'action.clear_cache = { cache_sets = ["../../etc"] }',
            "",
            "action: clear_cache",
        ),
        (
            'condition.service_not_running = { service = "sshd.service" }',
            'action.restart_service = { service = "sshd.service" }',
            "",
            "action: restart_service",
        ),
    ],
)
def test_out_of_range_rejected(
    condition: str, action: str, limits: str, expected: str
) -> None:
    policy = policy_from_toml(rule_toml(condition, action, limits), "site.toml")

    problems = validate_policy(policy, ALLOWLIST)

    assert problems, "the rule should be rejected"
    assert all(problem.startswith("rule 'r1': ") for problem in problems)
    assert any(expected in problem for problem in problems), problems


def test_rule_names_checked() -> None:
    text = (
        rule_toml("condition.disk_failing = {}", 'action.notify = { title = "t" }')
        + rule_toml("condition.disk_failing = {}", 'action.notify = { title = "t" }')
        + '[[rules]]\nname = "Bad Name"\ncondition.disk_failing = {}\n'
        'action.notify = { title = "t" }\n'
        '[[rules]]\ncondition.disk_failing = {}\naction.notify = { title = "t" }\n'
    )
    policy = policy_from_toml(text, "site.toml")

    problems = validate_policy(policy, ALLOWLIST)

    assert "rule 'r1': name is used by an earlier rule" in problems
    assert any(p.startswith("rule 'Bad Name': name must be") for p in problems)
    assert any(p.startswith("rule 4: name must be") for p in problems)


def test_missing_condition_rejected() -> None:
    policy = policy_from_toml(
        '[[rules]]\nname = "r1"\naction.notify = { title = "t" }\n', "site.toml"
    )

    assert validate_policy(policy, ALLOWLIST) == [
        "rule 'r1': condition: no condition set"
    ]


def test_validate_action_registry() -> None:
    assert set(ACTION_MODULES) == {
        field.name for field in remediation_pb2.Action.DESCRIPTOR.fields
    }
    assert validate_action(remediation_pb2.Action(), ALLOWLIST)[0].startswith(
        "no action set"
    )


# -- the policy store -------------------------------------------------------------


def collector_policy(
    version: int, service: str = "cups.service"
) -> remediation_pb2.Policy:
    policy = policy_from_toml(VALID, "collector")
    policy.version = version
    policy.rules[0].condition.service_not_running.service = service
    policy.rules[0].action.restart_service.service = service
    return policy


def default_policy() -> remediation_pb2.Policy:
    return policy_from_toml(default_policy_text(), "default_policy.toml")


def test_store_applies_and_persists(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path, default_policy(), ALLOWLIST)
    assert store.applied_version == 0

    assert store.apply(collector_policy(3)) == []

    assert store.applied_version == 3
    assert store.policy.rules[0].name == "restart-cups"
    path = tmp_path / POLICY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reloaded = PolicyStore(tmp_path, default_policy(), ALLOWLIST)
    assert reloaded.applied_version == 3
    assert reloaded.status.rejected_version == 0


def test_store_rejection_keeps_previous(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path, default_policy(), ALLOWLIST)
    store.apply(collector_policy(3))

    bad = collector_policy(4, service="sshd.service")
    bad.rules[0].limits.max_runs_per_day = 100_000
    problems = store.apply(bad)

    assert problems
    assert store.applied_version == 3
    assert store.policy.rules[0].action.restart_service.service == "cups.service"
    status = store.status
    assert status.applied_version == 3
    assert status.rejected_version == 4
    assert "max_runs_per_day is 100000" in status.rejected_reason
    assert "rule 'restart-cups'" in status.rejected_reason
    # A rejected policy refuses no rule: none of it applies.
    assert "sshd.service" not in status.rejected_reason
    assert list(status.refused_rules) == []
    # A later valid policy clears the rejection.
    assert store.apply(collector_policy(5)) == []
    assert store.status.rejected_version == 0


def test_store_refuses_rule_outside_new_allowlist(tmp_path: Path) -> None:
    PolicyStore(tmp_path, default_policy(), ALLOWLIST).apply(collector_policy(3))

    narrower = PolicyStore(tmp_path, default_policy(), LocalAllowlist())

    assert narrower.applied_version == 3
    assert narrower.policy.rules[0].name == "restart-cups"
    assert list(narrower.refused) == ["restart-cups"]
    assert [r.rule_name for r in narrower.status.refused_rules] == ["restart-cups"]


def test_store_damaged_file_uses_default(tmp_path: Path) -> None:
    (tmp_path / POLICY_FILE).write_bytes(b"\xff\xff not a policy")

    store = PolicyStore(tmp_path, default_policy(), ALLOWLIST)

    assert store.applied_version == 0
    assert len(store.policy.rules) == len(default_policy().rules)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder that every user can traverse, unlike pytest's 0700 tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-policy-test-"))
    os.chmod(folder, 0o711)  # noqa: S103 - let the other user traverse the folder
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_state_files_unreadable_by_other_user(reachable_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    PolicyStore(reachable_dir, default_policy(), ALLOWLIST).apply(collector_policy(3))
    state = HealingState.load(reachable_dir)
    state.commands["c1"] = datetime(2026, 1, 15, tzinfo=UTC)
    state.save(datetime(2026, 1, 15, tzinfo=UTC))

    for name in (POLICY_FILE, STATE_FILE):
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "cat",
                str(reachable_dir / name),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0, f"{name} was readable"
        assert "Permission denied" in result.stderr, name
