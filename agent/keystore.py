"""Storage of the node key: the system keyring, or an owner-only file.

The node key is the device's credential for every Connect stream. It goes into
the keyring (service "fleetmend", user "node-key <state dir>") when a keyring
backend works. Headless Linux services usually have none, so there it goes
into ``<state dir>/node-key`` with mode 0600. The ``key_store`` setting
(auto, keyring or file) picks the store, and auto keeps the reason why the
keyring was not used, so that ``diagnose`` can print it. No function here logs
the key or puts it in an error message.

``read_node_key`` reads a keyring-stored key in a child Python process
(``python -m agent.keystore``). On Linux, keyring's Secret Service backend
loads secretstorage, jeepney and cryptography, and a read in process added
13.1 MiB to the RSS of the agent's modules (bench/keyring_read.py). That
memory would stay in the long-running agent after its one read at start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

KEYRING_SERVICE = "fleetmend"
NODE_KEY_FILE = "node-key"
KEY_STORES = ("auto", "keyring", "file")
# Bound on the child process that reads a key from the keyring. keyring's D-Bus
# calls have no timeout of their own.
KEYRING_READ_TIMEOUT_SECONDS = 60.0
# Exit status of that child when the store raised KeyStoreError.
_KEY_STORE_ERROR_EXIT = 3


class KeyStoreError(Exception):
    """The node key cannot be stored or read; the message names the store and fix."""


class NodeKeyStore(Protocol):
    """A place that keeps one node key."""

    kind: str  # "keyring" or "file"

    def describe(self) -> str:
        """Return one line naming the store, for diagnose and enroll."""
        ...

    def read(self) -> str | None:
        """Return the stored key, or None when none is stored."""
        ...

    def write(self, key: str) -> None:
        """Store key, replacing any earlier one."""
        ...


def keyring_username(state_dir: Path) -> str:
    """Return the keyring user name of the node key of one state directory."""
    return f"node-key {os.path.abspath(state_dir)}"


def _secret_service_reason() -> str | None:
    """Return why the Secret Service backend is unavailable, or None if it loads."""
    try:
        from keyring.backends import SecretService

        SecretService.Keyring.priority  # noqa: B018 - raises with the reason
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return str(exc) or type(exc).__name__
    return None


def _locked_collection_reason() -> str | None:
    """Return a reason when the Secret Service default collection is locked.

    keyring would ask the Secret Service to unlock it, which opens a password
    prompt. A background agent cannot answer one, so a locked collection counts
    as unusable.
    """
    try:
        import secretstorage
    except ImportError:
        return None
    try:
        connection = secretstorage.dbus_init()
        try:
            collection = secretstorage.get_default_collection(connection)
            if collection.is_locked():
                return "the Secret Service default collection is locked"
        finally:
            connection.close()
    except Exception as exc:  # noqa: BLE001 - D-Bus and Secret Service errors vary
        return f"the Secret Service cannot be used: {exc}"
    return None


def find_keyring_backend() -> tuple[object | None, str]:
    """Return the usable keyring backend and its name, or None and the reason.

    Unusable: keyring's fail and null backends, a chainer without backends, a
    missing keyring package, and a Secret Service without a D-Bus session or
    with a locked collection.
    """
    try:
        import keyring
        from keyring.backends import chainer, fail, null
    except ImportError as exc:
        return None, f"the keyring package is not installed ({exc})"

    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring):
        reason = _secret_service_reason() if sys.platform.startswith("linux") else None
        return None, reason or "keyring found no backend on this system"
    if isinstance(backend, null.Keyring):
        return None, "the keyring backend is the null backend, which stores nothing"
    if isinstance(backend, chainer.ChainerBackend):
        backends = list(backend.backends)
        if not backends:
            return None, "keyring's chainer backend has no backends to use"
    else:
        backends = [backend]

    from keyring.backends import SecretService

    if any(isinstance(item, SecretService.Keyring) for item in backends):
        reason = _locked_collection_reason()
        if reason is not None:
            return None, reason
    return backend, str(getattr(backend, "name", type(backend).__name__))


class KeyringStore:
    """The node key in the system keyring."""

    kind = "keyring"

    def __init__(self, state_dir: Path, backend: object, backend_name: str) -> None:
        self.username = keyring_username(state_dir)
        self._backend = backend
        self.backend_name = backend_name

    def describe(self) -> str:
        return f"keyring ({self.backend_name})"

    def read(self) -> str | None:
        try:
            value = self._backend.get_password(KEYRING_SERVICE, self.username)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - backend libraries raise their own errors
            raise KeyStoreError(self._failure("read from", exc)) from None
        return value if isinstance(value, str) and value else None

    def write(self, key: str) -> None:
        try:
            self._backend.set_password(KEYRING_SERVICE, self.username, key)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - backend libraries raise their own errors
            raise KeyStoreError(self._failure("stored in", exc)) from None

    def _failure(self, verb: str, exc: Exception) -> str:
        # Callers raise with "from None": the chained traceback would show the
        # call's arguments, the key among them.
        return (
            f"the node key cannot be {verb} the keyring ({self.backend_name}): "
            f'{type(exc).__name__}: {exc}; set key_store = "file" '
            "(FLEETMEND_KEY_STORE=file) and enroll again"
        )


class FileStore:
    """The node key in ``<state dir>/node-key``, readable by its owner only."""

    kind = "file"

    def __init__(self, state_dir: Path, reason: str = "") -> None:
        self.path = state_dir / NODE_KEY_FILE
        # Why auto mode did not use the keyring; empty when file was chosen.
        self.reason = reason

    def describe(self) -> str:
        if self.reason:
            return f"file {self.path} (no keyring backend: {self.reason})"
        return f"file {self.path}"

    def read(self) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(
                f"node key file {self.path} cannot be read: {exc.strerror}"
            ) from None
        try:
            self._check_private(os.fstat(fd))
            data = b""
            while chunk := os.read(fd, 4096):
                data += chunk
        finally:
            os.close(fd)
        text = data.decode("utf-8", errors="replace").strip()
        return text or None

    def _check_private(self, status: os.stat_result) -> None:
        if sys.platform == "win32":
            # NOTE: Windows ignores the mode bits, so there only the state
            # folder's ACL keeps other users from reading the key.
            return
        if not stat.S_ISREG(status.st_mode):
            raise KeyStoreError(
                f"node key file {self.path} is not a regular file; remove it and "
                "enroll again"
            )
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077:
            raise KeyStoreError(
                f"node key file {self.path} has mode {mode:04o}, which lets other "
                f"users read it; run `chmod 600 {self.path}` if only you could "
                "read it so far, else enroll again to get a new key"
            )
        if status.st_uid != os.geteuid():
            raise KeyStoreError(
                f"node key file {self.path} belongs to user id {status.st_uid}, not "
                f"to this user ({os.geteuid()}); run the agent as its owner"
            )

    def write(self, key: str) -> None:
        """Write key to a new 0600 file, fsync it and rename it over the old one."""
        tmp = self.path.with_name(f".{NODE_KEY_FILE}.{secrets.token_hex(8)}.tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise KeyStoreError(
                f"node key file {self.path} cannot be created: {exc.strerror}"
            ) from None
        try:
            try:
                os.write(fd, (key + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KeyStoreError(
                f"node key file {self.path} cannot be written: {exc.strerror}"
            ) from None
        _fsync_dir(self.path.parent)


def _fsync_dir(directory: Path) -> None:
    """Flush a rename in directory to disk, where the OS allows it."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_key_store(mode: str, state_dir: Path) -> NodeKeyStore:
    """Return the store that key_store mode selects for state_dir.

    auto takes the keyring when a backend works, else the file with the
    reason; keyring raises KeyStoreError when no backend works.
    """
    if mode == "file":
        return FileStore(state_dir)
    if mode not in ("auto", "keyring"):
        raise KeyStoreError(f"key_store {mode!r} is not one of {', '.join(KEY_STORES)}")
    backend, detail = find_keyring_backend()
    if backend is not None:
        return KeyringStore(state_dir, backend, detail)
    if mode == "keyring":
        raise KeyStoreError(
            f"key_store is keyring but no keyring backend works: {detail}; "
            'set key_store = "file" (FLEETMEND_KEY_STORE=file) or auto'
        )
    return FileStore(state_dir, reason=detail)


