"""Shutdown during waits and walks, refused rules in `rules`, rule name "command".

throttle_process runs on real busy-looping children (see test_throttle),
WindowsScmBackend on the fake sc that replays recorded sc.exe output
(tests/fakes/sc, tests/data/services), clear_cache on real trees in tmp_path,
and `fleetmend-agent rules` through agent.cli.main with a collector policy
stored by a real PolicyStore.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.cli import main
from agent.healing.actions import clear_cache, restart_service, throttle_process
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
)
from agent.healing.conditions import ConditionResult
from agent.healing.engine import HealingEngine
from agent.healing.policy import (
    POLICY_FILE,
    PolicyStore,
    check_policy,
    policy_from_toml,
    validate_policy,
)
from agent.healing.services import (
    ServiceError,
    ServiceWaitInterrupted,
    WindowsScmBackend,
)
from agent.text import format_bytes
from agent.usage.catalog import Catalog
from collector._ops_render import change_text
from fleetmend.v1 import remediation_pb2
from tests.agent import test_clear_cache, test_services, test_throttle
from tests.agent.test_services import FakeServices

# Fixtures shared with the suites of each part.
catalog = test_throttle.catalog
spawn = test_throttle.spawn
fake_services = test_services.fake_services

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses Linux nice and /proc"
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="restoring a priority needs root"
)


def throttle_action() -> remediation_pb2.Action:
    return remediation_pb2.Action(
        throttle_process=remediation_pb2.ThrottleProcess(app_id=test_throttle.APP_ID)
    )


def record_of(
    result: ActionResult, condition: ConditionResult
) -> remediation_pb2.RemediationRecord:
    """Return the record that the engine writes for a rule's result."""
    return HealingEngine._record(
        throttle_action(), result, condition, datetime.now(UTC), time.monotonic()
    )


def cpu_condition(percent: float) -> ConditionResult:
    unit = f"percent of one CPU used by {test_throttle.APP_ID}"
    return ConditionResult(True, percent, unit, f"{percent} % for 0 s")


# -- throttle_process and shutdown -----------------------------------------------------


