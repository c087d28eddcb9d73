"""Convert a credential scan to its wire message."""

from __future__ import annotations

from agent.probes.credentials import CredentialReading, CredentialScan, PasswordExpiry
from agent.wire import probe_error_to_proto
from fleetmend.v1 import report_pb2

__all__ = ["credentials_to_proto"]

_EXPIRIES = {
    PasswordExpiry.NEVER: report_pb2.CREDENTIAL_EXPIRY_NEVER,
    PasswordExpiry.AT_TIME: report_pb2.CREDENTIAL_EXPIRY_AT_TIME,
    PasswordExpiry.MUST_CHANGE_NOW: report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW,
}


def credentials_to_proto(scan: CredentialScan) -> report_pb2.CredentialSection:
    """Build the credential section, one local password entry per account."""
    return report_pb2.CredentialSection(
        credentials=[_credential_to_proto(reading) for reading in scan.credentials],
        errors=[probe_error_to_proto(error) for error in scan.errors],
    )


def _credential_to_proto(reading: CredentialReading) -> report_pb2.Credential:
    message = report_pb2.Credential(
        kind=report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
        account=reading.account,
        expiry=_EXPIRIES[reading.expiry],
        source=reading.source,
    )
    if reading.expire_time is not None:
        message.expire_time.FromDatetime(reading.expire_time)
    return message
