"""The foreground detector on recorded xprop, loginctl and lsappinfo output.

The fakes in tests/fakes replay tests/data/foreground. A wrapper per tool in a
test folder points them at the test's state file, because the X11 reader runs
xprop with only DISPLAY, XAUTHORITY and PATH in its environment. The foreground
window's pid is a real child process, a copy of /bin/sleep under a catalogued
name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import clock as clock_module
from agent import foreground
from agent.foreground import (
    THROTTLE_END,
    ForegroundDetector,
    ForegroundReading,
    ForegroundUnavailable,
    LaunchServicesBackend,
    WindowsBackend,
    X11Backend,
)
from agent.healing.actions import throttle_process
from agent.healing.actions.base import ActionContext, LocalAllowlist, Outcome
from agent.healing.processes import SystemCpu
from agent.usage.catalog import Catalog, load_catalog
from fleetmend.v1 import remediation_pb2

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /proc and copies of /bin/sleep"
)

REPO = Path(__file__).resolve().parents[2]
RECORDINGS = REPO / "tests" / "data" / "foreground"
FAKES = REPO / "tests" / "fakes"
METADATA_PREFIXES = ("# origin:", "# shows:", "# kept:", "# exit status:", "# stream:")

WORK_APP = "fmwork"
WORK_PROCESS = "fmworkapp"
HOST_APP = "fmhost"
HOST_PROCESS = "fmhostapp"
HELPER_PROCESS = "fmhelper"
BUSY_APP = "busyfg"
BUSY_PROCESS = "fmbusyfg"
NOBODY = 65534
# The wrappers run the fakes with the system interpreter where there is one,
# because user 65534 may not reach the interpreter of the test's virtual
# environment (here it lives below /root). The fakes need only the stdlib.
SYSTEM_PYTHON = Path("/usr/bin/python3")
WRAPPER_PYTHON = str(SYSTEM_PYTHON) if SYSTEM_PYTHON.exists() else sys.executable

ACTIVE_X11 = "loginctl-show-session-systemd221-x11-active"
CLOSING_X11 = "loginctl-show-session-systemd221-x11-closing"
TWO_SESSIONS = "loginctl-list-sessions-systemd221-two"
WAYLAND_LIST = "loginctl-list-sessions-ubuntu2004-wayland"
WAYLAND_TYPE = "loginctl-show-session-ubuntu2004-wayland-type"
SSH_TTY = "loginctl-show-session-systemd257-ssh-tty"


def recording(name: str) -> str:
    """Return a recording without its metadata lines, as the fakes print it."""
    lines = (RECORDINGS / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith(METADATA_PREFIXES):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("reading another user's session and switching user need root")


def require_nobody() -> None:
    require_root()
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"user {NOBODY} needs {SYSTEM_PYTHON} to run the fakes")


# Fixtures


@dataclass
class FakeTools:
    """Wrappers for the fake xprop, loginctl and lsappinfo in one folder."""

    folder: Path
    state_path: Path
    log_path: Path
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return str(self.folder / "bin")

    def set(self, **tools: dict[str, Any]) -> None:
        self.state.update(tools)
        self.state_path.write_text(json.dumps(self.state), encoding="utf-8")

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        entries = [
            json.loads(line)
            for line in self.log_path.read_text(encoding="utf-8").splitlines()
        ]
        return [entry for entry in entries if tool is None or entry["tool"] == tool]


def make_fake_tools(folder: Path) -> FakeTools:
    """Write the wrappers into folder/bin, readable and runnable by every user."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    bin_dir.chmod(0o755)
    state_path = folder / "state.json"
    log_path = folder / "calls.jsonl"
    state_path.write_text("{}", encoding="utf-8")
    log_path.write_text("", encoding="utf-8")
    # The unprivileged user of the 65534 tests reads the state and appends to
    # the log.
    state_path.chmod(0o644)
    log_path.chmod(0o666)
    for tool in ("xprop", "loginctl", "lsappinfo"):
        wrapper = bin_dir / tool
        wrapper.write_text(
            f"#!{WRAPPER_PYTHON}\n"
            "import os, sys\n"
            f"os.environ['FAKE_FOREGROUND_STATE'] = {str(state_path)!r}\n"
            f"os.environ['FAKE_FOREGROUND_LOG'] = {str(log_path)!r}\n"
            f"fake = {str(FAKES / tool)!r}\n"
            "os.execv(sys.executable, [sys.executable, fake, *sys.argv[1:]])\n",
            encoding="utf-8",
        )
        wrapper.chmod(0o755)
    return FakeTools(folder=folder, state_path=state_path, log_path=log_path)


