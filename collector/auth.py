"""Credentials of the collector: node keys, operator tokens, enrollment secrets.

Formats:

- node key: ``fmk1.<key_id>.<secret>``, issued to one device at enrollment;
- operator token: ``fmt1.<token_id>.<secret>``, created on the collector host;
- enrollment secret: ``fme1.<secret>``, shared by the whole fleet.

key_id and token_id are 16 lowercase hex characters (8 random bytes). They are
not secret: the collector looks the credential up by its id, so the lookup is a
plain primary-key query whose timing does not depend on the secret, and a key
whose id belongs to another device can be rejected with PERMISSION_DENIED
rather than looking like a wrong key. The secret part is 32 bytes from the
``secrets`` module in URL-safe base64 without padding (43 characters).

The collector stores only ``sha256(secret)``, as hex, and compares digests with
``hmac.compare_digest``. A slow password hash (bcrypt, scrypt, Argon2) exists to
make guessing low-entropy passwords from a stolen hash expensive. These secrets
carry 256 random bits, so a leaked hash cannot be reversed by guessing, and a
fast hash keeps every authenticated call cheap.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

NODE_KEY_PREFIX = "fmk1"
OPERATOR_TOKEN_PREFIX = "fmt1"  # noqa: S105 (a format prefix, not a secret)
ENROLLMENT_SECRET_PREFIX = "fme1"  # noqa: S105 (a format prefix, not a secret)

# Random bytes of a credential id and of a secret part.
_ID_BYTES = 8
_SECRET_BYTES = 32
# Length of a secret part: URL-safe base64 of 32 bytes without the "=" padding.
SECRET_LENGTH = 43

# Operator token names: they become the actor of audit events, so they exclude
# ":", which marks local actors ("local:<login name>"), and whitespace.
TOKEN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

# Actor of audit events whose call carried no valid token, so no token may
# have this name, in any case.
UNKNOWN_ACTOR = "unknown"

# Node keys, operator tokens and enrollment secrets inside other text.
_SECRET_IN_TEXT_PATTERN = re.compile(
    r"fm[kt]1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}|fme1\.[A-Za-z0-9_-]{43}"
)
REDACTED = "<redacted>"

_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")


class Role(enum.IntEnum):
    """Role of an operator token; the values equal those of fleetmend.v1.Role."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        """Return the role named text ("viewer", "operator" or "admin", any case).

        Raises ValueError naming the value and the choices.
        """
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(role.label for role in cls)
            raise ValueError(
                f"unknown role {text!r}; choose one of {choices}"
            ) from None

    @property
    def label(self) -> str:
        """Lowercase name of the role, as the command line spells it."""
        return self.name.lower()


@dataclass(frozen=True, repr=False)
class IssuedCredential:
    """A newly issued node key or operator token.

    text is the whole credential and is shown once; the collector stores only
    credential_id and secret_hash. repr() leaves text out, so that a logged or
    printed object does not leak it.
    """

    credential_id: str
    secret_hash: str
    text: str

    def __repr__(self) -> str:
        return f"IssuedCredential(credential_id={self.credential_id!r})"


class InvalidCredentialError(ValueError):
    """A credential that is malformed or of another kind.

    The message names what is wrong and never contains the credential itself.
    """


def issue_node_key() -> IssuedCredential:
    """Return a new node key with a random key id."""
    return _issue(NODE_KEY_PREFIX)


def issue_operator_token() -> IssuedCredential:
    """Return a new operator token with a random token id."""
    return _issue(OPERATOR_TOKEN_PREFIX)


def new_enrollment_secret() -> str:
    """Return a new enrollment secret, ``fme1.<secret>``."""
    return f"{ENROLLMENT_SECRET_PREFIX}.{_new_secret()}"


def parse_credential(text: str, prefix: str) -> tuple[str, str]:
    """Split ``<prefix>.<id>.<secret>`` into the credential id and the secret.

    Surrounding whitespace is ignored. Raises InvalidCredentialError when text
    has another prefix, an id that is not 16 lowercase hex characters or a
    secret that is not 43 URL-safe base64 characters; the message names the
    part that is wrong, not the text.
    """
    kind = _KIND_BY_PREFIX.get(prefix, "credential")
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise InvalidCredentialError(
            f"malformed {kind}: expected {prefix}.<id>.<secret>, "
            f"got {len(parts)} dot-separated parts"
        )
    given_prefix, credential_id, secret = parts
    if given_prefix != prefix:
        expected = f"expected prefix {prefix!r}"
        other_kind = _KIND_BY_PREFIX.get(given_prefix)
        if other_kind is not None:
            raise InvalidCredentialError(
                f"malformed {kind}: {expected}, got {given_prefix!r}, the prefix "
                f"of {other_kind}s"
            )
        # An unknown prefix is not echoed: it may be part of a secret.
        raise InvalidCredentialError(f"malformed {kind}: {expected}")
    if not _ID_PATTERN.fullmatch(credential_id):
        raise InvalidCredentialError(
            f"malformed {kind}: the id part is not 16 lowercase hex characters"
        )
    if not _SECRET_PATTERN.fullmatch(secret):
        raise InvalidCredentialError(
            f"malformed {kind}: the secret part is not 43 URL-safe base64 characters"
        )
    return credential_id, secret


def hash_secret(secret: str) -> str:
    """Return the SHA-256 hex digest of a secret part, as the store keeps it."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Return whether secret hashes to stored_hash, comparing in constant time."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def enrollment_secret_matches(presented: str, expected: str) -> bool:
    """Return whether the presented enrollment secret equals the expected one.

    Both are hashed first, so that the comparison takes the same time whatever
    their lengths and contents.
    """
    return hmac.compare_digest(hash_secret(presented), hash_secret(expected))


