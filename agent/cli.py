"""``fleetmend-agent``: collect readings, show what is sent, diagnose settings, run."""

from __future__ import annotations

import os

# grpc core reads GRPC_VERBOSITY when it is imported. At its default it prints
# INFO lines about failed TLS handshakes on stderr, which would break enroll's
# one-line errors and repeat in run's log, so the agent shows ERROR and above
# unless the user sets the variable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from google.protobuf import json_format  # noqa: E402

from agent import __version__, paths  # noqa: E402
from agent import clock as clock_module  # noqa: E402
from agent.config import (  # noqa: E402
    LOG_LEVELS,
    AgentConfig,
    ConfigError,
    Setting,
    env_name,
    load_config,
    unknown_variable_message,
)
from agent.enrollment import (  # noqa: E402
    SECRET_VARIABLE,
    Enrollment,
    EnrollmentError,
    enrollment_path,
    read_enrollment,
    read_secret,
    secret_in_argv,
)
from agent.keystore import KeyStoreError  # noqa: E402
from agent.report import ReportBuilder  # noqa: E402
from agent.sections import probe_sources, read_safely, usage_source  # noqa: E402
from agent.spool import SPOOL_FILE, SpoolError, SpoolStats, read_stats  # noqa: E402
from agent.spool import describe as describe_spool  # noqa: E402
from agent.state import Identity, StateError, StateStore  # noqa: E402
from agent.transport import is_loopback_target  # noqa: E402
from fleetmend.v1 import remediation_pb2, report_pb2  # noqa: E402

if TYPE_CHECKING:
    from agent.healing.actions.base import LocalAllowlist
    from agent.healing.conditions import ConditionEvaluator

log = logging.getLogger("agent")

# Exit status when stdout is a closed pipe: 128 + SIGPIPE (13), which a shell
# reports for a tool such as cat that SIGPIPE ended. Python ignores SIGPIPE,
# so the agent gets BrokenPipeError and returns this status itself.
BROKEN_PIPE_EXIT = 141

# rules measures an application's CPU use over this many seconds, between two
# readings of its processes' CPU times.
CPU_SAMPLE_SECONDS = 1.0


def _common_options() -> argparse.ArgumentParser:
    """Return the parent parser of the options that every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML settings file (default: /etc/fleetmend/agent.toml as root on "
        "Linux, else agent.toml in the user config directory)",
    )
    common.add_argument(
        "--state-dir",
        metavar="DIR",
        help="folder of the device id, spool and local history (default: "
        "/var/lib/fleetmend as root on Linux, else the user state directory)",
    )
    common.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help="minimum level of log messages on stderr: debug, info, warning or "
        "error (default: info)",
    )
    return common


def _collector_options() -> argparse.ArgumentParser:
    """Return the parent parser of the options that name the collector."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--collector",
        metavar="HOST:PORT",
        help="collector address; enroll needs it, and run uses the enrolled "
        "collector without it",
    )
    options.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="connect to the collector without TLS (loopback collectors only)",
    )
    return options


