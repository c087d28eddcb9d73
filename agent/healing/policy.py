"""Self-healing policies: parse TOML, validate every rule, keep the applied one.

A policy's TOML keys are the field names of fleetmend.v1.Policy; durations
are protobuf JSON strings such as "3600s". The agent runs the collector's
latest valid policy, stored in ``<state dir>/policy.pb``, or else its default
policy (agent/healing/default_policy.toml, or the file named by the
``healing.policy_file`` setting). A collector policy with one invalid rule is
rejected as a whole and the previous policy stays in force. A valid rule that
names a service or cache set outside the laptop's allowlist does not reject
its policy: the rule is refused on this laptop, and the engine never runs it.
"""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath

from google.protobuf import duration_pb2, json_format
from google.protobuf.message import DecodeError

from agent.healing.actions import validate_action
from agent.healing.actions.base import (
    LocalAllowlist,
    allowlist_refusal_text,
)
from agent.healing.bounds import (
    MAX_LOG_CHARS,
    MAX_NAME,
    MAX_PATH,
    MAX_REASON_CHARS,
    MAX_RULES,
    SERVICE_NAME,
    SERVICE_NAME_TEXT,
    check_duration_range,
    check_text,
    quote,
    truncate,
)
from agent.state import write_private
from agent.text import count_text
from fleetmend.v1 import remediation_pb2, report_pb2

log = logging.getLogger(__name__)

POLICY_FILE = "policy.pb"

RULE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
# The collector lists the records of operator commands under this rule name,
# so a rule may not use it.
COMMAND_RULE_NAME = "command"

DAY_SECONDS = 86_400
# Upper bounds of durations, so that a typing error such as "36000000s" is
# caught instead of silencing a rule for a year.
MAX_COOLDOWN_SECONDS = 30 * DAY_SECONDS
MAX_SUSTAINED_SECONDS = DAY_SECONDS
MAX_EXPIRY_WINDOW_SECONDS = 366 * DAY_SECONDS
MAX_RUNS_PER_DAY = 1440
# process_cpu_above counts percent of one CPU, so a busy process on a
# many-core machine can pass 100; 1000 is ten cores' worth.
MAX_CPU_PERCENT = 1000.0

# CredentialExpiringWithin.kind values: CredentialKind names without prefix.
CREDENTIAL_KINDS = frozenset(
    name.removeprefix("CREDENTIAL_KIND_").lower()
    for name in report_pb2.CredentialKind.keys()  # noqa: SIM118 - an enum wrapper
    if name != "CREDENTIAL_KIND_UNSPECIFIED"
)


class PolicyError(ValueError):
    """A policy that cannot be parsed; the message names the file, rule and field."""


def policy_name(policy: remediation_pb2.Policy) -> str:
    """Return how messages name a policy: "fleet policy version 2 (generation N)".

    Operators know a collector policy by its fleet_version; the generation is
    Policy.version, which acks, records and PolicyStatus carry. A policy from a
    collector that sets no fleet_version is named by its generation only.
    """
    return version_name(policy.fleet_version, policy.version)


def version_name(fleet_version: int, generation: int) -> str:
    """Return the name of a policy from its fleet version and generation."""
    if fleet_version:
        return f"fleet policy version {fleet_version} (generation {generation})"
    if generation:
        return f"policy generation {generation}"
    return "the local policy"


def duration_seconds(duration: duration_pb2.Duration) -> float:
    """Return a protobuf Duration in seconds."""
    return duration.seconds + duration.nanos / 1e9


