"""Operator authentication, roles and the audit log of OpsService calls.

OpsAuthInterceptor checks the operator token of every OpsService call, applies
the minimum role of the method from auth.OPS_METHOD_ROLES, and writes one audit
event for every call that is not a query, rejected calls included. Health
checking and reflection pass without a token.

The audit log stays bounded under a flood. The stored request JSON is capped
at MAX_AUDIT_ARGUMENTS_BYTES. Of the UNAUTHENTICATED calls, only the first few
per source address and minute are audited and logged one by one, and the rest
are counted and written as one summary event and one log line per address.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from collector import auth
from collector._enroll import peer_host
from collector.store import Store, StoreError
from fleetmend.v1 import ops_pb2

logger = logging.getLogger(__name__)

OPS_SERVICE = ops_pb2.DESCRIPTOR.services_by_name["OpsService"].full_name
# The last-use time of a token is written at most this often, so that a
# script polling the collector does not write to the database on every call.
MARK_USED_INTERVAL_SECONDS = 60.0
# Actor of an audit event whose call carried no valid token.
UNKNOWN_ACTOR = auth.UNKNOWN_ACTOR
# Largest arguments_json of an audit event, in UTF-8 bytes. A larger request
# is stored as {"truncated": true, "bytes": N, "head": "<start of its JSON>"}.
MAX_AUDIT_ARGUMENTS_BYTES = 2048
# UNAUTHENTICATED calls audited and logged one by one per source address in
# each window; the rest are counted and summarized at the window's end.
UNAUTHENTICATED_AUDITS_PER_ADDRESS = 5
# UNAUTHENTICATED calls audited one by one in each window over all addresses,
# so that a flood from many addresses is bounded too.
UNAUTHENTICATED_AUDITS_PER_WINDOW = 100
UNAUTHENTICATED_WINDOW_SECONDS = 60.0
# Action of the audit event that counts UNAUTHENTICATED calls not audited one
# by one. It is not an OpsService method name.
THROTTLED_ACTION = "UnauthenticatedCalls"
# Source "address" of the summary of calls from addresses beyond
# UNAUTHENTICATED_AUDITS_PER_WINDOW.
OTHER_ADDRESSES = "other addresses"


class AuthorizationMetadataError(ValueError):
    """Missing or malformed "authorization" metadata. The message has no secret."""


@dataclass(frozen=True)
class Operator:
    """The token holder on whose behalf an OpsService handler runs."""

    name: str
    role: auth.Role
    # gRPC peer address of the call, such as "ipv4:127.0.0.1:50712".
    peer: str


_current_operator: contextvars.ContextVar[Operator] = contextvars.ContextVar(
    "fleetmend_current_operator"
)


def current_operator() -> Operator:
    """Return the operator of the OpsService call that is being handled.

    Raises LookupError outside a handler that OpsAuthInterceptor runs.
    """
    return _current_operator.get()


def bearer_credential(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """Return the credential in the call's "authorization: Bearer ..." metadata.

    Raises AuthorizationMetadataError when the metadata is missing, repeated or
    not a bearer credential. The message never contains the value.
    """
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        raise AuthorizationMetadataError(
            "the call has no authorization metadata; send 'authorization: Bearer "
            "<credential>'"
        )
    if len(values) > 1:
        raise AuthorizationMetadataError(
            f"the call has {len(values)} authorization metadata entries; send one"
        )
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    scheme, _, credential = str(value).strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise AuthorizationMetadataError(
            "the authorization metadata is not of the form 'Bearer <credential>'"
        )
    return credential


def status_code_name(code: object) -> str:
    """Return the name of a status code that grpc.aio reports as enum or number."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate.name
    return "UNKNOWN"


def request_json(request: Message) -> str:
    """Return the request as compact JSON, for the audit log.

    The field names are the proto3 JSON names that json_format.MessageToJson
    writes, such as "deviceId". A request that json_format cannot write, such
    as one with a Timestamp out of range, gives {"unserializable": true,
    "type": ..., "bytes": ...} and one log line. Credentials in it are
    redacted, and a result longer than MAX_AUDIT_ARGUMENTS_BYTES is truncated.
    """
    try:
        fields = json_format.MessageToDict(request)
    except Exception as error:
        # Any failure is caught: the audit event must be written whatever the
        # request contains.
        name = request.DESCRIPTOR.full_name
        size = request.ByteSize()
        logger.warning(
            "the %s of %d bytes cannot be written as JSON, so its audit event "
            "stores only its type and size: %s",
            name,
            size,
            _one_line(auth.redact_secrets(str(error))),
        )
        fields = {"unserializable": True, "type": name, "bytes": size}
    text = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    return audit_arguments(text)


