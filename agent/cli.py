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
from agent.spool import SPOOL_FILE, SpoolError, SpoolStats, read_stats
from agent.spool import describe as describe_spool
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
    common.add_argument(
        "--resolve-hosts",
        dest="resolve_hosts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="look up the catalog's host names in DNS to recognize web "
        "applications (default: on)",
    )
    common.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="minimum level of log messages on stderr (default: info)",
    )

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
        "usage.resolve_hosts": args.resolve_hosts,
        "log_level": args.log_level,
    }
    return load_config(flags=flags, config_file=args.config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class UsageUnavailable(Exception):
    """The usage catalog or history cannot be read; the message names which and why."""


def _read_usage(config: AgentConfig) -> report_pb2.UsageSection:
    from agent.usage.catalog import CatalogError
    from agent.usage.tracker import UsageHistoryError

    try:
        return usage_source(config).read()
    except (CatalogError, UsageHistoryError) as exc:
        raise UsageUnavailable(str(exc)) from exc
    except OSError as exc:
        raise UsageUnavailable(
            f"usage history in {config.state_dir} cannot be read: {exc.strerror}"
        ) from exc


def _collect_once(config: AgentConfig) -> tuple[report_pb2.Report, str | None]:
    """Read every section once; return the report and the usage error, if any."""
    # A collected report is not numbered, so no identity is created or changed.
    state = StateStore(config.state_dir)
    builder = ReportBuilder(state, Identity(device_id="", next_sequence=1))
    for source in probe_sources():
        reading = read_safely(source)
        if reading is not None:
            builder.update(source.section, reading)
    usage_error = None
    try:
        builder.update("usage", _read_usage(config))
    except UsageUnavailable as exc:
        usage_error = str(exc)
    return builder.snapshot(), usage_error


def cmd_collect(config: AgentConfig, output_format: str) -> int:
    from agent.render import render_report

    if output_format == "protobuf" and sys.stdout.isatty():
        print(
            "fleetmend-agent: --format protobuf writes binary data; redirect it to "
            "a file or a pipe",
            file=sys.stderr,
        )
        return 2
    report, usage_error = _collect_once(config)
    if output_format == "protobuf":
        sys.stdout.buffer.write(report.SerializeToString(deterministic=True))
        sys.stdout.buffer.flush()
    elif output_format == "json":
        print(json_format.MessageToJson(report, preserving_proto_field_name=True))
    else:
        sys.stdout.write(render_report(report))
    if usage_error is not None:
        print(
            f"fleetmend-agent: usage section left out: {usage_error}", file=sys.stderr
        )
        return 1
    return 0


def _spool_stats(config: AgentConfig) -> tuple[SpoolStats | None, str | None]:
    """Read the spool without changing it; return its stats or the problem."""
    try:
        return read_stats(config.state_dir / SPOOL_FILE, config.spool_max_bytes), None
    except SpoolError as exc:
        return None, str(exc)


def cmd_show(config: AgentConfig) -> int:
    from agent.render import render_disclosure
    from agent.usage.catalog import CatalogError

    names: list[str] | None = None
    if config.usage_enabled:
        try:
            catalog = usage_source(config).catalog()
        except CatalogError as exc:
            print(f"fleetmend-agent: {exc}", file=sys.stderr)
            return 1
        names = [app.name for app in catalog.apps]
    stats, problem = _spool_stats(config)
    sys.stdout.write(render_disclosure(config, names, stats))
    if problem is not None:
        print(f"fleetmend-agent: {problem}", file=sys.stderr)
    return 0


def _diagnose_problems(
    config: AgentConfig, state: StateStore, spool_problem: str | None
) -> list[str]:
    """Check what the settings point at; return each problem in one line."""
    from agent.usage.catalog import CatalogError

    problems = [
        f"environment variable {name} is not a Fleetmend setting (misspelt?)"
        for name in config.unknown_variables
    ]
    if spool_problem is not None:
        problems.append(spool_problem)
    if state.path.exists():
        try:
            state.read()
        except StateError as exc:
            problems.append(str(exc))
    if config.usage_enabled:
        try:
            usage_source(config).catalog()
        except CatalogError as exc:
            problems.append(str(exc))
    if not config.collector:
        problems.append(
            f"no collector set; `run` needs --collector or {env_name('collector')}"
        )
    return problems


def cmd_diagnose(config: AgentConfig) -> int:
    state = StateStore(config.state_dir)
    file_note = "found" if config.config_file_found else "not found, defaults apply"
    print(f"agent version: {__version__}")
    account = "root/administrator" if paths.is_privileged() else "a normal user"
    print(f"running as {account}")
    print(f"config file: {config.config_file} ({file_note})")
    identity_note = "exists" if state.path.exists() else "not created yet"
    print(f"identity file: {state.path} ({identity_note})")
    stats, spool_problem = _spool_stats(config)
    if stats is not None:
        print(describe_spool(stats))
    elif spool_problem is None:
        print(f"spool {config.state_dir / SPOOL_FILE}: not created yet")
    catalogs = ["built-in default catalog", *map(str, config.usage_catalogs)]
    print(f"usage catalogs: {', '.join(catalogs)}")
    print("settings (value, then source; each can be set by its environment variable):")
    width = max(len(name) for name in config.settings)
    for name, setting in config.settings.items():
        value = json.dumps(setting.value)
        print(f"  {name:<{width}}  {value:<40} {setting.source:<30} {env_name(name)}")

    problems = _diagnose_problems(config, state, spool_problem)
    if not problems:
        print("no problems found")
        return 0
    print("problems:")
    for problem in problems:
        print(f"  - {problem}")
    return 1


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

    if exit_after is not None and exit_after < 1:
        print(
            f"fleetmend-agent: --exit-after must be 1 or more, got {exit_after}",
            file=sys.stderr,
        )
        return 2
    for name in config.unknown_variables:
        log.warning("environment variable %s is not a Fleetmend setting", name)

    from agent.usage.catalog import CatalogError

    usage = make_usage(config)
    try:
        if config.usage_enabled:
            usage.catalog()
    except CatalogError as exc:
        print(f"fleetmend-agent: {exc}", file=sys.stderr)
        return 1

    with StateStore(config.state_dir).exclusive():
        log.info("priority lowered: %s", ", ".join(lower_priority()) or "unchanged")
        agent = Agent(config, probe_sources(), usage)
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
    except (StateError, SpoolError) as exc:
        print(f"fleetmend-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