def policy_from_toml(text: str, source: str) -> remediation_pb2.Policy:
    """Parse a policy from TOML text; source names it in errors.

    Each rule is parsed on its own so that an error names the rule (by name,
    or by position when it has none) and the field.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy {source} is not valid TOML: {exc}") from exc
    rules = data.pop("rules", [])
    if not isinstance(rules, list):
        raise PolicyError(
            f"policy {source}: rules must be an array of tables ([[rules]]), "
            f"got {type(rules).__name__}"
        )
    policy = remediation_pb2.Policy()
    try:
        json_format.ParseDict(data, policy)
    except json_format.ParseError as exc:
        raise PolicyError(f"policy {source}: {exc}") from exc
    for index, entry in enumerate(rules):
        label = f"rule {index + 1}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label = f"rule {entry['name']!r}"
        if not isinstance(entry, dict):
            raise PolicyError(f"policy {source}: {label} is not a table")
        try:
            json_format.ParseDict(entry, policy.rules.add())
        except json_format.ParseError as exc:
            raise PolicyError(f"policy {source}: {label}: {exc}") from exc
    return policy


def default_policy_text() -> str:
    """Return the text of the default policy that ships with the agent."""
    return (
        resources.files("agent.healing")
        .joinpath("default_policy.toml")
        .read_text(encoding="utf-8")
    )


def load_local_policy(policy_file: Path | None) -> remediation_pb2.Policy:
    """Parse the local policy: policy_file when set, else the shipped default."""
    if policy_file is None:
        return policy_from_toml(default_policy_text(), "default_policy.toml")
    try:
        text = policy_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            f"policy file {policy_file} cannot be read: {exc.strerror}; fix "
            "healing.policy_file"
        ) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy file {policy_file} is not UTF-8 text") from exc
    return policy_from_toml(text, str(policy_file))


# -- validation ------------------------------------------------------------------


def _check_duration(
    problems: list[str], field: str, duration: duration_pb2.Duration, maximum: float
) -> None:
    out_of_range = check_duration_range(field, duration)
    if out_of_range:
        problems += out_of_range
        return
    seconds = duration_seconds(duration)
    if seconds < 0:
        problems.append(f"{field} is negative ({seconds:.10g} s); use 0s or more")
    elif seconds > maximum:
        problems.append(
            f"{field} is {seconds:.10g} s, more than the maximum {maximum:.10g} s"
        )


def _check_ratio(problems: list[str], field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        problems.append(f"{field} is {value:g}; expected a ratio from 0 to 1")


def _is_absolute_path(text: str) -> bool:
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()


def validate_condition(condition: remediation_pb2.Condition) -> list[str]:
    """Return what is wrong with a condition; empty when it is valid."""
    kind = condition.WhichOneof("kind")
    problems: list[str] = []
    if kind is None:
        return ["condition: no condition set"]
    if kind == "free_space_below":
        free = condition.free_space_below
        bad_text = check_text(
            "free_space_below.mount_point", free.mount_point, MAX_PATH
        )
        if bad_text:
            problems += bad_text
        elif not _is_absolute_path(free.mount_point):
            problems.append(
                f"free_space_below.mount_point {quote(free.mount_point)} is not an "
                'absolute path such as "/" or "C:\\\\"'
            )
        _check_ratio(problems, "free_space_below.ratio", free.ratio)
        if free.ratio == 0 and free.bytes == 0:
            problems.append("free_space_below needs ratio or bytes above 0")
    elif kind == "service_not_running":
        service = condition.service_not_running.service
        if not SERVICE_NAME.fullmatch(service):
            problems.append(
                f"service_not_running.service {quote(service)} is not a service name "
                f"({SERVICE_NAME_TEXT})"
            )
    elif kind == "process_cpu_above":
        cpu = condition.process_cpu_above
        if not cpu.app_id:
            problems.append("process_cpu_above.app_id is empty; name a catalog app")
        problems += check_text("process_cpu_above.app_id", cpu.app_id, MAX_NAME)
        if not 0.0 < cpu.percent <= MAX_CPU_PERCENT:
            problems.append(
                f"process_cpu_above.percent is {cpu.percent:g}; expected above 0 "
                f"and at most {MAX_CPU_PERCENT:g}"
            )
        _check_duration(
            problems,
            "process_cpu_above.sustained",
            cpu.sustained,
            MAX_SUSTAINED_SECONDS,
        )
    elif kind == "credential_expiring_within":
        expiring = condition.credential_expiring_within
        _check_duration(
            problems,
            "credential_expiring_within.within",
            expiring.within,
            MAX_EXPIRY_WINDOW_SECONDS,
        )
        if expiring.kind and expiring.kind not in CREDENTIAL_KINDS:
            problems.append(
                f"credential_expiring_within.kind {quote(expiring.kind)} is not one of "
                f"{', '.join(sorted(CREDENTIAL_KINDS))} (or empty for any)"
            )
    elif kind == "battery_health_below":
        ratio = condition.battery_health_below.ratio
        _check_ratio(problems, "battery_health_below.ratio", ratio)
        if ratio == 0:
            problems.append("battery_health_below.ratio is 0, so it never holds")
    return [f"condition: {problem}" for problem in problems]


def validate_limits(limits: remediation_pb2.RuleLimits) -> list[str]:
    """Return what is wrong with a rule's limits; empty when they are valid."""
    problems: list[str] = []
    _check_duration(problems, "limits.cooldown", limits.cooldown, MAX_COOLDOWN_SECONDS)
    if limits.max_runs_per_day > MAX_RUNS_PER_DAY:
        problems.append(
            f"limits.max_runs_per_day is {limits.max_runs_per_day}, more than "
            f"the maximum {MAX_RUNS_PER_DAY}"
        )
    for index, span in enumerate(limits.quiet_hours):
        field = f"limits.quiet_hours[{index}]"
        for name, hour in (
            ("start_hour", span.start_hour),
            ("end_hour", span.end_hour),
        ):
            if hour > 23:
                problems.append(
                    f"{field}.{name} is {hour}; expected an hour from 0 to 23"
                )
        if span.start_hour == span.end_hour:
            problems.append(
                f"{field} starts and ends at hour {span.start_hour}, an empty span; "
                "remove it or set different hours"
            )
    return problems