def store_of_kind(kind: str, state_dir: Path) -> NodeKeyStore:
    """Return the store that enrollment recorded: "keyring" or "file".

    A recorded keyring store without a working backend raises KeyStoreError,
    because the key cannot be read then.
    """
    if kind == "file":
        return FileStore(state_dir)
    if kind != "keyring":
        raise KeyStoreError(f"unknown node key store {kind!r}; enroll again")
    backend, detail = find_keyring_backend()
    if backend is None:
        raise KeyStoreError(
            f"the node key was stored in the keyring at enrollment, but no keyring "
            f"backend works now: {detail}; start the keyring service or enroll again"
        )
    return KeyringStore(state_dir, backend, detail)


def read_node_key(
    kind: str,
    state_dir: Path,
    *,
    python: str = sys.executable,
    timeout_seconds: float = KEYRING_READ_TIMEOUT_SECONDS,
) -> str | None:
    """Read the node key from the store that enrollment recorded.

    A file store is read here. A keyring store is read by a child Python
    process, which prints the key on a pipe, so that keyring and its backends
    never load in this process. Returns None when no key is stored and raises
    KeyStoreError as store_of_kind and read do, or when the child fails.
    """
    if kind != "keyring":
        return store_of_kind(kind, state_dir).read()

    argv = [python, "-m", "agent.keystore", "read", str(Path(state_dir).absolute())]
    try:
        # python -m puts the working directory first on sys.path, so the child
        # runs in the folder that contains this agent package and imports it.
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=timeout_seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KeyStoreError(
            f"reading the node key from the keyring did not finish within "
            f"{timeout_seconds:g} s; check that the keyring service answers"
        ) from None
    except OSError as exc:
        raise KeyStoreError(
            f"the process that reads the node key from the keyring could not be "
            f"started with {python}: {exc.strerror or exc}"
        ) from None

    # The child writes the key only to stdout, so stderr, which goes into the
    # error messages, never contains it.
    stderr = completed.stderr.decode("utf-8", errors="replace").strip()
    if completed.returncode == _KEY_STORE_ERROR_EXIT and stderr:
        raise KeyStoreError(stderr)
    if completed.returncode != 0:
        last_line = stderr.splitlines()[-1] if stderr else "no output on stderr"
        raise KeyStoreError(
            f"the process that reads the node key from the keyring exited with "
            f"status {completed.returncode}: {last_line}"
        )
    key = completed.stdout.decode("utf-8", errors="replace").strip()
    return key or None


def _read_key_main(argv: Sequence[str]) -> int:
    """Print the keyring-stored node key of a state directory, or nothing."""
    parser = argparse.ArgumentParser(prog="python -m agent.keystore")
    parser.add_argument("action", choices=["read"])
    parser.add_argument("state_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        key = store_of_kind("keyring", args.state_dir).read()
    except KeyStoreError as exc:
        print(exc, file=sys.stderr)
        return _KEY_STORE_ERROR_EXIT
    if key is not None:
        sys.stdout.write(key + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_read_key_main(sys.argv[1:]))