def is_valid_enrollment_secret(text: str) -> bool:
    """Return whether text has the form ``fme1.<43 URL-safe base64 characters>``."""
    prefix, _, secret = text.partition(".")
    return prefix == ENROLLMENT_SECRET_PREFIX and bool(
        _SECRET_PATTERN.fullmatch(secret)
    )


def check_token_name(name: str) -> None:
    """Raise ValueError unless name is a valid operator token name.

    A name is 1 to 64 characters: letters, digits, ".", "_", "@" and "-",
    starting with a letter or digit. "unknown", in any case, is reserved for
    the actor of unauthenticated calls. The message redacts a credential
    pasted as the name.
    """
    if not TOKEN_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid token name {redact_secrets(name)!r}: use 1 to 64 letters, "
            "digits, '.', '_', '@' or '-', starting with a letter or digit, such "
            "as alice-laptop"
        )
    if redact_secrets(name) != name:
        raise ValueError(
            "invalid token name: it is a node key, operator token or enrollment "
            "secret, which must not be shown as an actor; choose a name such as "
            "alice-laptop"
        )
    if name.casefold() == UNKNOWN_ACTOR:
        raise ValueError(
            f"invalid token name {name!r}: {UNKNOWN_ACTOR!r} is reserved for the "
            "actor of unauthenticated calls in the audit log; choose another name"
        )


def redact_secrets(text: str) -> str:
    """Replace every node key, operator token and enrollment secret in text.

    Each match of the leak-check patterns becomes "<redacted>", so text that an
    operator typed can go into audit events, logs and error messages.
    """
    return _SECRET_IN_TEXT_PATTERN.sub(REDACTED, text)


# Minimum role of every fleetmend.v1.OpsService method, by method name.
OPS_METHOD_ROLES: Mapping[str, Role] = MappingProxyType(
    {
        "ListDevices": Role.VIEWER,
        "GetDevice": Role.VIEWER,
        "ListFindings": Role.VIEWER,
        "ListOutages": Role.VIEWER,
        "GetPolicy": Role.VIEWER,
        "ListRules": Role.VIEWER,
        "ListRemediations": Role.VIEWER,
        "DeclareOutage": Role.OPERATOR,
        "ChangeRuleState": Role.OPERATOR,
        "SendCommand": Role.OPERATOR,
        "RevokeDevice": Role.ADMIN,
        "ListTokens": Role.ADMIN,
        "RevokeToken": Role.ADMIN,
        "ListAuditEvents": Role.ADMIN,
        "SetPolicy": Role.ADMIN,
    }
)

# The read-only methods, open to viewers; a call of any other method is audited.
QUERY_METHODS: frozenset[str] = frozenset(
    name for name, role in OPS_METHOD_ROLES.items() if role is Role.VIEWER
)

_KIND_BY_PREFIX = {
    NODE_KEY_PREFIX: "node key",
    OPERATOR_TOKEN_PREFIX: "operator token",
    ENROLLMENT_SECRET_PREFIX: "enrollment secret",
}


def _issue(prefix: str) -> IssuedCredential:
    credential_id = secrets.token_hex(_ID_BYTES)
    secret = _new_secret()
    return IssuedCredential(
        credential_id=credential_id,
        secret_hash=hash_secret(secret),
        text=f"{prefix}.{credential_id}.{secret}",
    )


def _new_secret() -> str:
    # token_urlsafe returns URL-safe base64 without padding: 43 characters.
    return secrets.token_urlsafe(_SECRET_BYTES)
