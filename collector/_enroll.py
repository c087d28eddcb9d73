"""AgentService.Enroll: exchange the fleet's enrollment secret for a node key.

The secret is read from the TLS folder's enrollment-secret file, and read again
whenever the file's modification time, size or inode changes, so that
`fleetmend-collector init --rotate-secret` applies without a restart. Node
keys issued before a rotation stay valid.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import grpc

from collector import auth, tls
from collector._limits import DeviceRateLimiter, LogThrottle
from collector._validation import InvalidMessageError, validate_enroll_request
from collector.store import EnrollResult, Store
from fleetmend.v1 import agent_pb2

logger = logging.getLogger(__name__)


def peer_host(peer: str) -> str:
    """Return the address of a gRPC peer without its port.

    "ipv4:10.0.0.5:41000" gives "10.0.0.5", and "ipv6:[::1]:41000" gives "::1".
    Other peers, such as "unix:/run/x.sock", are returned as they are.
    """
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return rest.rpartition(":")[0] or rest
    if scheme == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.removeprefix("[").removesuffix("]")
    return peer


class _SecretFile:
    """The enrollment-secret file, read again only when its stat changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stat_key: tuple[int, int, int] | None = None
        self._secret: str | None = None

    def read(self) -> str | None:
        """Return the current secret, or None when the file is missing.

        Raises OSError or tls.TLSSetupError when the file cannot be read.
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._stat_key = None
            self._secret = None
            return None
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key != self._stat_key:
            self._secret = tls.read_enrollment_secret(self.path.parent)
            self._stat_key = key if self._secret is not None else None
        return self._secret


class EnrollServicer:
    """Serves AgentService.Enroll, limited per source address.

    Every call takes a token from the caller's address's bucket before
    anything else is checked, so a wrong secret costs a token too.
    """

    def __init__(
        self,
        store: Store,
        tls_dir: Path,
        *,
        clock: Callable[[], datetime],
        enrolls_per_minute: float,
        burst: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self._secret_file = _SecretFile(Path(tls_dir) / tls.ENROLLMENT_SECRET_FILENAME)
        self._enrolls_per_minute = enrolls_per_minute
        self._burst = burst
        self._limiter = DeviceRateLimiter(enrolls_per_minute / 60, burst, monotonic)
        self._limit_log = LogThrottle(clock=monotonic)

    def method_handler(self) -> grpc.RpcMethodHandler:
        """Return the method handler of Enroll, for AgentService's generic handler."""
        return grpc.unary_unary_rpc_method_handler(
            self.enroll,
            request_deserializer=agent_pb2.EnrollRequest.FromString,
            response_serializer=agent_pb2.EnrollResponse.SerializeToString,
        )

    async def enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        """Check the secret and issue a node key bound to the device id."""
        peer = context.peer()
        await self._apply_rate_limit(context, peer)
        try:
            validate_enroll_request(request)
        except InvalidMessageError as error:
            await self._reject_call(
                context, peer, grpc.StatusCode.INVALID_ARGUMENT, str(error)
            )
        expected = await self._read_secret(context, peer)
        if not auth.enrollment_secret_matches(request.enrollment_secret, expected):
            await self._reject_call(
                context,
                peer,
                grpc.StatusCode.UNAUTHENTICATED,
                "the enrollment secret is wrong; copy the current one from the "
                "collector's enrollment-secret file",
            )
        issued = auth.issue_node_key()
        try:
            result: EnrollResult = await asyncio.to_thread(
                self._store.enroll_device,
                request.device_id,
                request.hostname,
                request.agent_version,
                issued.credential_id,
                issued.secret_hash,
                self._clock(),
            )
        except Exception:
            logger.exception(
                "enrolling device %s from %s failed", request.device_id, peer
            )
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the collector could not store the enrollment; retry later",
            )
        self._log_enrolled(request, result, issued.credential_id, peer)
        return agent_pb2.EnrollResponse(
            device_id=result.device_id, node_key=issued.text
        )

    def _log_enrolled(
        self,
        request: agent_pb2.EnrollRequest,
        result: EnrollResult,
        key_id: str,
        peer: str,
    ) -> None:
        if result.new_id_assigned:
            logger.warning(
                "enrolled device %s (hostname %r) from %s with node key %s; the "
                "requested id %s belongs to a device that is enrolled or revoked, "
                "so a new id was assigned",
                result.device_id,
                request.hostname,
                peer,
                key_id,
                request.device_id,
            )
            return
        logger.info(
            "enrolled device %s (hostname %r) from %s with node key %s",
            result.device_id,
            request.hostname,
            peer,
            key_id,
        )

    async def _apply_rate_limit(
        self, context: grpc.aio.ServicerContext, peer: str
    ) -> None:
        address = peer_host(peer)
        if self._limiter.try_acquire(address):
            return
        wait = max(1, math.ceil(self._limiter.seconds_until_available(address)))
        self._log_rate_limited(address, peer)
        await _abort(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"more than {self._enrolls_per_minute:g} enrollment attempts per minute "
            f"(burst {self._burst}) from {address}; retry after {wait} s",
        )

    def _log_rate_limited(self, address: str, peer: str) -> None:
        held_back = self._limit_log.admit(address)
        if held_back is None:
            return
        logger.warning(
            "Enroll from %s rejected with RESOURCE_EXHAUSTED: more than %g attempts "
            "per minute (burst %d) from %s; %d rejections of this address were not "
            "logged since the previous line",
            peer,
            self._enrolls_per_minute,
            self._burst,
            address,
            held_back,
        )

    async def _read_secret(self, context: grpc.aio.ServicerContext, peer: str) -> str:
        try:
            secret = self._secret_file.read()
        except (OSError, tls.TLSSetupError) as error:
            logger.error("reading the enrollment secret failed: %s", error)
            await self._reject_call(
                context,
                peer,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the collector cannot read its enrollment secret; its log names "
                "the cause",
            )
        if secret is None:
            logger.error(
                "Enroll from %s: the enrollment secret file %s is missing; run "
                "fleetmend-collector init on the collector host",
                peer,
                self._secret_file.path,
            )
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the collector has no enrollment secret set up; run "
                "fleetmend-collector init on the collector host",
            )
        return secret

    async def _reject_call(
        self,
        context: grpc.aio.ServicerContext,
        peer: str,
        code: grpc.StatusCode,
        reason: str,
    ) -> NoReturn:
        logger.warning("Enroll from %s rejected with %s: %s", peer, code.name, reason)
        await _abort(context, code, reason)


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")