def audit_arguments(text: str) -> str:
    """Return JSON text as an audit event stores it: redacted and capped.

    Every credential becomes "<redacted>", which keeps the JSON valid because
    credentials contain no character that JSON escapes. A result over
    MAX_AUDIT_ARGUMENTS_BYTES becomes {"truncated": true, "bytes": N, "head":
    H}, where N is the full size in UTF-8 bytes and H the start of the text.
    """
    text = auth.redact_secrets(text)
    size = len(text.encode("utf-8"))
    if size <= MAX_AUDIT_ARGUMENTS_BYTES:
        return text
    head_chars = MAX_AUDIT_ARGUMENTS_BYTES
    while True:
        capped = json.dumps(
            {"bytes": size, "head": text[:head_chars], "truncated": True},
            separators=(",", ":"),
            sort_keys=True,
        )
        overflow = len(capped.encode("utf-8")) - MAX_AUDIT_ARGUMENTS_BYTES
        if overflow <= 0:
            return capped
        # Escapes and multibyte characters take more than one byte each, so
        # cutting overflow characters may cut more than needed, never less
        # than one character.
        head_chars = max(0, head_chars - max(1, overflow))


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _UnauthenticatedThrottle:
    """Counts of UNAUTHENTICATED calls per source address and fixed window.

    Time is cut into fixed windows of UNAUTHENTICATED_WINDOW_SECONDS. In each
    window the first UNAUTHENTICATED_AUDITS_PER_ADDRESS calls of an address
    are admitted, up to UNAUTHENTICATED_AUDITS_PER_WINDOW over all addresses.
    The rest are counted per address (or under OTHER_ADDRESSES when their
    address had no admitted call), so memory grows with the admitted
    addresses only. admit decides which calls are audited one by one. Only
    the event loop calls it.
    """

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._window_start = monotonic()
        self._admitted: dict[str, int] = {}
        self._admitted_total = 0
        # Held-back calls per address, and per method within it.
        self._held: dict[str, dict[str, int]] = {}

    def admit(self, address: str, method: str) -> bool:
        """Count one call; return True if it is to be audited and logged."""
        admitted = self._admitted.get(address, 0)
        under_total = self._admitted_total < UNAUTHENTICATED_AUDITS_PER_WINDOW
        if under_total and admitted < UNAUTHENTICATED_AUDITS_PER_ADDRESS:
            self._admitted[address] = admitted + 1
            self._admitted_total += 1
            return True
        key = address if address in self._admitted else OTHER_ADDRESSES
        methods = self._held.setdefault(key, {})
        methods[method] = methods.get(method, 0) + 1
        return False

    def seconds_left(self) -> float:
        """Return the seconds until the current window ends, 0 if it has."""
        end = self._window_start + UNAUTHENTICATED_WINDOW_SECONDS
        return max(0.0, end - self._monotonic())

    def has_held_calls(self) -> bool:
        """Return whether the current window has calls not audited one by one."""
        return bool(self._held)

    def end_window_if_over(self) -> dict[str, dict[str, int]]:
        """Start a new window if the current one is over; return its held calls.

        The result maps each address to its held-back calls per method, and
        is empty while the window lasts.
        """
        if self.seconds_left() > 0:
            return {}
        held = self._held
        self._window_start = self._monotonic()
        self._admitted = {}
        self._admitted_total = 0
        self._held = {}
        return held


