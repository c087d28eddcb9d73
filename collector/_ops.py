"""The OpsService servicer and its page tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc

from collector import auth, outages
from collector._authz import current_operator
from collector._ops_common import (
    FLEET_SCAN_CHUNK,
    DeviceStreams,
    InvalidPageTokenError,
    _abort_failed,
    _abort_invalid,
    _abort_not_found,
    _decode_base64,
    _ends_with_status,
    _failure,
    _invalid,
    _Rejected,
    _timestamp,
    _to_datetime,
    effective_page_size,
)
from collector._ops_healing import HealingHandlers
from collector._validation import (
    APP_ID_PATTERN,
    InvalidMessageError,
    validate_device_id,
)
from collector.findings import SortKey, compute_findings, sort_key
from collector.store import AuditRecord, OutageRecord, Store, TokenRecord
from fleetmend.v1 import ops_pb2

logger = logging.getLogger(__name__)

# Page tokens are opaque to clients: a prefix naming the token's kind and
# format version, then urlsafe base64 of the position after which the next page
# starts.
_DEVICES_TOKEN_PREFIX = "d1."  # noqa: S105 - a page position, not a secret
_FINDINGS_TOKEN_PREFIX = "f1."  # noqa: S105 - a page position, not a secret
_AUDIT_TOKEN_PREFIX = "a1."  # noqa: S105 - a page position, not a secret

# Limits of DeclareOutage, as ops.proto states them.
MAX_OUTAGE_SPAN = timedelta(days=7)
MAX_OUTAGE_MESSAGE_CHARS = 500
# IANA time zone names are at most about 30 characters long.
MAX_TIME_ZONE_CHARS = 64
# Status details that end a revoked device's open streams.
DEVICE_REVOKED_DETAILS = "device revoked by an operator"


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


def encode_audit_token(last_event_id: int) -> str:
    """Return the token of the page that follows the audit event last_event_id."""
    encoded = base64.urlsafe_b64encode(str(last_event_id).encode()).decode()
    return _AUDIT_TOKEN_PREFIX + encoded


def decode_audit_token(token: str) -> int:
    """Return the event id before which the page of token starts."""
    raw = _decode_base64(token, _AUDIT_TOKEN_PREFIX)
    text = raw.decode("ascii", errors="replace")
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 19):
        raise InvalidPageTokenError("page token is not an audit event position")
    return int(text)


def _is_sort_key(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 5:
        return False
    types = (int, str, int, str, str)
    return all(
        isinstance(item, kind) and not isinstance(item, bool)
        for item, kind in zip(value, types, strict=True)
    )


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


class OpsServicer(HealingHandlers):
    """Serves operators' queries and actions from the store.

    Store calls run in worker threads so that a slow query does not stall the
    agents' streams on the event loop. The authorization interceptor has checked
    the caller's token and role before a handler runs. The self-healing methods
    are inherited from HealingHandlers in collector._ops_healing.
    """

    def __init__(
        self, store: Store, clock: Callable[[], datetime], streams: DeviceStreams
    ) -> None:
        self._store = store
        self._clock = clock
        self._streams = streams

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
            await _abort_not_found(context, f"device {request.device_id} not found")
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
            await _abort_not_found(context, f"device {request.device_id} not found")
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

    @_ends_with_status(ops_pb2.DeclareOutageResponse)
    async def DeclareOutage(
        self,
        request: ops_pb2.DeclareOutageRequest,
        context: grpc.aio.ServicerContext,
    ) -> ops_pb2.DeclareOutageResponse:
        try:
            declaration = _parse_outage(request)
        except ValueError as error:
            raise _invalid(context, "DeclareOutage", str(error)) from None
        declared_by = current_operator().name
        try:
            record = await asyncio.to_thread(
                self._declare_outage, declaration, declared_by
            )
        except Exception as error:
            raise _failure(context, "DeclareOutage", error) from error
        logger.info(
            "outage %d of app %s declared by %s: %d devices affected",
            record.outage_id,
            record.app_id,
            declared_by,
            len(record.affected_device_ids),
        )
        return ops_pb2.DeclareOutageResponse(outage=outage_message(record))

    def _declare_outage(
        self, declaration: _OutageDeclaration, declared_by: str
    ) -> OutageRecord:
        hours = outages.covered_hours_of_week(
            declaration.start_time, declaration.end_time, declaration.zone
        )
        affected = tuple(
            device.device_id
            for device in iter_fleet(self._store)
            if device.HasField("usage")
            and outages.uses_app_in_hours(device.usage, declaration.app_id, hours)
        )
        return self._store.add_outage(
            declaration.app_id,
            declaration.start_time,
            declaration.end_time,
            declaration.time_zone,
            declaration.message,
            declared_by,
            self._clock(),
            affected,
        )

    async def ListOutages(
        self, request: ops_pb2.ListOutagesRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.ListOutagesResponse:
        if request.HasField("end_after_time"):
            try:
                end_after = _to_datetime("end_after_time", request.end_after_time)
            except ValueError as error:
                await _abort_invalid(context, "ListOutages", str(error))
        else:
            end_after = self._clock()
        try:
            records = await asyncio.to_thread(self._store.list_outages, end_after)
        except Exception as error:
            await _abort_failed(context, "ListOutages", error)
        return ops_pb2.ListOutagesResponse(
            outages=[outage_message(record) for record in records]
        )

    @_ends_with_status(ops_pb2.RevokeDeviceResponse)
    async def RevokeDevice(
        self, request: ops_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.RevokeDeviceResponse:
        if not request.device_id:
            raise _invalid(context, "RevokeDevice", "device_id is required")
        try:
            revoked_keys = await asyncio.to_thread(
                self._store.revoke_device, request.device_id, self._clock()
            )
        except Exception as error:
            raise _failure(context, "RevokeDevice", error) from error
        if revoked_keys is None:
            raise _Rejected(
                grpc.StatusCode.NOT_FOUND, f"device {request.device_id} not found"
            )
        # The keys are revoked first, so a stream that reconnects after this
        # point is rejected by its key.
        closed = self._streams.close_device_streams(
            request.device_id, grpc.StatusCode.UNAUTHENTICATED, DEVICE_REVOKED_DETAILS
        )
        logger.info(
            "device %s revoked by %s: %d node keys revoked, %d streams ended",
            request.device_id,
            current_operator().name,
            revoked_keys,
            closed,
        )
        return ops_pb2.RevokeDeviceResponse(
            revoked_keys=revoked_keys, stream_closed=closed > 0
        )

    @_ends_with_status(ops_pb2.ListTokensResponse)
    async def ListTokens(
        self, request: ops_pb2.ListTokensRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.ListTokensResponse:
        try:
            records = await asyncio.to_thread(self._store.list_tokens)
        except Exception as error:
            raise _failure(context, "ListTokens", error) from error
        return ops_pb2.ListTokensResponse(
            tokens=[token_message(record) for record in records]
        )

    @_ends_with_status(ops_pb2.RevokeTokenResponse)
    async def RevokeToken(
        self, request: ops_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext
    ) -> ops_pb2.RevokeTokenResponse:
        if not request.name:
            raise _invalid(context, "RevokeToken", "name is required")
        try:
            revoked = await asyncio.to_thread(
                self._store.revoke_token, request.name, self._clock()
            )
        except Exception as error:
            raise _failure(context, "RevokeToken", error) from error
        if revoked is None:
            raise _Rejected(
                grpc.StatusCode.NOT_FOUND,
                f"token {auth.redact_secrets(request.name)!r} not found",
            )
        if revoked:
            logger.info(
                "token %r revoked by %s",
                auth.redact_secrets(request.name),
                current_operator().name,
            )
        return ops_pb2.RevokeTokenResponse(revoked=revoked)

    @_ends_with_status(ops_pb2.ListAuditEventsResponse)
    async def ListAuditEvents(
        self,
        request: ops_pb2.ListAuditEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> ops_pb2.ListAuditEventsResponse:
        try:
            page_size = effective_page_size(request.page_size)
            before = (
                decode_audit_token(request.page_token) if request.page_token else None
            )
        except ValueError as error:
            raise _invalid(context, "ListAuditEvents", str(error)) from None
        try:
            records = await asyncio.to_thread(
                self._store.list_audit,
                page_size + 1,
                before_event_id=before,
                actor=request.actor,
            )
        except Exception as error:
            raise _failure(context, "ListAuditEvents", error) from error
        response = ops_pb2.ListAuditEventsResponse(
            events=[audit_message(record) for record in records[:page_size]]
        )
        if len(records) > page_size:
            last_id = records[page_size - 1].event_id
            response.next_page_token = encode_audit_token(last_id)
        return response


@dataclass(frozen=True)
class _OutageDeclaration:
    """A validated DeclareOutageRequest."""

    app_id: str
    start_time: datetime
    end_time: datetime
    # As requested: empty means UTC.
    time_zone: str
    zone: ZoneInfo
    message: str


def _parse_outage(request: ops_pb2.DeclareOutageRequest) -> _OutageDeclaration:
    """Validate a DeclareOutageRequest as ops.proto states; raise ValueError."""
    if not request.app_id:
        raise ValueError("app_id is required")
    if not APP_ID_PATTERN.fullmatch(request.app_id):
        raise ValueError(
            f"app_id {request.app_id[:80]!r} is not a catalog id "
            f"(it must match {APP_ID_PATTERN.pattern})"
        )

    for name in ("start_time", "end_time"):
        if not request.HasField(name):
            raise ValueError(f"{name} is required")
    start = _to_datetime("start_time", request.start_time)
    end = _to_datetime("end_time", request.end_time)

    if end <= start:
        raise ValueError(
            f"end_time {end.isoformat()} is not after start_time {start.isoformat()}"
        )
    if end - start > MAX_OUTAGE_SPAN:
        raise ValueError(
            f"the span from {start.isoformat()} to {end.isoformat()} is longer "
            f"than the maximum of {MAX_OUTAGE_SPAN.days} days"
        )
    validate_time_zone(request.time_zone)

    if len(request.message) > MAX_OUTAGE_MESSAGE_CHARS:
        raise ValueError(
            f"message has {len(request.message)} characters, more than the "
            f"maximum of {MAX_OUTAGE_MESSAGE_CHARS}"
        )
    if "\x00" in request.message:
        raise ValueError("message contains a NUL character")

    zone = ZoneInfo(request.time_zone or "UTC")
    return _OutageDeclaration(
        request.app_id, start, end, request.time_zone, zone, request.message
    )


def validate_time_zone(name: str) -> None:
    """Raise ValueError unless name is empty (UTC) or an IANA time zone name."""
    if not name:
        return
    quoted = repr(name[:MAX_TIME_ZONE_CHARS])
    if len(name) > MAX_TIME_ZONE_CHARS:
        raise ValueError(f"unknown time zone {quoted}...; give an IANA name")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {quoted}; give an IANA name such as Europe/Berlin"
        ) from None


def outage_message(record: OutageRecord) -> ops_pb2.Outage:
    """Return a stored outage as an Outage message."""
    return ops_pb2.Outage(
        outage_id=record.outage_id,
        app_id=record.app_id,
        start_time=_timestamp(record.start_time),
        end_time=_timestamp(record.end_time),
        time_zone=record.time_zone,
        message=record.message,
        declared_by=record.declared_by,
        declare_time=_timestamp(record.declare_time),
        affected_device_ids=record.affected_device_ids,
    )


def token_message(record: TokenRecord) -> ops_pb2.OperatorToken:
    """Return a stored operator token as an OperatorToken message, without its hash."""
    return ops_pb2.OperatorToken(
        name=record.name,
        role=ops_pb2.Role.ValueType(int(record.role)),
        create_time=_timestamp(record.create_time),
        revoke_time=_timestamp(record.revoke_time),
        last_use_time=_timestamp(record.last_use_time),
    )


def audit_message(record: AuditRecord) -> ops_pb2.AuditEvent:
    """Return a stored audit event as an AuditEvent message."""
    role = ops_pb2.ROLE_UNSPECIFIED if record.role is None else int(record.role)
    return ops_pb2.AuditEvent(
        event_id=record.event_id,
        event_time=_timestamp(record.event_time),
        actor=record.actor,
        role=ops_pb2.Role.ValueType(role),
        action=record.action,
        arguments_json=record.arguments_json,
        outcome=record.outcome,
        peer=record.peer,
    )