def _usage_options() -> argparse.ArgumentParser:
    """Return the parent parser of the options of the usage section."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--usage",
        dest="usage_enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="collect catalogued application usage (default: on)",
    )
    options.add_argument(
        "--resolve-hosts",
        dest="resolve_hosts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="look up the catalog's host names in DNS to recognize web "
        "applications (default: on)",
    )
    return options


# The option groups of each command besides the common ones. show and
# diagnose take the collector and usage options so that they print what run
# would do with the same options.
COMMAND_OPTIONS = {
    "collect": ("usage",),
    "show": ("collector", "usage"),
    "diagnose": ("collector", "usage"),
    "rules": (),
    "notices": (),
    "run": ("collector", "usage"),
    "enroll": ("collector",),
}


# Each command's one-line help in the command list and the description at the
# top of its own --help.
COMMANDS = {
    "collect": (
        "read everything once and print one full report",
        "Read every probe once and print the full report that the agent would "
        "send. Nothing is sent and no state is written.",
    ),
    "show": (
        "say in plain words what the agent sends",
        "Describe in plain words what this agent sends to the collector and "
        "what it never sends.",
    ),
    "diagnose": (
        "print every setting and where it came from, and any problems",
        "Print every setting with its value and source, the state files and "
        "the enrollment, then list the problems found. Exits 1 if there are any.",
    ),
    "rules": (
        "show what each self-healing rule would do now, changing nothing",
        "Evaluate every self-healing rule of the policy in force once and "
        "dry-run its action. Nothing is changed or sent. Rules that watch an "
        f"application's CPU use take {CPU_SAMPLE_SECONDS:g} s to measure it.",
    ),
    "notices": (
        "list the notices that self-healing rules left for the user",
        "List the notices that self-healing rules stored for the user of this "
        "computer, newest first.",
    ),
    "run": (
        "run the agent and stream reports to the collector",
        "Run the agent: read the probes on their intervals, apply the "
        "self-healing rules and stream reports to the enrolled collector until "
        "stopped (SIGTERM or Ctrl-C).",
    ),
    "enroll": (
        "exchange the fleet's enrollment secret for this device's node key",
        "Enroll this device with a collector. The enrollment secret "
        f"comes from --secret-file or the {SECRET_VARIABLE} variable, never "
        "from the command line.",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetmend-agent",
        description="Fleetmend endpoint agent: reads this computer's health and "
        "reports it to a Fleetmend collector.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    groups = {
        "collector": _collector_options(),
        "usage": _usage_options(),
    }
    common = _common_options()
    commands = parser.add_subparsers(
        title="commands",
        dest="command",
        required=True,
        metavar="COMMAND",
        help="run fleetmend-agent COMMAND --help for its options",
    )
    subparsers = {
        name: commands.add_parser(
            name,
            parents=[common, *(groups[group] for group in COMMAND_OPTIONS[name])],
            help=summary,
            description=description,
        )
        for name, (summary, description) in COMMANDS.items()
    }
    subparsers["collect"].add_argument(
        "--format",
        choices=("text", "json", "protobuf"),
        default="text",
        help="text for people (default), json, or protobuf (raw bytes on stdout)",
    )
    run = subparsers["run"]
    run.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="PEM file of the collector's CA (default: the copy made by enroll)",
    )
    run.add_argument(
        "--exit-after",
        type=int,
        metavar="N",
        help="exit once N routine reports are acknowledged, not counting reports "
        "of remediation records (for demos and smoke tests)",
    )
    enroll = subparsers["enroll"]
    enroll.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="PEM file of the collector's CA certificate (its ca.pem)",
    )
    enroll.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="file that contains the enrollment secret on one line",
    )
    return parser


def _config(args: argparse.Namespace) -> AgentConfig:
    # A command without an option group leaves its settings to the
    # environment, the config file and the defaults.
    flags = {
        "collector": getattr(args, "collector", None),
        "insecure": getattr(args, "insecure", None),
        "state_dir": args.state_dir,
        "usage.enabled": getattr(args, "usage_enabled", None),
        "usage.resolve_hosts": getattr(args, "resolve_hosts", None),
        "log_level": args.log_level,
    }
    return load_config(flags=flags, config_file=args.config)


def with_enrolled_collector(config: AgentConfig) -> AgentConfig:
    """Return config with the enrolled collector when no setting names a collector.

    Without such a setting, run connects to the enrolled collector, over
    plaintext if the enrollment was (see _run_connection). So show and
    diagnose print those values with the enrollment file as their source. A
    missing or damaged enrollment file leaves config as it is, and diagnose
    reports the damage.
    """
    if config.collector:
        return config
    try:
        enrollment = read_enrollment(config.state_dir)
    except EnrollmentError:
        return config
    if enrollment is None:
        return config
    source = f"enrollment {enrollment_path(config.state_dir)}"
    settings = dict(config.settings)
    settings["collector"] = Setting(enrollment.collector, source)
    if enrollment.insecure and not config.insecure:
        settings["insecure"] = Setting(True, source)
    return dataclasses.replace(config, settings=settings)


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


def _read_once(
    config: AgentConfig, usage: bool = True
) -> tuple[ReportBuilder, str | None]:
    """Read every section once into a builder; return it and the usage error, if any."""
    # A collected report is not numbered, so no identity is created or changed.
    state = StateStore(config.state_dir)
    builder = ReportBuilder(state, Identity(device_id="", next_sequence=1))
    for source in probe_sources():
        reading = read_safely(source)
        if reading is not None:
            builder.update(source.section, reading)
    usage_error = None
    if usage:
        try:
            builder.update("usage", _read_usage(config))
        except UsageUnavailable as exc:
            usage_error = str(exc)
    return builder, usage_error


def _collect_once(config: AgentConfig) -> tuple[report_pb2.Report, str | None]:
    """Read every section once; return the report and the usage error, if any."""
    builder, usage_error = _read_once(config)
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


def _start_cpu_samples(
    evaluator: ConditionEvaluator, policy: remediation_pb2.Policy
) -> None:
    """Take the first CPU reading for process_cpu_above rules, then wait.

    CPU use is the CPU time used between two readings, so without this the
    one evaluation of rules would show 0 % for every application.
    """
    app_ids = evaluator.start_cpu_samples(policy.rules)
    if not app_ids:
        return
    print(
        f"Measuring the CPU use of {', '.join(app_ids)} for "
        f"{CPU_SAMPLE_SECONDS:g} s...",
        file=sys.stderr,
        flush=True,
    )
    clock_module.clock.wait(threading.Event(), CPU_SAMPLE_SECONDS)


def cmd_rules(config: AgentConfig) -> int:
    """Print what each rule of the policy in force would do now, changing nothing."""
    from agent.healing.policy import PolicyError
    from agent.render import render_rules
    from agent.runtime import build_engine

    builder, _ = _read_once(config, usage=False)
    try:
        engine = build_engine(config, builder, None, usage_source(config))
    except PolicyError as exc:
        return _fail(str(exc), 1)
    local = "Built-in policy"
    if config.healing_policy_file is not None:
        local = f"Local policy {config.healing_policy_file}"
    _start_cpu_samples(engine.evaluator, engine.policies.policy)
    # Each rule's detail carries what the conditions would log as a warning,
    # such as a service status that cannot be read, so the log stays quiet.
    with _held_back("agent.healing.conditions"):
        previews = engine.preview(engine.readings())
    sys.stdout.write(render_rules(previews, engine.policies.status, local))
    if not config.healing_enabled:
        print(
            "fleetmend-agent: self-healing is turned off (healing.enabled = false); "
            "the agent runs none of these rules",
            file=sys.stderr,
        )
    return 0


def cmd_notices(config: AgentConfig) -> int:
    """Print the notices that rules left for the user; exit 1 if any is unreadable."""
    from agent.healing.notices import NoticeError, NoticeStore, render_notices

    try:
        notices, problems = NoticeStore(config.state_dir).read()
    except NoticeError as exc:
        return _fail(str(exc), 1)
    sys.stdout.write(render_notices(notices))
    for problem in problems:
        print(f"fleetmend-agent: skipped: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _key_store_line(config: AgentConfig) -> str:
    """Describe the enrolled node key's store; empty when not enrolled."""
    from agent.keystore import store_of_kind

    try:
        enrollment = read_enrollment(config.state_dir)
        if enrollment is None:
            return ""
        return store_of_kind(enrollment.key_store, config.state_dir).describe()
    except (EnrollmentError, KeyStoreError) as exc:
        return f"unusable: {exc}"


