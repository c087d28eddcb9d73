"""Tests of collector.auth: credential formats, hashing, roles per method."""

from __future__ import annotations

import hashlib
import re

import pytest

from collector import auth
from fleetmend.v1 import ops_pb2

NODE_KEY = re.compile(r"fmk1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")
OPERATOR_TOKEN = re.compile(r"fmt1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")
ENROLLMENT_SECRET = re.compile(r"fme1\.[A-Za-z0-9_-]{43}")


def test_node_key_format() -> None:
    issued = auth.issue_node_key()

    prefix, key_id, secret = issued.text.split(".")
    assert NODE_KEY.fullmatch(issued.text)
    assert prefix == "fmk1"
    assert key_id == issued.credential_id
    assert issued.secret_hash == hashlib.sha256(secret.encode()).hexdigest()


def test_operator_token_format() -> None:
    issued = auth.issue_operator_token()

    prefix, token_id, secret = issued.text.split(".")
    assert OPERATOR_TOKEN.fullmatch(issued.text)
    assert prefix == "fmt1"
    assert token_id == issued.credential_id
    assert issued.secret_hash == hashlib.sha256(secret.encode()).hexdigest()


def test_enrollment_secret_format() -> None:
    secret = auth.new_enrollment_secret()

    assert ENROLLMENT_SECRET.fullmatch(secret)
    assert auth.is_valid_enrollment_secret(secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fme1.",
        "fme1.short",
        "fmk1." + "A" * 43,
        "fme1." + "A" * 42 + "=",
        "fme1." + "A" * 44,
    ],
)
def test_enrollment_secret_invalid(text: str) -> None:
    assert not auth.is_valid_enrollment_secret(text)


def test_issued_credentials_differ() -> None:
    first = auth.issue_node_key()
    second = auth.issue_node_key()

    assert first.credential_id != second.credential_id
    assert first.text != second.text
    assert auth.new_enrollment_secret() != auth.new_enrollment_secret()


def test_issued_repr_hides_text() -> None:
    issued = auth.issue_operator_token()

    shown = repr(issued)

    assert issued.credential_id in shown
    assert issued.text not in shown
    assert issued.text.split(".")[2] not in shown
    assert issued.secret_hash not in shown


def test_parse_credential_round_trip() -> None:
    issued = auth.issue_node_key()

    credential_id, secret = auth.parse_credential(f"  {issued.text}\n", "fmk1")

    assert credential_id == issued.credential_id
    assert auth.hash_secret(secret) == issued.secret_hash


def test_parse_credential_other_kind() -> None:
    token = auth.issue_operator_token().text

    with pytest.raises(auth.InvalidCredentialError) as raised:
        auth.parse_credential(token, "fmk1")

    message = str(raised.value)
    assert "malformed node key" in message
    assert "got 'fmt1', the prefix of operator tokens" in message
    assert token not in message
    assert token.split(".")[2] not in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "got 1 dot-separated parts"),
        ("fmk1.0123456789abcdef", "got 2 dot-separated parts"),
        ("fmk1.0123456789abcdef." + "a" * 43 + ".x", "got 4 dot-separated parts"),
        ("fmx1.0123456789abcdef." + "a" * 43, "expected prefix 'fmk1'"),
        ("fmk1.0123456789ABCDEF." + "a" * 43, "id part is not 16 lowercase hex"),
        ("fmk1.0123456789abcde." + "a" * 43, "id part is not 16 lowercase hex"),
        ("fmk1.0123456789abcdef." + "a" * 42, "secret part is not 43"),
        ("fmk1.0123456789abcdef." + "a" * 42 + "+", "secret part is not 43"),
    ],
)
def test_parse_credential_malformed(text: str, reason: str) -> None:
    with pytest.raises(auth.InvalidCredentialError) as raised:
        auth.parse_credential(text, "fmk1")

    message = str(raised.value)
    assert reason in message
    assert "a" * 42 not in message


def test_invalid_credential_is_value_error() -> None:
    assert issubclass(auth.InvalidCredentialError, ValueError)


def test_secret_matches() -> None:
    issued = auth.issue_node_key()
    _, secret = auth.parse_credential(issued.text, "fmk1")
    other = auth.issue_node_key()

    assert auth.secret_matches(secret, issued.secret_hash)
    assert not auth.secret_matches(secret, other.secret_hash)
    assert not auth.secret_matches(secret[:-1] + "x", issued.secret_hash)
    assert not auth.secret_matches(secret, "")


def test_enrollment_secret_matches() -> None:
    expected = auth.new_enrollment_secret()

    assert auth.enrollment_secret_matches(expected, expected)
    assert not auth.enrollment_secret_matches(auth.new_enrollment_secret(), expected)
    assert not auth.enrollment_secret_matches(expected[:-1], expected)
    assert not auth.enrollment_secret_matches("", expected)


