"""The collector's TLS folder: CA, server certificate and enrollment secret.

``fleetmend-collector init`` creates these files in one folder (mode 0700):

- ``ca.pem`` (0644): the self-signed ECDSA P-256 CA certificate. Agents and
  operators verify the collector with it (``--ca-file``).
- ``ca.key`` (0600): the CA's private key, used only to issue server
  certificates.
- ``server.pem`` (0644) and ``server.key`` (0600): the server certificate,
  issued by the CA for every ``--name``, and its private key.
- ``enrollment-secret`` (0600): one line, ``fme1.<secret>``, that installers
  pass to ``fleetmend-agent enroll`` to get a node key.

Private keys and the secret are created with mode 0600 from the start under a
temporary name and then renamed into place, so they are never readable by
others and a reader never sees a half-written file.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import secrets
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector import auth
from collector.paths import default_data_dir

logger = logging.getLogger(__name__)

CA_CERT_FILENAME = "ca.pem"
CA_KEY_FILENAME = "ca.key"
SERVER_CERT_FILENAME = "server.pem"
SERVER_KEY_FILENAME = "server.key"
ENROLLMENT_SECRET_FILENAME = "enrollment-secret"  # noqa: S105 (a file name)
_TLS_FILENAMES = (
    CA_CERT_FILENAME,
    CA_KEY_FILENAME,
    SERVER_CERT_FILENAME,
    SERVER_KEY_FILENAME,
)

DIRECTORY_MODE = 0o700
PUBLIC_FILE_MODE = 0o644
PRIVATE_FILE_MODE = 0o600

DEFAULT_SERVER_DAYS = 397
# Apple platforms reject a TLS server certificate issued after 2019-07-01
# whose notBefore to notAfter period exceeds 825 days ("Requirements for
# trusted certificates in iOS 13 and macOS 10.15", support.apple.com/103769).
MAX_SERVER_DAYS = 825
DEFAULT_CA_DAYS = 3650
MAX_CA_DAYS = 36600
DEFAULT_WARN_WITHIN = timedelta(days=30)
# notBefore is set this long before the issue time, so that a peer whose clock
# is a little behind the collector's accepts a new certificate.
BACKDATE = timedelta(minutes=5)

PROG = "fleetmend-collector"

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_DNS_NAME_LENGTH = 253
# commonName is limited to 64 characters (RFC 5280, ub-common-name).
_MAX_COMMON_NAME_LENGTH = 64


class TLSSetupError(Exception):
    """A problem with the TLS folder; the message names the file and the fix."""


def init_tls_dir(
    directory: str | os.PathLike[str],
    names: Sequence[str],
    *,
    now: datetime | None = None,
    server_days: int = DEFAULT_SERVER_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
) -> list[Path]:
    """Create the CA, a server certificate for names and an enrollment secret.

    An existing CA and enrollment secret are kept. Returns the files created,
    in the order written. Raises ValueError for an invalid name or day count,
    and TLSSetupError when the folder already has a server certificate
    (renew_server_certificate replaces one) or its files cannot be used.
    now defaults to the current time; tests pass a time in the past to make
    an expired certificate.
    """
    folder = Path(directory)
    checked_names = validate_names(names)
    validate_server_days(server_days)
    if not 1 <= ca_days <= MAX_CA_DAYS:
        raise ValueError(
            f"invalid CA validity {ca_days} days; expected 1 to {MAX_CA_DAYS}"
        )
    issue_time = _aware(now)
    server_cert_path = folder / SERVER_CERT_FILENAME
    if server_cert_path.exists():
        raise TLSSetupError(
            f"{server_cert_path} already exists; renew it with "
            f"{PROG} init --renew --dir {folder}"
        )
    _make_directory(folder)
    created: list[Path] = []

    ca_cert_path = folder / CA_CERT_FILENAME
    ca_key_path = folder / CA_KEY_FILENAME
    if ca_cert_path.exists() or ca_key_path.exists():
        ca_cert, ca_key = _load_ca(folder)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue_ca_certificate(ca_key, issue_time, ca_days)
        _write_private_key(ca_key_path, ca_key)
        created.append(ca_key_path)
        _write_file(ca_cert_path, _certificate_pem(ca_cert), PUBLIC_FILE_MODE)
        created.append(ca_cert_path)

    created.extend(
        _issue_server_files(
            folder, ca_cert, ca_key, checked_names, issue_time, server_days
        )
    )

    secret_path = folder / ENROLLMENT_SECRET_FILENAME
    if not secret_path.exists():
        _write_enrollment_secret(secret_path)
        created.append(secret_path)
    return created


def renew_server_certificate(
    directory: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    now: datetime | None = None,
    server_days: int = DEFAULT_SERVER_DAYS,
) -> Path:
    """Issue a new server certificate and key from the folder's existing CA.

    names defaults to the names of the current server certificate. Returns
    the path of the new certificate. A running collector gives the new
    certificate to the connections that it accepts from then on (see
    ServerCertificateReloader).
    """
    folder = Path(directory)
    validate_server_days(server_days)
    if names is None:
        checked_names = certificate_names(
            _load_certificate(folder / SERVER_CERT_FILENAME)
        )
    else:
        checked_names = validate_names(names)
    ca_cert, ca_key = _load_ca(folder)
    _issue_server_files(
        folder, ca_cert, ca_key, checked_names, _aware(now), server_days
    )
    return folder / SERVER_CERT_FILENAME


def rotate_enrollment_secret(directory: str | os.PathLike[str]) -> None:
    """Replace the enrollment secret with a new random one.

    Devices that already enrolled keep their node keys; only new enrollments
    need the new secret.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise TLSSetupError(f"{folder} is missing; {_init_hint(folder)}")
    _write_enrollment_secret(folder / ENROLLMENT_SECRET_FILENAME)


