"""Conversion of probe readings to fleetmend.v1 messages, one module per section."""

from __future__ import annotations

from agent.probes import ProbeError, ProbeErrorKind
from fleetmend.v1 import report_pb2

_ERROR_KINDS = {
    ProbeErrorKind.UNPARSED: report_pb2.PROBE_ERROR_KIND_UNPARSED,
    ProbeErrorKind.UNREADABLE: report_pb2.PROBE_ERROR_KIND_UNREADABLE,
}


def probe_error_to_proto(error: ProbeError) -> report_pb2.ProbeError:
    """Build one ProbeError message."""
    return report_pb2.ProbeError(
        source=error.source, kind=_ERROR_KINDS[error.kind], reason=error.reason
    )
