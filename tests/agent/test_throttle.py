"""CpuSampler and throttle_process on real busy-looping child processes.

The child runs Python through a symlink named "fmbusyidx", so psutil's
Process.name() is that name and matches only the test catalog's entry, not
other Python processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from google.protobuf.duration_pb2 import Duration

from agent.healing.actions import throttle_process
from agent.healing.actions.base import ActionContext, LocalAllowlist, Outcome
from agent.healing.processes import CpuSampler, SystemCpu, app_processes
from agent.usage.catalog import Catalog, load_catalog
from fleetmend.v1 import remediation_pb2

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses Linux nice, ionice and affinity"
)

APP_ID = "busyidx"
PROCESS_NAME = "fmbusyidx"
BUSY_LOOP = "while True: pass"
IDLE_LOOP = "import time\nwhile True: time.sleep(1)"
WINDOW = 0.5
REPO = Path(__file__).resolve().parents[2]


class FixedSystemCpu(SystemCpu):
    """System-wide CPU use that stays the same, so only the app's share decides."""

    def busy_percent(self) -> float:
        return 50.0


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(
        f"[apps.{APP_ID}]\n"
        'name = "Busy indexer"\n'
        f'processes.linux = ["{PROCESS_NAME}"]\n'
    )
    return load_catalog([path], include_default=False)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    """Start children running code through the fmbusyidx symlink; kill them after."""
    link = tmp_path / PROCESS_NAME
    link.symlink_to(sys.executable)
    children: list[subprocess.Popen[bytes]] = []

    def start(code: str = BUSY_LOOP, name_link: bool = True) -> psutil.Process:
        executable = str(link) if name_link else sys.executable
        child = subprocess.Popen([executable, "-c", code])
        children.append(child)
        return psutil.Process(child.pid)

    yield start
    for child in children:
        child.kill()
        child.wait()


def pin_together(*processes: psutil.Process) -> None:
    """Run the processes on one CPU, so that they compete for it."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    for process in processes:
        process.cpu_affinity([cpu])


def throttle_params(
    restore_after: timedelta | None = None,
) -> remediation_pb2.ThrottleProcess:
    message = remediation_pb2.ThrottleProcess(app_id=APP_ID)
    if restore_after is not None:
        duration = Duration()
        duration.FromTimedelta(restore_after)
        message.restore_after.CopyFrom(duration)
    return message


def context(
    state_dir: Path, foreground: frozenset[str] = frozenset(), dry_run: bool = False
) -> ActionContext:
    return ActionContext(
        state_dir=state_dir,
        allowlist=LocalAllowlist(),
        dry_run=dry_run,
        foreground_apps=foreground,
    )


def throttle_contended(
    state_dir: Path,
    catalog: Catalog,
    spawn: object,
    restore_after: timedelta | None = None,
) -> tuple[psutil.Process, throttle_process.ActionResult]:
    """Throttle a busy child that shares its CPU with a busy competitor."""
    target = spawn()  # type: ignore[operator]
    competitor = spawn(name_link=False)  # type: ignore[operator]
    pin_together(target, competitor)
    result = throttle_process.execute(
        throttle_params(restore_after),
        context(state_dir),
        catalog=catalog,
        verify_window=WINDOW,
        system=FixedSystemCpu(),
        source_rule="busy-indexer",
    )
    return target, result


def wait_until_idle(process: psutil.Process) -> None:
    """Wait until the child's interpreter start-up no longer uses CPU."""
    previous = -1.0
    while True:
        times = process.cpu_times()
        used = times.user + times.system
        if used == previous:
            return
        previous = used
        time.sleep(0.2)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("restoring a higher priority needs root")


# CpuSampler


def test_sampler_first_call_is_zero(catalog: Catalog, spawn: object) -> None:
    spawn()  # type: ignore[operator]
    assert CpuSampler().sample(APP_ID, catalog) == 0.0


def test_sampler_measures_busy_child(catalog: Catalog, spawn: object) -> None:
    spawn()  # type: ignore[operator]
    sampler = CpuSampler()
    sampler.sample(APP_ID, catalog)
    psutil.Process().cpu_percent(interval=1.0)  # lets real time pass
    # One CPU fully busy is 100; other work on this machine may take a share.
    assert sampler.sample(APP_ID, catalog) > 5.0