def read_enrollment_secret(directory: str | os.PathLike[str]) -> str | None:
    """Read the enrollment secret of the folder; None when the file is missing.

    Raises TLSSetupError when the file cannot be read or does not contain an
    enrollment secret. The message never contains the file's text.
    """
    path = Path(directory) / ENROLLMENT_SECRET_FILENAME
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise TLSSetupError(_unreadable_message(path, error)) from None
    if not auth.is_valid_enrollment_secret(text):
        raise TLSSetupError(
            f"{path} does not contain an enrollment secret (fme1. followed by 43 "
            f"URL-safe base64 characters); write a new one with "
            f"{PROG} init --rotate-secret --dir {path.parent}"
        )
    return text


def load_server_credentials(
    directory: str | os.PathLike[str],
) -> grpc.ServerCredentials:
    """Return gRPC server credentials from the folder's server key and certificate.

    The credentials keep the contents that the files have at this call. The
    collector serves through ServerCertificateReloader instead, which rereads
    renewed files. The certificate chain sent to clients is the server certificate
    followed by the CA certificate. Raises TLSSetupError when a file is
    missing or unreadable, the key does not match the certificate, or the
    certificate was not issued by the folder's CA. An expired certificate is
    loaded: the server logs expiry_warning's text instead.
    """
    pair = _load_server_pair(Path(directory))
    return grpc.ssl_server_credentials([(pair.key_pem, pair.chain_pem)])


