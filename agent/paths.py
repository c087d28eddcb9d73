"""Locations of the agent's state directory and configuration file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

APP_NAME = "fleetmend"


def is_privileged() -> bool:
    """Return True when the agent runs as root (or, on Windows, as an administrator)."""
    if sys.platform == "win32":
        import ctypes

        try:
            return bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
        except OSError:
            return False
    return os.geteuid() == 0


def default_state_dir(privileged: bool | None = None) -> Path:
    """Return the state directory for a service (privileged) or a user run.

    platformdirs' site directories are shared read-only data locations, so a
    service uses the fixed per-OS folders below instead.
    """
    if privileged is None:
        privileged = is_privileged()
    if not privileged:
        return Path(platformdirs.user_state_dir(APP_NAME))
    if sys.platform == "win32":
        program_data = os.environ.get("PROGRAMDATA", r"C:\ProgramData")
        return Path(program_data) / "Fleetmend"
    if sys.platform == "darwin":
        return Path("/Library/Application Support/Fleetmend")
    return Path("/var/lib/fleetmend")


def default_config_file(privileged: bool | None = None) -> Path:
    """Return the TOML file read when neither --config nor FLEETMEND_CONFIG is given."""
    if privileged is None:
        privileged = is_privileged()
    if privileged and sys.platform not in ("win32", "darwin"):
        return Path("/etc/fleetmend/agent.toml")
    if privileged and sys.platform == "darwin":
        return Path("/Library/Application Support/Fleetmend/agent.toml")
    if privileged:
        return default_state_dir(True) / "agent.toml"
    return Path(platformdirs.user_config_dir(APP_NAME)) / "agent.toml"


class UnsafeDirectoryError(Exception):
    """A private folder that another user owns; the message names the fix."""


def ensure_private_dir(path: Path) -> Path:
    """Create path (and parents) so that only the owner can enter it; return it.

    On POSIX an existing folder must belong to the effective user, else
    UnsafeDirectoryError is raised: its owner could otherwise plant files or
    symbolic links that this process, perhaps root, then writes through. Raises
    OSError when the folder cannot be created or changed.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if sys.platform != "win32":
        check_owned_by_effective_user(path)
        os.chmod(path, 0o700)
    return path


def check_owned_by_effective_user(path: Path) -> None:
    """Raise UnsafeDirectoryError unless the effective user owns the folder path."""
    owner = os.stat(path).st_uid
    user = os.geteuid()
    if owner == user:
        return
    owner_name = _user_name(owner)
    user_name = _user_name(user)
    raise UnsafeDirectoryError(
        f"folder {path} is owned by {owner_name} (uid {owner}), not by {user_name} "
        f"(uid {user}) that runs this command, so its owner could replace the "
        f"files in it; run `chown {user_name} {path}` as root, or pass another "
        "--state-dir"
    )


def _user_name(user_id: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(user_id).pw_name
    except KeyError:
        return f"uid-{user_id}"
