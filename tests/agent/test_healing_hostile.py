"""Self-healing against a hostile collector: huge, malformed and out-of-range input.

The engine runs with a fake systemctl on PATH, a real spool and real state
files, as in test_engine.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent.healing.actions.base import LocalAllowlist
from agent.healing.actions.notify import validate as validate_notify
from agent.healing.actions.prompt_password_change import validate as validate_url
from agent.healing.bounds import (
    MAX_COMMAND_ID,
    MAX_REASON_CHARS,
    MAX_RECORD_ACTION_BYTES,
    MAX_RULES,
    truncate,
)
from agent.healing.conditions import ConditionEvaluator, ConditionResult, Readings
from agent.healing.limits import MAX_COMMAND_IDS, STATE_FILE, HealingState
from agent.healing.policy import PolicyStore, policy_from_toml, validate_policy
from agent.link import MAX_MESSAGE_BYTES
from fleetmend.v1 import remediation_pb2
from tests.agent.test_engine import (  # noqa: F401 - fixtures used by name
    ACTIVE_STATE,
    START,
    Harness,
    HarnessFactory,
    ManualClock,
    clock,
    command,
    harness_factory,
    restart_policy,
    restarts,
    systemctl,
)

Outcome = remediation_pb2.RemediationOutcome

ALLOWLIST = LocalAllowlist(services=frozenset({"cups.service"}))
HUGE = 3 * 1024 * 1024


def spooled_sizes(harness: Harness) -> list[int]:
    return [
        len(item.body) for item in harness.spool.pending(kind="remediation", limit=1000)
    ]


# -- bounded records ---------------------------------------------------------------


def test_huge_service_name_record_bounded(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
) -> None:
    harness = harness_factory(restart_policy())

    record = harness.engine.run_command(command("c-huge", service="s" * HUGE))

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert "more than the maximum 256" in record.reason
    assert len(record.reason) <= MAX_REASON_CHARS
    assert record.action.WhichOneof("kind") == "restart_service"
    assert record.action.restart_service.service == ""
    assert record.ByteSize() <= MAX_RECORD_ACTION_BYTES + 2 * MAX_REASON_CHARS
    assert spooled_sizes(harness) == [max(spooled_sizes(harness))]
    assert max(spooled_sizes(harness)) < MAX_MESSAGE_BYTES // 100
    assert restarts(systemctl) == 0


def test_refused_command_repeat_not_spooled(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
) -> None:
    harness = harness_factory(restart_policy())
    refused = command("c-refused", service="sshd.service")

    first = harness.engine.run_command(refused)
    again = harness.engine.run_command(refused)

    assert first.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert again.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert again.reason.startswith("command c-refused was already refused at")
    assert harness.spooled() == [first]
    # The refused id survives a restart of the agent.
    assert "c-refused" in HealingState.load(harness.state_dir).refused_commands


def test_ran_command_repeat_not_spooled(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
) -> None:
    (systemctl / "after_restart").write_text(ACTIVE_STATE)
    harness = harness_factory(restart_policy())

    first = harness.engine.run_command(command("c-ran"))
    harness.engine.run_command(command("c-ran"))

    assert first.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED
    assert harness.spooled() == [first]


def test_huge_command_id_refused(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
) -> None:
    harness = harness_factory(restart_policy())
    # A refused command with a valid id is stored, so healing.json exists.
    harness.engine.run_command(command("c-valid", service="sshd.service"))

    for index in range(200):
        harness.engine.run_command(command(f"{index:04d}" + "i" * 100_000))

    records = harness.spooled()[1:]
    assert len(records) == 200
    assert all(r.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED for r in records)
    assert all(len(r.command_id) <= MAX_COMMAND_ID for r in records)
    assert "more than the maximum 128" in records[0].reason
    assert (harness.state_dir / STATE_FILE).stat().st_size < 10_000
    assert restarts(systemctl) == 0


def test_command_id_with_nul_refused(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
) -> None:
    harness = harness_factory(restart_policy())

    record = harness.engine.run_command(command("c\x00id"))

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert "control character" in record.reason
    assert restarts(systemctl) == 0


def test_stored_command_ids_bounded(tmp_path: Path) -> None:
    state = HealingState(tmp_path / STATE_FILE)
    for index in range(MAX_COMMAND_IDS + 500):
        when = START + timedelta(seconds=index)
        state.commands[f"run-{index}"] = when
        state.refused_commands[f"refused-{index}"] = when

    state.save(START + timedelta(hours=1))
    loaded = HealingState.load(tmp_path)

    assert len(loaded.commands) == MAX_COMMAND_IDS
    assert len(loaded.refused_commands) == MAX_COMMAND_IDS
    newest = f"run-{MAX_COMMAND_IDS + 499}"
    assert newest in loaded.commands
    assert "run-0" not in loaded.commands


def test_rejected_policy_reason_bounded(tmp_path: Path) -> None:
    policy = remediation_pb2.Policy(version=9)
    rule = policy.rules.add(name="huge")
    rule.condition.service_not_running.service = "x" * (2_500_000)
    rule.action.restart_service.service = "y" * 10
    store = PolicyStore(tmp_path, remediation_pb2.Policy(), ALLOWLIST)

    problems = store.apply(policy)

    assert problems
    status = store.status
    assert status.rejected_version == 9
    assert len(status.rejected_reason) <= MAX_REASON_CHARS
    assert status.ByteSize() < 2 * MAX_REASON_CHARS


def test_too_many_rules_rejected() -> None:
    policy = remediation_pb2.Policy()
    for index in range(MAX_RULES + 1):
        rule = policy.rules.add(name=f"r{index}")
        rule.condition.service_not_running.service = "cups.service"
        rule.action.restart_service.service = "cups.service"

    problems = validate_policy(policy, ALLOWLIST)

    assert problems == [
        f"policy has {MAX_RULES + 1} rules, more than the maximum {MAX_RULES}; "
        "split the work over fewer, broader rules"
    ]
    del policy.rules[-1]
    assert validate_policy(policy, ALLOWLIST) == []


def test_truncate_marks_cut() -> None:
    text = truncate("a" * 5000, 1024)

    assert len(text) == 1024
    assert text.endswith(" ... [truncated, 5000 characters in all]")
    assert truncate("short", 1024) == "short"


# -- names, paths and control characters ---------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (
            "condition.free_space_below = "
            '{ mount_point = "/ho\\u0000me", ratio = 0.1 }',
            "free_space_below.mount_point '/ho\\x00me' contains a control character",
        ),
        (
            'condition.free_space_below = { mount_point = "/\\u001b[2J", ratio = 0.1 }',
            "contains a control character",
        ),
        (
            'condition.free_space_below = { mount_point = "/'
            + "m" * 5000
            + '", ratio = 0.1 }',
            "free_space_below.mount_point has 5001 characters, more than the "
            "maximum 4096",
        ),
        (
            "condition.process_cpu_above = "
            '{ app_id = "a\\u0000b", percent = 50, sustained = "60s" }',
            "process_cpu_above.app_id 'a\\x00b' contains a control character",
        ),
    ],
)
def test_bad_names_and_paths_rejected(condition: str, expected: str) -> None:
    text = (
        f'[[rules]]\nname = "r1"\n{condition}\n'
        'action.notify = { title = "t", body = "b" }\n'
    )
    policy = policy_from_toml(text, "test")

    problems = validate_policy(policy, ALLOWLIST)

    assert any(expected in problem for problem in problems), problems


def test_rejection_quotes_value_briefly() -> None:
    policy = remediation_pb2.Policy()
    rule = policy.rules.add(name="r1")
    rule.condition.service_not_running.service = "bad name " * 10_000
    rule.action.notify.title = "t"

    problems = validate_policy(policy, ALLOWLIST)

    assert len(problems) == 1
    assert "(90000 characters)" in problems[0]
    assert len(problems[0]) < 300


class FailingEvaluator(ConditionEvaluator):
    """Raise for the rule named "boom", as a bug or bad input in a condition would."""

    def evaluate(
        self,
        rule_name: str,
        condition: remediation_pb2.Condition,
        readings: Readings,
        now: datetime,
        monotonic: float,
        live: bool = False,
    ) -> ConditionResult:
        if rule_name == "boom":
            raise ValueError("embedded null byte")
        return super().evaluate(rule_name, condition, readings, now, monotonic, live)


BOOM_RULE = """
[[rules]]
name = "boom"
condition.free_space_below = { mount_point = "/", ratio = 0.5 }
action.clear_cache = { cache_sets = ["thumbnails"] }
"""


def test_rule_error_isolated(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
) -> None:
    (systemctl / "after_restart").write_text(ACTIVE_STATE)
    harness = harness_factory(BOOM_RULE + restart_policy())
    harness.engine.evaluator = FailingEvaluator(
        services=harness.engine.evaluator.services
    )

    records = harness.engine.evaluate()

    assert [(r.rule, r.outcome) for r in records] == [
        ("boom", Outcome.REMEDIATION_OUTCOME_FAILED),
        ("restart-cups", Outcome.REMEDIATION_OUTCOME_SUCCEEDED),
    ]
    assert records[0].reason == (
        "evaluating the rule failed: ValueError: embedded null byte"
    )
    assert harness.spooled() == records
    saved = json.loads((harness.state_dir / STATE_FILE).read_text())
    assert len(saved["rules"]["restart-cups"]["runs"]) == 1


# -- durations and times out of range ------------------------------------------------


@pytest.mark.parametrize(
    ("action", "field"),
    [
        ("restart_service", "settle"),
        ("restart_service", "failure_window"),
        ("throttle_process", "restore_after"),
    ],
)
def test_huge_duration_rejected(action: str, field: str) -> None:
    policy = remediation_pb2.Policy()
    rule = policy.rules.add(name="r1")
    rule.condition.service_not_running.service = "cups.service"
    params = getattr(rule.action, action)
    if action == "restart_service":
        params.service = "cups.service"
    else:
        params.app_id = "firefox"
    getattr(params, field).seconds = 2**62

    problems = validate_policy(policy, ALLOWLIST)

    assert problems == [
        f"rule 'r1': action: {action}: {field} has {2**62} seconds, outside the "
        "Duration range of +-315576000000"
    ]


def test_huge_cooldown_rejected() -> None:
    policy = remediation_pb2.Policy()
    rule = policy.rules.add(name="r1")
    rule.condition.service_not_running.service = "cups.service"
    rule.action.restart_service.service = "cups.service"
    rule.limits.cooldown.seconds = 2**62
    rule.limits.cooldown.nanos = 5

    problems = validate_policy(policy, ALLOWLIST)

    assert len(problems) == 1
    assert "limits.cooldown has 4611686018427387904 seconds" in problems[0]


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [
        (2**40, 0, f"expire_time has {2**40} seconds, outside the Timestamp range"),
        (253402300800, 0, "expire_time has 253402300800 seconds, outside"),
        (int(START.timestamp()) + 3600, -5, "expire_time has -5 nanos"),
    ],
)
def test_bad_expire_time_refused(
    harness_factory: HarnessFactory,  # noqa: F811
    systemctl: Path,  # noqa: F811
    seconds: int,
    nanos: int,
    expected: str,
) -> None:
    harness = harness_factory(restart_policy())
    message = command("c-time")
    message.expire_time.seconds = seconds
    message.expire_time.nanos = nanos

    record = harness.engine.run_command(message)

    assert record.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert expected in record.reason
    assert harness.spooled() == [record]
    assert restarts(systemctl) == 0


# -- notices and links shown to the user ---------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pw@password.example.com/change",
        "https://user@password.example.com/change",
    ],
)
def test_url_with_userinfo_rejected(url: str) -> None:
    params = remediation_pb2.PromptPasswordChange(self_service_url=url)

    problems = validate_url(params, ALLOWLIST)

    assert problems == [
        "self_service_url contains a user name or password before the host "
        "(user:password@); remove it"
    ]


@pytest.mark.parametrize(
    "char", ["\u2028", "\u2029", "\u202a", "\u202e", "\u2066", "\u2069"]
)
@pytest.mark.parametrize("field", ["title", "body"])
def test_notice_layout_characters_rejected(char: str, field: str) -> None:
    params = remediation_pb2.Notify(title="Disk full", body="Free some space.")
    setattr(params, field, f"abc{char}def")

    problems = validate_notify(params, ALLOWLIST)

    assert len(problems) == 1
    assert problems[0].startswith(f"{field} contains a line or paragraph separator")


def test_notice_plain_unicode_accepted() -> None:
    params = remediation_pb2.Notify(title="Speicher fast voll", body="Bitte löschen ✓")

    assert validate_notify(params, ALLOWLIST) == []