class ServerCertificateReloader:
    """The server key and certificate of a TLS folder, reread when they change.

    gRPC calls fetch() before each TLS handshake of the credentials() it
    serves with. fetch() compares the device, inode, size, mtime and ctime of
    server.pem, server.key and ca.pem with those of the files in service, and
    reads them again only when one differs. A pair that passes the checks of
    load_server_credentials goes to the connections accepted from then on.
    Open connections keep the session that they negotiated. A pair that fails
    a check (a half-written file, a key that does not match the certificate,
    a file that cannot be read) leaves the pair in service unchanged and logs
    one warning per version of the files. Safe to call from any thread.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Load the folder's pair, raising TLSSetupError as load_server_credentials."""
        self._folder = Path(directory)
        self._paths = _server_pair_paths(self._folder)
        self._lock = threading.Lock()
        pair = _load_server_pair(self._folder)
        # The pair that new connections get, and the pair last handed to gRPC.
        # They differ after refresh() loads a pair that no handshake fetched.
        self._current = pair
        self._configured = pair
        self._versions = pair.versions
        # What failed a check and was logged: the file versions, or the
        # message when a file could not be found or read at all. Those
        # versions are not read again.
        self._rejected: tuple[_FileVersion, ...] | str | None = None

    @property
    def certificate(self) -> x509.Certificate:
        """The server certificate that new connections get."""
        with self._lock:
            return self._current.certificate

    def credentials(self) -> grpc.ServerCredentials:
        """Return gRPC server credentials that call fetch() before each handshake."""
        with self._lock:
            initial = _certificate_configuration(self._configured)
        return grpc.dynamic_ssl_server_credentials(initial, self.fetch)

    def refresh(self) -> x509.Certificate:
        """Reread the files if they changed and return the certificate in service."""
        with self._lock:
            self._refresh()
            return self._current.certificate

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a renewed pair's configuration for gRPC once, else None.

        gRPC keeps the configuration that it has when this returns None.
        """
        with self._lock:
            self._refresh()
            if self._current is self._configured:
                return None
            self._configured = self._current
            return _certificate_configuration(self._current)

    def _refresh(self) -> None:
        names = certificate_names(self._current.certificate)
        try:
            versions = _file_versions(self._paths, names)
        except TLSSetupError as error:
            self._reject(str(error), str(error))
            return
        if versions in (self._versions, self._rejected):
            return
        try:
            pair = _load_server_pair(self._folder, names)
        except TLSSetupError as error:
            self._reject(versions, str(error))
            return
        self._rejected = None
        self._versions = pair.versions
        if (pair.key_pem, pair.chain_pem) == (
            self._current.key_pem,
            self._current.chain_pem,
        ):
            # The files were rewritten with the same contents, or only touched.
            return
        self._current = pair
        logger.info(
            "new connections get the server certificate %s with serial %x, "
            "valid until %s; open connections keep theirs",
            self._paths[0],
            pair.certificate.serial_number,
            pair.certificate.not_valid_after_utc.isoformat(),
        )

    def _reject(self, rejected: tuple[_FileVersion, ...] | str, problem: str) -> None:
        if rejected == self._rejected:
            return
        self._rejected = rejected
        logger.warning(
            "%s; new connections still get the server certificate with serial "
            "%x, valid until %s",
            problem,
            self._current.certificate.serial_number,
            self._current.certificate.not_valid_after_utc.isoformat(),
        )


def server_certificate_expiry(directory: str | os.PathLike[str]) -> datetime:
    """Return the notAfter time (UTC) of the folder's server certificate."""
    certificate = _load_certificate(Path(directory) / SERVER_CERT_FILENAME)
    return certificate.not_valid_after_utc


def expiry_warning(
    not_after: datetime,
    now: datetime,
    *,
    warn_within: timedelta = DEFAULT_WARN_WITHIN,
    directory: str | os.PathLike[str] | None = None,
) -> str | None:
    """Return a warning when the server certificate expires within warn_within.

    The text gives the expiry date, or that the certificate expired, and the
    command that renews it. It names the certificate file when directory is
    given.
    Returns None when not_after is further away than warn_within.
    """
    remaining = not_after - now
    if remaining > warn_within:
        return None
    folder = Path(directory) if directory is not None else None
    subject = "the server certificate"
    renew = f"{PROG} init --renew"
    if folder is not None:
        subject = f"the server certificate {folder / SERVER_CERT_FILENAME}"
        renew = f"{renew} --dir {folder}"
    date = not_after.astimezone(UTC).strftime("%Y-%m-%d")
    if remaining < timedelta(0):
        return f"{subject} expired on {date}; renew it with {renew}"
    days = round(remaining / timedelta(days=1))
    if days == 0:
        when = "in less than a day"
    elif days == 1:
        when = "in 1 day"
    else:
        when = f"in {days} days"
    return f"{subject} expires {when} ({date}); renew it with {renew}"


