"""The foreground detector against a real X server (Xvfb) and the real xprop.

A window manager sets ``_NET_ACTIVE_WINDOW`` on the root window and clients set
``_NET_WM_PID`` on their windows. Here a small Xlib client, driven through
ctypes, plays both parts: it creates a window, gives it the pid of a real child
process, and marks it active, with the property types a window manager uses
(WINDOW and CARDINAL). The detector then runs the real xprop on that display.
Xvfb listens on its Unix socket only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from agent.foreground import ForegroundDetector, X11Backend
from agent.healing.actions.base import LocalAllowlist
from agent.healing.actions.throttle_process import STATE_FILE as THROTTLE_FILE
from agent.healing.actions.throttle_process import Throttle, ThrottleStore
from agent.healing.engine import HealingEngine
from agent.healing.policy import PolicyStore
from agent.report import ReportBuilder
from agent.state import StateStore
from agent.usage.catalog import Catalog, load_catalog
from fleetmend.v1 import remediation_pb2

WORK_APP = "fmx11work"
WORK_PROCESS = "fmx11workapp"
INDEXER_APP = "fmx11index"
INDEXER_PROCESS = "fmx11indexer"

XA_CARDINAL = 6
XA_WINDOW = 33
PROP_MODE_REPLACE = 0

pytestmark = pytest.mark.skipif(
    shutil.which("Xvfb") is None or shutil.which("xprop") is None,
    reason="needs Xvfb and xprop (apt packages xvfb, x11-utils; .ci/run installs them)",
)


@dataclass
class Display:
    name: str
    xlib: ctypes.CDLL
    connection: int
    root: int

    def atom(self, name: str) -> int:
        return int(self.xlib.XInternAtom(self.connection, name.encode(), 0))

    def set_property(self, window: int, name: str, kind: int, value: int) -> None:
        data = (ctypes.c_long * 1)(value)
        self.xlib.XChangeProperty(
            self.connection,
            window,
            self.atom(name),
            kind,
            32,
            PROP_MODE_REPLACE,
            data,
            1,
        )
        self.xlib.XSync(self.connection, 0)

    def open_window(self, pid: int) -> int:
        """Create a window owned by pid, the way a client announces itself."""
        window = int(
            self.xlib.XCreateSimpleWindow(
                self.connection, self.root, 0, 0, 10, 10, 0, 0, 0
            )
        )
        self.set_property(window, "_NET_WM_PID", XA_CARDINAL, pid)
        return window

    def activate(self, window: int) -> None:
        """Mark window active, as a window manager does on focus."""
        self.set_property(self.root, "_NET_ACTIVE_WINDOW", XA_WINDOW, window)


def load_xlib() -> ctypes.CDLL:
    path = ctypes.util.find_library("X11")
    if path is None:
        pytest.skip("libX11 is not installed")
    xlib = ctypes.CDLL(path)
    xlib.XOpenDisplay.restype = ctypes.c_void_p
    xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    xlib.XDefaultRootWindow.restype = ctypes.c_ulong
    xlib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
    xlib.XCreateSimpleWindow.restype = ctypes.c_ulong
    xlib.XCreateSimpleWindow.argtypes = [
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    xlib.XInternAtom.restype = ctypes.c_ulong
    xlib.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    xlib.XChangeProperty.argtypes = [
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    xlib.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
    xlib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    return xlib


@pytest.fixture
def display() -> Iterator[Display]:
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write_end),
            "-nolisten",
            "tcp",
            "-noreset",
            "-screen",
            "0",
            "64x64x24",
        ],
        pass_fds=[write_end],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            number = pipe.readline().decode().strip()
        if not number.isdigit():
            pytest.fail(f"Xvfb printed no display number (exit {server.poll()})")
        name = f":{number}"
        xlib = load_xlib()
        connection = xlib.XOpenDisplay(name.encode())
        assert connection, f"cannot open display {name}"
        try:
            yield Display(
                name, xlib, connection, int(xlib.XDefaultRootWindow(connection))
            )
        finally:
            xlib.XCloseDisplay(connection)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(
        f"[apps.{WORK_APP}]\n"
        'name = "Work app"\n'
        f'processes.linux = ["{WORK_PROCESS}"]\n'
        f"[apps.{INDEXER_APP}]\n"
        'name = "Indexer"\n'
        f'processes.linux = ["{INDEXER_PROCESS}"]\n',
        encoding="utf-8",
    )
    return load_catalog([path], include_default=False)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        child.kill()
        child.wait()


def start(
    tmp_path: Path, name: str, started: list[subprocess.Popen[bytes]], argv: list[str]
) -> psutil.Process:
    """Run argv from a copy of its program named name."""
    executable = tmp_path / name
    shutil.copy(argv[0], executable)
    executable.chmod(0o755)
    child = subprocess.Popen([str(executable), *argv[1:]])
    started.append(child)
    return psutil.Process(child.pid)


def detector(display: Display, catalog: Catalog) -> ForegroundDetector:
    backend = X11Backend(environ={"PATH": os.environ["PATH"], "DISPLAY": display.name})
    return ForegroundDetector(
        lambda: catalog, backend, os_name="linux", cache_seconds=0
    )


def test_active_window_maps_to_its_app(
    display: Display,
    catalog: Catalog,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    owner = start(tmp_path, WORK_PROCESS, children, ["/bin/sleep", "60"])
    display.activate(display.open_window(owner.pid))

    found = detector(display, catalog)

    assert found.foreground_apps() == frozenset({WORK_APP})
    assert (
        found.status()
        == f"available: X11 display {display.name} from the agent's DISPLAY (xprop)"
    )


def test_no_active_window_yet(display: Display, catalog: Catalog) -> None:
    found = detector(display, catalog)

    assert found.foreground_apps() == frozenset()
    assert not found.status().startswith("unavailable")


def test_focus_moves_to_an_uncatalogued_window(
    display: Display,
    catalog: Catalog,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    owner = start(tmp_path, WORK_PROCESS, children, ["/bin/sleep", "60"])
    other = start(tmp_path, "fmx11other", children, ["/bin/sleep", "60"])
    found = detector(display, catalog)
    display.activate(display.open_window(owner.pid))
    assert found.foreground_apps() == frozenset({WORK_APP})

    display.activate(display.open_window(other.pid))

    assert found.foreground_apps() == frozenset()


def test_engine_undoes_throttle_in_front(
    display: Display,
    catalog: Catalog,
    children: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("restoring a lower nice value needs root")
    indexer = start(tmp_path, INDEXER_PROCESS, children, ["/bin/sleep", "60"])
    # The nice value and the throttle entry that throttle_process leaves behind.
    indexer.nice(10)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    now = datetime.now(UTC)
    ThrottleStore(state_dir / THROTTLE_FILE).save(
        [
            Throttle(
                app_id=INDEXER_APP,
                pid=indexer.pid,
                create_time=indexer.create_time(),
                old_nice=0,
                old_ionice=None,
                start=now.isoformat(),
                until=(now + timedelta(hours=1)).isoformat(),
                rule="busy-indexer",
            )
        ]
    )
    identity = StateStore(state_dir)
    builder = ReportBuilder(identity, identity.load_or_create())
    allowlist = LocalAllowlist()
    engine = HealingEngine(
        state_dir,
        PolicyStore(state_dir, remediation_pb2.Policy(), allowlist),
        allowlist,
        builder,
        None,
        foreground_apps=detector(display, catalog).foreground_apps,
    )

    assert engine.undo_throttles() == []
    assert indexer.nice() == 10

    display.activate(display.open_window(indexer.pid))
    records = engine.undo_throttles()

    assert [record.outcome for record in records] == [
        remediation_pb2.REMEDIATION_OUTCOME_UNDONE
    ]
    assert records[0].rule == "busy-indexer"
    assert "foreground" in records[0].reason
    assert indexer.nice() == 0
    assert ThrottleStore(state_dir / THROTTLE_FILE).load() == []


def test_diagnose_names_the_display(display: Display, tmp_path: Path) -> None:
    agent = Path(sys.executable).with_name("fleetmend-agent")
    (tmp_path / "agent.toml").write_text("", encoding="utf-8")
    env = {
        "PATH": os.environ["PATH"],
        "DISPLAY": display.name,
        "HOME": str(tmp_path),
        "FLEETMEND_CONFIG": str(tmp_path / "agent.toml"),
    }

    result = subprocess.run(
        [str(agent), "diagnose", "--state-dir", str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    line = (
        f"foreground check for throttles: available: X11 display {display.name} "
        "from the "
    )
    assert line + "agent's DISPLAY (xprop)" in result.stdout, result.stderr
