"""Policy status, policy file checks and closed pipes in the fleetmend CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from collector.store import IncomingReport, Store
from fleetmend.v1 import ops_pb2, ops_pb2_grpc, remediation_pb2, report_pb2
from tests.collector.test_ops_healing import (
    POLICY_TOML,
    Collector,
    clean_environment,
    collector,
    run,
    run_json,
    set_policy,
)
from tests.trust import bearer, channel_to, enroll

__all__ = ["clean_environment", "collector"]

REPOSITORY = Path(__file__).resolve().parents[2]
ONE_RULE = (
    '[[rules]]\nname = "r"\ncondition.disk_failing = {}\n'
    'action.notify = { title = "t" }\n'
)


def current_generation(collector: Collector) -> ops_pb2.GetPolicyResponse:
    metadata = bearer(collector.tokens["viewer"])
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        response: ops_pb2.GetPolicyResponse = stub.GetPolicy(
            ops_pb2.GetPolicyRequest(), metadata=metadata, timeout=10
        )
    return response


def report_status(
    collector: Collector,
    device_id: str,
    status: remediation_pb2.PolicyStatus,
    *,
    hostname: str,
    sequence: int = 1,
) -> None:
    """Store a report of the device that carries status, as the agent sends it."""
    report = report_pb2.Report(
        sequence=sequence,
        full=True,
        host=report_pb2.HostFacts(hostname=hostname),
        policy_status=status,
    )
    with Store.open(collector.database_url) as store:
        store.ingest([IncomingReport(device_id, report, datetime.now(UTC))])


# Policy status in device show and rules


def test_device_show_policy_not_reported(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    code, out, err = run(collector, "viewer", capsys, "device", "show", device_id)

    assert code == 0, err
    assert "policy              not reported yet" in out


def test_device_show_policy_applied(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    policy = current_generation(collector)
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    status = remediation_pb2.PolicyStatus(applied_version=policy.generation)
    report_status(collector, device_id, status, hostname="desk")

    code, out, err = run(collector, "viewer", capsys, "device", "show", device_id)
    shown = run_json(collector, "viewer", capsys, "device", "show", device_id)

    assert code == 0, err
    assert policy.policy.version == 1
    assert "policy              applied version 1\n" in out
    device = shown["device"]
    assert isinstance(device, dict)
    assert device["policy_status"] == {"applied_version": str(policy.generation)}


def test_device_show_policy_rejected(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    set_policy(collector, capsys, ONE_RULE)
    policy = current_generation(collector)
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    status = remediation_pb2.PolicyStatus(
        applied_version=policy.generation - 1,
        rejected_version=policy.generation,
        rejected_reason="rule 'r': unknown action",
    )
    report_status(collector, device_id, status, hostname="desk")

    code, out, err = run(collector, "viewer", capsys, "device", "show", device_id)

    assert code == 0, err
    assert (
        "policy              version 2 rejected: rule 'r': unknown action; the "
        f"device runs generation {policy.generation - 1} (not the current policy)\n"
    ) in out


def test_device_show_rejected_names_running(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    old = current_generation(collector)
    set_policy(collector, capsys, ONE_RULE)
    policy = current_generation(collector)
    first, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    second, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    on_version_1 = remediation_pb2.PolicyStatus(
        applied_version=old.generation,
        applied_fleet_version=1,
        rejected_version=policy.generation,
        rejected_fleet_version=2,
        rejected_reason="rule 'r': unknown action",
    )
    on_built_in = remediation_pb2.PolicyStatus(
        rejected_version=policy.generation,
        rejected_fleet_version=2,
        rejected_reason="rule 'r': unknown action",
    )
    report_status(collector, first, on_version_1, hostname="desk-1")
    report_status(collector, second, on_built_in, hostname="desk-2")

    code, out, err = run(collector, "viewer", capsys, "device", "show", first)
    code_built_in, out_built_in, _ = run(
        collector, "viewer", capsys, "device", "show", second
    )

    assert code == 0, err
    assert (
        "version 2 rejected: rule 'r': unknown action; the device runs version 1 "
        f"(generation {old.generation}, not the current one)\n"
    ) in out
    assert code_built_in == 0
    assert (
        "version 2 rejected: rule 'r': unknown action; the device runs its "
        "built-in or local policy\n"
    ) in out_built_in


def test_device_show_older_generation(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    old = current_generation(collector)
    set_policy(collector, capsys, ONE_RULE)
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    status = remediation_pb2.PolicyStatus(applied_version=old.generation)
    report_status(collector, device_id, status, hostname="desk")

    code, out, err = run(collector, "viewer", capsys, "device", "show", device_id)

    assert code == 0, err
    assert f"applied generation {old.generation} (not the current policy)" in out


def test_list_devices_has_policy_status(collector: Collector) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    status = remediation_pb2.PolicyStatus(rejected_version=7, rejected_reason="bad")
    report_status(collector, device_id, status, hostname="desk")

    metadata = bearer(collector.tokens["viewer"])
    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        listed = stub.ListDevices(
            ops_pb2.ListDevicesRequest(), metadata=metadata, timeout=10
        )
        got = stub.GetDevice(
            ops_pb2.GetDeviceRequest(device_id=device_id), metadata=metadata, timeout=10
        )

    assert [device.policy_status for device in listed.devices] == [status]
    assert got.device.policy_status == status


def test_rules_count_rejecting_devices(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    policy = current_generation(collector)
    rejected = remediation_pb2.PolicyStatus(
        applied_version=0,
        rejected_version=policy.generation,
        rejected_reason="unknown field 'x' in rules[0]",
    )
    older = remediation_pb2.PolicyStatus(
        rejected_version=policy.generation - 1, rejected_reason="older"
    )
    applied = remediation_pb2.PolicyStatus(applied_version=policy.generation)
    statuses = [rejected, rejected, older, applied]
    for index, status in enumerate(statuses):
        device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
        report_status(collector, device_id, status, hostname=f"desk-{index}")

    code, out, err = run(collector, "viewer", capsys, "rules")
    shown = run_json(collector, "viewer", capsys, "rules")

    assert code == 0, err
    assert (
        "2 devices rejected policy version 1 and run their previous policy "
        "instead; for example: unknown field 'x' in rules[0]\n"
    ) in out
    assert shown["rejecting_devices"] == 2
    assert shown["rejected_reason_example"] == "unknown field 'x' in rules[0]"


def test_rules_without_rejections(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)

    code, out, err = run(collector, "viewer", capsys, "rules")
    shown = run_json(collector, "viewer", capsys, "rules")

    assert code == 0, err
    assert "rejected" not in out
    assert shown["rejecting_devices"] == 0
    assert shown["rejected_reason_example"] == ""


def test_rules_rejection_follows_state_change(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    before = current_generation(collector)
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    status = remediation_pb2.PolicyStatus(
        rejected_version=before.generation, rejected_reason="bad"
    )
    report_status(collector, device_id, status, hostname="desk")

    code, _, err = run(
        collector, "operator", capsys, "rules", "pause", "failing-disk-notice"
    )
    after = current_generation(collector)
    shown = run_json(collector, "viewer", capsys, "rules")

    assert code == 0, err
    assert after.generation > before.generation
    assert shown["rejecting_devices"] == 0


# Policy file checks


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rules]]\nname = "two-actions"\ncondition.disk_failing = {}\n'
            'action = { notify = { title = "t" }, clear_cache = {} }\n',
            "rule 'two-actions': rules[0].action sets both notify and clear_cache, "
            "but Action takes only one of",
        ),
        (
            '[[rules]]\nname = "two-conditions"\ncondition.disk_failing = {}\n'
            'condition.free_space_below = { mount_point = "/", ratio = 0.1 }\n'
            'action.notify = { title = "t" }\n',
            "rule 'two-conditions': rules[0].condition sets both disk_failing and "
            "free_space_below, but Condition takes only one of",
        ),
        (
            ONE_RULE + 'limits = { cooldown = "1 hour" }\n',
            "rule 'r': rules[0].limits.cooldown: invalid span '1 hour'; give a "
            'quoted number with a unit of s, m, h or d, such as "90s"',
        ),
        (
            ONE_RULE + "limits = { cooldown = 3600 }\n",
            "rules[0].limits.cooldown: invalid span 3600",
        ),
    ],
)
def test_policy_file_field_errors(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    path = collector.write("bad.toml", text)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert f"invalid policy file {path}: " in err
    assert message in err


def test_policy_file_spans(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    text = POLICY_TOML.replace('"21600s"', '"6h"').replace('"86400s"', '"1d1h30m"')
    text += (
        '\n[[rules]]\nname = "password-notice"\n'
        'condition.credential_expiring_within = { within = "2d" }\n'
        'action.notify = { title = "t" }\n'
    )
    set_policy(collector, capsys, text)

    shown = current_generation(collector).policy

    assert shown.rules[0].limits.cooldown.seconds == 6 * 3600
    assert shown.rules[1].limits.cooldown.seconds == 86400 + 5400
    within = shown.rules[2].condition.credential_expiring_within.within
    assert within.seconds == 2 * 86400


def test_policy_file_seconds_form_kept(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, ONE_RULE + 'limits = { cooldown = "90.5s" }\n')

    cooldown = current_generation(collector).policy.rules[0].limits.cooldown

    assert cooldown.seconds == 90
    assert cooldown.nanos == 500_000_000


@pytest.mark.parametrize("text", ["", "# no rules yet\n", "rules = []\n"])
def test_policy_empty_rejected(
    collector: Collector, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = collector.write("empty.toml", text)

    code, out, err = run(collector, "admin", capsys, "policy", "set", str(path))
    shown = run_json(collector, "viewer", capsys, "policy", "show")

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert f"the policy file {path} has no rules" in err
    assert "--allow-empty" in err
    assert shown == {"policy": None}


def test_policy_empty_allowed(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = collector.write("empty.toml", "")

    code, out, err = run(
        collector, "admin", capsys, "policy", "set", "--allow-empty", str(path)
    )
    policy = current_generation(collector)

    assert code == 0, err
    assert "with 0 rules" in out
    assert policy.HasField("policy")
    assert list(policy.policy.rules) == []


def test_policy_set_help_names_allow_empty(capsys: pytest.CaptureFixture[str]) -> None:
    from collector.ops_cli import main

    with pytest.raises(SystemExit):
        main(["policy", "set", "--help"])
    out = " ".join(capsys.readouterr().out.split())

    assert "--allow-empty" in out
    assert "agents then run no rules at all" in out


# Closed standard output


def cli_command(collector: Collector, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from collector.ops_cli import main; sys.exit(main())",
        *collector.args("viewer", *args),
    ]


def cli_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FLEETMEND_")
    }


def test_pipe_to_head_exits_quietly(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    # The largest policy that agents take, 200 rules with the longest notice
    # texts, prints about 160 kB of JSON: more than twice a Linux pipe's 64 KiB
    # buffer, so the CLI is still writing when head closes the pipe.
    rules = "".join(
        f'[[rules]]\nname = "rule-{index}"\ncondition.disk_failing = {{}}\n'
        f'action.notify = {{ title = "{"t" * 80}", body = "{"b" * 500}" }}\n'
        for index in range(200)
    )
    set_policy(collector, capsys, rules)

    cli = subprocess.Popen(
        cli_command(collector, "--json", "policy", "show"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPOSITORY,
        env=cli_environment(),
    )
    assert cli.stdout is not None
    head = subprocess.run(
        ["head", "-5"], stdin=cli.stdout, capture_output=True, check=True
    )
    cli.stdout.close()
    _, err = cli.communicate(timeout=60)

    assert head.stdout.count(b"\n") == 5
    assert cli.returncode == 141
    assert b"Traceback" not in err
    assert b"BrokenPipeError" not in err


def test_closed_pipe_exits_quietly(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys)
    read_end, write_end = os.pipe()
    # With the read end closed before the CLI starts, its first write fails.
    os.close(read_end)
    try:
        cli = subprocess.run(
            cli_command(collector, "--json", "rules"),
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=REPOSITORY,
            env=cli_environment(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)

    assert cli.returncode == 141
    assert cli.stderr == b""