def test_sampler_idle_child_is_low(catalog: Catalog, spawn: object) -> None:
    spawn(IDLE_LOOP)  # type: ignore[operator]
    sampler = CpuSampler()
    sampler.sample(APP_ID, catalog)
    psutil.Process().cpu_percent(interval=0.5)
    assert sampler.sample(APP_ID, catalog) < 20.0


def test_app_processes_match_only_named(catalog: Catalog, spawn: object) -> None:
    target = spawn()  # type: ignore[operator]
    spawn(name_link=False)  # type: ignore[operator]
    assert [process.pid for process in app_processes(APP_ID, catalog)] == [target.pid]


def test_app_processes_unknown_app(catalog: Catalog) -> None:
    assert app_processes("nope", catalog) == []


# validate


def test_validate_accepts_defaults() -> None:
    assert throttle_process.validate(throttle_params(), LocalAllowlist()) == []


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (
            remediation_pb2.ThrottleProcess(app_id="Bad Id"),
            "app_id 'Bad Id' is invalid",
        ),
        (remediation_pb2.ThrottleProcess(app_id=""), "app_id '' is invalid"),
        (throttle_params(timedelta(seconds=10)), "restore_after 10 s is out of range"),
        (throttle_params(timedelta(days=2)), "restore_after 172800 s is out of range"),
    ],
)
def test_validate_rejects(message: remediation_pb2.ThrottleProcess, text: str) -> None:
    problems = throttle_process.validate(message, LocalAllowlist())
    assert len(problems) == 1
    assert text in problems[0]


# execute