@pytest.fixture
def fakes() -> Iterator[FakeTools]:
    # mkdtemp instead of tmp_path: pytest's base folder is private to root, and
    # some tests run the wrappers as user 65534.
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-foreground-test-"))
    folder.chmod(0o755)
    try:
        yield make_fake_tools(folder)
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(
        f"[apps.{WORK_APP}]\n"
        'name = "Work app"\n'
        f'processes.linux = ["{WORK_PROCESS}"]\n'
        f'processes.macos = ["{WORK_PROCESS}"]\n'
        f"[apps.{HOST_APP}]\n"
        'name = "Electron-style host app"\n'
        f'processes.linux = ["{HOST_PROCESS}"]\n'
        f"[apps.{BUSY_APP}]\n"
        'name = "Busy indexer"\n'
        f'processes.linux = ["{BUSY_PROCESS}"]\n',
        encoding="utf-8",
    )
    return load_catalog([path], include_default=False)


Spawn = Callable[..., psutil.Process]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `NAME 60` from a copy of /bin/sleep named NAME; kill them after."""
    children: list[subprocess.Popen[bytes]] = []

    def start(
        name: str,
        env: dict[str, str] | None = None,
        user: int | None = None,
        folder: Path = tmp_path,
    ) -> psutil.Process:
        executable = folder / name
        if not executable.exists():
            shutil.copy("/bin/sleep", executable)
            executable.chmod(0o755)
        child = subprocess.Popen(
            [str(executable), "60"], env=env if env is not None else {}, user=user
        )
        children.append(child)
        return psutil.Process(child.pid)

    yield start
    for child in children:
        child.kill()
        child.wait()


def detector_for(
    backend: foreground.ForegroundBackend,
    catalog: Catalog | None,
    os_name: foreground.OsName = "linux",
    cache_seconds: float = foreground.CACHE_SECONDS,
) -> ForegroundDetector:
    return ForegroundDetector(
        lambda: catalog, backend, os_name=os_name, cache_seconds=cache_seconds
    )


def xprop_state(
    root: str = "xprop-active-window-notype",
    window: str = "xprop-wm-pid-typed",
    pid: int | None = None,
) -> dict[str, Any]:
    return {"root": root, "window": window, "pid": pid}


def display_backend(fakes: FakeTools, display: str = ":0") -> X11Backend:
    return X11Backend(environ={"PATH": fakes.path, "DISPLAY": display})


def root_backend(fakes: FakeTools) -> X11Backend:
    return X11Backend(environ={"PATH": fakes.path}, euid=0)


def wait_for_child(parent: psutil.Process) -> psutil.Process:
    """Return the first child of parent once the shell has started it."""
    for _ in range(200):
        children = parent.children()
        if children and children[0].name() == HELPER_PROCESS:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"pid {parent.pid} started no {HELPER_PROCESS} child")


# Parsers on the recordings


def test_active_window_notype() -> None:
    window = foreground.parse_active_window(recording("xprop-active-window-notype"))
    assert window == 0x4400003


def test_active_window_zero_is_none() -> None:
    text = recording("xprop-active-window-notype-none")
    assert foreground.parse_active_window(text) is None


def test_active_window_unparsed() -> None:
    with pytest.raises(ValueError, match="unparsed _NET_ACTIVE_WINDOW"):
        foreground.parse_active_window(recording("xprop-wm-pid-typed"))


def test_wm_pid_typed() -> None:
    assert foreground.parse_wm_pid(recording("xprop-wm-pid-typed")) == 3870


def test_wm_pid_not_found_is_none() -> None:
    assert foreground.parse_wm_pid(recording("xprop-wm-pid-not-found")) is None


def test_wm_pid_notype_form() -> None:
    # No -notype recording of _NET_WM_PID exists in tests/data/foreground; this
    # is the form of the recorded -notype CARDINAL line "_QUBES_LABEL_COLOR =
    # 13369344" (see the folder's README).
    assert foreground.parse_wm_pid("_NET_WM_PID = 13369344\n") == 13369344


def test_wm_pid_unparsed() -> None:
    with pytest.raises(ValueError, match="unparsed _NET_WM_PID"):
        foreground.parse_wm_pid(recording("xprop-unable-to-open-display"))


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        (TWO_SESSIONS, ["1", "3"]),
        (WAYLAND_LIST, ["12"]),
        ("loginctl-list-sessions-systemd256-greeter", ["1", "10", "9", "c1"]),
    ],
)
def test_session_ids(name: str, ids: list[str]) -> None:
    assert foreground.parse_session_ids(recording(name)) == ids


def test_session_active_x11() -> None:
    properties = foreground.parse_session_properties(recording(ACTIVE_X11))
    session = foreground.session_from_properties("3", properties)
    assert session.type == "x11"
    assert session.display == ":0"
    assert session.active is True
    assert session.remote is False
    assert session.uid is None
    assert session.name == "liveinstuser"


def test_session_closing_x11() -> None:
    properties = foreground.parse_session_properties(recording(CLOSING_X11))
    session = foreground.session_from_properties("1", properties)
    assert session.active is False
    assert properties["State"] == "closing"


def test_session_ssh_tty() -> None:
    properties = foreground.parse_session_properties(recording(SSH_TTY))
    session = foreground.session_from_properties("21", properties)
    assert session.type == "tty"
    assert session.remote is True
    assert session.uid == 1000
    assert session.display == ""


def test_session_wayland_type_only() -> None:
    properties = foreground.parse_session_properties(recording(WAYLAND_TYPE))
    session = foreground.session_from_properties("12", properties)
    assert session.type == "wayland"
    assert session.active is None
    assert session.name == ""


@pytest.mark.parametrize(
    ("name", "asn"),
    [
        ("lsappinfo-front-macos26", "ASN:0x0-0x11011:"),
        ("lsappinfo-front-chrome", "ASN:0x0-0x14014:"),
    ],
)
def test_lsappinfo_front(name: str, asn: str) -> None:
    assert foreground.parse_lsappinfo_front(recording(name)) == asn


def test_lsappinfo_front_unparsed() -> None:
    with pytest.raises(ValueError, match="unparsed lsappinfo front"):
        foreground.parse_lsappinfo_front(recording("lsappinfo-info-only-pid-cmux"))


@pytest.mark.parametrize(
    ("name", "pid"),
    [("lsappinfo-info-bundleid-macos26", 514), ("lsappinfo-info-only-pid-cmux", 44127)],
)
def test_lsappinfo_pid(name: str, pid: int) -> None:
    assert foreground.parse_lsappinfo_pid(recording(name)) == pid


def test_lsappinfo_pid_empty_is_none() -> None:
    assert foreground.parse_lsappinfo_pid("") is None


def test_lsappinfo_pid_unparsed() -> None:
    with pytest.raises(ValueError, match='no "pid" line'):
        foreground.parse_lsappinfo_pid(recording("lsappinfo-front-macos26"))


def test_parse_environ_of_child(spawn: Spawn) -> None:
    child = spawn(WORK_PROCESS, env={"DISPLAY": ":0.0", "XAUTHORITY": "/tmp/x a"})
    data = Path(f"/proc/{child.pid}/environ").read_bytes()
    assert foreground.parse_environ(data) == {
        "DISPLAY": ":0.0",
        "XAUTHORITY": "/tmp/x a",
    }


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [(":0", ":0.0", True), (":0.1", ":0", True), (":0", ":1", False)],
)
def test_same_display(first: str, second: str, same: bool) -> None:
    assert foreground.same_display(first, second) is same


# The detector with DISPLAY set


def test_detector_returns_window_app(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn
) -> None:
    window_owner = spawn(WORK_PROCESS)
    fakes.set(xprop=xprop_state(pid=window_owner.pid))
    detector = detector_for(display_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset({WORK_APP})
    assert detector.status() == (
        "available: X11 display :0 from the agent's DISPLAY (xprop)"
    )
    calls = fakes.calls("xprop")
    assert [call["argv"] for call in calls] == [
        ["-root", "-notype", "_NET_ACTIVE_WINDOW"],
        ["-id", "0x4400003", "-notype", "_NET_WM_PID"],
    ]
    assert calls[0]["env"]["DISPLAY"] == ":0"


def test_detector_parent_fallback(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn, tmp_path: Path
) -> None:
    # A shell copy named like the host app runs the helper and waits for it
    # (the trailing ":" keeps the shell from replacing itself with the helper).
    shutil.copy("/bin/sleep", tmp_path / HELPER_PROCESS)
    shutil.copy("/bin/sh", tmp_path / HOST_PROCESS)
    host = subprocess.Popen(
        [str(tmp_path / HOST_PROCESS), "-c", f"{tmp_path / HELPER_PROCESS} 60; :"]
    )
    try:
        helper = wait_for_child(psutil.Process(host.pid))
        fakes.set(xprop=xprop_state(pid=helper.pid))
        detector = detector_for(display_backend(fakes), catalog)

        assert detector.foreground_apps() == frozenset({HOST_APP})
    finally:
        for process in psutil.Process(host.pid).children():
            process.kill()
        host.kill()
        host.wait()


def test_detector_uncatalogued_process(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn
) -> None:
    # The parent chain is this test process and its ancestors, none catalogued.
    other = spawn("fmotherapp")
    fakes.set(xprop=xprop_state(pid=other.pid))
    assert (
        detector_for(display_backend(fakes), catalog).foreground_apps() == frozenset()
    )


def test_detector_no_active_window(fakes: FakeTools, catalog: Catalog) -> None:
    fakes.set(xprop=xprop_state(root="xprop-active-window-notype-none"))
    detector = detector_for(display_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset()
    assert not detector.status().startswith("unavailable")
    assert len(fakes.calls("xprop")) == 1


def test_detector_window_without_pid(fakes: FakeTools, catalog: Catalog) -> None:
    fakes.set(xprop=xprop_state(window="xprop-wm-pid-not-found"))
    detector = detector_for(display_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset()
    assert len(fakes.calls("xprop")) == 2


def test_detector_no_catalog(fakes: FakeTools, spawn: Spawn) -> None:
    window_owner = spawn(WORK_PROCESS)
    fakes.set(xprop=xprop_state(pid=window_owner.pid))
    assert detector_for(display_backend(fakes), None).foreground_apps() == frozenset()


def test_no_xprop_is_unavailable(tmp_path: Path, catalog: Catalog) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    backend = X11Backend(environ={"PATH": str(empty), "DISPLAY": ":0"})
    detector = detector_for(backend, catalog)

    assert detector.foreground_apps() == frozenset()
    status = detector.status()
    assert status.startswith("unavailable: xprop is not found on PATH")
    assert "x11-utils on Debian and Ubuntu" in status
    assert "xorg-xprop on Arch" in status
    assert status.endswith(f"; {THROTTLE_END}")


def test_xprop_failure_is_unavailable(fakes: FakeTools, catalog: Catalog) -> None:
    fakes.set(xprop=xprop_state(root="xprop-unable-to-open-display"))
    detector = detector_for(display_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset()
    assert detector.status() == (
        "unavailable: the active window of X11 display :0 cannot be read "
        f"(xprop: unable to open display ':0.0'); {THROTTLE_END}"
    )


def test_wayland_display_without_x11_window(fakes: FakeTools, catalog: Catalog) -> None:
    fakes.set(xprop=xprop_state(root="xprop-active-window-notype-none"))
    backend = X11Backend(
        environ={"PATH": fakes.path, "DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}
    )
    detector = detector_for(backend, catalog)

    assert detector.foreground_apps() == frozenset()
    assert detector.status() == (
        "unavailable: no X11 window is active in the agent's Wayland session, "
        f"and native Wayland windows cannot be read; {THROTTLE_END}"
    )


def test_not_root_without_display(fakes: FakeTools, catalog: Catalog) -> None:
    backend = X11Backend(environ={"PATH": fakes.path}, euid=1000)
    detector = detector_for(backend, catalog)

    assert detector.foreground_apps() == frozenset()
    assert "DISPLAY is not set and the agent does not run as root" in detector.status()
    assert fakes.calls() == []


def test_unavailable_logged_once(
    fakes: FakeTools,
    catalog: Catalog,
    spawn: Spawn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fakes.set(xprop=xprop_state(root="xprop-unable-to-open-display"))
    detector = detector_for(display_backend(fakes), catalog, cache_seconds=0)
    caplog.set_level(logging.INFO, logger="agent.foreground")

    for _ in range(3):
        assert detector.foreground_apps() == frozenset()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unable to open display" in warnings[0].getMessage()
    assert len(fakes.calls("xprop")) == 3

    window_owner = spawn(WORK_PROCESS)
    fakes.set(xprop=xprop_state(pid=window_owner.pid))
    assert detector.foreground_apps() == frozenset({WORK_APP})
    assert "foreground detection works again" in caplog.records[-1].getMessage()


class FailingBackend:
    """A reader that fails in a way no reader expects."""

    def read(self) -> ForegroundReading:
        raise RuntimeError("reader bug")


def test_backend_error_never_raises(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    detector = detector_for(FailingBackend(), catalog, cache_seconds=0)
    caplog.set_level(logging.WARNING, logger="agent.foreground")

    assert detector.foreground_apps() == frozenset()
    assert detector.foreground_apps() == frozenset()
    assert detector.status().startswith(
        "unavailable: the foreground reader failed (RuntimeError('reader bug'))"
    )
    assert len(caplog.records) == 1


def test_catalog_error_never_raises(fakes: FakeTools, spawn: Spawn) -> None:
    def broken_catalog() -> Catalog:
        return load_catalog([Path("/nonexistent/catalog.toml")])

    window_owner = spawn(WORK_PROCESS)
    fakes.set(xprop=xprop_state(pid=window_owner.pid))
    detector = ForegroundDetector(broken_catalog, display_backend(fakes))

    assert detector.foreground_apps() == frozenset()
    assert "catalog file not found" in detector.status()


class ManualClock(clock_module.Clock):
    """A clock whose monotonic time moves only when the test moves it."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def monotonic(self) -> float:
        return self.seconds