def test_hash_secret_is_sha256_hex() -> None:
    assert auth.hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("viewer", auth.Role.VIEWER),
        ("operator", auth.Role.OPERATOR),
        ("admin", auth.Role.ADMIN),
        ("Admin", auth.Role.ADMIN),
    ],
)
def test_role_parse(text: str, role: auth.Role) -> None:
    assert auth.Role.parse(text) is role


@pytest.mark.parametrize("text", ["", "root", "unspecified", "1"])
def test_role_parse_invalid(text: str) -> None:
    with pytest.raises(ValueError) as raised:
        auth.Role.parse(text)

    message = str(raised.value)
    assert repr(text) in message
    assert "viewer, operator, admin" in message


def test_role_values_match_proto() -> None:
    assert auth.Role.VIEWER == ops_pb2.ROLE_VIEWER
    assert auth.Role.OPERATOR == ops_pb2.ROLE_OPERATOR
    assert auth.Role.ADMIN == ops_pb2.ROLE_ADMIN
    assert {role.name for role in auth.Role} == {
        name.removeprefix("ROLE_")
        for name in ops_pb2.Role.DESCRIPTOR.values_by_name
        if name != "ROLE_UNSPECIFIED"
    }


def test_method_roles_cover_ops_service() -> None:
    service = ops_pb2.DESCRIPTOR.services_by_name["OpsService"]

    methods = {method.name for method in service.methods}

    assert set(auth.OPS_METHOD_ROLES) == methods


def test_method_roles() -> None:
    roles = auth.OPS_METHOD_ROLES

    assert roles["ListDevices"] is auth.Role.VIEWER
    assert roles["GetDevice"] is auth.Role.VIEWER
    assert roles["ListFindings"] is auth.Role.VIEWER
    assert roles["ListOutages"] is auth.Role.VIEWER
    assert roles["DeclareOutage"] is auth.Role.OPERATOR
    assert roles["RevokeDevice"] is auth.Role.ADMIN
    assert roles["ListTokens"] is auth.Role.ADMIN
    assert roles["RevokeToken"] is auth.Role.ADMIN
    assert roles["ListAuditEvents"] is auth.Role.ADMIN
    assert roles["SetPolicy"] is auth.Role.ADMIN
    assert roles["ChangeRuleState"] is auth.Role.OPERATOR
    assert roles["SendCommand"] is auth.Role.OPERATOR


def test_method_roles_read_only() -> None:
    with pytest.raises(TypeError):
        auth.OPS_METHOD_ROLES["DeclareOutage"] = auth.Role.VIEWER  # type: ignore[index]


def test_query_methods() -> None:
    assert (
        frozenset(
            {
                "ListDevices",
                "GetDevice",
                "ListFindings",
                "ListOutages",
                "GetPolicy",
                "ListRules",
                "ListRemediations",
            }
        )
        == auth.QUERY_METHODS
    )


@pytest.mark.parametrize(
    "name", ["alice", "alice-laptop", "ops.bot_2", "alice@example.com", "a" * 64]
)
def test_token_name_valid(name: str) -> None:
    auth.check_token_name(name)


@pytest.mark.parametrize(
    "name", ["", "-alice", "local:root", "two words", "a" * 65, "tab\tname", "é"]
)
def test_token_name_invalid(name: str) -> None:
    with pytest.raises(ValueError, match="invalid token name") as raised:
        auth.check_token_name(name)

    assert repr(name) in str(raised.value)


@pytest.mark.parametrize("name", ["unknown", "Unknown", "UNKNOWN", "unKnown"])
def test_token_name_unknown_reserved(name: str) -> None:
    with pytest.raises(ValueError, match="reserved for the actor") as raised:
        auth.check_token_name(name)

    assert repr(name) in str(raised.value)


def test_token_name_credential_rejected() -> None:
    secret = auth.new_enrollment_secret()

    with pytest.raises(ValueError, match="invalid token name") as raised:
        auth.check_token_name(secret)

    assert secret not in str(raised.value)


def test_token_name_invalid_redacts_token() -> None:
    token = auth.issue_operator_token().text

    with pytest.raises(ValueError, match="invalid token name") as raised:
        auth.check_token_name(token)

    assert token not in str(raised.value)
    assert "<redacted>" in str(raised.value)


def test_redact_secrets_every_kind() -> None:
    key = auth.issue_node_key().text
    token = auth.issue_operator_token().text
    secret = auth.new_enrollment_secret()
    text = f'{{"name":"{token}","key":"x{key}y","secret":" {secret}"}}'

    redacted = auth.redact_secrets(text)

    assert (
        redacted == '{"name":"<redacted>","key":"x<redacted>y","secret":" <redacted>"}'
    )


def test_redact_secrets_keeps_other_text() -> None:
    text = "fmt1.0123456789abcdef.short and fme1.tooShort and alice"

    assert auth.redact_secrets(text) == text
