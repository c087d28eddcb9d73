"""``fleetmend-collector``: run the collector or migrate its database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Sequence

from collector import __version__, server
from collector.paths import default_database_url
from collector.store import Store, StoreError

logger = logging.getLogger(__name__)

PROG = "fleetmend-collector"
DEFAULT_LISTEN = "127.0.0.1:50051"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of fleetmend-collector."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="The Fleetmend collector service."
    )
    parser.add_argument("--version", action="version", version=__version__)
    _add_log_level_option(parser, default=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the gRPC server until SIGTERM or SIGINT"
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
        "--insecure",
        action="store_true",
        help="serve plaintext gRPC; required until TLS is available, loopback only",
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

    migrate = commands.add_parser(
        "migrate", help="apply pending database migrations and exit"
    )
    _add_database_option(migrate)
    _add_log_level_option(migrate, default=argparse.SUPPRESS)
    return parser


def _add_log_level_option(parser: argparse.ArgumentParser, default: object) -> None:
    # The option is accepted before and after the command; SUPPRESS keeps a
    # command's parser from overwriting a value given before the command.
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="minimum level of log messages on stderr (default: INFO for serve, "
        "WARNING for migrate)",
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
    if args.database is not None and not args.database.strip():
        _print_error(
            "--database is empty; give a database URL such as sqlite:///PATH, "
            "or leave the option out to use the default"
        )
        return 2
    database_url = args.database or default_database_url()
    if args.command == "migrate":
        return _migrate(database_url)
    return _serve(database_url, args.listen, args.insecure, args.grace)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    # Alembic logs its migration context ("Context impl SQLiteImpl.") at INFO
    # each time the store reads or applies migrations, and the store logs the
    # revisions it applies itself, so alembic's lines show at DEBUG only.
    alembic_level = logging.DEBUG if level == "DEBUG" else logging.WARNING
    logging.getLogger("alembic").setLevel(alembic_level)


def _serve(database_url: str, listen: str, insecure: bool, grace_seconds: float) -> int:
    try:
        server.check_plaintext_allowed(listen, insecure=insecure)
    except ValueError as error:
        _print_error(str(error))
        return 2
    try:
        serving = server.serve(
            database_url, listen, insecure=insecure, grace_seconds=grace_seconds
        )
        asyncio.run(serving)
    except (OSError, StoreError) as error:
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


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
