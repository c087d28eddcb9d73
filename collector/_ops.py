"""The OpsService servicer and its page tokens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, NoReturn

import grpc

from collector._validation import InvalidMessageError, validate_device_id
from collector.findings import SortKey, compute_findings, sort_key
from collector.store import Store, StoreError
from fleetmend.v1 import ops_pb2, ops_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Devices read per store call while computing the findings of the whole fleet.
FLEET_SCAN_CHUNK = 500

# Page tokens are opaque to clients: a prefix naming the token's kind and
# format version, then urlsafe base64 of the position after which the next page
# starts.
_DEVICES_TOKEN_PREFIX = "d1."  # noqa: S105 - a page position, not a secret
_FINDINGS_TOKEN_PREFIX = "f1."  # noqa: S105 - a page position, not a secret


class InvalidPageTokenError(ValueError):
    """A page token that this collector did not issue."""


def encode_devices_token(last_device_id: str) -> str:
    """Return the token of the page that follows the device last_device_id."""
    encoded = base64.urlsafe_b64encode(last_device_id.encode()).decode()
    return _DEVICES_TOKEN_PREFIX + encoded


def decode_devices_token(token: str) -> str:
    """Return the device id after which the page of token starts."""
    device_id = _decode_base64(token, _DEVICES_TOKEN_PREFIX).decode(errors="replace")
    try:
        validate_device_id(device_id)
    except InvalidMessageError as error:
        raise InvalidPageTokenError("page token is not a device position") from error
    return device_id


def encode_findings_token(last: ops_pb2.Finding) -> str:
    """Return the token of the page that follows the finding last."""
    payload = json.dumps(list(sort_key(last)), separators=(",", ":"))
    encoded = base64.urlsafe_b64encode(payload.encode()).decode()
    return _FINDINGS_TOKEN_PREFIX + encoded


def decode_findings_token(token: str) -> SortKey:
    """Return the sort key after which the page of token starts."""
    raw = _decode_base64(token, _FINDINGS_TOKEN_PREFIX)
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise InvalidPageTokenError("page token is not a finding position") from error
    if not _is_sort_key(value):
        raise InvalidPageTokenError("page token is not a finding position")
    return (value[0], value[1], value[2], value[3], value[4])


def _is_sort_key(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 5:
        return False
    types = (int, str, int, str, str)
    return all(
        isinstance(item, kind) and not isinstance(item, bool)
        for item, kind in zip(value, types, strict=True)
    )


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


def iter_fleet(store: Store) -> Iterator[ops_pb2.Device]:
    """Yield every device with all its sections, in device id order."""
    after = ""
    while True:
        devices = store.list_devices(
            limit=FLEET_SCAN_CHUNK, after_device_id=after, full=True
        )
        yield from devices
        if len(devices) < FLEET_SCAN_CHUNK:
            return
        after = devices[-1].device_id


class _DeviceNotFoundError(LookupError):
    pass


class OpsServicer(ops_pb2_grpc.OpsServiceServicer):
    """Serves operators' queries from the store.

    Store calls run in worker threads so that a slow query does not stall the
    agents' streams on the event loop.
    """

    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    async def ListDevices(
        self, request: ops_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.ListDevicesResponse:
        try:
            page_size = effective_page_size(request.page_size)
            after = (
                decode_devices_token(request.page_token) if request.page_token else ""
            )
        except ValueError as error:
            await _abort_invalid(context, "ListDevices", str(error))
        try:
            devices = await asyncio.to_thread(
                self._store.list_devices,
                limit=page_size + 1,
                after_device_id=after,
                hostname=request.hostname,
            )
        except Exception as error:
            await _abort_failed(context, "ListDevices", error)
        response = ops_pb2.ListDevicesResponse(devices=devices[:page_size])
        if len(devices) > page_size:
            last_id = devices[page_size - 1].device_id
            response.next_page_token = encode_devices_token(last_id)
        return response

    async def GetDevice(
        self, request: ops_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.GetDeviceResponse:
        if not request.device_id:
            await _abort_invalid(context, "GetDevice", "device_id is required")
        try:
            device = await asyncio.to_thread(self._store.get_device, request.device_id)
        except Exception as error:
            await _abort_failed(context, "GetDevice", error)
        if device is None:
            await _abort_not_found(context, request.device_id)
        return ops_pb2.GetDeviceResponse(device=device)

    async def ListFindings(
        self, request: ops_pb2.ListFindingsRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.ListFindingsResponse:
        try:
            page_size = effective_page_size(request.page_size)
            after = (
                decode_findings_token(request.page_token)
                if request.page_token
                else None
            )
        except ValueError as error:
            await _abort_invalid(context, "ListFindings", str(error))
        try:
            findings = await asyncio.to_thread(
                self._findings_after, request.device_id, after, page_size + 1
            )
        except _DeviceNotFoundError:
            await _abort_not_found(context, request.device_id)
        except Exception as error:
            await _abort_failed(context, "ListFindings", error)
        response = ops_pb2.ListFindingsResponse(findings=findings[:page_size])
        if len(findings) > page_size:
            response.next_page_token = encode_findings_token(findings[page_size - 1])
        return response

    def _findings_after(
        self, device_id: str, after: SortKey | None, limit: int
    ) -> list[ops_pb2.Finding]:
        now = self._clock()
        if device_id:
            device = self._store.get_device(device_id)
            if device is None:
                raise _DeviceNotFoundError(device_id)
            devices: Iterator[ops_pb2.Device] = iter([device])
        else:
            devices = iter_fleet(self._store)
        # NOTE: every call computes the findings of the whole fleet and sorts
        # them, because findings depend on the time of the call and are not
        # stored. That is linear in the fleet size per page.
        findings = [
            finding for device in devices for finding in compute_findings(device, now)
        ]
        findings.sort(key=sort_key)
        if after is not None:
            findings = [finding for finding in findings if sort_key(finding) > after]
        return findings[:limit]


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


async def _abort_not_found(
    context: grpc.aio.ServicerContext, device_id: str
) -> NoReturn:
    await _abort(context, grpc.StatusCode.NOT_FOUND, f"device {device_id} not found")


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