def cmd_show(config: AgentConfig) -> int:
    from agent.render import render_disclosure
    from agent.usage.catalog import CatalogError

    config = with_enrolled_collector(config)
    names: list[str] | None = None
    if config.usage_enabled:
        try:
            catalog = usage_source(config).catalog()
        except CatalogError as exc:
            print(f"fleetmend-agent: {exc}", file=sys.stderr)
            return 1
        names = [app.name for app in catalog.apps]
    stats, problem = _spool_stats(config)
    sys.stdout.write(
        render_disclosure(config, names, stats, key_store=_key_store_line(config))
    )
    if problem is not None:
        print(f"fleetmend-agent: {problem}", file=sys.stderr)
    return 0


def _diagnose_trust(config: AgentConfig) -> list[str]:
    """Print the node key store and the enrollment; return their problems."""
    from agent.keystore import find_keyring_backend, open_key_store, store_of_kind

    problems: list[str] = []
    try:
        enrollment: Enrollment | None = read_enrollment(config.state_dir)
    except EnrollmentError as exc:
        problems.append(str(exc))
        enrollment = None
    try:
        if enrollment is not None:
            store = store_of_kind(enrollment.key_store, config.state_dir)
            line = store.describe()
            if store.kind == "file" and config.key_store == "auto":
                backend, reason = find_keyring_backend()
                line += (
                    f" (no keyring backend: {reason})"
                    if backend is None
                    else " (chosen at enrollment; a keyring works now)"
                )
            print(f"node key store: {line}")
            if store.read() is None:
                problems.append(f"{NOT_ENROLLED} (no node key in {line})")
        else:
            store = open_key_store(config.key_store, config.state_dir)
            print(f"node key store: {store.describe()}")
    except KeyStoreError as exc:
        print("node key store: unusable")
        problems.append(str(exc))

    if enrollment is None:
        print(f"enrollment: none ({config.state_dir / 'enrollment.json'} not found)")
        if config.collector:
            problems.append(NOT_ENROLLED)
        else:
            problems.append(
                f"no collector set; enroll with --collector or set "
                f"{env_name('collector')}"
            )
        return problems
    ca_note = (
        "plaintext, no CA" if enrollment.insecure else f"CA file {enrollment.ca_file}"
    )
    print(
        f"enrollment: collector {enrollment.collector}, {ca_note}, enrolled "
        f"{enrollment.enrolled_time.isoformat(timespec='seconds')}"
    )
    if enrollment.ca_file is not None and not enrollment.ca_file.is_file():
        problems.append(
            f"CA file {enrollment.ca_file} is missing; enroll again with --ca-file"
        )
    if config.collector and config.collector != enrollment.collector:
        print(
            f"  note: run uses collector {config.collector} from the settings, not "
            "the enrolled one"
        )
    return problems