def validate_names(names: Sequence[str]) -> list[str]:
    """Return names without duplicates, each a valid DNS name or IP address.

    IP addresses are returned in their canonical form. Raises ValueError
    naming the first invalid value, or when names is empty.
    """
    if isinstance(names, str):
        raise ValueError(f"names must be a list of names, got the string {names!r}")
    checked: list[str] = []
    seen: set[str] = set()
    for name in names:
        canonical = validate_name(name)
        if canonical.lower() not in seen:
            seen.add(canonical.lower())
            checked.append(canonical)
    if not checked:
        raise ValueError(
            "no server name given; give the DNS names or IP addresses that "
            "agents connect to, for example --name collector.example.com"
        )
    return checked


def validate_name(name: str) -> str:
    """Return name if it is a valid DNS name or IP address (canonical form).

    Raises ValueError naming the value.
    """
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if _is_dns_name(name):
        return name
    raise ValueError(
        f"invalid server name {name!r}: expected a DNS name such as "
        f"collector.example.com or an IP address such as 192.0.2.10"
    )


def validate_server_days(days: int) -> None:
    """Raise ValueError naming days unless it is from 1 to MAX_SERVER_DAYS."""
    if isinstance(days, bool) or not 1 <= days <= MAX_SERVER_DAYS:
        raise ValueError(
            f"invalid server certificate validity {days!r} days; "
            f"expected a whole number from 1 to {MAX_SERVER_DAYS}"
        )


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses of a certificate's SAN, in order."""
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for entry in san:
        if isinstance(entry, x509.DNSName | x509.IPAddress):
            names.append(str(entry.value))
    return names


# The init command.


def add_init_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the ``init`` command to the subcommands of fleetmend-collector."""
    init = commands.add_parser(
        "init",
        help="create the TLS folder: CA, server certificate and enrollment secret",
        description=(
            "Create a CA, a server certificate issued by it and an enrollment "
            "secret. An existing CA and enrollment secret are kept."
        ),
    )
    init.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of the TLS files (default: {default_data_dir()})",
    )
    init.add_argument(
        "--name",
        dest="names",
        action="append",
        type=_name_argument,
        default=None,
        metavar="HOST",
        help=(
            "DNS name or IP address that agents connect to; repeat for every "
            "name (with --renew, default: the names of the current certificate)"
        ),
    )
    init.add_argument(
        "--renew",
        action="store_true",
        help="issue a new server certificate and key from the existing CA",
    )
    init.add_argument(
        "--rotate-secret",
        action="store_true",
        help=("write a new enrollment secret; enrolled devices keep their node keys"),
    )
    init.add_argument(
        "--days",
        type=_days_argument,
        default=None,
        metavar="N",
        help=(
            f"validity of the server certificate in days, 1 to {MAX_SERVER_DAYS} "
            f"(default: {DEFAULT_SERVER_DAYS})"
        ),
    )


def run_init(args: argparse.Namespace) -> int:
    """Run ``fleetmend-collector init`` with parsed args; return the exit code.

    Prints the files written and what to do with them, never a secret or a
    key. Exit code 2 for invalid options, 1 when the TLS folder cannot be set
    up, else 0.
    """
    folder: Path = args.dir if args.dir is not None else default_data_dir()
    names: list[str] | None = args.names
    days: int | None = args.days
    if args.rotate_secret and not args.renew and (names or days is not None):
        _print_error(
            "--name and --days set the server certificate; add --renew to issue "
            "a new one, or leave them out to only rotate the enrollment secret"
        )
        return 2
    if not args.renew and not args.rotate_secret and not names:
        _print_error(
            "init needs at least one --name HOST: a DNS name or IP address that "
            "agents connect to, for example --name collector.example.com"
        )
        return 2
    server_days = days if days is not None else DEFAULT_SERVER_DAYS
    try:
        if args.renew or args.rotate_secret:
            _renew_or_rotate(folder, names, server_days, args.renew, args.rotate_secret)
        else:
            assert names is not None
            created = init_tls_dir(folder, names, server_days=server_days)
            _print_init_summary(folder, created)
    except ValueError as error:
        _print_error(str(error))
        return 2
    except TLSSetupError as error:
        _print_error(str(error))
        return 1
    except OSError as error:
        _print_error(f"setting up {folder} failed: {error}")
        return 1
    return 0


def _renew_or_rotate(
    folder: Path,
    names: list[str] | None,
    server_days: int,
    renew: bool,
    rotate: bool,
) -> None:
    if renew:
        old_names = _current_names(folder) if names is not None else []
        cert_path = renew_server_certificate(folder, names, server_days=server_days)
        _print_written(folder / SERVER_KEY_FILENAME, PRIVATE_FILE_MODE)
        _print_written(cert_path, PUBLIC_FILE_MODE)
        _print_certificate(folder)
        _warn_dropped_names(folder, old_names, names or [])
        print(
            f"kept the CA in {folder / CA_CERT_FILENAME}: agents need no new CA file. "
            f"A running {PROG} serve gives the new certificate to new connections "
            "without a restart; open connections keep the old one until they "
            "reconnect."
        )
    if rotate:
        rotate_enrollment_secret(folder)
        _print_written(folder / ENROLLMENT_SECRET_FILENAME, PRIVATE_FILE_MODE)
        print(
            "Devices that already enrolled keep their node keys; new enrollments "
            "need the new secret. The collector reads the file at each enrollment, "
            "so no restart is needed."
        )
        _print_secret_handling(folder)


def _current_names(folder: Path) -> list[str]:
    """Return the names of the folder's server certificate, or [] if unreadable."""
    try:
        return certificate_names(_load_certificate(folder / SERVER_CERT_FILENAME))
    except TLSSetupError:
        return []


