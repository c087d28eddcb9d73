"""Detect which catalogued applications own the foreground window.

throttle_process restores a throttled app's priority when the app comes to the
foreground. ForegroundDetector supplies the catalog app ids of the foreground
window's process for that check:

- Linux: ``xprop`` reads ``_NET_ACTIVE_WINDOW`` from the X root window and
  ``_NET_WM_PID`` from that window. That covers X11 sessions and the XWayland
  windows of a Wayland session, but not native Wayland windows. An
  agent that runs as root without DISPLAY finds the active local graphical
  session with ``loginctl`` and runs xprop as that session's user.
- macOS: ``lsappinfo front`` and ``lsappinfo info -only pid ASN``.
- Windows: GetForegroundWindow and GetWindowThreadProcessId from user32.

The parsers are pure functions of the command output. The readers
(``X11Backend``, ``LaunchServicesBackend``, ``WindowsBackend``) run the commands
and raise ForegroundUnavailable with the reason when the foreground cannot be
read at all.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TypeVar

import psutil

from agent import clock as clock_module
from agent.healing.actions.throttle_process import DEFAULT_RESTORE_AFTER
from agent.usage.catalog import CURRENT_OS, Catalog, OsName

if sys.platform != "win32":
    # The X11 reader needs the user database; Windows has none.
    import pwd

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _hours_text(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:g} hour" if hours == 1 else f"{hours:g} hours"


__all__ = [
    "CACHE_SECONDS",
    "COMMAND_TIMEOUT_SECONDS",
    "THROTTLE_END",
    "ForegroundBackend",
    "ForegroundDetector",
    "ForegroundReading",
    "ForegroundUnavailable",
    "LaunchServicesBackend",
    "LoginSession",
    "WindowsBackend",
    "X11Backend",
    "app_ids_for_pid",
    "default_backend",
    "parse_active_window",
    "parse_environ",
    "parse_lsappinfo_front",
    "parse_lsappinfo_pid",
    "parse_session_ids",
    "parse_session_properties",
    "parse_wm_pid",
]

# One engine pass requests the foreground apps several times (once per undo
# check and once per action context); the result is reused for this long.
CACHE_SECONDS = 5.0
# Timeout of each xprop, loginctl and lsappinfo run.
COMMAND_TIMEOUT_SECONDS = 2.0
# The end of a throttle while the foreground cannot be read, for diagnose and logs.
THROTTLE_END = (
    "a throttle ends when restore_after passes (default "
    f"{_hours_text(DEFAULT_RESTORE_AFTER)}) or its verification fails"
)
# Bound on the walk from the window's process up through its parents.
MAX_ANCESTORS = 64

# NOTE: only the Debian package name is confirmed, by dpkg -S /usr/bin/xprop.
# The Arch and Fedora names are not checked on those systems.
XPROP_PACKAGES = "x11-utils on Debian and Ubuntu, xorg-xprop on Arch or xprop on Fedora"
NO_SESSION = "no graphical session found"
SESSION_PROPERTIES = ("Type", "Display", "Active", "User", "Name", "Remote")
GRAPHICAL_SESSION_TYPES = ("x11", "wayland")

# xprop prints "NAME(TYPE): window id # 0x1, 0x0" for a WINDOW property and
# "NAME(TYPE) = 123" for a CARDINAL one, and -notype leaves out "(TYPE)". A
# missing property is "NAME:  not found." and an atom the server does not know
# is "NAME:  no such atom on any window.".
_ACTIVE_WINDOW = re.compile(
    r"_NET_ACTIVE_WINDOW(?:\(WINDOW\))?:\s+window id # (0x[0-9a-fA-F]+)"
)
_WM_PID = re.compile(r"_NET_WM_PID(?:\(CARDINAL\))?\s*=\s*(\d+)")
_PROPERTY_MISSING = re.compile(r"\S+:\s+(not found\.|no such atom on any window\.)")
# lsappinfo front prints an application serial number such as "ASN:0x0-0x11011:".
_ASN = re.compile(r"ASN:0x[0-9a-fA-F]+-0x[0-9a-fA-F]+:")
_LSAPPINFO_PID = re.compile(r'"pid"\s*=\s*(\d+)')
_SESSION_LEGEND = re.compile(r"SESSION\s.*|\d+ sessions? listed\.|No sessions\.")


class ForegroundUnavailable(Exception):
    """The foreground window cannot be read, for the reason in the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ForegroundReading:
    """The foreground window's process and where the reading came from."""

    # None when no window is in the foreground or the window names no process.
    pid: int | None
    # One line for diagnose, for example "X11 display :0 of user alice (xprop)".
    source: str


