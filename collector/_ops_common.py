"""Helpers that the OpsService handlers share: call status, pages, timestamps."""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from collector._validation import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from collector.store import StoreError

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Devices read per store call while computing the findings of the whole fleet.
FLEET_SCAN_CHUNK = 500


class InvalidPageTokenError(ValueError):
    """A page token that this collector did not issue."""


def _decode_base64(token: str, prefix: str) -> bytes:
    if not token.startswith(prefix):
        raise InvalidPageTokenError("page token was not issued by this collector")
    try:
        encoded = token[len(prefix) :].encode("ascii")
        return base64.b64decode(encoded, altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise InvalidPageTokenError("page token is not valid base64") from error


def effective_page_size(requested: int) -> int:
    """Apply the default and the maximum to a requested page size.

    Raises ValueError for a negative size.
    """
    if requested < 0:
        raise ValueError(f"page_size must not be negative, got {requested}")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


class DeviceStreams(Protocol):
    """The open agent streams that the ops handlers act on (the AgentServicer)."""

    def close_device_streams(
        self, device_id: str, code: grpc.StatusCode, details: str
    ) -> int:
        """End the device's open streams with code and details; return how many."""
        ...

    def notify_policy_changed(self) -> None:
        """Send each open stream its effective policy if that changed."""
        ...

    def deliver_commands(self, device_ids: Sequence[str]) -> set[str]:
        """Send pending commands to open streams; return the devices that had one."""
        ...


class _Rejected(Exception):
    """A failed call of an audited method, ended by _ends_with_status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)
_Handler = Callable[
    [_Servicer, _Request, grpc.aio.ServicerContext], Awaitable[_Response]
]


def _ends_with_status(
    response_type: type[_Response],
) -> Callable[
    [_Handler[_Servicer, _Request, _Response]],
    _Handler[_Servicer, _Request, _Response],
]:
    """Make a handler end a _Rejected call by setting its status and returning.

    Audited methods fail this way rather than with context.abort, because
    abort sends the status at once, before the authorization interceptor has
    written the call's audit event. A client that reads the audit log right
    after a failed call then finds the event, and a collector that stops
    right after it does not lose the event.
    """

    def decorate(
        handler: _Handler[_Servicer, _Request, _Response],
    ) -> _Handler[_Servicer, _Request, _Response]:
        @functools.wraps(handler)
        async def run(
            servicer: _Servicer, request: _Request, context: grpc.aio.ServicerContext
        ) -> _Response:
            try:
                return await handler(servicer, request, context)
            except _Rejected as rejected:
                context.set_code(rejected.code)
                context.set_details(rejected.details)
                return response_type()

        return run

    return decorate


def _invalid(context: grpc.aio.ServicerContext, method: str, reason: str) -> _Rejected:
    logger.info("%s from %s rejected: %s", method, context.peer(), reason)
    return _Rejected(grpc.StatusCode.INVALID_ARGUMENT, reason)


def _log_rejected(
    context: grpc.aio.ServicerContext, method: str, rejected: _Rejected
) -> None:
    logger.info(
        "%s from %s rejected with %s: %s",
        method,
        context.peer(),
        rejected.code.name,
        rejected.details,
    )


def _failure(
    context: grpc.aio.ServicerContext, method: str, error: Exception
) -> _Rejected:
    """Log the traceback of error and return the short status to end the call with.

    A StoreError is UNAVAILABLE because the call is safe to retry once the
    database is back; anything else is INTERNAL.
    """
    logger.error("%s from %s failed", method, context.peer(), exc_info=error)
    if isinstance(error, StoreError):
        return _Rejected(grpc.StatusCode.UNAVAILABLE, "the database is unavailable")
    return _Rejected(grpc.StatusCode.INTERNAL, f"{method} failed on the collector")


def _to_datetime(name: str, timestamp: Timestamp) -> datetime:
    if not MIN_TIMESTAMP_SECONDS <= timestamp.seconds <= MAX_TIMESTAMP_SECONDS:
        raise ValueError(f"{name} has seconds {timestamp.seconds}, out of range")
    if not 0 <= timestamp.nanos <= 999_999_999:
        raise ValueError(f"{name} has nanos {timestamp.nanos}, out of range")
    return timestamp.ToDatetime(tzinfo=UTC)


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")


async def _abort_invalid(
    context: grpc.aio.ServicerContext, method: str, reason: str
) -> NoReturn:
    logger.info("%s from %s rejected: %s", method, context.peer(), reason)
    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, reason)


async def _abort_not_found(context: grpc.aio.ServicerContext, details: str) -> NoReturn:
    await _abort(context, grpc.StatusCode.NOT_FOUND, details)


async def _abort_failed(
    context: grpc.aio.ServicerContext, method: str, error: Exception
) -> NoReturn:
    """Log the traceback of error and end the call with a short status.

    A StoreError is UNAVAILABLE because the call is safe to retry once the
    database is back; anything else is INTERNAL.
    """
    logger.error("%s from %s failed", method, context.peer(), exc_info=error)
    if isinstance(error, StoreError):
        await _abort(
            context, grpc.StatusCode.UNAVAILABLE, "the database is unavailable"
        )
    await _abort(context, grpc.StatusCode.INTERNAL, f"{method} failed on the collector")