def _warn_dropped_names(
    folder: Path, old_names: Sequence[str], new_names: Sequence[str]
) -> None:
    kept = {name.lower() for name in new_names}
    dropped = [name for name in old_names if name.lower() not in kept]
    if not dropped:
        return
    shown = ", ".join(dropped)
    options = " ".join(f"--name {name}" for name in [*new_names, *dropped])
    print(
        f"warning: the new certificate no longer covers {shown}, which the old "
        "one did; agents and operators that connect by those names now fail "
        f"certificate verification. To keep them, renew with {PROG} init --renew "
        f"--dir {folder} {options}",
        file=sys.stderr,
    )


def _print_init_summary(folder: Path, created: list[Path]) -> None:
    for name in (
        CA_CERT_FILENAME,
        CA_KEY_FILENAME,
        SERVER_KEY_FILENAME,
        SERVER_CERT_FILENAME,
        ENROLLMENT_SECRET_FILENAME,
    ):
        path = folder / name
        mode = PUBLIC_FILE_MODE if name.endswith(".pem") else PRIVATE_FILE_MODE
        if path in created:
            _print_written(path, mode)
        else:
            print(f"kept    {path} (already present)")
    _print_certificate(folder)
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    if folder_mode & 0o077:
        print(
            f"note: {folder} has mode {folder_mode:04o}, so other users can list it; "
            f"the private files are 0600 anyway. Run chmod 700 {folder} to hide "
            "the file names too."
        )
    print(
        f"CA file for agents and operators: {folder / CA_CERT_FILENAME} "
        "(fleetmend-agent enroll --ca-file, fleetmend --ca-file)"
    )
    _print_secret_handling(folder)


def _print_written(path: Path, mode: int) -> None:
    print(f"wrote   {path} (mode {mode:04o})")


def _print_certificate(folder: Path) -> None:
    certificate = _load_certificate(folder / SERVER_CERT_FILENAME)
    names = ", ".join(certificate_names(certificate))
    expiry = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    print(f"server certificate for {names}, valid until {expiry}")