class ForegroundBackend(Protocol):
    """A per-OS reader of the foreground window's process."""

    def read(self) -> ForegroundReading:
        """Return the foreground process, or raise ForegroundUnavailable."""
        ...


@dataclass(frozen=True)
class LoginSession:
    """The logind properties of one session that the X11 reader uses."""

    session_id: str
    type: str
    display: str
    # None where loginctl did not print the property.
    active: bool | None
    remote: bool | None
    uid: int | None
    name: str


# -- parsers ------------------------------------------------------------------


def parse_active_window(text: str) -> int | None:
    """Return the window id in ``xprop -root _NET_ACTIVE_WINDOW`` output.

    Returns None for window 0 (no active window) and for a missing property.
    Raises ValueError for output in any other form.
    """
    stripped = text.strip()
    if match := _ACTIVE_WINDOW.match(stripped):
        window = int(match[1], 16)
        return window or None
    if _PROPERTY_MISSING.fullmatch(stripped):
        return None
    raise ValueError(f"unparsed _NET_ACTIVE_WINDOW output {stripped[:200]!r}")


def parse_wm_pid(text: str) -> int | None:
    """Return the pid in ``xprop -id WINDOW _NET_WM_PID`` output.

    Returns None for a window without the property and for pid 0. Raises
    ValueError for output in any other form.
    """
    stripped = text.strip()
    if match := _WM_PID.fullmatch(stripped):
        return int(match[1]) or None
    if _PROPERTY_MISSING.fullmatch(stripped):
        return None
    raise ValueError(f"unparsed _NET_WM_PID output {stripped[:200]!r}")


def parse_session_ids(text: str) -> list[str]:
    """Return the session ids, the first column of ``loginctl list-sessions``.

    The header and the "N sessions listed." footer are skipped, so output with
    or without --no-legend gives the same ids.
    """
    ids = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or _SESSION_LEGEND.fullmatch(stripped):
            continue
        ids.append(stripped.split()[0])
    return ids


def parse_session_properties(text: str) -> dict[str, str]:
    """Return the KEY=VALUE lines of ``loginctl show-session`` as a dict."""
    properties = {}
    for line in text.splitlines():
        key, separator, value = line.partition("=")
        if separator and key.strip():
            properties[key.strip()] = value.strip()
    return properties


def parse_lsappinfo_front(text: str) -> str | None:
    """Return the ASN that ``lsappinfo front`` printed, or None for no output.

    Raises ValueError for output in any other form.
    """
    stripped = text.strip()
    if not stripped:
        return None
    if match := _ASN.fullmatch(stripped):
        return match[0]
    raise ValueError(f"unparsed lsappinfo front output {stripped[:200]!r}")


def parse_lsappinfo_pid(text: str) -> int | None:
    """Return the value of the ``"pid"=N`` line of ``lsappinfo info`` output.

    lsappinfo prints nothing for an ASN that no longer runs, which gives None.
    Raises ValueError for output without a pid line.
    """
    stripped = text.strip()
    if not stripped:
        return None
    for line in stripped.splitlines():
        if match := _LSAPPINFO_PID.fullmatch(line.strip()):
            return int(match[1]) or None
    raise ValueError(f'no "pid" line in lsappinfo info output {stripped[:200]!r}')


