"""Policy and command delivery and the fleet limits, through a real collector.

Agents are raw gRPC clients on 127.0.0.1; operators call OpsService with
tokens created in the same database.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from collector import fleet
from collector._limits import FleetLimitsWorker
from collector.server import ServerHandle, start_server_thread
from collector.store import IncomingReport, RuleStats, Store
from fleetmend.v1 import agent_pb2, ops_pb2, ops_pb2_grpc, remediation_pb2
from tests.collector.test_server import (
    OPEN_ENROLLMENT,
    T0,
    AgentClient,
    Clock,
    Conversation,
    Enroller,
    new_device_id,
    ops_stub,
    report,
)
from tests.trust import create_token

SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
FAILED = remediation_pb2.REMEDIATION_OUTCOME_FAILED


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def server(database_url: str, tls_dir: Path, clock: Clock) -> Iterator[ServerHandle]:
    handle = start_server_thread(
        database_url,
        tls_dir=tls_dir,
        insecure=True,
        clock=clock,
        settings=OPEN_ENROLLMENT,
    )
    yield handle
    handle.stop()


@pytest.fixture
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture
def agents(channel: grpc.Channel, server: ServerHandle, tls_dir: Path) -> AgentClient:
    return AgentClient(channel, Enroller(server.address, tls_dir))


@pytest.fixture
def admin(
    channel: grpc.Channel, server: ServerHandle, database_url: str
) -> ops_pb2_grpc.OpsServiceStub:
    return ops_stub(channel, create_token(database_url, "admin"))


@pytest.fixture
def reader(server: ServerHandle, database_url: str) -> Iterator[Store]:
    store = Store.open(database_url)
    yield store
    store.close()


def notify_rule(name: str, **limits: float) -> remediation_pb2.Rule:
    rule = remediation_pb2.Rule(name=name)
    rule.condition.free_space_below.mount_point = "/"
    rule.condition.free_space_below.ratio = 0.1
    rule.action.notify.title = "Disk almost full"
    rule.action.notify.body = "Free some space on the system disk."
    rule.fleet.CopyFrom(remediation_pb2.FleetLimits(**limits))  # type: ignore[arg-type]
    return rule


def set_policy(
    admin: ops_pb2_grpc.OpsServiceStub, clock: Clock, *rules: remediation_pb2.Rule
) -> int:
    # Each change gets a later time, as on a real clock, so that the effective
    # policy's version grows with it.
    clock.now += timedelta(minutes=1)
    request = ops_pb2.SetPolicyRequest(policy=remediation_pb2.Policy(rules=rules))
    return admin.SetPolicy(request, timeout=10).version


def send_command(
    admin: ops_pb2_grpc.OpsServiceStub,
    device_id: str,
    ttl: timedelta = timedelta(hours=24),
) -> ops_pb2.CommandStatus:
    action = remediation_pb2.Action(
        notify=remediation_pb2.Notify(title="Restart today", body="Updates wait.")
    )
    request = ops_pb2.SendCommandRequest(
        action=action,
        device_ids=[device_id],
        time_to_live=duration_pb2.Duration(seconds=int(ttl.total_seconds())),
    )
    response = admin.SendCommand(request, timeout=10)
    assert len(response.commands) == 1
    return response.commands[0]


def hello(device_id: str, policy_version: int = 0) -> agent_pb2.ConnectRequest:
    return agent_pb2.ConnectRequest(
        hello=agent_pb2.Hello(
            device_id=device_id, agent_version="0.1.0", policy_version=policy_version
        )
    )


def outcome_report(
    sequence: int,
    outcome: int,
    clock: Clock,
    *,
    rule: str = "",
    command_id: str = "",
    policy_version: int = 0,
) -> agent_pb2.ConnectRequest:
    record = remediation_pb2.RemediationRecord(
        rule=rule,
        command_id=command_id,
        policy_version=policy_version,
        outcome=outcome,  # type: ignore[arg-type]
        reason="" if outcome == SUCCEEDED else "verification failed",
    )
    record.action.notify.title = "Disk almost full"
    record.start_time.FromDatetime(clock.now)
    record.duration.FromMilliseconds(40)
    return report(sequence, remediations=[record])


def kinds(responses: list[agent_pb2.ConnectResponse]) -> list[str]:
    return [response.WhichOneof("message") or "" for response in responses]


class Agent:
    """One device's Connect stream, read one response at a time.

    Responses that arrive while the test waits for something else are kept,
    because a pushed policy may come before or after the ack of the report
    that caused it.
    """

    def __init__(
        self, agents: AgentClient, device_id: str, policy_version: int = 0
    ) -> None:
        self.device_id = device_id
        self.conversation = Conversation(agents)
        self.conversation.send(hello(device_id, policy_version))
        first = self.conversation.receive()
        assert first.WhichOneof("message") == "welcome"
        self.kept: list[agent_pb2.ConnectResponse] = []

    def next_of(self, kind: str) -> agent_pb2.ConnectResponse:
        """Return the next response of kind, skipping acks."""
        while self.kept:
            response = self.kept.pop(0)
            if response.WhichOneof("message") == kind:
                return response
        while True:
            response = self.conversation.receive()
            found = response.WhichOneof("message")
            if found == kind:
                return response
            assert found == "ack", f"expected {kind} or ack, got {response}"

    def ack_of(self, request: agent_pb2.ConnectRequest) -> list[str]:
        """Send a report and wait for its ack; return the kinds received since."""
        self.conversation.send(request)
        seen = []
        while True:
            response = self.conversation.receive()
            seen.append(response.WhichOneof("message") or "")
            if not response.HasField("ack"):
                self.kept.append(response)
            elif request.report.sequence in response.ack.sequences:
                return seen

    def close(self) -> list[agent_pb2.ConnectResponse]:
        """End the stream; return the responses not yet read, kept ones first."""
        self.conversation.close()
        return [*self.kept, *self.conversation.responses]


def enrolled(agents: AgentClient) -> str:
    device_id = new_device_id()
    agents.enroller.key(device_id)
    return device_id


# Policy delivery


def test_policy_sent_after_welcome(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub, clock: Clock
) -> None:
    set_policy(admin, clock, notify_rule("disk-notice"))
    agent = Agent(agents, new_device_id())
    policy = agent.conversation.receive()
    assert policy.WhichOneof("message") == "policy"
    assert [rule.name for rule in policy.policy.rules] == ["disk-notice"]
    assert policy.policy.version > 0
    assert not policy.policy.rules[0].paused
    agent.close()


def test_policy_not_sent_when_version_equal(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub, clock: Clock
) -> None:
    set_policy(admin, clock, notify_rule("disk-notice"))
    device_id = new_device_id()
    first = Agent(agents, device_id)
    version = first.next_of("policy").policy.version
    first.close()

    again = Agent(agents, device_id, policy_version=version)
    assert again.ack_of(report(1)) == ["ack"]
    assert "policy" not in kinds(again.close())


def test_policy_sent_when_version_older(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub, clock: Clock
) -> None:
    set_policy(admin, clock, notify_rule("disk-notice"))
    device_id = new_device_id()
    first = Agent(agents, device_id)
    version = first.next_of("policy").policy.version
    first.close()

    set_policy(admin, clock, notify_rule("disk-notice"), notify_rule("second"))
    again = Agent(agents, device_id, policy_version=version)
    policy = again.next_of("policy").policy
    assert policy.version > version
    assert [rule.name for rule in policy.rules] == ["disk-notice", "second"]
    again.close()


def test_no_policy_before_first_set(agents: AgentClient) -> None:
    agent = Agent(agents, new_device_id())
    assert agent.ack_of(report(1)) == ["ack"]
    assert "policy" not in kinds(agent.close())


def test_policy_pushed_on_change(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub, clock: Clock
) -> None:
    set_policy(admin, clock, notify_rule("disk-notice"))
    first = Agent(agents, new_device_id())
    second = Agent(agents, new_device_id())
    old_version = first.next_of("policy").policy.version
    assert second.next_of("policy").policy.version == old_version

    set_policy(admin, clock, notify_rule("disk-notice"), notify_rule("second"))
    for agent in (first, second):
        pushed = agent.next_of("policy").policy
        assert pushed.version > old_version
        assert [rule.name for rule in pushed.rules] == ["disk-notice", "second"]
    first.close()
    second.close()


def test_pushed_policy_after_pause(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub, clock: Clock
) -> None:
    set_policy(admin, clock, notify_rule("disk-notice"))
    agent = Agent(agents, new_device_id())
    agent.next_of("policy")

    clock.now += timedelta(minutes=1)
    admin.ChangeRuleState(
        ops_pb2.ChangeRuleStateRequest(
            name="disk-notice", change=ops_pb2.RULE_CHANGE_PAUSE, reason="too noisy"
        ),
        timeout=10,
    )
    pushed = agent.next_of("policy").policy
    assert pushed.rules[0].paused
    assert "too noisy" in pushed.rules[0].paused_reason
    agent.close()


# Command delivery


def test_command_delivered_on_connect(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub
) -> None:
    device_id = enrolled(agents)
    status = send_command(admin, device_id)
    assert not status.sent

    agent = Agent(agents, device_id)
    command = agent.next_of("command").command
    assert command.command_id == status.command_id
    assert command.action.notify.title == "Restart today"
    assert command.expire_time == status.expire_time
    agent.close()


def test_command_delivered_at_creation(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub
) -> None:
    device_id = enrolled(agents)
    agent = Agent(agents, device_id)
    assert agent.ack_of(report(1)) == ["ack"]

    status = send_command(admin, device_id)
    assert status.sent
    command = agent.next_of("command").command
    assert command.command_id == status.command_id
    assert "command" not in kinds(agent.close())


def test_command_not_sent_after_done(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    device_id = enrolled(agents)
    status = send_command(admin, device_id)
    agent = Agent(agents, device_id)
    command_id = agent.next_of("command").command.command_id
    agent.ack_of(outcome_report(1, SUCCEEDED, clock, command_id=command_id))
    agent.close()
    stored = reader.get_command(command_id)
    assert stored is not None
    assert stored.done_time is not None

    again = Agent(agents, device_id)
    assert again.ack_of(report(2)) == ["ack"]
    assert "command" not in kinds(again.close())
    assert status.command_id == command_id


def test_command_not_sent_after_expiry(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub, clock: Clock
) -> None:
    device_id = enrolled(agents)
    send_command(admin, device_id, ttl=timedelta(hours=1))
    clock.now += timedelta(hours=2)

    agent = Agent(agents, device_id)
    assert agent.ack_of(report(1)) == ["ack"]
    assert "command" not in kinds(agent.close())


def test_command_for_other_device_not_sent(
    agents: AgentClient, admin: ops_pb2_grpc.OpsServiceStub
) -> None:
    bystander = Agent(agents, enrolled(agents))
    target = enrolled(agents)
    assert not send_command(admin, target).sent
    assert bystander.ack_of(report(1)) == ["ack"]
    assert "command" not in kinds(bystander.close())


# Fleet limits


def test_breaker_trips_failing_rule(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    rule = notify_rule("flaky", breaker_window=4, max_failure_ratio=0.5)
    set_policy(admin, clock, rule)
    watcher = Agent(agents, new_device_id())
    assert not watcher.next_of("policy").policy.rules[0].paused

    failing = Agent(agents, new_device_id())
    version = failing.next_of("policy").policy.version
    clock.now += timedelta(minutes=1)
    for sequence in range(1, 4):
        failing.ack_of(
            outcome_report(
                sequence, FAILED, clock, rule="flaky", policy_version=version
            )
        )

    for agent in (watcher, failing):
        pushed = agent.next_of("policy").policy
        assert pushed.version > version
        assert pushed.rules[0].paused
        assert pushed.rules[0].paused_reason == (
            "circuit breaker: 3 of the last 4 runs failed, more than 50%"
        )
    state = reader.rule_states()["flaky"]
    assert state.stage == fleet.PAUSED
    assert state.changed_by == fleet.FLEET_LIMITS_ACTOR
    watcher.close()
    failing.close()


def test_breaker_holds_below_threshold(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    rule = notify_rule("steady", breaker_window=4, max_failure_ratio=0.5)
    set_policy(admin, clock, rule)
    agent = Agent(agents, new_device_id())
    agent.next_of("policy")
    outcomes = [FAILED, SUCCEEDED, FAILED, SUCCEEDED]
    for sequence, outcome in enumerate(outcomes, start=1):
        assert agent.ack_of(
            outcome_report(sequence, outcome, clock, rule="steady")
        ) == ["ack"]
    assert "policy" not in kinds(agent.close())
    assert reader.rule_states()["steady"].stage == fleet.ACTIVE


def split_by_canary(rule_name: str, percent: int) -> tuple[str, str]:
    """Return a device id inside the rule's canary set and one outside it."""
    inside = outside = ""
    while not (inside and outside):
        device_id = str(uuid.uuid4())
        if fleet.in_canary(device_id, rule_name, percent):
            inside = inside or device_id
        else:
            outside = outside or device_id
    return inside, outside


