"""The agent's persistent identity: its device id and the next sequence number.

Both live in ``identity.json`` in the state directory, so that a restarted agent
keeps its id and never reuses a sequence number. The file is replaced
atomically (write, fsync, rename) and is readable by its owner only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.paths import UnsafeDirectoryError, ensure_private_dir

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
LOCK_FILE = "agent.lock"


class StateError(Exception):
    """The state directory or the identity file cannot be read or written."""


@dataclass
class Identity:
    device_id: str
    next_sequence: int


def _try_lock(handle: IO[str]) -> bool:
    """Take an exclusive lock on an open file without waiting; False if it is held."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# Flags of a new private file: O_EXCL fails on any existing name, a symbolic
# link included, and O_NOFOLLOW (POSIX) also on a final symbolic link.
_NEW_FILE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def write_private(path: Path, data: bytes) -> None:
    """Replace path atomically (write, fsync, rename) with an owner-only file.

    The data goes to a new file with a random name beside path, created with
    mode 0600 by an exclusive open, so that no file or symbolic link planted
    in the folder is written through. os.replace then swaps it in; a
    symbolic link at path is replaced, not followed. Raises OSError.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateStore:
    """Load, create and update the identity file of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / IDENTITY_FILE
        self._lock = threading.Lock()

    def prepare_dir(self) -> None:
        """Create the owner-only state directory; raise StateError saying why not."""
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise StateError(
                f"state directory {self.state_dir} is a file, not a folder; "
                "pass --state-dir with a folder"
            )
        try:
            ensure_private_dir(self.state_dir)
        except UnsafeDirectoryError as exc:
            raise StateError(str(exc)) from exc
        except OSError as exc:
            raise StateError(
                f"state directory {self.state_dir} cannot be created: {exc.strerror}; "
                "pass --state-dir with a writable folder"
            ) from exc
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            raise StateError(
                f"state directory {self.state_dir} is not writable by this user; "
                "pass --state-dir with a writable folder"
            )

    def load_or_create(self) -> Identity:
        """Return the stored identity, creating a new device id at first start."""
        self.prepare_dir()
        if not self.path.exists():
            identity = Identity(device_id=str(uuid.uuid4()), next_sequence=1)
            self.save(identity)
            log.info("created device id %s in %s", identity.device_id, self.path)
            return identity
        return self.read()

    def read(self) -> Identity:
        """Return the stored identity; raise StateError if it is missing or damaged."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise StateError(
                f"identity file {self.path} cannot be read: {exc.strerror}"
            ) from exc
        except ValueError as exc:
            raise self._damaged(f"not JSON: {exc}") from exc

        if not isinstance(data, dict):
            raise self._damaged("expected a JSON object")
        device_id = data.get("device_id")
        next_sequence = data.get("next_sequence")
        if not isinstance(device_id, str):
            raise self._damaged(f"device_id must be a UUID string, got {device_id!r}")
        try:
            device_id = str(uuid.UUID(device_id))
        except ValueError as exc:
            raise self._damaged(f"device_id {device_id!r} is not a UUID") from exc
        if not isinstance(next_sequence, int) or isinstance(next_sequence, bool):
            raise self._damaged(
                f"next_sequence must be a whole number, got {next_sequence!r}"
            )
        if next_sequence < 1:
            raise self._damaged(f"next_sequence must be 1 or more, got {next_sequence}")
        return Identity(device_id=device_id, next_sequence=next_sequence)

    def _damaged(self, reason: str) -> StateError:
        return StateError(
            f"identity file {self.path} is damaged ({reason}); restore it from a "
            "backup, or move it aside to start as a new device"
        )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the state directory's lock, so that one agent at a time uses it.

        Two agents on one state directory would number different reports with
        the same sequence numbers, and the collector keeps only one of each.
        """
        self.prepare_dir()
        lock_path = self.state_dir / LOCK_FILE
        # O_NOFOLLOW: the lock file is truncated below, so a symbolic link
        # there must not lead to another file.
        flags = (
            os.O_RDWR
            | os.O_CREAT
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_CLOEXEC", 0)
        )
        try:
            descriptor = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            raise StateError(
                f"lock file {lock_path} cannot be opened: {exc.strerror}; remove "
                "it if it is not a regular file"
            ) from exc
        handle = os.fdopen(descriptor, "r+", encoding="utf-8")
        try:
            if not _try_lock(handle):
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise StateError(
                    f"another fleetmend-agent (pid {holder}) is using state "
                    f"directory {self.state_dir}; stop it or pass another --state-dir"
                )
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            handle.close()

    def save(self, identity: Identity) -> None:
        """Write the identity atomically with mode 0600."""
        payload = json.dumps(
            {"device_id": identity.device_id, "next_sequence": identity.next_sequence}
        ).encode()
        with self._lock:
            try:
                write_private(self.path, payload)
            except OSError as exc:
                raise StateError(
                    f"identity file {self.path} cannot be written: {exc.strerror}"
                ) from exc