class _RejectedError(Exception):
    """An OpsService call that authentication or the role check rejects."""

    def __init__(
        self, code: grpc.StatusCode, details: str, operator: Operator | None = None
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.operator = operator


_Handler = Callable[[Any, Any], Awaitable[Any]]


class _AuditOnce:
    """Writes the audit event of one call, the first time write is awaited."""

    def __init__(self, write: Callable[[str], Awaitable[None]]) -> None:
        self._write = write
        self.written = False

    async def write(self, outcome: str) -> None:
        if self.written:
            return
        self.written = True
        await self._write(outcome)


class _AuditingContext:
    """The call's context, writing the audit event before an abort ends the call.

    grpc.aio sends the status as soon as a handler calls abort, so the event
    is written first. A client that sees the outcome can then read the event.
    """

    def __init__(self, context: grpc.aio.ServicerContext, audit: _AuditOnce) -> None:
        self._context = context
        self._audit = audit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> NoReturn:
        await self._audit.write(status_code_name(code))
        await self._context.abort(code, *args, **kwargs)
        raise AssertionError("context.abort returned")

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self._audit.write(status_code_name(status.code))
        await self._context.abort_with_status(status)
        raise AssertionError("context.abort_with_status returned")


class OpsAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorizes and audits every OpsService call.

    Store calls run in worker threads. A token must parse, exist, match its
    stored hash and not be revoked, else the call fails with UNAUTHENTICATED.
    A role below the method's minimum fails it with PERMISSION_DENIED.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self._monotonic = monotonic
        self._marked_times: dict[str, float] = {}
        self._throttle = _UnauthenticatedThrottle(monotonic)
        self._summary_timer: asyncio.TimerHandle | None = None
        # Summary writes in progress, referenced so that they are not
        # garbage-collected before they finish.
        self._summary_tasks: set[asyncio.Task[None]] = set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap each OpsService method handler in the token and role checks."""
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method
        prefix = f"/{OPS_SERVICE}/"
        if handler is None or not path.startswith(prefix):
            return handler
        method = path[len(prefix) :]
        metadata = handler_call_details.invocation_metadata
        inner: _Handler | None = handler.unary_unary
        if inner is None:
            # Every OpsService method is unary. A streaming method added to
            # ops.proto must get its own wrapper here before it is served.
            raise TypeError(f"OpsService method {method} is not unary-unary")
        serve = inner

        async def guarded(request: Message, context: grpc.aio.ServicerContext) -> Any:
            return await self._run(method, metadata, serve, request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _run(
        self,
        method: str,
        metadata: Sequence[tuple[str, Any]] | None,
        inner: _Handler,
        request: Message,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        peer = context.peer()
        audited = method not in auth.QUERY_METHODS
        try:
            operator = await self._authorize(method, metadata, peer)
        except _RejectedError as rejection:
            await self._record_rejection(method, request, peer, rejection, audited)
            await _abort(context, rejection.code, rejection.details)

        if not audited:
            return await self._call_as(operator, inner, request, context)
        audit = _AuditOnce(
            lambda outcome: self._audit(method, request, operator, outcome, peer)
        )
        try:
            response = await self._call_as(
                operator, inner, request, _AuditingContext(context, audit)
            )
        except grpc.aio.AbortError:
            await audit.write(status_code_name(context.code()))
            raise
        except asyncio.CancelledError:
            # Shielded, so that a call cancelled by its client is still
            # written to the audit log.
            await asyncio.shield(audit.write("CANCELLED"))
            raise
        except Exception:
            # gRPC ends the call with UNKNOWN.
            await audit.write("UNKNOWN")
            raise
        code = context.code()
        await audit.write("OK" if code is None else status_code_name(code))
        return response

    async def _record_rejection(
        self,
        method: str,
        request: Message,
        peer: str,
        rejection: _RejectedError,
        audited: bool,
    ) -> None:
        """Log and audit a rejected call, throttling UNAUTHENTICATED ones."""
        await self._write_summaries_if_due()
        unauthenticated = rejection.code == grpc.StatusCode.UNAUTHENTICATED
        if unauthenticated and not self._throttle.admit(peer_host(peer), method):
            self._schedule_summaries()
            return
        logger.warning(
            "%s from %s (actor %s) rejected with %s: %s",
            method,
            peer,
            rejection.operator.name if rejection.operator else UNKNOWN_ACTOR,
            rejection.code.name,
            rejection.details,
        )
        if audited:
            await self._audit(
                method, request, rejection.operator, rejection.code.name, peer
            )

    def _schedule_summaries(self) -> None:
        # One timer per window writes the summaries when it ends, so that the
        # last window of a flood is summarized without waiting for a call.
        # NOTE: calls held back in a window that is still open when the server
        # stops are in no log line and no audit event.
        if self._summary_timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._summary_timer = loop.call_later(
            self._throttle.seconds_left(), self._on_summary_timer
        )

    def _on_summary_timer(self) -> None:
        self._summary_timer = None
        if self._throttle.seconds_left() > 0:
            # The timer ran early by the monotonic clock; try again later.
            if self._throttle.has_held_calls():
                self._schedule_summaries()
            return
        task = asyncio.get_running_loop().create_task(self._write_summaries_if_due())
        self._summary_tasks.add(task)
        task.add_done_callback(self._summary_tasks.discard)

    async def _write_summaries_if_due(self) -> None:
        held = self._throttle.end_window_if_over()
        for address, methods in held.items():
            await self._write_summary(address, methods)

    async def _write_summary(self, address: str, methods: dict[str, int]) -> None:
        count = sum(methods.values())
        summary = (
            f"{count} more unauthenticated calls from {address}, not audited one by one"
        )
        logger.warning(
            "%s in the last %g s: %s",
            summary,
            UNAUTHENTICATED_WINDOW_SECONDS,
            ", ".join(f"{name} {calls}" for name, calls in sorted(methods.items())),
        )
        arguments = {
            "calls": count,
            "methods": methods,
            "summary": summary,
            "windowSeconds": UNAUTHENTICATED_WINDOW_SECONDS,
        }
        text = json.dumps(arguments, separators=(",", ":"), sort_keys=True)
        await self._append_audit(
            THROTTLED_ACTION,
            audit_arguments(text),
            None,
            grpc.StatusCode.UNAUTHENTICATED.name,
            address,
        )

    @staticmethod
    async def _call_as(
        operator: Operator, inner: _Handler, request: Message, context: Any
    ) -> Any:
        reset = _current_operator.set(operator)
        try:
            return await inner(request, context)
        finally:
            _current_operator.reset(reset)

    async def _authorize(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None, peer: str
    ) -> Operator:
        operator = await self._authenticate(metadata, peer)
        # A method missing from the table needs the highest role.
        required = auth.OPS_METHOD_ROLES.get(method, auth.Role.ADMIN)
        if operator.role < required:
            raise _RejectedError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the {required.name.lower()} role, and token "
                f"{operator.name} has the {operator.role.name.lower()} role",
                operator,
            )
        return operator

    async def _authenticate(
        self, metadata: Sequence[tuple[str, Any]] | None, peer: str
    ) -> Operator:
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        try:
            text = bearer_credential(metadata)
            token_id, secret = auth.parse_credential(text, auth.OPERATOR_TOKEN_PREFIX)
        except (AuthorizationMetadataError, auth.InvalidCredentialError) as error:
            raise _RejectedError(unauthenticated, str(error)) from None
        try:
            record = await asyncio.to_thread(self._store.find_token, token_id)
        except StoreError as error:
            logger.error(
                "looking up operator token %s failed", token_id, exc_info=error
            )
            raise _RejectedError(
                grpc.StatusCode.UNAVAILABLE,
                "the collector could not check the token; retry later",
            ) from None
        if record is None or not auth.secret_matches(secret, record.token_hash):
            raise _RejectedError(
                unauthenticated,
                f"operator token {token_id} is not valid; ask an admin for a token",
            )
        if record.revoke_time is not None:
            # The secret matched, so the audit event can name the token's
            # owner: a revoked token still in use is worth investigating.
            raise _RejectedError(
                unauthenticated,
                f"operator token {record.name} was revoked; ask an admin for a new "
                "token",
                Operator(name=record.name, role=record.role, peer=peer),
            )
        await self._mark_used(token_id)
        return Operator(name=record.name, role=record.role, peer=peer)

    async def _mark_used(self, token_id: str) -> None:
        now = self._monotonic()
        last = self._marked_times.get(token_id)
        if last is not None and now - last < MARK_USED_INTERVAL_SECONDS:
            return
        self._marked_times[token_id] = now
        try:
            await asyncio.to_thread(
                self._store.mark_token_used, token_id, self._clock()
            )
        except StoreError as error:
            # The call goes on: the last-use time is informational.
            logger.error(
                "recording the use of operator token %s failed",
                token_id,
                exc_info=error,
            )

    async def _audit(
        self,
        method: str,
        request: Message,
        operator: Operator | None,
        outcome: str,
        peer: str,
    ) -> None:
        await self._append_audit(method, request_json(request), operator, outcome, peer)

    async def _append_audit(
        self,
        action: str,
        arguments_json: str,
        operator: Operator | None,
        outcome: str,
        peer: str,
    ) -> None:
        try:
            await asyncio.to_thread(
                self._store.append_audit,
                self._clock(),
                operator.name if operator else UNKNOWN_ACTOR,
                operator.role if operator else None,
                action,
                arguments_json,
                outcome,
                peer,
            )
        except Exception as error:
            # NOTE: the call has already run, so a failed audit write loses the
            # event; the log line is then the only record of it.
            logger.error(
                "writing the audit event of %s from %s (actor %s, outcome %s) failed",
                action,
                peer,
                operator.name if operator else UNKNOWN_ACTOR,
                outcome,
                exc_info=error,
            )


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")