@linux_only
def test_throttle_stop_first_window(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    target = spawn()  # type: ignore[operator]
    stop = threading.Event()
    context = ActionContext(state_dir=tmp_path, allowlist=LocalAllowlist(), stop=stop)
    timer = threading.Timer(0.2, stop.set)
    timer.start()

    # The window is far longer than the test: only the stop event ends it.
    result = throttle_process.execute(
        test_throttle.throttle_params(),
        context,
        catalog=catalog,
        verify_window=60,
    )
    timer.join()

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert "shutdown interrupted the measurement" in result.reason
    assert "before any priority was lowered" in result.reason
    assert target.nice() == 0
    assert not (tmp_path / throttle_process.STATE_FILE).exists()
    assert result.unit == ""


@linux_only
@needs_root
def test_throttle_stop_second_window(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    target = spawn()  # type: ignore[operator]
    stop = threading.Event()
    context = ActionContext(state_dir=tmp_path, allowlist=LocalAllowlist(), stop=stop)
    store_path = tmp_path / throttle_process.STATE_FILE
    lowered: list[int] = []

    def stop_once_throttled() -> None:
        # throttles.json is written right after the priority is lowered, at
        # the start of the second window.
        while not store_path.exists():
            time.sleep(0.01)
        lowered.append(target.nice())
        stop.set()

    watcher = threading.Thread(target=stop_once_throttled)
    watcher.start()
    result = throttle_process.execute(
        test_throttle.throttle_params(),
        context,
        catalog=catalog,
        verify_window=2.0,
        system=test_throttle.FixedSystemCpu(),
    )
    watcher.join()

    assert lowered == [10]
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "shutdown interrupted the verification" in result.reason
    assert "restored the priority of 1 process of" in result.reason
    assert target.nice() == 0
    assert throttle_process.ThrottleStore(store_path).load() == []
    assert result.after == result.before


@linux_only
def test_throttle_dry_run_records_condition(
    tmp_path: Path, catalog: Catalog, spawn: object
) -> None:
    spawn()  # type: ignore[operator]
    context = ActionContext(
        state_dir=tmp_path, allowlist=LocalAllowlist(), dry_run=True
    )

    result = throttle_process.execute(
        test_throttle.throttle_params(), context, catalog=catalog
    )
    record = record_of(result, cpu_condition(93.4))

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert result.unit == ""
    assert record.unit == f"percent of one CPU used by {test_throttle.APP_ID}"
    assert record.before == pytest.approx(93.4)
    assert record.after == pytest.approx(93.4)
    assert change_text(record) == f"{test_throttle.APP_ID} CPU 93.4 %"


LOWER_AS_NOBODY = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from agent.healing.actions import throttle_process
    from agent.healing.actions.base import ActionContext, LocalAllowlist
    from agent.usage.catalog import load_catalog
    from fleetmend.v1 import remediation_pb2

    folder = Path(sys.argv[1])
    catalog = load_catalog([folder / "catalog.toml"], include_default=False)
    result = throttle_process.execute(
        remediation_pb2.ThrottleProcess(app_id=sys.argv[2]),
        ActionContext(state_dir=folder, allowlist=LocalAllowlist()),
        catalog=catalog,
        verify_window=0.5,
    )
    print(json.dumps({
        "outcome": result.outcome,
        "reason": result.reason,
        "before": result.before,
        "after": result.after,
        "unit": result.unit,
    }))
    """
)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """Return a folder that user 65534 may write; pytest's tmp_path is root-only."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-followups-"))
    os.chmod(folder, 0o777)  # noqa: S103 - the unprivileged user writes here
    yield folder
    shutil.rmtree(folder)


@linux_only
def test_lowering_denied_keeps_value(shared_folder: Path, spawn: object) -> None:
    # A process of root, which user 65534 may not renice.
    target = spawn()  # type: ignore[operator]
    (shared_folder / "catalog.toml").write_text(
        f"[apps.{test_throttle.APP_ID}]\n"
        'name = "Busy indexer"\n'
        f'processes.linux = ["{test_throttle.PROCESS_NAME}"]\n',
        encoding="utf-8",
    )
    os.chmod(shared_folder / "catalog.toml", 0o644)

    completed = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        + [sys.executable, "-c", LOWER_AS_NOBODY, str(shared_folder)]
        + [test_throttle.APP_ID],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"},
        check=False,
        timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    values = json.loads(completed.stdout)
    assert values["outcome"] == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "could not lower the priority of any process" in values["reason"]
    assert f"pid {target.pid}: access denied" in values["reason"]
    assert values["before"] > 0
    assert values["after"] == values["before"]
    assert target.nice() == 0
    result = ActionResult(
        Outcome.REMEDIATION_OUTCOME_FAILED,
        values["reason"],
        before=values["before"],
        after=values["after"],
        unit=values["unit"],
    )
    record = record_of(result, cpu_condition(50.0))
    assert record.before == record.after == values["before"]
    assert change_text(record) == f"CPU {values['before']:.1f} %"


# -- WindowsScmBackend and shutdown ----------------------------------------------------

PENDING_SERVICE = "TestSirepSvc"


def test_sc_stop_pending_interrupted(fake_services: FakeServices) -> None:
    fake_services.set(
        PENDING_SERVICE,
        status=["sc-query-running"],
        stop="sc-stop-stop-pending",
        after_stop=["sc-stop-stop-pending"],
        restart="sc-start-running",
        after_restart=["sc-query-running"],
    )
    stop = threading.Event()

    def stop_after_first_query() -> None:
        while ("sc", ["query", PENDING_SERVICE]) not in fake_services.calls():
            time.sleep(0.01)
        stop.set()

    watcher = threading.Thread(target=stop_after_first_query)
    watcher.start()
    # Without the stop event this wait would last stop_timeout, 60 s.
    backend = WindowsScmBackend(sc="sc", stop_timeout=60, poll_interval=0.05)
    with pytest.raises(ServiceWaitInterrupted) as raised:
        backend.restart(PENDING_SERVICE, stop=stop)
    watcher.join()

    assert isinstance(raised.value, ServiceError)
    assert str(raised.value) == (
        f"shutdown interrupted the wait for service {PENDING_SERVICE!r} to stop "
        "(state STOP_PENDING), so it was not started again"
    )
    verbs = [argv[0] for _, argv in fake_services.calls()]
    assert verbs[0] == "stop"
    assert "query" in verbs
    assert "start" not in verbs


def test_restart_interrupted_not_counted(
    fake_services: FakeServices, tmp_path: Path
) -> None:
    fake_services.set(
        PENDING_SERVICE,
        status=["sc-stop-stop-pending"],
        stop="sc-stop-stop-pending",
        after_stop=["sc-stop-stop-pending"],
    )
    stop = threading.Event()
    context = ActionContext(
        state_dir=tmp_path,
        allowlist=LocalAllowlist(services=frozenset({PENDING_SERVICE})),
        stop=stop,
    )
    params = remediation_pb2.RestartService(service=PENDING_SERVICE)

    def stop_after_stop_sent() -> None:
        while not any(argv[0] == "stop" for _, argv in fake_services.calls()):
            time.sleep(0.01)
        stop.set()

    watcher = threading.Thread(target=stop_after_stop_sent)
    watcher.start()
    backend = WindowsScmBackend(sc="sc", stop_timeout=60, poll_interval=0.05)
    result = restart_service.execute(params, context, backend=backend)
    watcher.join()

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "shutdown interrupted the wait" in result.reason
    assert result.reason.endswith("(not counted as a failed restart)")
    assert "start" not in [argv[0] for _, argv in fake_services.calls()]


def test_sc_stop_pending_times_out(fake_services: FakeServices) -> None:
    fake_services.set(
        PENDING_SERVICE,
        status=["sc-query-running"],
        stop="sc-stop-stop-pending",
        after_stop=["sc-stop-stop-pending"],
    )
    backend = WindowsScmBackend(sc="sc", stop_timeout=0.05, poll_interval=0.01)

    with pytest.raises(ServiceError) as raised:
        backend.restart(PENDING_SERVICE, stop=threading.Event())

    assert not isinstance(raised.value, ServiceWaitInterrupted)
    assert "did not stop within 0.05 s (state STOP_PENDING)" in str(raised.value)


# -- clear_cache and shutdown ----------------------------------------------------------

posix_only = pytest.mark.skipif(
    sys.platform == "win32", reason="the dir_fd walk is for POSIX systems"
)


@posix_only
def test_clear_stop_mid_walk(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    files = [test_clear_cache.write(root / f"f{index}.bin") for index in range(5)]
    test_clear_cache.write(root / "sub" / "g.bin")
    size = test_clear_cache.allocated(files[0])
    stop = threading.Event()
    unlinked: list[str] = []

    def stop_at_first_unlink(dir_fd: int, name: str) -> None:
        unlinked.append(name)
        stop.set()

    result, reports = clear_cache.clear_roots(
        [test_clear_cache.cache_root(root)],
        0,
        dry_run=False,
        in_use_ids=frozenset(),
        before_unlink=stop_at_first_unlink,
        stop=stop,
    )

    remaining = sorted(path.name for path in root.rglob("*") if path.is_file())
    assert len(unlinked) == 1
    assert unlinked[0] not in remaining
    assert len(remaining) == 5
    assert reports[0].interrupted is True
    assert reports[0].files_deleted == 1
    assert reports[0].directories_removed == 0
    assert result.bytes_freed == size
    assert result.reason.startswith(
        f"freed {format_bytes(size)} in 1 file from 1 cache folder"
    )
    assert result.reason.endswith(
        "; shutdown interrupted the walk, so the rest waits for the next run"
    )
    assert result.details["interrupted"] == "by shutdown"
    # Other processes write to this volume too, so the outcome, which also
    # compares its free space, may be FAILED; only SKIPPED would be wrong.
    assert result.outcome != Outcome.REMEDIATION_OUTCOME_SKIPPED


@posix_only
def test_clear_execute_reads_context_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    anchor = tmp_path / "home" / ".cache"
    root = anchor / "google-chrome"
    for index in range(3):
        test_clear_cache.write(root / "Default" / "Cache" / f"data_{index}")
    monkeypatch.setattr(
        clear_cache,
        "roots_for_this_machine",
        lambda cache_sets: [test_clear_cache.cache_root(root, anchor)],
    )
    stop = threading.Event()
    stop.set()
    context = ActionContext(
        state_dir=tmp_path / "state", allowlist=LocalAllowlist(), stop=stop
    )

    result = clear_cache.execute(test_clear_cache.clear_params("browser"), context)

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert result.reason == "shutdown interrupted the walk before anything was freed"
    assert result.bytes_freed == 0
    assert len(list(root.rglob("data_*"))) == 3


@posix_only
def test_clear_dry_run_interrupted(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    for index in range(3):
        test_clear_cache.write(root / f"f{index}.bin")
    stop = threading.Event()
    stop.set()

    result, reports = clear_cache.clear_roots(
        [test_clear_cache.cache_root(root)],
        0,
        dry_run=True,
        in_use_ids=frozenset(),
        stop=stop,
    )

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert result.reason == (
        "would free 0 B in 0 files from 0 cache folders; shutdown "
        "interrupted the count, so the rest waits for the next run"
    )
    assert reports == []


def test_path_walk_stops(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    for index in range(3):
        test_clear_cache.write(root / "sub" / f"f{index}.bin")
    report = clear_cache.RootReport(test_clear_cache.cache_root(root))
    stop = threading.Event()
    stop.set()

    clear_cache._clear_root_by_path(report, 0, False, time.time(), stop)

    assert report.interrupted is True
    assert report.files_deleted == 0
    assert len(list(root.rglob("*.bin"))) == 3


# -- fleetmend-agent rules and refused rules -------------------------------------------

REFUSAL_POLICY = """
[[rules]]
name = "browser-low-space"
condition.free_space_below = { mount_point = "/", bytes = 1 }
action.clear_cache = { cache_sets = ["browser"] }

[[rules]]
name = "chat-always"
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.clear_cache = { cache_sets = ["chat"] }

[[rules]]
name = "thumbnails-always"
condition.free_space_below = { mount_point = "/", ratio = 1.0 }
action.clear_cache = { cache_sets = ["thumbnails"] }
"""


def refusal_reason(cache_set: str) -> str:
    return (
        f"cache set {cache_set} is not in healing.cache_sets in this device's "
        "agent.toml (allowed: thumbnails); add it there and restart the agent to "
        "let this rule run"
    )


@pytest.fixture
def agent_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FLEETMEND_CONFIG at a settings file that allows only thumbnails."""
    for name in list(os.environ):
        if name.startswith("FLEETMEND_"):
            monkeypatch.delenv(name)
    config = tmp_path / "agent.toml"
    config.write_text(
        '[usage]\nresolve_hosts = false\n[healing]\ncache_sets = ["thumbnails"]\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("FLEETMEND_CONFIG", str(config))
    return config


def run_rules(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    status = main(["rules", "--state-dir", str(state_dir)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def rule_block(out: str, name: str) -> str:
    """Return the lines of one rule in `rules` output, continuation lines joined."""
    block = out.split(f"\nRule {name}\n", 1)[1].split("\n\n", 1)[0]
    return block.replace("\n    ", " ")


def test_rules_lists_refused_rules(
    tmp_path: Path, agent_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    policy = policy_from_toml(REFUSAL_POLICY, "collector")
    policy.version = 7
    allowlist = LocalAllowlist(cache_sets=frozenset({"thumbnails"}))
    assert (
        PolicyStore(state_dir, remediation_pb2.Policy(), allowlist).apply(policy) == []
    )
    assert (state_dir / POLICY_FILE).exists()

    status, out, err = run_rules(state_dir, capsys)

    assert status == 0, err
    header = out.split("\n\n", 1)[0].replace("\n    ", " ")
    assert header.splitlines() == [
        "Policy generation 7 from the collector, 3 rules. A dry run: nothing was "
        "changed.",
        f"  ! rule browser-low-space is refused on this device: "
        f"{refusal_reason('browser')}",
        f"  ! rule chat-always is refused on this device: {refusal_reason('chat')}",
    ]
    browser = rule_block(out, "browser-low-space")
    assert "  condition not met: " in browser
    assert "  now: refused on this device (see above)" in browser
    chat = rule_block(out, "chat-always")
    assert "  condition met: " in chat
    assert "  now: refused on this device (see above)" in chat
    assert "skipped: refused" not in out
    thumbnails = rule_block(out, "thumbnails-always")
    assert "  now: would act" in thumbnails
    assert "refused" not in thumbnails


# -- the reserved rule name "command" --------------------------------------------------

COMMAND_RULE = """
[[rules]]
name = "command"
condition.free_space_below = { mount_point = "/", bytes = 1 }
action.clear_cache = { cache_sets = ["thumbnails"] }
"""

RESERVED_REASON = (
    "rule 'command': name 'command' is reserved, because the collector lists the "
    "records of operator commands under it; give the rule another name"
)


def test_command_name_local_policy(
    tmp_path: Path, agent_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(COMMAND_RULE, encoding="utf-8")
    with agent_config.open("a", encoding="utf-8") as handle:
        handle.write(f'policy_file = "{policy_file}"\n')

    status, out, err = run_rules(tmp_path / "state", capsys)

    assert status == 1
    assert out == ""
    assert f"policy file {policy_file} is invalid: {RESERVED_REASON}" in err
    policy = policy_from_toml(COMMAND_RULE, str(policy_file))
    assert validate_policy(policy, LocalAllowlist()) == [RESERVED_REASON]


def test_command_name_collector_policy(tmp_path: Path) -> None:
    policy = policy_from_toml(COMMAND_RULE, "collector")
    policy.version = 4
    store = PolicyStore(tmp_path, remediation_pb2.Policy(), LocalAllowlist())

    problems = store.apply(policy)

    assert problems == [RESERVED_REASON]
    assert check_policy(policy, LocalAllowlist()).problems == [RESERVED_REASON]
    assert store.status.rejected_version == 4
    assert store.status.rejected_reason == RESERVED_REASON
    assert store.applied_version == 0
    assert not (tmp_path / POLICY_FILE).exists()
