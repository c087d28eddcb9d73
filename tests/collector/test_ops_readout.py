"""Output of the collector and the fleetmend CLI that an administrator reads.

Each test runs the real fleetmend or fleetmend-collector entry point against a
real TLS collector on 127.0.0.1, or against a real TLS folder, and checks the
output that the admin reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from cryptography import x509

from collector import tls
from collector.cli import build_parser as build_collector_parser
from collector.cli import main as collector_main
from collector.ops_cli import build_parser, main
from collector.server import start_server_thread
from collector.store import Store
from fleetmend.v1 import ops_pb2, ops_pb2_grpc, remediation_pb2
from tests.collector.test_ops_cli_polish import NOTICE_POLICY, record, summary_rows
from tests.collector.test_ops_healing import (
    Collector,
    audit_events,
    clean_environment,
    collector,
    run,
    run_json,
    set_policy,
    store_remediations,
)
from tests.collector.test_refused_rules import (
    CUPS_REASON,
    POLICY,
    AgentStream,
    agents,
    generation_of,
)
from tests.collector.test_tls_reload import served_serial
from tests.trust import bearer, channel_to, enroll, make_tls_dir

__all__ = ["agents", "clean_environment", "collector"]

ROOT = Path(__file__).resolve().parents[2]
SUCCEEDED = remediation_pb2.REMEDIATION_OUTCOME_SUCCEEDED
REFUSED = remediation_pb2.REMEDIATION_OUTCOME_REFUSED
DRY_RUN = remediation_pb2.REMEDIATION_OUTCOME_DRY_RUN

# The reason with which fleetmend-agent refuses a command whose service is not
# in its healing.services allowlist.
SERVICE_REFUSAL = (
    "restart_service: service 'cups' is not in the local allowlist "
    "healing.services (allowed: none); add it to the agent's settings to "
    "permit restarts"
)


def command_records(collector: Collector) -> None:
    """Store one command that succeeded and two that the agent refused."""
    start = datetime.now(UTC) - timedelta(hours=1)
    records = [
        record("cleared", rule="", command_id="cmd-1", start=start),
        record(
            SERVICE_REFUSAL,
            REFUSED,
            rule="",
            command_id="cmd-2",
            start=start + timedelta(minutes=1),
        ),
        record(
            SERVICE_REFUSAL,
            REFUSED,
            rule="",
            command_id="cmd-3",
            start=start + timedelta(minutes=2),
        ),
    ]
    store_remediations(collector.database_url, str(uuid.uuid4()), records)


def reload_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        entry.getMessage()
        for entry in caplog.records
        if entry.name == "collector.tls" and entry.levelno == logging.WARNING
    ]


def hint_command(message: str) -> list[str]:
    """Return the arguments of the fleetmend-collector command in a message."""
    start = message.index("fleetmend-collector ")
    end = message.find(";", start)
    words = shlex.split(message[start : end if end != -1 else None])
    assert words[0] == "fleetmend-collector"
    return words[1:]


def certificate_names(tls_dir: Path) -> list[str]:
    pem = (tls_dir / "server.pem").read_bytes()
    return tls.certificate_names(x509.load_pem_x509_certificate(pem))


# TLS hints that work


def test_truncated_certificate_hint_renews(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector")
    tls_dir = make_tls_dir(tmp_path / "tls")
    handle = start_server_thread(f"sqlite:///{tmp_path}/collector.db", tls_dir=tls_dir)
    try:
        ca_file = tls_dir / "ca.pem"
        before = served_serial(handle.port, ca_file)
        pem = tls_dir / "server.pem"
        pem.write_bytes(pem.read_bytes()[:100])
        still = served_serial(handle.port, ca_file)
        (warning,) = reload_warnings(caplog)

        code = collector_main(hint_command(warning))
        after = served_serial(handle.port, ca_file)
    finally:
        handle.stop()

    assert still == before
    assert f"init --renew --dir {tls_dir} --name 127.0.0.1 --name localhost" in (
        warning
    )
    assert code == 0
    assert after != before
    assert certificate_names(tls_dir) == ["127.0.0.1", "localhost"]


def test_missing_key_hint_renews(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tls_dir / "server.key").unlink()
    with pytest.raises(tls.TLSSetupError) as caught:
        tls.load_server_credentials(tls_dir)

    arguments = hint_command(str(caught.value))
    code = collector_main(arguments)

    assert arguments == ["init", "--renew", "--dir", str(tls_dir)]
    assert code == 0, capsys.readouterr().err
    assert (tls_dir / "server.key").is_file()
    tls.load_server_credentials(tls_dir)


def test_truncated_certificate_init_hint(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tls_dir / "server.pem"
    pem.write_bytes(pem.read_bytes()[:100])

    code = collector_main(["init", "--renew", "--dir", str(tls_dir)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"{pem} is not a PEM certificate" in err
    assert f"init --renew --dir {tls_dir} --name HOST" in err


def test_renew_warns_dropped_names(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = collector_main(
        ["init", "--renew", "--dir", str(tls_dir), "--name", "10.0.0.5"]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert certificate_names(tls_dir) == ["10.0.0.5"]
    assert "no longer covers 127.0.0.1, localhost" in captured.err
    assert (
        f"init --renew --dir {tls_dir} --name 10.0.0.5 --name 127.0.0.1 "
        "--name localhost"
    ) in captured.err


def test_renew_same_names_no_warning(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["init", "--renew", "--dir", str(tls_dir)]
    code = collector_main([*arguments, "--name", "localhost", "--name", "127.0.0.1"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no longer covers" not in captured.err


# fleetmend act


def test_act_without_title_sends_nothing(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    code, out, err = run(collector, "operator", capsys, "act", "notify", "--all")
    with Store.open(collector.database_url) as store:
        pending = store.pending_commands(device_id, datetime.now(UTC))
    events = audit_events(collector, capsys)

    assert code == 2
    assert out == ""
    assert "notify needs title" in err
    assert "`fleetmend act notify --param title=VALUE`" in err
    assert pending == []
    assert "SendCommand" not in [event["action"] for event in events]


def test_send_command_rejects_blank_title(collector: Collector) -> None:
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)
    request = ops_pb2.SendCommandRequest(device_ids=[device_id])
    request.action.notify.title = "  "

    with channel_to(collector.address, collector.tls_dir) as channel:
        stub = ops_pb2_grpc.OpsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SendCommand(
                request, metadata=bearer(collector.tokens["operator"]), timeout=10
            )
    with Store.open(collector.database_url) as store:
        pending = store.pending_commands(device_id, datetime.now(UTC))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "notify needs title" in (caught.value.details() or "")
    assert pending == []


@pytest.mark.parametrize(
    ("action", "missing"),
    [
        ("clear_cache", "cache_sets"),
        ("restart_service", "service"),
        ("throttle_process", "app_id"),
        ("prompt_password_change", "self_service_url"),
    ],
)
def test_act_required_parameters(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    action: str,
    missing: str,
) -> None:
    code, _, err = run(collector, "operator", capsys, "act", action, "--all")

    assert code == 2
    assert f"{action} needs {missing}, which every agent refuses empty" in err


def test_act_help_lists_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["act", "--help"])

    out = capsys.readouterr().out
    assert raised.value.code == 0
    assert "  notify: title* (text), body (text)\n" in out
    assert "  clear_cache: cache_sets* (comma list of text), older_than_days" in out
    assert "  prompt_password_change: self_service_url* (text)\n" in out
    assert "restart_service: service* (text), settle (span)" in out


def test_act_device_before_action(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = enroll(
        collector.address, collector.tls_dir, plaintext=False, hostname="vm"
    )
    second, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    one = run_json(
        collector, "operator", capsys, "act", "--device", "vm", "notify",
        "--param", "title=Hello",
    )  # fmt: skip
    both = run_json(
        collector, "operator", capsys, "act", "notify", "--param", "title=Hello",
        "--device", first, "--device", second,
    )  # fmt: skip

    one_commands = one["commands"]
    both_commands = both["commands"]
    assert isinstance(one_commands, list)
    assert isinstance(both_commands, list)
    assert [command["device_id"] for command in one_commands] == [first]
    assert sorted(command["device_id"] for command in both_commands) == sorted(
        [first, second]
    )


def test_readme_act_example(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(collector.address, collector.tls_dir, plaintext=False)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (line,) = [
        text for text in readme.splitlines() if text.startswith("fleetmend act ")
    ]

    code, out, err = run(collector, "operator", capsys, *shlex.split(line)[1:])

    assert code == 0, err
    assert out.startswith("Queued notify for 1 device, none connected now;")


def test_send_command_log_singular(
    collector: Collector,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="collector")
    device_id, _ = enroll(collector.address, collector.tls_dir, plaintext=False)

    code, _, err = run(
        collector, "operator", capsys, "act", "notify", "--param", "title=t",
        "--device", device_id,
    )  # fmt: skip

    messages = [entry.getMessage() for entry in caplog.records]
    assert code == 0, err
    assert any("command notify for 1 device created by" in text for text in messages)
    assert not any("1 devices" in text for text in messages)


# fleetmend remediations


def test_summary_counts_refusals(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    command_records(collector)

    code, out, err = run(collector, "viewer", capsys, "remediations")
    shown = run_json(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    summary_header = out.split("Summary per rule, over every matching record\n")[1]
    assert summary_header.split()[:11] == [
        "RULE",
        "RUNS",
        "SUCCEEDED",
        "FAILED",
        "SKIPPED",
        "REFUSED",
        "DRY",
        "RUN",
        "SUCCESS",
        "DEVICES",
        "RECURRING",
    ]
    rows = summary_rows(out)
    assert rows["command"] == ["1", "1", "0", "0", "2", "0", "100%", "1", "0"]
    summaries = shown["summaries"]
    assert isinstance(summaries, list)
    assert summaries[0]["refused"] == "2"
    assert summaries[0]["runs"] == "1"
    assert "dry_runs" not in summaries[0]


def test_summary_counts_dry_runs(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    records = [
        record(f"would clear {n}", DRY_RUN, rule="preview", start=start)
        for n in range(3)
    ]
    store_remediations(collector.database_url, str(uuid.uuid4()), records)

    code, out, err = run(collector, "viewer", capsys, "remediations")
    shown = run_json(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    assert summary_rows(out)["preview"] == ["0", "0", "0", "0", "0", "3", "-", "1", "0"]
    summaries = shown["summaries"]
    assert isinstance(summaries, list)
    assert summaries[0]["dry_runs"] == "3"


def test_command_records_show_no_policy(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)
    command_records(collector)

    code, out, err = run(collector, "viewer", capsys, "remediations")

    assert code == 0, err
    lines = [line for line in out.splitlines() if "  command cmd-" in line]
    assert len(lines) == 3
    header = out.splitlines()[0]
    policy_column = header.index("POLICY")
    for line in lines:
        assert line[policy_column:].split()[0] == "-", line
    assert "- an operator command, which runs under no policy" in out


# fleetmend rules


def test_refusal_line_names_command(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    generation = generation_of(collector)
    first, second, _ = agents
    first.send_status(generation, {"restart-cups": CUPS_REASON})
    second.send_status(generation, {"restart-cups": CUPS_REASON})

    _, out, _ = run(collector, "viewer", capsys, "rules")
    (line,) = [text for text in out.splitlines() if " is refused on " in text]
    suggested = line.split("; `fleetmend ")[1].split("` lists them")[0]
    code, listed, err = run(collector, "viewer", capsys, *shlex.split(suggested))

    assert suggested == "remediations --rule restart-cups --outcome refused"
    assert code == 0, err
    records = listed.split("\nSummary per rule")[0]
    rows = [text for text in records.splitlines() if "  restart-cups  " in text]
    assert len(rows) == 2
    assert any(first.device_id in row for row in rows)
    assert any(second.device_id in row for row in rows)
    assert all("  refused  " in row for row in rows)


def test_rules_json_refusing_devices_number(
    collector: Collector,
    agents: list[AgentStream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_policy(collector, capsys, POLICY)
    agents[0].send_status(generation_of(collector), {"restart-cups": CUPS_REASON})

    shown = run_json(collector, "viewer", capsys, "rules")

    rules = shown["rules"]
    assert isinstance(rules, list)
    assert rules[0]["refusing_devices"] == 1
    assert shown["rejecting_devices"] == 0


def test_rules_json_dry_run(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)

    shown = run_json(collector, "viewer", capsys, "rules")

    rules = shown["rules"]
    assert isinstance(rules, list)
    assert "dry_run" not in rules[0]
    assert rules[1]["name"] == "preview-temp"
    assert rules[1]["dry_run"] is True


def test_rules_today_without_budget(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)

    code, out, err = run(collector, "viewer", capsys, "rules")

    lines = out.splitlines()
    assert code == 0, err
    assert lines[1].endswith("  0 (no budget)")
    assert lines[2].endswith("  0/5")


def test_promote_active_rule_changes_nothing(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)

    code, out, err = run(
        collector, "operator", capsys, "rules", "promote", "low-space-notice"
    )
    shown = run_json(
        collector, "operator", capsys, "rules", "promote", "low-space-notice"
    )
    rules = run_json(collector, "viewer", capsys, "rules")["rules"]

    assert code == 0, err
    assert out == (
        "Rule low-space-notice is not a canary, so nothing changed. Rule "
        "low-space-notice is active on the whole fleet.\n"
    )
    assert shown["changed"] is False
    assert isinstance(rules, list)
    assert "reason" not in rules[0]


def test_resume_active_rule_changes_nothing(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    set_policy(collector, capsys, NOTICE_POLICY)

    code, out, err = run(
        collector, "operator", capsys, "rules", "resume", "low-space-notice"
    )
    paused = run(collector, "operator", capsys, "rules", "pause", "low-space-notice")
    resumed = run_json(
        collector, "operator", capsys, "rules", "resume", "low-space-notice"
    )

    assert code == 0, err
    assert out.startswith("Rule low-space-notice is not paused, so nothing changed. ")
    assert paused[1] == (
        "Rule low-space-notice is paused. Reason: paused by operator-token.\n"
    )
    assert resumed["changed"] is True


# Help


def subcommand_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += subcommand_parsers(child, (*path, name))
    return found


LIST_COMMANDS = {
    ("devices",),
    ("findings",),
    ("audit",),
    ("remediations",),
    ("device", "show"),
}


def test_page_size_only_on_list_commands() -> None:
    parsers = subcommand_parsers(build_parser())

    for path, parser in parsers:
        options = {
            option for action in parser._actions for option in action.option_strings
        }
        if not path or path in LIST_COMMANDS:
            assert "--page-size" in options, path
        else:
            assert "--page-size" not in options, path
    assert {path for path, _ in parsers} >= LIST_COMMANDS | {
        ("act",),
        ("policy", "set"),
    }


def test_page_size_after_act_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["act", "notify", "--all", "--page-size", "5"])

    assert raised.value.code == 2
    assert "unrecognized arguments: --page-size 5" in capsys.readouterr().err


def test_collector_commands_have_descriptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parsers = subcommand_parsers(build_collector_parser())

    paths = {path for path, _ in parsers}
    assert paths >= {
        ("serve",),
        ("migrate",),
        ("init",),
        ("token", "create"),
        ("token", "list"),
        ("token", "revoke"),
    }
    for path, parser in parsers:
        assert parser.description, path
        with pytest.raises(SystemExit):
            collector_main([*path, "--help"])
        out = capsys.readouterr().out
        assert " ".join(parser.description.split()) in " ".join(out.split()), path
        if path in ((), ("token",)):
            assert "\ncommands:\n" in out, path
            assert "positional arguments:" not in out, path


# make run


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_names_tls_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo = load_demo()
    run_dir = tmp_path / ".fleetmend-run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.setattr(demo, "TLS_DIR", run_dir / "collector")
    monkeypatch.setattr(demo, "TOKEN_FILE", run_dir / "admin-token")

    demo.set_up_collector(f"sqlite:///{run_dir / 'collector.db'}", run_dir / "log")

    out = capsys.readouterr().out
    assert (
        "==> making a CA, a certificate for 127.0.0.1 and a secret in "
        ".fleetmend-run/collector/\n"
    ) in out
    assert (run_dir / "collector" / "server.pem").is_file()
    assert (run_dir / "collector" / "enrollment-secret").is_file()
