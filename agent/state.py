"""The agent's persistent identity: its device id and the next sequence number.

Both live in ``identity.json`` in the state directory, so that a restarted agent
keeps its id and never reuses a sequence number. The file is replaced
atomically (write, fsync, rename) and is readable by its owner only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.paths import ensure_private_dir

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"


class StateError(Exception):
    """The state directory or the identity file cannot be read or written."""


@dataclass
class Identity:
    device_id: str
    next_sequence: int


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StateStore:
    """Load, create and update the identity file of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / IDENTITY_FILE
        self._lock = threading.Lock()

    def load_or_create(self) -> Identity:
        """Return the stored identity, creating a new device id at first start."""
        try:
            ensure_private_dir(self.state_dir)
        except OSError as exc:
            raise StateError(
                f"state directory {self.state_dir} cannot be created: {exc.strerror}; "
                "pass --state-dir with a writable folder"
            ) from exc

        if not self.path.exists():
            identity = Identity(device_id=str(uuid.uuid4()), next_sequence=1)
            self.save(identity)
            log.info("created device id %s in %s", identity.device_id, self.path)
            return identity
        return self._read()

    def _read(self) -> Identity:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            device_id = str(uuid.UUID(data["device_id"]))
            next_sequence = int(data["next_sequence"])
        except OSError as exc:
            raise StateError(
                f"identity file {self.path} cannot be read: {exc}"
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"identity file {self.path} is damaged ({exc}); move it aside to "
                "start as a new device"
            ) from exc
        if next_sequence < 1:
            raise StateError(
                f"identity file {self.path} has next_sequence {next_sequence}, "
                "expected 1 or more"
            )
        return Identity(device_id=device_id, next_sequence=next_sequence)

    def save(self, identity: Identity) -> None:
        """Write the identity atomically with mode 0600."""
        payload = json.dumps(
            {"device_id": identity.device_id, "next_sequence": identity.next_sequence}
        ).encode()
        with self._lock:
            try:
                _write_private(self.path, payload)
            except OSError as exc:
                raise StateError(
                    f"identity file {self.path} cannot be written: {exc.strerror}"
                ) from exc