def validate_rule(rule: remediation_pb2.Rule, allowlist: LocalAllowlist) -> list[str]:
    """Return what is wrong with one rule, each problem without the rule's name."""
    problems: list[str] = []
    if rule.name == COMMAND_RULE_NAME:
        problems.append(
            f"name {quote(rule.name)} is reserved, because the collector lists "
            "the records of operator commands under it; give the rule another name"
        )
    problems += validate_condition(rule.condition)
    if rule.HasField("action"):
        problems += [f"action: {p}" for p in validate_action(rule.action, allowlist)]
    else:
        problems.append("action: no action set")
    problems += validate_limits(rule.limits)
    return problems


def allowlist_of(action: remediation_pb2.Action) -> LocalAllowlist:
    """Return the allowlist that permits what action names, for a structural check.

    Validating against it finds every problem except a service or cache set
    that the laptop's own allowlist leaves out. Its empty cache_sets permits
    every known cache set, so an unknown one is still a problem.
    """
    if action.WhichOneof("kind") == "restart_service":
        return LocalAllowlist(services=frozenset({action.restart_service.service}))
    return LocalAllowlist()


def allowlist_refusal(rule: remediation_pb2.Rule, allowlist: LocalAllowlist) -> str:
    """Return why the device's allowlist keeps a valid rule from running, or "".

    The rule must pass validate_rule against allowlist_of(rule.action).
    """
    refusal = action_allowlist_refusal(rule.action, allowlist, "this rule")
    if refusal:
        return refusal
    # An allowlist check that an action gains later, and that
    # action_allowlist_refusal does not know, still keeps the rule from running.
    problems = validate_rule(rule, allowlist)
    if problems:
        return _unknown_allowlist_refusal(problems)
    return ""


def action_allowlist_refusal(
    action: remediation_pb2.Action, allowlist: LocalAllowlist, subject: str
) -> str:
    """Return why the device's allowlist keeps a valid action from running, or "".

    subject names what the fix lets run, such as "this rule" or "this command".
    The action must pass validate_action against allowlist_of(action).
    """
    kind = action.WhichOneof("kind")
    if kind == "restart_service":
        service = action.restart_service.service
        if service not in allowlist.services:
            return allowlist_refusal_text(
                "service", [service], "healing.services", allowlist.services, subject
            )
    elif kind == "clear_cache" and allowlist.cache_sets:
        outside = [
            name
            for name in action.clear_cache.cache_sets
            if name not in allowlist.cache_sets
        ]
        if outside:
            return allowlist_refusal_text(
                "cache set",
                outside,
                "healing.cache_sets",
                allowlist.cache_sets,
                subject,
            )
    return ""


def _unknown_allowlist_refusal(problems: list[str]) -> str:
    return "not allowed by the healing settings in this device's agent.toml: " + (
        "; ".join(problems)
    )


