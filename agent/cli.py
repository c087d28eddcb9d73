"""``fleetmend-agent``: collect readings, show what is sent, diagnose settings, run."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from google.protobuf import json_format

from agent import __version__, paths
from agent.config import AgentConfig, ConfigError, env_name, load_config
from agent.report import ReportBuilder
from agent.sections import probe_sources, read_safely, usage_source
from agent.state import Identity, StateError, StateStore
from fleetmend.v1 import report_pb2

log = logging.getLogger("agent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetmend-agent",
        description="Fleetmend endpoint agent: reads this computer's health and "
        "reports it to a Fleetmend collector.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: /etc/fleetmend/agent.toml as root, "
        "else agent.toml in the user config directory)",
    )
    common.add_argument(
        "--state-dir", help="folder for the device id and local history"
    )
    common.add_argument("--collector", help="collector address as HOST:PORT")
    common.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="talk plaintext gRPC to the collector (loopback demos only)",
    )
    common.add_argument(
        "--usage",
        dest="usage_enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="collect catalogued application usage (default: on)",
    )
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    collect = commands.add_parser(
        "collect",
        parents=[common],
        help="read everything once and print one full report",
    )
    collect.add_argument(
        "--format",
        choices=("text", "json", "protobuf"),
        default="text",
        help="text for people (default), json, or protobuf (raw bytes on stdout)",
    )
    commands.add_parser(
        "show", parents=[common], help="say in plain words what the agent sends"
    )
    commands.add_parser(
        "diagnose", parents=[common], help="print every setting and where it came from"
    )
    run = commands.add_parser(
        "run",
        parents=[common],
        help="run the agent and stream reports to the collector",
    )
    run.add_argument(
        "--exit-after",
        type=int,
        metavar="N",
        help="exit once N reports are acknowledged (for demos and smoke tests)",
    )
    return parser


def _config(args: argparse.Namespace) -> AgentConfig:
    flags = {
        "collector": args.collector,
        "insecure": args.insecure,
        "state_dir": args.state_dir,
        "usage.enabled": args.usage_enabled,
        "log_level": args.log_level,
    }
    return load_config(flags=flags, config_file=args.config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _collect_once(config: AgentConfig) -> report_pb2.Report:
    # A collected report is not numbered, so no identity is created or changed.
    state = StateStore(config.state_dir)
    builder = ReportBuilder(state, Identity(device_id="", next_sequence=1))
    for source in probe_sources():
        reading = read_safely(source)
        if reading is not None:
            builder.update(source.section, reading)
    usage = usage_source(config)
    try:
        builder.update("usage", usage.read())
    except Exception:
        log.exception("usage summary failed")
    return builder.snapshot()


def cmd_collect(config: AgentConfig, output_format: str) -> int:
    from agent.render import render_report

    report = _collect_once(config)
    if output_format == "protobuf":
        sys.stdout.buffer.write(report.SerializeToString(deterministic=True))
        sys.stdout.buffer.flush()
    elif output_format == "json":
        print(json_format.MessageToJson(report, preserving_proto_field_name=True))
    else:
        sys.stdout.write(render_report(report))
    return 0


def cmd_show(config: AgentConfig) -> int:
    from agent.render import render_disclosure

    names: list[str] | None = None
    if config.usage_enabled:
        from agent.usage.catalog import load_catalog

        catalog = load_catalog(config.usage_catalogs)
        names = [app.name for app in catalog.apps]
    sys.stdout.write(render_disclosure(config, names))
    return 0


def cmd_diagnose(config: AgentConfig) -> int:
    state = StateStore(config.state_dir)
    file_note = "found" if config.config_file_found else "not found, defaults apply"
    print(f"agent version: {__version__}")
    account = "root/administrator" if paths.is_privileged() else "a normal user"
    print(f"running as {account}")
    print(f"config file: {config.config_file} ({file_note})")
    identity_note = "exists" if state.path.exists() else "not created yet"
    print(f"identity file: {state.path} ({identity_note})")
    print("settings (value, then source; each can be set by its environment variable):")
    width = max(len(name) for name in config.settings)
    for name, setting in config.settings.items():
        value = json.dumps(setting.value)
        print(f"  {name:<{width}}  {value:<40} {setting.source:<30} {env_name(name)}")
    return 0


def cmd_run(config: AgentConfig, exit_after: int | None) -> int:
    from agent.priority import lower_priority
    from agent.runtime import Agent
    from agent.sections import usage_source as make_usage

    if not config.collector:
        print(
            "fleetmend-agent: no collector set; pass --collector HOST:PORT or set "
            f"{env_name('collector')}",
            file=sys.stderr,
        )
        return 2
    if not config.insecure:
        print(
            "fleetmend-agent: TLS is not available yet; pass --insecure to use "
            "plaintext gRPC with a collector on a loopback address",
            file=sys.stderr,
        )
        return 2

    log.info("priority lowered: %s", ", ".join(lower_priority()) or "unchanged")
    agent = Agent(config, probe_sources(), make_usage(config))
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    agent.run(stop, exit_after_acks=exit_after)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"fleetmend-agent: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)

    try:
        if args.command == "collect":
            return cmd_collect(config, args.format)
        if args.command == "show":
            return cmd_show(config)
        if args.command == "diagnose":
            return cmd_diagnose(config)
        return cmd_run(config, args.exit_after)
    except StateError as exc:
        print(f"fleetmend-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