def parse_environ(data: bytes) -> dict[str, str]:
    """Return the variables of a NUL-separated environment (/proc/PID/environ)."""
    variables = {}
    for entry in data.split(b"\0"):
        name, separator, value = entry.partition(b"=")
        if separator and name:
            variables[name.decode("utf-8", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
    return variables


def session_from_properties(
    session_id: str, properties: Mapping[str, str]
) -> LoginSession:
    """Build a LoginSession from the properties of ``loginctl show-session``."""
    uid_text = properties.get("User", "")
    return LoginSession(
        session_id=session_id,
        type=properties.get("Type", ""),
        display=properties.get("Display", ""),
        active=_yes_no(properties.get("Active")),
        remote=_yes_no(properties.get("Remote")),
        uid=int(uid_text) if uid_text.isdigit() else None,
        name=properties.get("Name", ""),
    )


def _yes_no(value: str | None) -> bool | None:
    if value == "yes":
        return True
    if value == "no":
        return False
    return None


def same_display(first: str, second: str) -> bool:
    """Return whether two DISPLAY values name the same X server (":0" is ":0.0")."""
    return _strip_screen(first) == _strip_screen(second)


def _strip_screen(display: str) -> str:
    host, colon, rest = display.rpartition(":")
    return f"{host}{colon}{rest.split('.')[0]}"


# -- process to app ids -------------------------------------------------------


def app_ids_for_pid(
    pid: int,
    process_index: Mapping[str, frozenset[str]],
    max_ancestors: int = MAX_ANCESTORS,
) -> frozenset[str]:
    """Return the app ids of pid's process name, else of its nearest catalogued parent.

    The walk up the parents stops below pid 1, so init (or launchd) never
    counts. A helper process of an app (an Electron renderer, for example) that
    owns the window is matched through the app's main process.
    """
    try:
        process: psutil.Process | None = psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return frozenset()
    for _ in range(max_ancestors):
        if process is None or process.pid <= 1:
            break
        try:
            app_ids = process_index.get(process.name().lower())
            if app_ids:
                return app_ids
            process = process.parent()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            break
    return frozenset()


# -- commands -----------------------------------------------------------------


class _ToolFailed(Exception):
    """A command failed; the message is "TOOL: ERROR", as in "loginctl: ..."."""


def _run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float = COMMAND_TIMEOUT_SECONDS,
    uid: int | None = None,
    gid: int | None = None,
) -> str:
    """Run a command and return its stdout, or raise _ToolFailed.

    The caller turns _ToolFailed into ForegroundUnavailable, with what is
    missing first and the tool's error in parentheses.
    """
    tool = Path(argv[0]).name
    try:
        completed = subprocess.run(
            list(argv),
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            env=dict(env),
            cwd="/",
            timeout=timeout,
            check=False,
            user=uid,
            group=gid,
            # Root's supplementary groups are dropped along with its uid.
            extra_groups=None if uid is None else [],
        )
    except subprocess.TimeoutExpired as exc:
        raise _ToolFailed(f"{tool} timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise _ToolFailed(f"{tool} cannot be run: {exc.strerror or exc}") from exc
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        if not lines:
            raise _ToolFailed(
                f"{tool} exited with status {completed.returncode} and no message"
            )
        raise _ToolFailed(_tool_message(tool, lines[-1]))
    return completed.stdout


def _tool_message(tool: str, line: str) -> str:
    """Return a stderr line as "TOOL: message", once, with runs of spaces joined."""
    message = " ".join(line.split())
    prefix = f"{tool}:"
    if message.startswith(prefix):
        message = message[len(prefix) :].strip()
    return f"{tool}: {message}"


def _run_or_unavailable(
    missing: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    uid: int | None = None,
    gid: int | None = None,
) -> str:
    """Run a command; if it fails, raise ForegroundUnavailable("MISSING (ERROR)")."""
    try:
        return _run(argv, env=env, uid=uid, gid=gid)
    except _ToolFailed as exc:
        raise ForegroundUnavailable(f"{missing} ({exc})") from exc


def _parsed(parse: Callable[[str], T], text: str, missing: str, command: str) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise ForegroundUnavailable(f"{missing} ({command}: {exc})") from exc


# -- Linux: X11 and XWayland --------------------------------------------------


@dataclass(frozen=True)
class _XTarget:
    """The X server to ask and the user to ask it as."""

    display: str
    xauthority: str | None
    # None: run xprop as the agent, with the agent's environment.
    uid: int | None
    gid: int | None
    source: str
    # The Wayland session in words, for example "Wayland session 2", when the
    # display is XWayland, whose X root does not see native Wayland windows.
    wayland: str = ""


class X11Backend:
    """Reader of the active X11 window's pid, using xprop.

    With DISPLAY in environ, xprop runs as the agent on that display. An agent
    that runs as root without DISPLAY takes the active local session of type
    x11 that has a Display from loginctl, or the XWayland display of the active
    local Wayland session. It then runs xprop as the session's user, with only
    DISPLAY, XAUTHORITY and PATH in its environment. XAUTHORITY comes from the
    environment of a process of that user on the same display, read from
    proc_root/PID/environ.
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        proc_root: Path = Path("/proc"),
        euid: int | None = None,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._proc_root = proc_root
        self._euid = os.geteuid() if euid is None else euid

    def read(self) -> ForegroundReading:
        xprop = self._which("xprop")
        if xprop is None:
            raise ForegroundUnavailable(
                f"xprop is not found on PATH (install the package {XPROP_PACKAGES})"
            )
        target = self._target()
        root_argv = [xprop, "-root", "-notype", "_NET_ACTIVE_WINDOW"]
        missing = f"the active window of X11 display {target.display} cannot be read"
        root_text = self._xprop(target, root_argv, missing)
        window = _parsed(parse_active_window, root_text, missing, "xprop -root")
        if window is None:
            if target.wayland:
                raise ForegroundUnavailable(
                    f"no X11 window is active in {target.wayland}, and native "
                    "Wayland windows cannot be read"
                )
            return ForegroundReading(None, target.source)
        window_argv = [xprop, "-id", hex(window), "-notype", "_NET_WM_PID"]
        missing = f"the process of X11 window {hex(window)} cannot be read"
        window_text = self._xprop(target, window_argv, missing)
        pid = _parsed(parse_wm_pid, window_text, missing, "xprop -id")
        # NOTE: a sandboxed client (Flatpak, Snap) may set _NET_WM_PID to a pid
        # of its own pid namespace, which names another process or none here.
        return ForegroundReading(pid, target.source)

    def _which(self, name: str) -> str | None:
        return shutil.which(name, path=self._environ.get("PATH", os.defpath))

    def _xprop(self, target: _XTarget, argv: list[str], missing: str) -> str:
        if target.uid is None:
            return _run_or_unavailable(missing, argv, env=self._environ)
        env = {"DISPLAY": target.display, "PATH": self._environ.get("PATH", os.defpath)}
        if target.xauthority:
            env["XAUTHORITY"] = target.xauthority
        return _run_or_unavailable(
            missing, argv, env=env, uid=target.uid, gid=target.gid
        )

    # -- finding the display --------------------------------------------------

    def _target(self) -> _XTarget:
        display = self._environ.get("DISPLAY")
        if display:
            wayland = ""
            if self._environ.get("WAYLAND_DISPLAY"):
                wayland = "the agent's Wayland session"
            return _XTarget(
                display=display,
                xauthority=None,
                uid=None,
                gid=None,
                source=f"X11 display {display} from the agent's DISPLAY (xprop)",
                wayland=wayland,
            )
        if self._euid != 0:
            raise ForegroundUnavailable(
                "DISPLAY is not set and the agent does not run as root, so it "
                "cannot use another user's graphical session"
            )
        session = self._graphical_session()
        account = self._account(session)
        if session.type == "x11":
            display = session.display
            xauthority = self._find_xauthority(account.pw_uid, display)
            if xauthority is None:
                xauthority = _home_xauthority(account)
            return _XTarget(
                display=display,
                xauthority=xauthority,
                uid=account.pw_uid,
                gid=account.pw_gid,
                source=f"X11 display {display} of user {account.pw_name} (xprop)",
            )
        found = self._find_user_display(account.pw_uid)
        if found is None:
            raise ForegroundUnavailable(
                f"Wayland session {session.session_id} of user {account.pw_name} "
                "has no XWayland display, and native Wayland windows cannot be read"
            )
        display, xauthority = found
        return _XTarget(
            display=display,
            xauthority=xauthority,
            uid=account.pw_uid,
            gid=account.pw_gid,
            source=(
                f"XWayland display {display} of user {account.pw_name} in Wayland "
                f"session {session.session_id} (xprop, which does not see native "
                "Wayland windows)"
            ),
            wayland=f"Wayland session {session.session_id}",
        )

    def _graphical_session(self) -> LoginSession:
        sessions = self._sessions()
        local = [
            session
            for session in sessions
            if session.type in GRAPHICAL_SESSION_TYPES and session.remote is not True
        ]
        active = [session for session in local if session.active]
        for session in active:
            if session.type == "x11" and session.display:
                return session
        for session in active:
            if session.type == "wayland":
                return session
        if local:
            ids = ", ".join(session.session_id for session in local)
            raise ForegroundUnavailable(
                f"no local graphical session is active with a display (sessions "
                f"{ids} are inactive, or of type x11 without a Display)"
            )
        raise ForegroundUnavailable(NO_SESSION)

    def _sessions(self) -> list[LoginSession]:
        loginctl = self._which("loginctl")
        if loginctl is None:
            raise ForegroundUnavailable(
                "DISPLAY is not set and loginctl is not found on PATH, so no "
                "graphical session can be found"
            )
        env = {**self._environ, "LC_ALL": "C"}
        listing = _run_or_unavailable(
            NO_SESSION, [loginctl, "list-sessions", "--no-legend"], env=env
        )
        sessions = []
        for session_id in parse_session_ids(listing):
            argv = [loginctl, "show-session", session_id]
            for name in SESSION_PROPERTIES:
                argv += ["-p", name]
            text = _run_or_unavailable(NO_SESSION, argv, env=env)
            properties = parse_session_properties(text)
            sessions.append(session_from_properties(session_id, properties))
        return sessions

    def _account(self, session: LoginSession) -> pwd.struct_passwd:
        try:
            if session.uid is not None:
                return pwd.getpwuid(session.uid)
            return pwd.getpwnam(session.name)
        except KeyError as exc:
            user = session.uid if session.uid is not None else repr(session.name)
            raise ForegroundUnavailable(
                f"session {session.session_id} belongs to user {user}, who is not "
                "in the user database"
            ) from exc

    def _user_environments(self, uid: int) -> Iterator[dict[str, str]]:
        """Yield the environments of uid's processes that can be read."""
        try:
            entries = list(self._proc_root.iterdir())
        except OSError as exc:
            raise ForegroundUnavailable(
                f"the processes of user {uid} cannot be listed to find their X "
                f"display ({self._proc_root}: {exc.strerror or exc})"
            ) from exc
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                data = (entry / "environ").read_bytes()
            except OSError:
                continue
            yield parse_environ(data)

    def _find_xauthority(self, uid: int, display: str) -> str | None:
        for variables in self._user_environments(uid):
            if same_display(variables.get("DISPLAY", ""), display):
                xauthority = variables.get("XAUTHORITY")
                if xauthority:
                    return xauthority
        return None

    def _find_user_display(self, uid: int) -> tuple[str, str | None] | None:
        for variables in self._user_environments(uid):
            display = variables.get("DISPLAY")
            if display:
                return display, variables.get("XAUTHORITY") or None
        return None


def _home_xauthority(account: pwd.struct_passwd) -> str | None:
    # Xlib reads $HOME/.Xauthority when XAUTHORITY is unset; HOME is not passed
    # to xprop, so the file is named explicitly.
    path = Path(account.pw_dir) / ".Xauthority"
    return str(path) if path.is_file() else None


# -- macOS ---------------------------------------------------------------------


class LaunchServicesBackend:
    """Reader of the front application's pid, using lsappinfo (LaunchServices)."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def read(self) -> ForegroundReading:
        # NOTE: not run on macOS by this project's tests. A LaunchDaemon runs
        # outside the console user's login session, and lsappinfo there may
        # report no front application.
        lsappinfo = shutil.which("lsappinfo", path=self._environ.get("PATH"))
        if lsappinfo is None:
            raise ForegroundUnavailable("lsappinfo is not found on PATH")
        source = "macOS front application (lsappinfo)"
        missing = "the front application cannot be read"
        front = _run_or_unavailable(missing, [lsappinfo, "front"], env=self._environ)
        asn = _parsed(parse_lsappinfo_front, front, missing, "lsappinfo front")
        if asn is None:
            return ForegroundReading(None, source)
        argv = [lsappinfo, "info", "-only", "pid", asn]
        info = _run_or_unavailable(missing, argv, env=self._environ)
        pid = _parsed(parse_lsappinfo_pid, info, missing, "lsappinfo info")
        return ForegroundReading(pid, source)


# -- Windows -------------------------------------------------------------------


class WindowsBackend:
    """Reader of the foreground window's pid, using user32 GetForegroundWindow."""

    def read(self) -> ForegroundReading:
        if sys.platform != "win32":
            raise ForegroundUnavailable("the Windows reader runs only on Windows")
        import ctypes
        from ctypes import wintypes

        # NOTE: a Windows service runs in session 0, which has no user desktop,
        # so the foreground is unavailable there. Only a process in the user's
        # session, such as the planned per-user tray, can read it.
        session = wintypes.DWORD()
        kernel32 = ctypes.windll.kernel32
        known = kernel32.ProcessIdToSessionId(os.getpid(), ctypes.byref(session))
        if known and session.value == 0:
            raise ForegroundUnavailable(
                "the agent runs as a service in session 0, which has no user desktop"
            )
        user32 = ctypes.windll.user32
        source = "Windows foreground window (user32)"
        window = user32.GetForegroundWindow()
        if not window:
            return ForegroundReading(None, source)
        pid = wintypes.DWORD()
        user32.GetWindowThreadProcessId(window, ctypes.byref(pid))
        return ForegroundReading(pid.value or None, source)


class _UnsupportedBackend:
    def __init__(self, platform: str) -> None:
        self._platform = platform

    def read(self) -> ForegroundReading:
        raise ForegroundUnavailable(
            f"no foreground reader for platform {self._platform}"
        )


def default_backend(os_name: OsName | None = CURRENT_OS) -> ForegroundBackend:
    """Return the reader for os_name ("linux", "macos", "windows")."""
    if os_name == "linux":
        return X11Backend()
    if os_name == "macos":
        return LaunchServicesBackend()
    if os_name == "windows":
        return WindowsBackend()
    return _UnsupportedBackend(sys.platform)


# -- the detector --------------------------------------------------------------


class ForegroundDetector:
    """Supplier of the catalog app ids of the foreground window's process.

    catalog returns the current catalog, or None when there is none. The
    backend defaults to the reader for os_name. A result is reused for
    cache_seconds of agent.clock's monotonic time. foreground_apps never
    raises: a failing backend or catalog gives frozenset(), and the reason is
    logged once until it changes.
    """

    def __init__(
        self,
        catalog: Callable[[], Catalog | None],
        backend: ForegroundBackend | None = None,
        *,
        os_name: OsName | None = CURRENT_OS,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self._catalog = catalog
        self._backend = backend if backend is not None else default_backend(os_name)
        self._os_name = os_name
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, frozenset[str]] | None = None
        self._status = "not read yet"
        self._logged_problem: str | None = None

    def foreground_apps(self) -> frozenset[str]:
        """Return the catalog app ids that are in the foreground now."""
        with self._lock:
            now = clock_module.clock.monotonic()
            if self._cached is not None and now - self._cached[0] < self._cache_seconds:
                return self._cached[1]
            app_ids = self._read()
            self._cached = (now, app_ids)
            return app_ids

    def status(self) -> str:
        """Return one line for diagnose: "available: SOURCE" or "unavailable: WHY"."""
        self.foreground_apps()
        with self._lock:
            return self._status

    def _read(self) -> frozenset[str]:
        try:
            reading = self._backend.read()
        except ForegroundUnavailable as exc:
            self._problem(exc.reason, exc)
            return frozenset()
        except Exception as exc:
            # Any failure of a reader ends here, because the engine must never
            # see it.
            self._problem(f"the foreground reader failed ({exc!r})", exc)
            return frozenset()
        try:
            catalog = self._catalog()
        except Exception as exc:
            self._problem(f"the catalog cannot be loaded ({exc})", exc)
            return frozenset()
        self._status = f"available: {reading.source}"
        if self._logged_problem is not None:
            logger.info("foreground detection works again: %s", reading.source)
            self._logged_problem = None
        if reading.pid is None or catalog is None or self._os_name is None:
            return frozenset()
        app_ids = app_ids_for_pid(reading.pid, catalog.process_index(self._os_name))
        logger.debug("foreground pid %d: apps %s", reading.pid, sorted(app_ids))
        return app_ids

    def _problem(self, reason: str, exc: BaseException) -> None:
        self._status = f"unavailable: {reason}; {THROTTLE_END}"
        if reason == self._logged_problem:
            return
        self._logged_problem = reason
        if isinstance(exc, ForegroundUnavailable):
            logger.warning("foreground apps unavailable: %s; %s", reason, THROTTLE_END)
        else:
            logger.warning(
                "foreground apps unavailable: %s; %s",
                reason,
                THROTTLE_END,
                exc_info=exc,
            )