def test_canary_promoted_reaches_every_device(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    rule = notify_rule(
        "gradual", canary_percent=50, promote_after_runs=3, max_failure_ratio=0.4
    )
    set_policy(admin, clock, rule)
    assert reader.rule_states()["gradual"].stage == fleet.CANARY
    inside_id, outside_id = split_by_canary("gradual", 50)

    outside = Agent(agents, outside_id)
    held_back = outside.next_of("policy").policy
    assert held_back.rules[0].paused
    assert held_back.rules[0].paused_reason == "canary: not in the first 50%"

    inside = Agent(agents, inside_id)
    canary = inside.next_of("policy").policy
    assert not canary.rules[0].paused
    clock.now += timedelta(minutes=1)
    for sequence in range(1, 4):
        inside.ack_of(outcome_report(sequence, SUCCEEDED, clock, rule="gradual"))

    for agent in (outside, inside):
        promoted = agent.next_of("policy").policy
        assert not promoted.rules[0].paused
        assert promoted.version > canary.version
    state = reader.rule_states()["gradual"]
    assert state.stage == fleet.ACTIVE
    assert state.reason.startswith("promoted after 3 canary runs")

    late = Agent(agents, split_by_canary("gradual", 50)[1])
    assert not late.next_of("policy").policy.rules[0].paused
    for agent in (outside, inside, late):
        agent.close()


def test_canary_not_promoted_while_failing(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    rule = notify_rule(
        "gradual", canary_percent=50, promote_after_runs=3, max_failure_ratio=0.4
    )
    set_policy(admin, clock, rule)
    inside_id, _ = split_by_canary("gradual", 50)
    inside = Agent(agents, inside_id)
    inside.next_of("policy")
    outcomes = [SUCCEEDED, FAILED, FAILED]
    for sequence, outcome in enumerate(outcomes, start=1):
        assert inside.ack_of(
            outcome_report(sequence, outcome, clock, rule="gradual")
        ) == ["ack"]
    assert "policy" not in kinds(inside.close())
    assert reader.rule_states()["gradual"].stage == fleet.CANARY


def test_redefined_rule_canary_again(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    limits = {"canary_percent": 50, "promote_after_runs": 3, "max_failure_ratio": 0.4}
    rule = notify_rule("gradual", **limits)
    set_policy(admin, clock, rule)
    inside_id, outside_id = split_by_canary("gradual", 50)
    inside = Agent(agents, inside_id)
    inside.next_of("policy")
    clock.now += timedelta(minutes=1)
    for sequence in range(1, 4):
        inside.ack_of(outcome_report(sequence, SUCCEEDED, clock, rule="gradual"))
    inside.next_of("policy")
    assert reader.rule_states()["gradual"].stage == fleet.ACTIVE

    changed = notify_rule("gradual", **limits)
    changed.action.notify.title = "Disk full: clean up now"
    version = set_policy(admin, clock, changed)

    state = reader.rule_states()["gradual"]
    assert state.stage == fleet.CANARY
    assert state.reason.startswith(f"changed in policy version {version}")
    outside = Agent(agents, outside_id)
    held_back = outside.next_of("policy").policy
    assert held_back.rules[0].paused
    assert held_back.rules[0].action.notify.title == "Disk full: clean up now"
    assert not inside.next_of("policy").policy.rules[0].paused

    clock.now += timedelta(minutes=1)
    for sequence in range(4, 6):
        inside.ack_of(outcome_report(sequence, SUCCEEDED, clock, rule="gradual"))
    assert reader.rule_states()["gradual"].stage == fleet.CANARY
    inside.ack_of(outcome_report(6, SUCCEEDED, clock, rule="gradual"))
    assert not outside.next_of("policy").policy.rules[0].paused
    assert reader.rule_states()["gradual"].stage == fleet.ACTIVE
    for agent in (outside, inside):
        agent.close()


def test_budget_pauses_and_resumes_next_day(
    agents: AgentClient,
    admin: ops_pb2_grpc.OpsServiceStub,
    clock: Clock,
    reader: Store,
) -> None:
    set_policy(
        admin, clock, notify_rule("limited", daily_budget=2), notify_rule("other")
    )
    agent = Agent(agents, new_device_id())
    agent.next_of("policy")
    clock.now += timedelta(minutes=1)
    agent.ack_of(outcome_report(1, SUCCEEDED, clock, rule="limited"))
    agent.ack_of(outcome_report(2, SUCCEEDED, clock, rule="limited"))
    paused = agent.next_of("policy").policy
    assert paused.rules[0].paused
    assert paused.rules[0].paused_reason == "daily budget of 2 runs used"
    assert not paused.rules[1].paused
    assert reader.rule_states()["limited"].stage == fleet.PAUSED

    # A record of another rule on the next UTC day makes the collector
    # evaluate the limits again.
    clock.now += timedelta(days=1)
    agent.ack_of(outcome_report(3, SUCCEEDED, clock, rule="other"))
    resumed = agent.next_of("policy").policy
    assert not resumed.rules[0].paused
    assert resumed.version > paused.version
    state = reader.rule_states()["limited"]
    assert state.stage == fleet.ACTIVE
    assert state.reason == (
        "resumed: a new UTC day began after the daily budget was used"
    )
    agent.close()


# The fleet limits worker on a real store


class OperatorBetweenReads:
    """A store whose rule_statistics lets an operator pause a rule first.

    This is the operator's change arriving while the worker evaluates.
    """

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def rule_statistics(self, since_day_start: datetime) -> dict[str, RuleStats]:
        statistics = self._store.rule_statistics(since_day_start)
        self._clock.now += timedelta(seconds=1)
        self._store.set_rule_state(
            "flaky", fleet.PAUSED, "paused by alice", "alice", self._clock.now
        )
        return statistics


def store_failures(store: Store, device_id: str, clock: Clock, count: int) -> None:
    store.ingest(
        [
            IncomingReport(
                device_id=device_id,
                report=outcome_report(sequence, FAILED, clock, rule="flaky").report,
                received_time=clock.now,
            )
            for sequence in range(1, count + 1)
        ]
    )


def test_worker_stores_breaker_trip(database_url: str, clock: Clock) -> None:
    with Store.open(database_url) as store:
        store.migrate()
        rule = notify_rule("flaky", breaker_window=4, max_failure_ratio=0.5)
        store.set_policy(remediation_pb2.Policy(rules=[rule]), "alice", clock.now)
        clock.now += timedelta(minutes=1)
        store_failures(store, new_device_id(), clock, 3)
        changed: list[bool] = []
        worker = FleetLimitsWorker(store, clock, lambda: changed.append(True))

        applied = worker.evaluate_once()

        assert [change.stage for change in applied] == [fleet.PAUSED]
        state = store.rule_states()["flaky"]
        assert state.stage == fleet.PAUSED
        assert state.changed_by == fleet.FLEET_LIMITS_ACTOR
        assert worker.evaluate_once() == []


def test_worker_keeps_concurrent_operator_change(
    database_url: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(database_url) as store:
        store.migrate()
        rule = notify_rule("flaky", breaker_window=4, max_failure_ratio=0.5)
        store.set_policy(remediation_pb2.Policy(rules=[rule]), "alice", clock.now)
        clock.now += timedelta(minutes=1)
        store_failures(store, new_device_id(), clock, 3)
        racing = OperatorBetweenReads(store, clock)
        worker = FleetLimitsWorker(racing, clock, lambda: None)  # type: ignore[arg-type]

        with caplog.at_level(logging.INFO, logger="collector._limits"):
            assert worker.evaluate_once() == []

        state = store.rule_states()["flaky"]
        assert state.changed_by == "alice"
        assert state.reason == "paused by alice"
        assert "changed while the fleet limits were evaluated" in caplog.text
