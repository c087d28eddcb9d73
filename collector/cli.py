"""``fleetmend-collector``: run the collector or migrate its database."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta

from collector import __version__, server
from collector._limits import (
    DEFAULT_REPORT_BURST,
    DEFAULT_REPORTS_PER_SECOND,
    IngestLimits,
)
from collector._validation import (
    DEFAULT_CLOCK_SKEW_LIMIT,
    DEFAULT_MAX_REPORT_AGE,
    ClockLimits,
)
from collector.paths import default_database_url
from collector.store import Store, StoreError

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
    _add_limit_options(serve)

    migrate = commands.add_parser(
        "migrate", help="apply pending database migrations and exit"
    )
    _add_database_option(migrate)
    _add_log_level_option(migrate, default=argparse.SUPPRESS)
    return parser


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
    return _serve(
        database_url, args.listen, args.insecure, args.grace, settings_from_args(args)
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
            insecure=insecure,
            grace_seconds=grace_seconds,
            settings=settings,
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