def _print_secret_handling(folder: Path) -> None:
    path = folder / ENROLLMENT_SECRET_FILENAME
    print(
        f"enrollment secret: {path} (readable by its owner only). Copy it to the "
        "machine that installs agents over a trusted channel and run "
        "fleetmend-agent enroll --secret-file FILE, or set FLEETMEND_ENROLL_SECRET; "
        "never put it on a command line."
    )


def _print_error(message: str) -> None:
    print(f"{PROG} init: error: {message}", file=sys.stderr)


def _name_argument(text: str) -> str:
    try:
        return validate_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _days_argument(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_SERVER_DAYS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of days from 1 to {MAX_SERVER_DAYS}, got {text!r}"
        )
    return days


# Certificates.


def _issue_ca_certificate(
    key: ec.EllipticCurvePrivateKey, now: datetime, days: int
) -> x509.Certificate:
    # A random suffix gives every CA its own subject, so a certificate from
    # another Fleetmend CA fails with "unable to get local issuer certificate".
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleetmend"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Fleetmend collector CA {secrets.token_hex(4)}"
            ),
        ]
    )
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256())


def _issue_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    now: datetime,
    days: int,
) -> x509.Certificate:
    # The validity period counts from notBefore, so --days 825 stays within
    # Apple's limit.
    not_before = now - BACKDATE
    not_after = not_before + timedelta(days=days)
    if ca_cert.not_valid_after_utc < not_after:
        # A certificate cannot be verified after its issuer expires, so it
        # ends with the CA.
        not_after = ca_cert.not_valid_after_utc
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleetmend")]
    if len(names[0]) <= _MAX_COMMON_NAME_LENGTH:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, names[0]))
    ca_key_id = ca_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(_subject_alternative_name(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def _subject_alternative_name(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue_server_files(
    folder: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    now: datetime,
    days: int,
) -> list[Path]:
    if ca_cert.not_valid_after_utc <= now:
        expired = ca_cert.not_valid_after_utc.strftime("%Y-%m-%d")
        raise TLSSetupError(
            f"{folder / CA_CERT_FILENAME} expired on {expired}; move ca.pem and "
            f"ca.key out of {folder}, run {PROG} init --dir {folder} --name HOST "
            "and give the agents the new ca.pem"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _issue_server_certificate(key, ca_cert, ca_key, names, now, days)
    key_path = folder / SERVER_KEY_FILENAME
    cert_path = folder / SERVER_CERT_FILENAME
    # Both files are written in full before either is renamed into place, so
    # the folder contains a mismatched pair only between two renames. The key
    # goes first: a collector that starts in that moment stops with an error
    # rather than serving with a stale pair, and a running one keeps the pair
    # it serves until the certificate follows.
    _write_files(
        [
            (key_path, _private_key_pem(key), PRIVATE_FILE_MODE),
            (cert_path, _certificate_pem(certificate), PUBLIC_FILE_MODE),
        ]
    )
    return [key_path, cert_path]


class _FileVersion(NamedTuple):
    """The identity of one version of a file, which a rename or a write changes."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> _FileVersion:
        return cls(
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
        )


@dataclass(frozen=True)
class _ServerPair:
    """A checked server key and certificate, as gRPC serves them."""

    certificate: x509.Certificate
    key_pem: bytes
    # The server certificate followed by the CA certificate.
    chain_pem: bytes
    # Versions of server.pem, server.key and ca.pem, in that order, that the
    # contents were read from.
    versions: tuple[_FileVersion, ...]


def _server_pair_paths(folder: Path) -> tuple[Path, Path, Path]:
    return (
        folder / SERVER_CERT_FILENAME,
        folder / SERVER_KEY_FILENAME,
        folder / CA_CERT_FILENAME,
    )


def _load_server_pair(folder: Path, names: Sequence[str] = ()) -> _ServerPair:
    """Read and check the folder's server pair.

    names, those of the certificate in service, go into the repair command of
    an error.
    """
    cert_path, key_path, ca_path = _server_pair_paths(folder)
    cert_data, cert_version = _read_file_version(cert_path, names)
    key_data, key_version = _read_file_version(key_path, names)
    ca_data, ca_version = _read_file_version(ca_path, names)
    certificate = _parse_certificate(cert_path, cert_data, names)
    key = _parse_private_key(key_path, key_data, names)
    ca_cert = _parse_certificate(ca_path, ca_data, names)
    if not _key_matches(key, certificate):
        raise TLSSetupError(
            f"{key_path} does not match {cert_path}; issue both again with "
            f"{PROG} init --renew --dir {folder}"
        )
    if not _issued_by(certificate, ca_cert):
        raise TLSSetupError(
            f"{cert_path} was not issued by the CA in {ca_path}; issue it again with "
            f"{PROG} init --renew --dir {folder}"
        )
    return _ServerPair(
        certificate=certificate,
        key_pem=_private_key_pem(key),
        chain_pem=_certificate_pem(certificate) + _certificate_pem(ca_cert),
        versions=(cert_version, key_version, ca_version),
    )


def _certificate_configuration(
    pair: _ServerPair,
) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.chain_pem)])


def _file_versions(
    paths: Sequence[Path], names: Sequence[str] = ()
) -> tuple[_FileVersion, ...]:
    versions: list[_FileVersion] = []
    for path in paths:
        try:
            versions.append(_FileVersion.of(os.stat(path)))
        except FileNotFoundError:
            raise TLSSetupError(
                f"{path} is missing; {_repair_hint(path, names)}"
            ) from None
        except OSError as error:
            raise TLSSetupError(_unreadable_message(path, error)) from None
    return tuple(versions)


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = folder / CA_CERT_FILENAME
    key_path = folder / CA_KEY_FILENAME
    if cert_path.exists() != key_path.exists():
        # Running init again would not help: it keeps an existing CA.
        missing, present = (
            (key_path, cert_path) if cert_path.exists() else (cert_path, key_path)
        )
        raise TLSSetupError(
            f"{missing} is missing but {present} exists; restore {missing.name} "
            f"from a backup, or move {present.name}, server.pem and server.key out "
            f"of {folder} and run {PROG} init --dir {folder} --name HOST to make a "
            "new CA, which every agent then needs"
        )
    ca_cert = _load_certificate(folder / CA_CERT_FILENAME)
    ca_key = _load_private_key(folder / CA_KEY_FILENAME)
    if not _key_matches(ca_key, ca_cert):
        raise TLSSetupError(
            f"{folder / CA_KEY_FILENAME} does not match {folder / CA_CERT_FILENAME}; "
            f"restore the CA's own key, or move both files out of {folder} and run "
            f"{PROG} init --dir {folder} --name HOST to make a new CA"
        )
    return ca_cert, ca_key


def _load_certificate(path: Path) -> x509.Certificate:
    return _parse_certificate(path, _read_file(path))


def _parse_certificate(
    path: Path, data: bytes, names: Sequence[str] = ()
) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TLSSetupError(
            f"{path} is not a PEM certificate; {_repair_hint(path, names)}"
        ) from None


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return _parse_private_key(path, _read_file(path))


def _parse_private_key(
    path: Path, data: bytes, names: Sequence[str] = ()
) -> ec.EllipticCurvePrivateKey:
    hint = _repair_hint(path, names)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's message is left out: it could quote the file's bytes.
        raise TLSSetupError(
            f"{path} is not an unencrypted PEM private key; {hint}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSSetupError(f"{path} is not an ECDSA private key; {hint}")
    return key


def _read_file(path: Path) -> bytes:
    return _read_file_version(path)[0]


def _read_file_version(
    path: Path, names: Sequence[str] = ()
) -> tuple[bytes, _FileVersion]:
    """Read path and return its bytes with the version of the file they came from.

    fstat on the open file ties the version to the inode that was read, even
    when a rename replaces path meanwhile.
    """
    try:
        with path.open("rb") as stream:
            version = _FileVersion.of(os.fstat(stream.fileno()))
            return stream.read(), version
    except FileNotFoundError:
        raise TLSSetupError(f"{path} is missing; {_repair_hint(path, names)}") from None
    except OSError as error:
        raise TLSSetupError(_unreadable_message(path, error)) from None


def _key_matches(
    key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
) -> bool:
    encoding = serialization.Encoding.DER
    public_format = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(encoding, public_format) == (
        certificate.public_key().public_bytes(encoding, public_format)
    )


def _issued_by(certificate: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _init_hint(folder: Path) -> str:
    return f"run {PROG} init --dir {folder} --name HOST"


def _repair_hint(path: Path, names: Sequence[str] = ()) -> str:
    """Return the command that replaces the missing or broken file path.

    init refuses to run over an existing server.pem and keeps an existing
    CA, so each file needs its own command. names are those of the
    certificate in service, when a running collector has one.
    """
    folder = path.parent
    name_options = " ".join(f"--name {name}" for name in names) or "--name HOST"
    if path.name == SERVER_KEY_FILENAME and (folder / SERVER_CERT_FILENAME).exists():
        return (
            f"issue a new key and certificate with {PROG} init --renew --dir {folder}"
        )
    if path.name in (SERVER_CERT_FILENAME, SERVER_KEY_FILENAME):
        if not (folder / SERVER_CERT_FILENAME).exists():
            return f"run {PROG} init --dir {folder} {name_options}"
        # renew takes its names from server.pem, which cannot be read here.
        return (
            f"issue a new key and certificate with {PROG} init --renew "
            f"--dir {folder} {name_options}"
        )
    if path.name in (CA_CERT_FILENAME, CA_KEY_FILENAME):
        if not any((folder / name).exists() for name in _TLS_FILENAMES):
            return _init_hint(folder)
        return (
            f"restore {path.name} from a backup, or move ca.pem, ca.key, server.pem "
            f"and server.key out of {folder} and run {PROG} init --dir {folder} "
            f"{name_options} to make a new CA, which every agent then needs"
        )
    return _init_hint(folder)


def _unreadable_message(path: Path, error: OSError | UnicodeDecodeError) -> str:
    reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
    return (
        f"cannot read {path}: {reason}; run the collector as the user that owns "
        f"{path.parent}, or fix the file's owner and mode"
    )


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got {now.isoformat()}")
    return now.astimezone(UTC)


def _is_dns_name(name: str) -> bool:
    if not name or len(name) > _MAX_DNS_NAME_LENGTH:
        return False
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return False
    # An all-numeric last label (as in 10.0.0.300) is no top-level domain and
    # is almost always a mistyped IP address.
    return not labels[-1].isdigit()


# Files.


def _make_directory(folder: Path) -> None:
    if folder.is_dir():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(folder, DIRECTORY_MODE)
    # mkdir applies the umask; a umask cannot add permissions, so this only
    # restores bits the umask removed from the owner.
    os.chmod(folder, DIRECTORY_MODE)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_file(path, _private_key_pem(key), PRIVATE_FILE_MODE)


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_enrollment_secret(path: Path) -> None:
    secret = auth.new_enrollment_secret()
    _write_file(path, (secret + "\n").encode("utf-8"), PRIVATE_FILE_MODE)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write data to path atomically: a new file with mode, then a rename."""
    _write_files([(path, data, mode)])


def _write_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write each (path, data, mode) to a temporary file, then rename all in order.

    A failed write renames nothing and removes the temporary files. The
    temporary files are created with O_EXCL and the final mode (private
    files are never wider than 0600), so no other user can open them while
    they are written.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_write_temporary(path, data, mode), path))
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for _, path in staged):
        _sync_directory(folder)


def _write_temporary(path: Path, data: bytes, mode: int) -> Path:
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, mode)
    try:
        if mode & 0o077:
            # A public file gets its full mode whatever the umask; fchmod
            # runs on the still empty file. Private files keep the mode of
            # os.open, which a umask can only narrow.
            os.fchmod(descriptor, mode)
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        temporary.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    return temporary


def _sync_directory(folder: Path) -> None:
    # fsync on the folder makes the rename durable on POSIX; Windows cannot
    # open a folder this way.
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