def command_refusal(action: remediation_pb2.Action, allowlist: LocalAllowlist) -> str:
    """Return why the device does not run an operator command's action, or "".

    Invalid parameters start with "invalid command:", and an action that the
    allowlist does not permit is worded as a refused rule is.
    """
    problems = validate_action(action, allowlist_of(action))
    if problems:
        return "invalid command: " + "; ".join(problems)
    refusal = action_allowlist_refusal(action, allowlist, "this command")
    if refusal:
        return refusal
    problems = validate_action(action, allowlist)
    if problems:
        return _unknown_allowlist_refusal(problems)
    return ""


@dataclass(frozen=True)
class PolicyCheck:
    """The result of checking a policy against the laptop's allowlist."""

    # Problems that reject the whole policy, as "rule NAME: field: problem".
    problems: list[str] = field(default_factory=list)
    # Name of each valid rule that the allowlist keeps from running -> the
    # reason. The other rules run.
    refused: dict[str, str] = field(default_factory=dict)


def check_policy(
    policy: remediation_pb2.Policy, allowlist: LocalAllowlist
) -> PolicyCheck:
    """Find the problems that reject a policy and the rules that this laptop refuses.

    Rules are refused only when the policy has no problem, because a rejected
    policy does not apply at all.
    """
    problems = _policy_problems(policy, lambda rule: allowlist_of(rule.action))
    if problems:
        return PolicyCheck(problems=problems)
    refused: dict[str, str] = {}
    for rule in policy.rules:
        reason = allowlist_refusal(rule, allowlist)
        if reason:
            refused[rule.name] = truncate(reason, MAX_REASON_CHARS)
    return PolicyCheck(refused=refused)


def validate_policy(
    policy: remediation_pb2.Policy, allowlist: LocalAllowlist
) -> list[str]:
    """Return each problem of a policy as "rule NAME: field: problem".

    A rule outside allowlist is a problem here. This is the check for a local
    policy, which must fit the laptop's allowlist as a whole. A collector
    policy goes through check_policy.
    """
    return _policy_problems(policy, lambda rule: allowlist)


def _policy_problems(
    policy: remediation_pb2.Policy,
    allowlist_for: Callable[[remediation_pb2.Rule], LocalAllowlist],
) -> list[str]:
    """Return each problem of a policy, rule by rule against allowlist_for(rule)."""
    if len(policy.rules) > MAX_RULES:
        # Each rule is evaluated on every tick, and the problems of thousands
        # of rules would only be truncated.
        return [
            f"policy has {len(policy.rules)} rules, more than the maximum "
            f"{MAX_RULES}; split the work over fewer, broader rules"
        ]
    problems: list[str] = []
    seen: set[str] = set()
    for index, rule in enumerate(policy.rules):
        label = f"rule {quote(rule.name)}" if rule.name else f"rule {index + 1}"
        if not RULE_NAME.fullmatch(rule.name):
            problems.append(f'{label}: name must be 1 to 64 of a-z, 0-9, "_" and "-"')
        elif rule.name in seen:
            problems.append(f"{label}: name is used by an earlier rule")
        seen.add(rule.name)
        problems += [f"{label}: {p}" for p in validate_rule(rule, allowlist_for(rule))]
    return problems


# -- the applied policy ----------------------------------------------------------