def _diagnose_problems(
    config: AgentConfig,
    state: StateStore,
    spool_problem: str | None,
    trust_problems: list[str],
) -> list[str]:
    """Check what the settings point at; return each problem in one line."""
    from agent.usage.catalog import CatalogError

    problems = [unknown_variable_message(name) for name in config.unknown_variables]
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
    problems += trust_problems
    return problems


def _print_settings(config: AgentConfig) -> None:
    """Print a table of each setting's value, source and environment variable."""
    rows = [
        (name, json.dumps(setting.value), setting.source, env_name(name))
        for name, setting in config.settings.items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    print("settings (name, value, source, and the environment variable that sets it):")
    for name, value, source, variable in rows:
        print(
            f"  {name:<{widths[0]}}  {value:<{widths[1]}}  {source:<{widths[2]}}  "
            f"{variable}"
        )


def _foreground_status(config: AgentConfig) -> str:
    from agent.foreground import ForegroundDetector
    from agent.usage.catalog import Catalog, CatalogError

    source = usage_source(config)

    def catalog() -> Catalog | None:
        try:
            return source.catalog()
        except CatalogError:
            # diagnose reports the catalog error among its problems.
            return None

    # The detector logs why it is unavailable, and diagnose prints the same
    # reason in its foreground line.
    with _held_back("agent.foreground", level=logging.ERROR):
        return ForegroundDetector(catalog).status()


def _stored_policy_problem(
    path: Path, in_force: remediation_pb2.Policy, allowlist: LocalAllowlist
) -> str:
    """Return why the stored fleet policy at path is not in force; "" if it is.

    PolicyStore logs this at load and runs the local policy instead, so here
    the reason is found again.
    """
    from google.protobuf.message import DecodeError

    from agent.healing.bounds import MAX_LOG_CHARS, truncate
    from agent.healing.policy import check_policy, policy_name

    fallback = "; the local policy runs until the collector sends a valid one"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"stored fleet policy {path} cannot be read: {exc.strerror}{fallback}"
    try:
        stored = remediation_pb2.Policy.FromString(data)
    except DecodeError:
        return f"stored fleet policy {path} is damaged and cannot be decoded{fallback}"
    if stored == in_force:
        return ""
    problems = check_policy(stored, allowlist).problems
    if not problems:
        # The collector replaced the file after PolicyStore read it.
        return ""
    reason = truncate("; ".join(problems), MAX_LOG_CHARS)
    return (
        f"{policy_name(stored)} stored in {path} is rejected on this laptop: "
        f"{reason}{fallback}"
    )


@contextlib.contextmanager
def _held_back(*names: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """Drop the named loggers' messages below level while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _diagnose_policy(config: AgentConfig) -> tuple[str, list[str]]:
    """Return the line about the self-healing policy in force and its problems."""
    from agent.healing.policy import (
        PolicyError,
        PolicyStore,
        load_local_policy,
        validate_policy,
    )
    from agent.runtime import describe_policy, local_allowlist, local_policy

    allowlist = local_allowlist(config)
    # local_policy and PolicyStore log what they leave out or reject, and
    # diagnose lists the same as problems, so their logs are held back here.
    with _held_back("agent.runtime", "agent.healing.policy"):
        try:
            local = local_policy(config, allowlist)
        except PolicyError as exc:
            return "self-healing policy: none, the local policy is invalid", [str(exc)]
        store = PolicyStore(config.state_dir, local, allowlist)

    policy, refused = store.in_force()
    problems: list[str] = []
    if config.healing_policy_file is None:
        # local_policy leaves these rules of the built-in policy out.
        for problem in validate_policy(load_local_policy(None), allowlist):
            problems.append(f"built-in policy: {problem}; the rule is left out")
    stored_problem = _stored_policy_problem(store.path, policy, allowlist)
    if stored_problem:
        problems.append(stored_problem)
    for name, reason in refused.items():
        problems.append(
            f"self-healing rule {name} is refused on this laptop and never runs: "
            f"{reason}"
        )

    line = f"self-healing policy: {describe_policy(config, store)}"
    if stored_problem:
        line += ", because the stored fleet policy is rejected"
    if refused:
        line += " (fleetmend-agent rules shows why)"
    if not config.healing_enabled:
        line += "; self-healing is off (healing.enabled = false)"
    return line, problems


def cmd_diagnose(config: AgentConfig) -> int:
    from agent.render import wrap_line

    config = with_enrolled_collector(config)
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
    print(f"foreground check for throttles: {_foreground_status(config)}")
    policy_line, policy_problems = _diagnose_policy(config)
    print(policy_line)
    _print_settings(config)

    trust_problems = _diagnose_trust(config)
    problems = _diagnose_problems(config, state, spool_problem, trust_problems)
    problems += policy_problems
    if not problems:
        print("no problems found")
        return 0
    print("problems:")
    for problem in problems:
        print(wrap_line(f"  - {problem}", "    "))
    return 1


# Commands that only read the state folder. Run by a user who cannot read it,
# they would take its files for missing or damaged, so they check it first.
READ_ONLY_COMMANDS = frozenset({"show", "diagnose", "rules", "notices"})


def unreadable_state(state_dir: Path) -> str | None:
    """Return which state folder or file this user cannot read, None if all can be.

    A missing folder counts as readable, because it contains nothing yet.
    Only permission errors count. The command itself reports other problems.
    """
    try:
        with os.scandir(state_dir) as iterator:
            entries = list(iterator)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return f"state folder {state_dir}"
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            descriptor = os.open(entry.path, os.O_RDONLY)
        except PermissionError:
            return f"state file {entry.path}"
        except OSError:
            continue
        os.close(descriptor)
    return None


def _user_text() -> str:
    """Return the effective user as "name (uid N)", or the login name on Windows."""
    try:
        import pwd
    except ImportError:
        import getpass

        return getpass.getuser()
    user_id = os.geteuid()
    try:
        return f"{pwd.getpwuid(user_id).pw_name} (uid {user_id})"
    except KeyError:
        return f"uid {user_id}"


def _check_state_readable(config: AgentConfig, command: str) -> int | None:
    """Print why a read-only command cannot read the state and return 1, else None."""
    unreadable = unreadable_state(config.state_dir)
    if unreadable is None:
        return None
    return _fail(
        f"{unreadable} cannot be read by {_user_text()}: permission denied; run "
        "the command as root or as the account that the agent service runs "
        f"as, for example: sudo fleetmend-agent {command}",
        1,
    )


NOT_ENROLLED = (
    "not enrolled: run fleetmend-agent enroll --collector HOST:PORT --ca-file "
    f"CA.pem with the secret in --secret-file FILE or {SECRET_VARIABLE}"
)


def _fail(message: str, code: int) -> int:
    print(f"fleetmend-agent: {message}", file=sys.stderr)
    return code


def _run_connection(
    config: AgentConfig, ca_file: Path | None
) -> tuple[str, bytes | None, bool, str] | int:
    """Return run's target, CA, plaintext flag and node key, or the exit code."""
    from agent.keystore import read_node_key

    try:
        enrollment = read_enrollment(config.state_dir)
    except EnrollmentError as exc:
        return _fail(str(exc), 1)
    if enrollment is None:
        return _fail(NOT_ENROLLED, 2)
    target = config.collector or enrollment.collector
    insecure = config.insecure or enrollment.insecure
    if insecure and not is_loopback_target(target):
        return _fail(
            f"--insecure (plaintext) is allowed only for a loopback collector, not "
            f"{target}; drop --insecure to use TLS",
            2,
        )
    root_certificates = None
    ca_path = ca_file or enrollment.ca_file
    if not insecure and ca_path is not None:
        try:
            root_certificates = ca_path.read_bytes()
        except OSError as exc:
            return _fail(
                f"CA file {ca_path} cannot be read: {exc.strerror}; pass --ca-file "
                "or enroll again",
                1,
            )
    try:
        node_key = read_node_key(enrollment.key_store, config.state_dir)
    except KeyStoreError as exc:
        return _fail(str(exc), 1)
    if node_key is None:
        return _fail(
            f"{NOT_ENROLLED} (the node key is missing from its {enrollment.key_store} "
            "store)",
            2,
        )
    return target, root_certificates, insecure, node_key


def cmd_run(
    config: AgentConfig, exit_after: int | None, ca_file: Path | None = None
) -> int:
    from agent.healing.policy import PolicyError
    from agent.priority import lower_priority
    from agent.runtime import Agent
    from agent.sections import usage_source as make_usage

    for name in config.unknown_variables:
        log.warning("%s", unknown_variable_message(name))
    connection = _run_connection(config, ca_file)
    if isinstance(connection, int):
        return connection
    target, root_certificates, insecure, node_key = connection

    if exit_after is not None and exit_after < 1:
        print(
            f"fleetmend-agent: --exit-after must be 1 or more, got {exit_after}",
            file=sys.stderr,
        )
        return 2
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
        try:
            agent = Agent(
                config,
                probe_sources(),
                usage,
                target=target,
                node_key=node_key,
                root_certificates=root_certificates,
                insecure=insecure,
            )
        except PolicyError as exc:
            return _fail(str(exc), 1)
        stop = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        agent.run(stop, exit_after_acks=exit_after)
    return 0


def cmd_enroll(
    config: AgentConfig, ca_file: Path | None, secret_file: Path | None
) -> int:
    from agent.enrollment import enroll

    if not config.collector:
        return _fail("enroll needs --collector HOST:PORT", 2)
    if config.insecure and not is_loopback_target(config.collector):
        return _fail(
            f"--insecure (plaintext) is allowed only for a loopback collector, not "
            f"{config.collector}; pass --ca-file to use TLS",
            2,
        )
    if ca_file is None and not config.insecure:
        return _fail(
            "enroll needs --ca-file with the collector's CA certificate (ca.pem)", 2
        )
    try:
        secret = read_secret(secret_file, dict(os.environ))
        device_id, store = enroll(
            config.state_dir,
            config.collector,
            ca_file=None if config.insecure else ca_file,
            insecure=config.insecure,
            secret=secret,
            key_store_mode=config.key_store,
        )
    except EnrollmentError as exc:
        return _fail(str(exc), 1)
    print(
        f"enrolled device {device_id} with collector {config.collector}; node key "
        f"stored in {store.describe()}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run fleetmend-agent with argv (default: sys.argv); return its exit status.

    A closed stdout, as when a pipe's reader such as head exits early, ends
    the command quietly with BROKEN_PIPE_EXIT, without a traceback.
    """
    try:
        try:
            return _main(argv)
        finally:
            # Output that is still buffered is written now, while a closed
            # pipe can be handled, and not at interpreter exit. This also
            # covers --help and --version, which argparse ends with SystemExit.
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE_EXIT


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if secret_in_argv(arguments):
        # argparse would repeat an unknown argument, the secret, in its error.
        return _fail(
            "an enrollment secret is never accepted as an argument, where other "
            f"users can read it; pass --secret-file FILE or set {SECRET_VARIABLE}",
            2,
        )
    args = _parser().parse_args(arguments)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"fleetmend-agent: {exc}", file=sys.stderr)
        return 2
    level = config.log_level
    if args.command == "enroll" and config.settings["log_level"].source == "default":
        # enroll prints one line of result; progress logs would only add noise.
        level = "warning"
    _setup_logging(level)
    if args.command in READ_ONLY_COMMANDS:
        failed = _check_state_readable(config, args.command)
        if failed is not None:
            return failed

    try:
        if args.command == "collect":
            return cmd_collect(config, args.format)
        if args.command == "show":
            return cmd_show(config)
        if args.command == "diagnose":
            return cmd_diagnose(config)
        if args.command == "rules":
            return cmd_rules(config)
        if args.command == "notices":
            return cmd_notices(config)
        if args.command == "enroll":
            return cmd_enroll(config, args.ca_file, args.secret_file)
        return cmd_run(config, args.exit_after, args.ca_file)
    except (StateError, SpoolError) as exc:
        print(f"fleetmend-agent: {exc}", file=sys.stderr)
        return 1


def _discard_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit cannot fail.

    Without it, Python prints "Exception ignored ... BrokenPipeError" when it
    flushes the unwritten rest of stdout at exit.
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        # stdout is no file (replaced by a test harness, or closed).
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


if __name__ == "__main__":
    sys.exit(main())