def test_throttle_lowers_priority(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    require_root()
    target, result = throttle_contended(tmp_path, catalog, spawn)
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    assert result.after < result.before
    assert result.unit == "percent of one CPU"
    assert target.nice() == 10
    assert target.ionice().ioclass == psutil.IOPRIO_CLASS_IDLE
    stored = json.loads((tmp_path / "throttles.json").read_text())["throttles"]
    assert [entry["pid"] for entry in stored] == [target.pid]
    assert stored[0]["old_nice"] == 0
    assert stored[0]["create_time"] == target.create_time()
    assert (tmp_path / "throttles.json").stat().st_mode & 0o777 == 0o600


def test_undo_restores_priority(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    require_root()
    target, result = throttle_contended(tmp_path, catalog, spawn)
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    old_ionice = tuple(
        json.loads((tmp_path / "throttles.json").read_text())["throttles"][0][
            "old_ionice"
        ]
    )
    undone = throttle_process.undo(context(tmp_path), APP_ID, "test")
    assert undone.outcome == Outcome.REMEDIATION_OUTCOME_UNDONE, undone.reason
    assert target.nice() == 0
    assert tuple(target.ionice()) == old_ionice
    assert json.loads((tmp_path / "throttles.json").read_text())["throttles"] == []


def test_tick_undoes_after_restore_time(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    require_root()
    target, result = throttle_contended(
        tmp_path, catalog, spawn, restore_after=timedelta(minutes=5)
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    now = datetime.now(UTC)
    assert throttle_process.tick(context(tmp_path), now) == []
    assert target.nice() == 10
    results = throttle_process.tick(context(tmp_path), now + timedelta(minutes=6))
    assert [r.outcome for r in results] == [Outcome.REMEDIATION_OUTCOME_UNDONE]
    assert "restore_after ended" in results[0].reason
    assert results[0].details["app_id"] == APP_ID
    assert results[0].details["rule"] == "busy-indexer"
    assert target.nice() == 0


def test_tick_undoes_when_foreground(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    require_root()
    target, result = throttle_contended(tmp_path, catalog, spawn)
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, result.reason
    results = throttle_process.tick(
        context(tmp_path, foreground=frozenset({APP_ID})), datetime.now(UTC)
    )
    assert [r.outcome for r in results] == [Outcome.REMEDIATION_OUTCOME_UNDONE]
    assert "foreground" in results[0].reason
    assert target.nice() == 0
    assert target.ionice().ioclass != psutil.IOPRIO_CLASS_IDLE


def test_verification_fails_idle_child(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    # A child that sleeps uses no CPU, so a lower priority cannot lower its use.
    require_root()
    target = spawn(IDLE_LOOP)  # type: ignore[operator]
    wait_until_idle(target)
    result = throttle_process.execute(
        throttle_params(),
        context(tmp_path),
        catalog=catalog,
        verify_window=WINDOW,
        system=FixedSystemCpu(),
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "did not fall" in result.reason
    assert "restored the priority of 1 process of" in result.reason
    assert target.nice() == 0
    assert json.loads((tmp_path / "throttles.json").read_text())["throttles"] == []


def test_reused_pid_left_alone(tmp_path: Path, spawn: object) -> None:
    other = spawn(IDLE_LOOP)  # type: ignore[operator]
    other.nice(5)
    store = throttle_process.ThrottleStore(tmp_path / "throttles.json")
    store.save(
        [
            throttle_process.Throttle(
                app_id=APP_ID,
                pid=other.pid,
                create_time=other.create_time() - 100.0,
                old_nice=0,
                old_ionice=[0, 0],
                start="2026-03-02T09:00:00+00:00",
                until="2026-03-02T10:00:00+00:00",
            )
        ]
    )
    results = throttle_process.tick(
        context(tmp_path), datetime(2026, 3, 2, 11, tzinfo=UTC)
    )
    assert [r.outcome for r in results] == [Outcome.REMEDIATION_OUTCOME_UNDONE]
    assert "pid was reused, left alone" in results[0].reason
    assert other.nice() == 5
    assert store.load() == []


def test_dry_run_changes_nothing(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    target = spawn()  # type: ignore[operator]
    result = throttle_process.execute(
        throttle_params(), context(tmp_path, dry_run=True), catalog=catalog
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert str(target.pid) in result.reason
    assert target.nice() == 0
    assert not (tmp_path / "throttles.json").exists()


def test_no_process_is_skipped(tmp_path: Path, catalog: Catalog) -> None:
    result = throttle_process.execute(
        throttle_params(), context(tmp_path), catalog=catalog
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert "no process of app busyidx runs" in result.reason


def test_unknown_app_fails(tmp_path: Path, catalog: Catalog) -> None:
    result = throttle_process.execute(
        remediation_pb2.ThrottleProcess(app_id="nope"),
        context(tmp_path),
        catalog=catalog,
    )
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "'nope' is not in the catalog" in result.reason


def test_already_throttled_is_skipped(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    require_root()
    _, first = throttle_contended(tmp_path, catalog, spawn)
    assert first.outcome == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, first.reason
    again = throttle_process.execute(
        throttle_params(), context(tmp_path), catalog=catalog
    )
    assert again.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert "already throttled" in again.reason


def test_damaged_store_is_empty(tmp_path: Path) -> None:
    (tmp_path / "throttles.json").write_text('{"throttles": [{"pid": "x"}]}')
    assert throttle_process.ThrottleStore(tmp_path / "throttles.json").load() == []


# Unprivileged undo

UNPRIVILEGED_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    from datetime import UTC, datetime
    from pathlib import Path

    import psutil

    from agent.healing.actions import throttle_process
    from agent.healing.actions.base import ActionContext, LocalAllowlist

    state_dir = Path(sys.argv[1])
    child = subprocess.Popen(["sleep", "60"])
    try:
        process = psutil.Process(child.pid)
        now = datetime.now(UTC)
        throttles, errors = throttle_process._lower_priority(
            [process], "busyidx", now, now
        )
        assert not errors, errors
        throttle_process.ThrottleStore(state_dir / "throttles.json").save(throttles)
        print("nice after lowering", process.nice())
        context = ActionContext(state_dir=state_dir, allowlist=LocalAllowlist())
        result = throttle_process.undo(context, "busyidx", "test")
        print("outcome", result.outcome)
        print("reason", result.reason)
        print("nice after undo", process.nice())
    finally:
        child.kill()
    """
)


def test_unprivileged_undo_fails(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    state_dir = Path(tempfile.mkdtemp(prefix="fleetmend-throttle-test-"))
    try:
        os.chmod(state_dir, 0o777)  # noqa: S103 - the unprivileged user writes here
        completed = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [sys.executable, "-c", UNPRIVILEGED_SCRIPT, str(state_dir)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"},
            check=False,
            timeout=60,
        )
    finally:
        shutil.rmtree(state_dir)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "nice after lowering 10" in lines
    assert f"outcome {Outcome.REMEDIATION_OUTCOME_FAILED}" in lines
    assert "raising a priority back needs root" in completed.stdout
    assert "nice after undo 10" in lines