def test_result_cached_for_a_pass(
    fakes: FakeTools,
    catalog: Catalog,
    spawn: Spawn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manual = ManualClock()
    monkeypatch.setattr(clock_module, "clock", manual)
    window_owner = spawn(WORK_PROCESS)
    fakes.set(xprop=xprop_state(pid=window_owner.pid))
    detector = detector_for(display_backend(fakes), catalog)

    for _ in range(3):
        assert detector.foreground_apps() == frozenset({WORK_APP})
    assert len(fakes.calls("xprop")) == 2

    manual.seconds += foreground.CACHE_SECONDS
    assert detector.foreground_apps() == frozenset({WORK_APP})
    assert len(fakes.calls("xprop")) == 4


# The detector as root without DISPLAY, through loginctl


def session_state(
    listing: str, sessions: dict[str, str], properties: dict[str, dict[str, str]]
) -> dict[str, Any]:
    return {"list": listing, "sessions": sessions, "set": properties}


def test_root_session_x11(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn, tmp_path: Path
) -> None:
    require_root()
    # The recorded sessions belong to liveinstuser on :0; the test gives them
    # to root on :97, a display that no other process of this machine uses.
    cookie = tmp_path / "Xauthority"
    spawn("fmsessionproc", env={"DISPLAY": ":97.0", "XAUTHORITY": str(cookie)})
    window_owner = spawn(WORK_PROCESS)
    fakes.set(
        loginctl=session_state(
            TWO_SESSIONS,
            {"1": CLOSING_X11, "3": ACTIVE_X11},
            {
                "1": {"Name": "root", "Display": ":97"},
                "3": {"Name": "root", "Display": ":97"},
            },
        ),
        xprop=xprop_state(pid=window_owner.pid),
    )
    detector = detector_for(root_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset({WORK_APP})
    assert detector.status() == "available: X11 display :97 of user root (xprop)"
    show = [call["argv"] for call in fakes.calls("loginctl")][1:]
    assert [argv[1] for argv in show] == ["1", "3"]
    assert show[0][2:] == ["-p", "Type", "-p", "Display", "-p", "Active"] + [
        "-p",
        "User",
        "-p",
        "Name",
        "-p",
        "Remote",
    ]
    for call in fakes.calls("xprop"):
        # Python's C locale coercion (PEP 538) adds LC_CTYPE to the fake's own
        # environment when no locale variable is set, as here.
        env = {k: v for k, v in call["env"].items() if k != "LC_CTYPE"}
        assert env == {"DISPLAY": ":97", "XAUTHORITY": str(cookie), "PATH": fakes.path}
        assert call["uid"] == 0


def test_root_session_as_nobody(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn
) -> None:
    require_nobody()
    spawn(
        "fmsessionproc",
        env={"DISPLAY": ":96", "XAUTHORITY": "/nonexistent/nobody-cookie"},
        user=NOBODY,
        folder=fakes.folder,
    )
    window_owner = spawn(WORK_PROCESS)
    fakes.set(
        loginctl=session_state(
            TWO_SESSIONS,
            {"1": CLOSING_X11, "3": ACTIVE_X11},
            {"3": {"Name": "nobody", "Display": ":96"}},
        ),
        xprop=xprop_state(pid=window_owner.pid),
    )
    detector = detector_for(root_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset({WORK_APP}), detector.status()
    assert detector.status() == "available: X11 display :96 of user nobody (xprop)"
    calls = fakes.calls("xprop")
    assert len(calls) == 2
    for call in calls:
        assert (call["uid"], call["gid"]) == (NOBODY, NOBODY)
        assert call["env"]["XAUTHORITY"] == "/nonexistent/nobody-cookie"


def test_root_no_graphical_session(fakes: FakeTools, catalog: Catalog) -> None:
    require_root()
    # The one listed session is an SSH login of type tty.
    fakes.set(loginctl=session_state(WAYLAND_LIST, {"12": SSH_TTY}, {}))
    detector = detector_for(root_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset()
    assert detector.status() == (
        f"unavailable: no graphical session found; {THROTTLE_END}"
    )
    assert fakes.calls("xprop") == []


def test_root_inactive_session(fakes: FakeTools, catalog: Catalog) -> None:
    require_root()
    fakes.set(
        loginctl=session_state(TWO_SESSIONS, {"1": CLOSING_X11, "3": CLOSING_X11}, {})
    )
    detector = detector_for(root_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset()
    assert "sessions 1, 3 are inactive" in detector.status()


def test_root_wayland_without_xwayland(fakes: FakeTools, catalog: Catalog) -> None:
    require_root()
    # The recording was made with -p Type, so the test supplies the rest.
    fakes.set(
        loginctl=session_state(
            WAYLAND_LIST,
            {"12": WAYLAND_TYPE},
            {"12": {"Active": "yes", "Remote": "no", "Name": "nobody"}},
        )
    )
    detector = detector_for(root_backend(fakes), catalog)

    assert detector.foreground_apps() == frozenset()
    assert detector.status() == (
        "unavailable: Wayland session 12 of user nobody has no XWayland display, "
        f"and native Wayland windows cannot be read; {THROTTLE_END}"
    )


def test_root_wayland_xwayland_window(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn
) -> None:
    require_nobody()
    spawn("fmsessionproc", env={"DISPLAY": ":95"}, user=NOBODY, folder=fakes.folder)
    window_owner = spawn(WORK_PROCESS)
    fakes.set(
        loginctl=session_state(
            WAYLAND_LIST,
            {"12": WAYLAND_TYPE},
            {"12": {"Active": "yes", "Remote": "no", "Name": "nobody"}},
        ),
        xprop=xprop_state(pid=window_owner.pid),
    )
    detector = detector_for(root_backend(fakes), catalog, cache_seconds=0)

    assert detector.foreground_apps() == frozenset({WORK_APP}), detector.status()
    assert detector.status().startswith(
        "available: XWayland display :95 of user nobody in Wayland session 12"
    )
    assert "XAUTHORITY" not in fakes.calls("xprop")[0]["env"]

    fakes.set(xprop=xprop_state(root="xprop-active-window-notype-none"))
    assert detector.foreground_apps() == frozenset()
    assert detector.status() == (
        "unavailable: no X11 window is active in Wayland session 12, and native "
        f"Wayland windows cannot be read; {THROTTLE_END}"
    )


# macOS and Windows readers


def test_macos_front_app(fakes: FakeTools, catalog: Catalog, spawn: Spawn) -> None:
    window_owner = spawn(WORK_PROCESS)
    fakes.set(
        lsappinfo={
            "front": "lsappinfo-front-macos26",
            "info": "lsappinfo-info-bundleid-macos26",
            "pid": window_owner.pid,
        }
    )
    backend = LaunchServicesBackend(environ={"PATH": fakes.path})
    detector = detector_for(backend, catalog, os_name="macos")

    assert detector.foreground_apps() == frozenset({WORK_APP})
    assert detector.status() == "available: macOS front application (lsappinfo)"
    assert [call["argv"] for call in fakes.calls("lsappinfo")] == [
        ["front"],
        ["info", "-only", "pid", "ASN:0x0-0x11011:"],
    ]


def test_macos_single_pid_line(
    fakes: FakeTools, catalog: Catalog, spawn: Spawn
) -> None:
    window_owner = spawn(WORK_PROCESS)
    fakes.set(
        lsappinfo={
            "front": "lsappinfo-front-chrome",
            "info": "lsappinfo-info-only-pid-cmux",
            "pid": window_owner.pid,
        }
    )
    backend = LaunchServicesBackend(environ={"PATH": fakes.path})
    assert detector_for(backend, catalog, os_name="macos").foreground_apps() == (
        frozenset({WORK_APP})
    )


def test_macos_without_lsappinfo(tmp_path: Path, catalog: Catalog) -> None:
    backend = LaunchServicesBackend(environ={"PATH": str(tmp_path)})
    detector = detector_for(backend, catalog, os_name="macos")

    assert detector.foreground_apps() == frozenset()
    assert detector.status().startswith("unavailable: lsappinfo is not found on PATH")


def test_windows_reader_off_windows() -> None:
    with pytest.raises(ForegroundUnavailable, match="runs only on Windows"):
        WindowsBackend().read()


# The real undo of throttle_process


class FixedSystemCpu(SystemCpu):
    """System-wide CPU use that stays the same, so only the app's share decides."""

    def busy_percent(self) -> float:
        return 50.0


def test_foreground_undoes_throttle(
    fakes: FakeTools, catalog: Catalog, tmp_path: Path
) -> None:
    require_root()
    link = tmp_path / BUSY_PROCESS
    link.symlink_to(sys.executable)
    target = subprocess.Popen([str(link), "-c", "while True: pass"])
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        for pid in (target.pid, competitor.pid):
            psutil.Process(pid).cpu_affinity([cpu])
        context = ActionContext(state_dir=state_dir, allowlist=LocalAllowlist())
        result = throttle_process.execute(
            remediation_pb2.ThrottleProcess(app_id=BUSY_APP),
            context,
            catalog=catalog,
            verify_window=0.5,
            system=FixedSystemCpu(),
            stop=threading.Event(),
        )
        assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
        assert psutil.Process(target.pid).nice() == 10

        fakes.set(xprop=xprop_state(pid=target.pid))
        detector = detector_for(display_backend(fakes), catalog)
        in_front = ActionContext(
            state_dir=state_dir,
            allowlist=LocalAllowlist(),
            foreground_apps=detector.foreground_apps(),
        )
        assert in_front.foreground_apps == frozenset({BUSY_APP})
        results = throttle_process.tick(in_front, datetime.now(UTC))

        assert [r.outcome for r in results] == [Outcome.REMEDIATION_OUTCOME_UNDONE]
        assert "the app came to the foreground" in results[0].reason
        assert psutil.Process(target.pid).nice() == 0
        assert psutil.Process(target.pid).ionice().ioclass != psutil.IOPRIO_CLASS_IDLE
    finally:
        for child in (target, competitor):
            child.kill()
            child.wait()
