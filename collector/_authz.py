"""Operator authentication, roles and the audit log of OpsService calls.

OpsAuthInterceptor checks the operator token of every OpsService call, applies
the minimum role of the method from auth.OPS_METHOD_ROLES, and writes one audit
event for every call that is not a query, rejected calls included. Health
checking and reflection pass without a token.
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
from collector.store import Store, StoreError
from fleetmend.v1 import ops_pb2

logger = logging.getLogger(__name__)

OPS_SERVICE = ops_pb2.DESCRIPTOR.services_by_name["OpsService"].full_name
# The last-use time of a token is written at most this often, so that a
# script polling the collector does not write to the database on every call.
MARK_USED_INTERVAL_SECONDS = 60.0
# Actor of an audit event whose call carried no valid token.
UNKNOWN_ACTOR = "unknown"


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
    writes, such as "deviceId".
    """
    fields = json_format.MessageToDict(request)
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)


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
        try:
            await asyncio.to_thread(
                self._store.append_audit,
                self._clock(),
                operator.name if operator else UNKNOWN_ACTOR,
                operator.role if operator else None,
                method,
                request_json(request),
                outcome,
                peer,
            )
        except Exception as error:
            # NOTE: the call has already run, so a failed audit write loses the
            # event; the log line is then the only record of it.
            logger.error(
                "writing the audit event of %s from %s (actor %s, outcome %s) failed",
                method,
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
