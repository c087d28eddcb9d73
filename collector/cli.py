"""``fleetmend-collector``: run the collector, set it up and manage its tokens.

Commands: ``serve``, ``migrate``, ``init`` (the TLS folder, see collector.tls)
and ``token create|list|revoke`` (operator tokens, written to the database
directly, so they work while the collector is stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from google.protobuf import json_format
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from collector import __version__, auth, server, tls
from collector._authz import audit_arguments
from collector._limits import (
    DEFAULT_REPORT_BURST,
    DEFAULT_REPORTS_PER_SECOND,
    IngestLimits,
)
from collector._ops_render import format_time, render_table
from collector._validation import (
    DEFAULT_CLOCK_SKEW_LIMIT,
    DEFAULT_MAX_REPORT_AGE,
    ClockLimits,
)
from collector.paths import default_data_dir, default_database_url
from collector.store import (
    AuditEvent,
    Store,
    StoreError,
    TokenNameTakenError,
    TokenRecord,
)
from fleetmend.v1 import ops_pb2

logger = logging.getLogger(__name__)

PROG = "fleetmend-collector"
DEFAULT_LISTEN = "127.0.0.1:50051"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Bounds of the limit options. A message limit under 1 KiB would reject a
# hello with a long agent version, and gRPC takes it as a signed 32-bit int.
MIN_MESSAGE_BYTES = 1024
MAX_MESSAGE_BYTES_LIMIT = 2**31 - 1
MAX_REPORT_BURST = 10**9
MAX_REPORTS_PER_SECOND = 1e9
MAX_CLOCK_SKEW_LIMIT_SECONDS = 10 * 365 * 86400
MAX_REPORT_AGE_DAYS = 10 * 365


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of fleetmend-collector."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="The Fleetmend collector service."
    )
    parser.add_argument("--version", action="version", version=__version__)
    _add_log_level_option(parser, default=None)
    commands = parser.add_subparsers(
        title="commands",
        dest="command",
        required=True,
        metavar="COMMAND",
        help=f"run {PROG} COMMAND --help for its options",
    )

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server, with TLS unless --insecure, until SIGTERM or SIGINT",
        description=(
            "Run the collector's gRPC server: the agent service, the operator "
            "service, health checking and reflection on one port. It serves TLS "
            "with the certificate in --tls-dir unless --insecure is given, "
            "applies pending database migrations at start and runs until "
            "SIGTERM or SIGINT."
        ),
    )
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free port (default: %(default)s)",
    )
    _add_database_option(serve)
    _add_log_level_option(serve, default=argparse.SUPPRESS)
    serve.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "folder that `fleetmend-collector init` wrote the certificate, key "
            f"and enrollment secret to (default: {default_data_dir()})"
        ),
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help=(
            "serve plaintext gRPC without TLS, on a loopback address only; node "
            "keys and operator tokens are checked all the same"
        ),
    )
    serve.add_argument(
        "--grace",
        type=_grace_seconds,
        default=5.0,
        metavar="SECONDS",
        help=(
            "time that open calls get to finish at shutdown, in seconds "
            "(default: %(default)s)"
        ),
    )
    _add_limit_options(serve)

    migrate = commands.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        description=(
            "Apply the database migrations that --database lacks, print each "
            "revision applied, and exit. serve applies them too, so this is "
            "needed only to migrate before a start."
        ),
    )
    _add_database_option(migrate)
    _add_log_level_option(migrate, default=argparse.SUPPRESS)

    tls.add_init_parser(commands)
    _add_token_parser(commands)
    return parser


def _add_token_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    token = commands.add_parser(
        "token",
        help="create, list or revoke operator tokens in the collector database",
        description=(
            "Manage the operator tokens that the fleetmend CLI authenticates "
            "with. These commands write to the database directly and need no "
            "running collector. Each one is written to the audit log with the "
            "actor local:<login name>."
        ),
    )
    actions = token.add_subparsers(
        title="commands",
        dest="token_command",
        required=True,
        metavar="ACTION",
        help=f"run {PROG} token ACTION --help for its options",
    )

    create = actions.add_parser(
        "create",
        help="create a token and print it once",
        description=(
            "Create an operator token and print it on stdout, or write it to "
            "--output. The collector stores only its hash, so it cannot be shown "
            "again."
        ),
    )
    create.add_argument(
        "--role",
        required=True,
        type=_role_argument,
        metavar="ROLE",
        help=(
            "viewer (queries), operator (also actions such as declaring an "
            "outage) or admin (also devices, tokens and the audit log)"
        ),
    )
    create.add_argument(
        "--name",
        required=True,
        metavar="NAME",
        help=(
            "unique name of the token, shown as the actor in the audit log: 1 to "
            "64 letters, digits, '.', '_', '@' or '-'"
        ),
    )
    create.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            "write the token to FILE, a new file created with mode 0600, and "
            "print only its path"
        ),
    )

    listing = actions.add_parser(
        "list",
        help="list tokens with their roles and times, never their secrets",
        description=(
            "List every operator token, revoked ones included, with its role "
            "and the times it was created, revoked and last used. The "
            "database stores only hashes, so no secret is shown."
        ),
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help='print {"tokens": [OperatorToken]} in the protobuf JSON mapping',
    )

    revoke = actions.add_parser(
        "revoke",
        help="revoke a token by name; calls with it fail from then on",
        description=(
            "Revoke the operator token NAME. Calls that present it fail with "
            "UNAUTHENTICATED from then on; the token stays in the list with "
            "its revoke time."
        ),
    )
    revoke.add_argument("name", metavar="NAME", help="name of the token")

    for action in (create, listing, revoke):
        _add_database_option(action)
        _add_log_level_option(action, default=argparse.SUPPRESS)


def _role_argument(text: str) -> auth.Role:
    try:
        return auth.Role.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_limit_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--max-message-bytes",
        type=_whole_number(MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES_LIMIT),
        default=server.MAX_MESSAGE_BYTES,
        metavar="BYTES",
        help=(
            "largest message accepted; a larger one ends its stream with "
            "RESOURCE_EXHAUSTED (default: %(default)s)"
        ),
    )
    serve.add_argument(
        "--max-reports-per-second",
        type=_number(allow_zero=True, maximum=MAX_REPORTS_PER_SECOND),
        default=DEFAULT_REPORTS_PER_SECOND,
        metavar="RATE",
        help=(
            "sustained reports per second accepted from one device over all its "
            "streams; 0 turns the limit off (default: %(default)g)"
        ),
    )
    serve.add_argument(
        "--report-burst",
        type=_whole_number(1, MAX_REPORT_BURST),
        default=DEFAULT_REPORT_BURST,
        metavar="COUNT",
        help=(
            "reports one device may send at once before the rate limit applies "
            "(default: %(default)s)"
        ),
    )
    serve.add_argument(
        "--clock-skew-limit",
        type=_number(allow_zero=False, maximum=MAX_CLOCK_SKEW_LIMIT_SECONDS),
        default=DEFAULT_CLOCK_SKEW_LIMIT.total_seconds(),
        metavar="SECONDS",
        help=(
            "largest difference between a device's clock and the collector's "
            "before its reports are flagged as clock-skewed, in seconds "
            "(default: %(default)g)"
        ),
    )
    serve.add_argument(
        "--max-report-age",
        type=_number(allow_zero=False, maximum=MAX_REPORT_AGE_DAYS),
        default=DEFAULT_MAX_REPORT_AGE / timedelta(days=1),
        metavar="DAYS",
        help=(
            "reports collected longer ago than this when they arrive are "
            "flagged as clock-skewed, in days (default: %(default)g)"
        ),
    )


def _whole_number(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {minimum} to {maximum}, got {text!r}"
            )
        return value

    return parse


def _number(*, allow_zero: bool, maximum: float) -> Callable[[str], float]:
    # maximum keeps the value within what timedelta and gRPC accept.
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > 0 or (allow_zero and value == 0)
        if not (math.isfinite(value) and low_ok and value <= maximum):
            expected = f"from 0 to {maximum:g}"
            if not allow_zero:
                expected = f"greater than 0 and at most {maximum:g}"
            raise argparse.ArgumentTypeError(
                f"expected a number {expected}, got {text!r}"
            )
        return value

    return parse


def settings_from_args(args: argparse.Namespace) -> server.ServerSettings:
    """Return the server settings that the serve options select."""
    clock = ClockLimits(
        skew_limit=timedelta(seconds=args.clock_skew_limit),
        max_report_age=timedelta(days=args.max_report_age),
    )
    limits = IngestLimits(
        reports_per_second=args.max_reports_per_second,
        report_burst=args.report_burst,
        clock=clock,
    )
    return server.ServerSettings(
        max_message_bytes=args.max_message_bytes, limits=limits
    )


def _add_log_level_option(parser: argparse.ArgumentParser, default: object) -> None:
    # The option is accepted before and after the command; SUPPRESS keeps a
    # command's parser from overwriting a value given before the command.
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="minimum level of log messages on stderr (default: INFO for serve, "
        "WARNING for the other commands)",
    )


def _grace_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds of 0 or more, got {text!r}"
        )
    return value


def _add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        metavar="URL",
        default=None,
        help=(
            f"SQLAlchemy database URL (default: SQLite file {default_database_url()})"
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run fleetmend-collector on argv (default: sys.argv[1:]); return its exit code."""
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    _configure_logging(level)
    if args.command == "init":
        return tls.run_init(args)
    if args.database is not None and not args.database.strip():
        _print_error(
            "--database is empty; give a database URL such as sqlite:///PATH, "
            "or leave the option out to use the default"
        )
        return 2
    database_url = args.database or default_database_url()
    if args.command == "migrate":
        return _migrate(database_url)
    if args.command == "token":
        return _run_token_command(database_url, args)
    tls_dir = args.tls_dir if args.tls_dir is not None else default_data_dir()
    return _serve(
        database_url,
        args.listen,
        tls_dir,
        args.insecure,
        args.grace,
        settings_from_args(args),
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    # Alembic logs its migration context ("Context impl SQLiteImpl.") at INFO
    # each time the store reads or applies migrations, and the store logs the
    # revisions it applies itself, so alembic's lines show at DEBUG only.
    alembic_level = logging.DEBUG if level == "DEBUG" else logging.WARNING
    logging.getLogger("alembic").setLevel(alembic_level)


def _serve(
    database_url: str,
    listen: str,
    tls_dir: Path,
    insecure: bool,
    grace_seconds: float,
    settings: server.ServerSettings,
) -> int:
    try:
        server.check_plaintext_allowed(listen, insecure=insecure)
    except ValueError as error:
        _print_error(str(error))
        return 2
    try:
        serving = server.serve(
            database_url,
            listen,
            tls_dir=tls_dir,
            insecure=insecure,
            grace_seconds=grace_seconds,
            settings=settings,
        )
        asyncio.run(serving)
    except (OSError, StoreError, tls.TLSSetupError) as error:
        _print_error(f"serve failed: {error}")
        return 1
    return 0


def _migrate(database_url: str) -> int:
    shown_url = server.redact_database_url(database_url)
    try:
        store = Store.open(database_url)
        try:
            applied = store.migrate()
        finally:
            store.close()
    except (OSError, StoreError) as error:
        _print_error(f"migrating {shown_url} failed: {error}")
        return 1
    if not applied:
        print(f"{shown_url}: already up to date")
    for revision in applied:
        print(f"{shown_url}: applied migration {revision}")
    return 0


# Operator tokens


def _run_token_command(database_url: str, args: argparse.Namespace) -> int:
    action: str = args.token_command
    database_file = sqlite_database_file(database_url)
    if action == "create":
        existed = database_file is None or database_file.exists()
        code = _create_token(database_url, args.name, args.role, args.output)
        if not existed and database_file is not None and database_file.exists():
            # The first admin token may come before the first serve, so a new
            # database is allowed here, but a mistyped --database shows.
            print(f"created a new database at {database_file}", file=sys.stderr)
        return code
    if database_file is not None and not database_file.exists():
        _print_error(
            f"database file {database_file} does not exist; check --database, "
            "or create the database with `fleetmend-collector token create` or "
            "`fleetmend-collector serve`"
        )
        return 1
    if action == "list":
        return _list_tokens(database_url, as_json=args.json)
    return _revoke_token(database_url, args.name)


def sqlite_database_file(database_url: str) -> Path | None:
    """Return the file of a SQLite database URL, or None for other URLs.

    None also for a URL that does not parse, which Store.open then reports.
    """
    try:
        parsed = make_url(database_url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _create_token(
    database_url: str, name: str, role: auth.Role, output: Path | None
) -> int:
    try:
        auth.check_token_name(name)
    except ValueError as error:
        _print_error(str(error))
        return 2

    issued = auth.issue_operator_token()
    if output is not None:
        # The file is written before the token is stored, so that a path that
        # exists or cannot be written leaves no unusable token in the database.
        try:
            _write_private_file(output, issued.text + "\n")
        except OSError as error:
            _print_error(_output_error(output, error))
            return 1

    code = _store_token(database_url, name, role, issued)
    if code != 0:
        if output is not None:
            _remove_output(output)
        return code

    if output is not None:
        print(output)
        print(
            f"wrote operator token {name!r} ({role.label}) to {output}; it cannot "
            "be shown again",
            file=sys.stderr,
        )
    else:
        print(issued.text)
        print(
            f"created operator token {name!r} ({role.label}); store it now, it "
            "cannot be shown again",
            file=sys.stderr,
        )
    return 0


def _store_token(
    database_url: str, name: str, role: auth.Role, issued: auth.IssuedCredential
) -> int:
    actor = local_actor()
    arguments = {"name": name, "role": ops_pb2.Role.Name(ops_pb2.Role.ValueType(role))}
    try:
        with _open_store(database_url) as store:
            # The event goes into the token's transaction: a failed audit
            # write leaves no token behind.
            event = _audit_event(actor, "token create", arguments, "OK")
            try:
                store.create_token(
                    name,
                    role,
                    issued.credential_id,
                    issued.secret_hash,
                    actor,
                    event.event_time,
                    audit=event,
                )
            except TokenNameTakenError as error:
                _audit(store, actor, "token create", arguments, "ALREADY_EXISTS")
                _print_error(str(error))
                return 1
    except (OSError, StoreError) as error:
        shown_url = server.redact_database_url(database_url)
        _print_error(f"creating token {name!r} in {shown_url} failed: {error}")
        return 1
    return 0


def _list_tokens(database_url: str, *, as_json: bool) -> int:
    try:
        with _open_store(database_url) as store:
            tokens = store.list_tokens()
            _audit(store, local_actor(), "token list", {}, "OK")
    except (OSError, StoreError) as error:
        shown_url = server.redact_database_url(database_url)
        _print_error(f"listing tokens in {shown_url} failed: {error}")
        return 1

    messages = [token_message(token) for token in tokens]
    if as_json:
        dicts = [
            json_format.MessageToDict(message, preserving_proto_field_name=True)
            for message in messages
        ]
        print(json.dumps({"tokens": dicts}, indent=2))
        return 0
    if not messages:
        print("no operator tokens; create one with `fleetmend-collector token create`")
        return 0
    rows = [
        [
            message.name,
            auth.Role(message.role).label,
            format_time(message.create_time),
            format_time(message.revoke_time),
            format_time(message.last_use_time),
        ]
        for message in messages
    ]
    headers = ["NAME", "ROLE", "CREATED", "REVOKED", "LAST USED"]
    print(render_table(headers, rows), end="")
    return 0


def _revoke_token(database_url: str, name: str) -> int:
    actor = local_actor()
    arguments = {"name": name}
    try:
        with _open_store(database_url) as store:
            event = _audit_event(actor, "token revoke", arguments, "OK")
            revoked = store.revoke_token(name, event.event_time, audit=event)
            if revoked is None:
                _audit(store, actor, "token revoke", arguments, "NOT_FOUND")
    except (OSError, StoreError) as error:
        shown_url = server.redact_database_url(database_url)
        _print_error(
            f"revoking token {_shown_name(name)} in {shown_url} failed: {error}"
        )
        return 1

    if revoked is None:
        _print_error(
            f"no operator token named {_shown_name(name)}; `fleetmend-collector "
            "token list` shows the names"
        )
        return 1
    if revoked:
        print(f"revoked operator token {_shown_name(name)}")
    else:
        print(f"operator token {_shown_name(name)} was revoked already")
    return 0


def _shown_name(name: str) -> str:
    # A token pasted in place of its name must not be echoed.
    return repr(auth.redact_secrets(name))


def token_message(token: TokenRecord) -> ops_pb2.OperatorToken:
    """Return a stored token as a fleetmend.v1.OperatorToken, without its hash."""
    message = ops_pb2.OperatorToken(
        name=token.name, role=ops_pb2.Role.ValueType(token.role)
    )
    message.create_time.FromDatetime(token.create_time)
    if token.revoke_time is not None:
        message.revoke_time.FromDatetime(token.revoke_time)
    if token.last_use_time is not None:
        message.last_use_time.FromDatetime(token.last_use_time)
    return message


def local_actor() -> str:
    """Return the audit actor of a command run on this host: "local:<login name>".

    On POSIX the name is that of the effective user id in the password
    database, or "uid-<number>" for a user id that it lacks. The environment
    is not consulted there, because USER can name anyone. Elsewhere the name
    comes from getpass.getuser().
    """
    try:
        import pwd
    except ImportError:
        return f"local:{getpass.getuser()}"
    user_id = os.geteuid()
    try:
        return f"local:{pwd.getpwuid(user_id).pw_name}"
    except KeyError:
        return f"local:uid-{user_id}"


@contextmanager
def _open_store(database_url: str) -> Iterator[Store]:
    """Open and migrate the store, as serve does, and close it at the end."""
    store = Store.open(database_url)
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def _audit_event(
    actor: str, action: str, arguments: dict[str, str], outcome: str
) -> AuditEvent:
    arguments_json = audit_arguments(json.dumps(arguments, separators=(",", ":")))
    return AuditEvent(
        event_time=datetime.now(UTC),
        actor=actor,
        role=None,
        action=action,
        arguments_json=arguments_json,
        outcome=outcome,
        peer="",
    )


def _audit(
    store: Store,
    actor: str,
    action: str,
    arguments: dict[str, str],
    outcome: str,
) -> None:
    event = _audit_event(actor, action, arguments, outcome)
    store.append_audit(
        event.event_time,
        event.actor,
        event.role,
        event.action,
        event.arguments_json,
        event.outcome,
        event.peer,
    )


def _write_private_file(path: Path, text: str) -> None:
    """Write text to a new file with mode 0600; fail if path exists.

    O_EXCL also fails on a symlink at path, so the file is never one that
    another user prepared.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError:
        _remove_output(path)
        raise


def _remove_output(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        _print_error(f"could not remove {path}: {error}; delete it by hand")


def _output_error(path: Path, error: OSError) -> str:
    if isinstance(error, FileExistsError):
        return (
            f"--output {path} exists; choose a new path or delete the file, "
            "since an existing file is never overwritten"
        )
    reason = error.strerror or str(error)
    return f"cannot create --output {path}: {reason}"


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