class PolicyStore:
    """The policy in force: the applied collector policy, or the local default.

    The collector's policy is kept in ``<state dir>/policy.pb`` (0600, replaced
    atomically) so that the rules keep running offline and after a restart.
    The rules of the policy in force that the allowlist refuses are found
    again at every load, because the allowlist may have changed since. Methods
    are thread-safe.
    """

    def __init__(
        self,
        state_dir: Path,
        local_policy: remediation_pb2.Policy,
        allowlist: LocalAllowlist,
    ) -> None:
        """Load the stored collector policy, or use local_policy if none is valid."""
        self.path = state_dir / POLICY_FILE
        self._allowlist = allowlist
        self._local = local_policy
        self._lock = threading.Lock()
        stored = self._load_stored()
        if stored is None:
            # agent.runtime.local_policy leaves out or rejects the rules
            # outside the allowlist, so from there no rule is refused.
            self._policy = local_policy
            self._refused = check_policy(local_policy, allowlist).refused
        else:
            self._policy, self._refused = stored
        self._status = _status(self._policy, self._refused)

    def _load_stored(self) -> tuple[remediation_pb2.Policy, dict[str, str]] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error(
                "stored policy %s cannot be read: %s; using the default",
                self.path,
                exc.strerror,
            )
            return None
        try:
            policy = remediation_pb2.Policy.FromString(data)
        except DecodeError as exc:
            log.error(
                "stored policy %s is damaged (%s); using the default", self.path, exc
            )
            return None
        check = check_policy(policy, self._allowlist)
        if check.problems:
            log.error(
                "stored policy %s (%s) is no longer valid here: %s; using "
                "the default until the collector sends a new one",
                self.path,
                policy_name(policy),
                truncate("; ".join(check.problems), MAX_LOG_CHARS),
            )
            return None
        # The refused rules are logged by the engine when it runs the rules,
        # so that a read-only preview logs nothing about them.
        return policy, check.refused

    @property
    def policy(self) -> remediation_pb2.Policy:
        """The policy in force (a copy)."""
        return self.in_force()[0]

    @property
    def refused(self) -> dict[str, str]:
        """The rules in force that this laptop refuses: name -> reason (a copy)."""
        return self.in_force()[1]

    def in_force(self) -> tuple[remediation_pb2.Policy, dict[str, str]]:
        """Return copies of the policy in force and its refused rules, read at once."""
        with self._lock:
            copy = remediation_pb2.Policy()
            copy.CopyFrom(self._policy)
            return copy, dict(self._refused)

    @property
    def status(self) -> remediation_pb2.PolicyStatus:
        """The applied version, refused rules and last rejection, for reports."""
        with self._lock:
            copy = remediation_pb2.PolicyStatus()
            copy.CopyFrom(self._status)
            return copy

    @property
    def applied_version(self) -> int:
        with self._lock:
            return self._status.applied_version

    def apply(self, policy: remediation_pb2.Policy) -> list[str]:
        """Validate and apply a collector policy; return the problems if it is rejected.

        A rejected policy leaves the one in force unchanged and is recorded in
        the status with the reason. An applied policy may have rules that this
        laptop refuses; the status names them.
        """
        check = check_policy(policy, self._allowlist)
        with self._lock:
            if check.problems:
                self._status.rejected_version = policy.version
                self._status.rejected_fleet_version = policy.fleet_version
                self._status.rejected_reason = truncate(
                    "; ".join(check.problems), MAX_REASON_CHARS
                )
                log.error(
                    "rejected %s from the collector: %s",
                    policy_name(policy),
                    truncate(self._status.rejected_reason, MAX_LOG_CHARS),
                )
                return check.problems
            write_private(self.path, policy.SerializeToString(deterministic=True))
            self._policy = remediation_pb2.Policy()
            self._policy.CopyFrom(policy)
            self._refused = check.refused
            self._status = _status(policy, check.refused)
        rules = count_text(len(policy.rules), "rule")
        if check.refused:
            verb = "is" if len(check.refused) == 1 else "are"
            rules += f", of which {len(check.refused)} {verb} refused on this device"
        log.info("applied %s from the collector: %s", policy_name(policy), rules)
        return []


def _status(
    policy: remediation_pb2.Policy, refused: dict[str, str]
) -> remediation_pb2.PolicyStatus:
    status = remediation_pb2.PolicyStatus(
        applied_version=policy.version, applied_fleet_version=policy.fleet_version
    )
    for name, reason in refused.items():
        status.refused_rules.add(rule_name=name, reason=reason)
    return status


def log_refused(policy: remediation_pb2.Policy, refused: dict[str, str]) -> None:
    """Log the rules of policy that this device refuses, as one warning."""
    if not refused:
        return
    verbs = ("is", "does") if len(refused) == 1 else ("are", "do")
    log.warning(
        "%s: %s %s refused on this device and %s not run: %s",
        policy_name(policy),
        count_text(len(refused), "rule"),
        *verbs,
        truncate(
            "; ".join(f"{name}: {reason}" for name, reason in refused.items()),
            MAX_LOG_CHARS,
        ),
    )
