"""clear_cache on real directory trees: links, races, open files, permissions, ages."""

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
from pathlib import Path, PurePath

import pytest

from agent.healing import caches
from agent.healing.actions import clear_cache
from agent.healing.actions.base import (
    ActionContext,
    LocalAllowlist,
    Outcome,
)
from agent.text import format_bytes
from fleetmend.v1 import remediation_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY = 86400

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="the dir_fd walk is for POSIX systems"
)


def cache_root(path: Path, anchor: Path | None = None, **kw) -> caches.CacheRoot:
    return caches.CacheRoot(
        cache_set="browser",
        label="test cache",
        path=PurePath(path),
        anchor=PurePath(anchor if anchor is not None else path.parent),
        **kw,
    )


def write(path: Path, size: int = 8192) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def age(path: Path, days: float) -> None:
    when = time.time() - days * DAY
    os.utime(path, (when, when), follow_symlinks=False)


def clear_params(*sets: str, days: int = 0) -> remediation_pb2.ClearCache:
    return remediation_pb2.ClearCache(cache_sets=list(sets), older_than_days=days)


# validate


def test_validate_accepts_known_sets() -> None:
    params = clear_params("browser", "chat", "user_temp", days=7)

    assert clear_cache.validate(params, LocalAllowlist()) == []


def test_validate_problems_name_value() -> None:
    allowlist = LocalAllowlist(cache_sets=frozenset({"browser", "user_temp"}))

    unknown = clear_cache.validate(clear_params("cookies"), allowlist)
    not_allowed = clear_cache.validate(clear_params("chat"), allowlist)
    too_old = clear_cache.validate(clear_params("browser", days=3651), allowlist)
    temp_any_age = clear_cache.validate(clear_params("user_temp", days=0), allowlist)
    empty = clear_cache.validate(clear_params(), allowlist)

    assert len(unknown) == 1
    assert "unknown cache set 'cookies'" in unknown[0]
    assert "browser" in unknown[0]
    assert len(not_allowed) == 1
    assert (
        "cache set chat is not in healing.cache_sets in this device's "
        in (not_allowed[0])
    )
    assert "(allowed: browser, user_temp)" in not_allowed[0]
    assert too_old == ["older_than_days 3651 is out of range: use 0 to 3650"]
    assert len(temp_any_age) == 1
    assert "'user_temp' needs older_than_days of at least 1, not 0" in temp_any_age[0]
    assert len(empty) == 1
    assert "at least one cache set" in empty[0]


def test_validate_upper_bound_inclusive() -> None:
    assert (
        clear_cache.validate(clear_params("browser", days=3650), LocalAllowlist()) == []
    )


# Deletion


def test_clears_files_and_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    files = [
        write(root / "a.bin"),
        write(root / "sub" / "b.bin"),
        write(root / "sub" / "deep" / "c"),
    ]
    expected = sum(allocated(f) for f in files)

    report = clear_cache.clear_root(
        cache_root(root), 0, dry_run=False, in_use_ids=frozenset()
    )

    assert report.status == "cleared"
    assert report.files_deleted == 3
    assert report.bytes_freed == expected
    assert report.directories_removed == 2
    assert root.is_dir()
    assert list(root.iterdir()) == []


def test_symlinks_outside_root_untouched(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    outside = tmp_path / "outside"
    secret = write(outside / "secret.txt", 100)
    write(outside / "folder" / "kept.txt", 100)
    write(root / "own.bin")
    root.joinpath("file_link").symlink_to(secret)
    root.joinpath("dir_link").symlink_to(outside / "folder")
    root.joinpath("dangling").symlink_to(tmp_path / "missing")
    write(root / "sub" / "x.bin")
    root.joinpath("sub", "up").symlink_to(outside)

    report = clear_cache.clear_root(
        cache_root(root), 0, dry_run=False, in_use_ids=frozenset()
    )

    assert secret.read_bytes() == b"x" * 100
    assert (outside / "folder" / "kept.txt").read_bytes() == b"x" * 100
    assert report.symlinks_removed == 4
    assert report.files_deleted == 2
    assert list(root.iterdir()) == []


def test_hard_links_counted_apart(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    outside = write(tmp_path / "outside.bin", 65536)
    root.mkdir()
    os.link(outside, root / "linked.bin")
    single = write(root / "single.bin", 16384)
    single_bytes = allocated(single)

    report = clear_cache.clear_root(
        cache_root(root), 0, dry_run=False, in_use_ids=frozenset()
    )

    assert outside.read_bytes() == b"x" * 65536
    assert os.stat(outside).st_nlink == 1
    assert report.files_deleted == 2
    assert report.hard_links == 1
    assert report.bytes_freed == single_bytes
    assert not (root / "linked.bin").exists()


def test_root_symlink_rejected(tmp_path: Path) -> None:
    real = tmp_path / "real"
    kept = write(real / "kept.bin")
    link = tmp_path / "cache"
    link.symlink_to(real)

    report = clear_cache.clear_root(cache_root(link), 0, dry_run=False)
    result, _ = clear_cache.clear_roots([cache_root(link)], 0, dry_run=False)

    assert report.status == "rejected"
    assert report.reason == f"{link} is a symbolic link"
    assert kept.exists()
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert f"rejected {link} is a symbolic link" in result.reason


def test_link_below_anchor_rejected(tmp_path: Path) -> None:
    anchor = tmp_path / "home"
    real = tmp_path / "elsewhere"
    kept = write(real / "google-chrome" / "kept.bin")
    anchor.mkdir()
    (anchor / ".cache").symlink_to(real)
    root = cache_root(anchor / ".cache" / "google-chrome", anchor=anchor)

    report = clear_cache.clear_root(root, 0, dry_run=False)

    assert report.status == "rejected"
    assert report.reason == f"{anchor / '.cache'} is a symbolic link"
    assert kept.exists()


def test_root_that_is_file_rejected(tmp_path: Path) -> None:
    root = write(tmp_path / "cache", 10)

    report = clear_cache.clear_root(cache_root(root), 0, dry_run=False)

    assert report.status == "rejected"
    assert report.reason == f"{root} is not a folder"


def test_missing_root_skipped(tmp_path: Path) -> None:
    result, reports = clear_cache.clear_roots(
        [cache_root(tmp_path / "absent"), cache_root(tmp_path / "gone" / "deeper")],
        0,
        dry_run=False,
    )

    assert [r.status for r in reports] == ["missing", "missing"]
    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert result.reason == "nothing to free: no cache folder of these sets exists"


def test_file_swapped_for_symlink(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    secret = write(tmp_path / "outside" / "secret.txt", 100)
    write(root / "a.bin")

    def swap(dir_fd: int, name: str) -> None:
        # The checked file moves aside and a link to the outside file takes
        # its name, after the checks and before the unlink.
        os.rename(name, "moved.bin", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.symlink(secret, name, dir_fd=dir_fd)

    report = clear_cache.clear_root(
        cache_root(root), 0, dry_run=False, in_use_ids=frozenset(), before_unlink=swap
    )

    assert secret.read_bytes() == b"x" * 100
    assert not os.path.lexists(root / "a.bin")
    assert (root / "moved.bin").exists()
    assert report.changed == 1
    assert report.bytes_freed == 0


def test_folder_swapped_for_symlink(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    outside = tmp_path / "outside"
    decoy = write(outside / "f.bin", 100)
    write(root / "sub" / "f.bin")
    swapped = []

    def swap(dir_fd: int, name: str) -> None:
        # The folder being walked is renamed and replaced by a link to a
        # folder outside the root that has a file of the same name.
        if swapped:
            return
        swapped.append(name)
        os.rename(root / "sub", root / "sub.moved")
        (root / "sub").symlink_to(outside)

    report = clear_cache.clear_root(
        cache_root(root), 0, dry_run=False, in_use_ids=frozenset(), before_unlink=swap
    )

    assert swapped == ["f.bin"]
    assert decoy.read_bytes() == b"x" * 100
    assert not (root / "sub.moved" / "f.bin").exists()
    assert report.files_deleted == 1
    assert report.symlinks_removed == 1
    assert not os.path.lexists(root / "sub")


def test_concurrent_swaps_spare_outside(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    outside = tmp_path / "outside"
    names = [f"f{i:03}.bin" for i in range(300)]
    targets = [write(outside / name, 100) for name in names]
    for name in names:
        write(root / "sub" / name, 4096)
    done = threading.Event()

    def swap_files() -> None:
        # Atomically replaces files, one after another, with links to
        # the outside files of the same name, while the walk runs.
        while not done.is_set():
            for name, target in zip(names, targets, strict=True):
                link = root / "sub" / f".{name}.link"
                try:
                    link.symlink_to(target)
                    os.replace(link, root / "sub" / name)
                except FileNotFoundError:
                    return
                except FileExistsError:
                    pass

    swapper = threading.Thread(target=swap_files)
    swapper.start()
    try:
        clear_cache.clear_root(
            cache_root(root), 0, dry_run=False, in_use_ids=frozenset()
        )
    finally:
        done.set()
        swapper.join(timeout=60)

    for target in targets:
        assert target.read_bytes() == b"x" * 100, target


HOLD_OPEN = textwrap.dedent(
    """
    import fcntl, sys
    handle = open(sys.argv[1], "rb")
    if sys.argv[2] == "flock":
        fcntl.flock(handle, fcntl.LOCK_EX)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


def hold(processes: list[subprocess.Popen[str]], path: Path, mode: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_file_open_elsewhere_skipped(tmp_path: Path, holder) -> None:
    root = tmp_path / "cache"
    busy = write(root / "busy.bin")
    free = write(root / "free.bin")
    hold(holder, busy, "open")

    result, reports = clear_cache.clear_roots([cache_root(root)], 0, dry_run=False)

    assert busy.exists()
    assert not free.exists()
    assert reports[0].in_use == 1
    assert result.details["in_use"] == "1"


def test_flocked_file_skipped(tmp_path: Path, holder) -> None:
    root = tmp_path / "cache"
    locked = write(root / "locked.bin")
    hold(holder, locked, "flock")

    # No /proc snapshot: only the flock check can see the file is in use.
    report = clear_cache.clear_root(
        cache_root(root), 0, dry_run=False, in_use_ids=frozenset()
    )

    assert locked.exists()
    assert report.in_use == 1
    assert report.files_deleted == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_open_file_ids_sees_child(tmp_path: Path, holder) -> None:
    busy = write(tmp_path / "busy.bin")
    idle = write(tmp_path / "idle.bin")
    hold(holder, busy, "open")

    ids = clear_cache.open_file_ids()

    assert (os.stat(busy).st_dev, os.stat(busy).st_ino) in ids
    assert (os.stat(idle).st_dev, os.stat(idle).st_ino) not in ids


def test_older_than_days(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    old = write(root / "old.bin")
    new = write(root / "new.bin")
    write(root / "oldsub" / "older.bin")
    fresh_empty = root / "fresh_empty"
    fresh_empty.mkdir()
    stale_empty = root / "stale_empty"
    stale_empty.mkdir()
    age(old, 10)
    age(new, 2)
    age(root / "oldsub" / "older.bin", 30)
    age(stale_empty, 10)

    report = clear_cache.clear_root(
        cache_root(root), 7, dry_run=False, in_use_ids=frozenset()
    )

    assert not old.exists()
    assert new.exists()
    assert not (root / "oldsub").exists()
    assert fresh_empty.is_dir()
    assert not stale_empty.exists()
    assert report.files_deleted == 2
    assert report.too_new == 1
    assert report.directories_removed == 2


def test_patterns_and_owner_filter(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file another owner")
    root = tmp_path / "archives"
    deb = write(root / "tool_1.0_amd64.deb")
    lock = write(root / "lock", 0)
    theirs = write(root / "other_1.0_all.deb")
    os.chown(theirs, 4242, 4242)
    partial = root / "partial"
    partial.mkdir()
    age(partial, 30)
    (root / "notes").symlink_to(lock)

    report = clear_cache.clear_root(
        cache_root(root, patterns=("*.deb",), owner_uid=0),
        0,
        dry_run=False,
        in_use_ids=frozenset(),
    )

    assert not deb.exists()
    assert lock.exists()
    assert theirs.exists()
    assert partial.is_dir()
    assert os.path.lexists(root / "notes")
    assert report.files_deleted == 1


def test_dry_run_deletes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    files = [write(root / f"f{i}.bin", 4096 * (i + 1)) for i in range(5)]
    write(root / "sub" / "g.bin", 12345)
    os.link(files[0], tmp_path / "other_link")
    root.joinpath("link").symlink_to(tmp_path / "other_link")
    before = sorted(str(p) for p in root.rglob("*"))

    dry, dry_reports = clear_cache.clear_roots(
        [cache_root(root)], 0, dry_run=True, in_use_ids=frozenset()
    )
    after_dry = sorted(str(p) for p in root.rglob("*"))
    real, _ = clear_cache.clear_roots(
        [cache_root(root)], 0, dry_run=False, in_use_ids=frozenset()
    )

    assert after_dry == before
    assert dry.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    assert dry.bytes_freed > 0
    assert dry.bytes_freed == real.bytes_freed
    assert dry_reports[0].hard_links == 1
    assert (
        dry.reason
        == f"would free {format_bytes(dry.bytes_freed)} in 6 files from 1 cache folder"
    )
    assert real.bytes_freed > 0
    assert real.unit == "bytes"
    assert list(root.iterdir()) == []


def test_nothing_to_free_skipped(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write(root / "new.bin")

    result, _ = clear_cache.clear_roots(
        [cache_root(root)], 3, dry_run=False, in_use_ids=frozenset()
    )

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED
    assert (
        result.reason
        == "nothing to free in 1 cache folder (1 file newer than the age limit)"
    )
    assert result.bytes_freed == 0


def test_free_space_fell_fails() -> None:
    report = clear_cache.RootReport(
        cache_root(Path("/nonexistent/cache")), files_deleted=1, bytes_freed=4096
    )

    result = clear_cache._judge(
        [report], before=1_000_000, after=900_000, dry_run=False
    )

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_FAILED
    assert "free space fell from 976.6 KiB to 878.9 KiB" in result.reason
    assert result.bytes_freed == 4096


def test_execute_clears_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chrome = tmp_path / "home" / ".cache" / "google-chrome"
    firefox = tmp_path / "home" / ".cache" / "mozilla" / "firefox"
    for i in range(20):
        write(chrome / "Default" / "Cache" / f"data_{i}", 65536)
    write(firefox / "abc.default" / "cache2" / "entries" / "E1", 65536)
    resolved: list[list[str]] = []

    def fake_roots(cache_sets):
        resolved.append(list(cache_sets))
        anchor = tmp_path / "home" / ".cache"
        return [cache_root(chrome, anchor), cache_root(firefox, anchor)]

    monkeypatch.setattr(clear_cache, "roots_for_this_machine", fake_roots)
    context = ActionContext(state_dir=tmp_path / "state", allowlist=LocalAllowlist())

    dry = clear_cache.execute(
        clear_params("browser"),
        ActionContext(
            state_dir=tmp_path / "state", allowlist=LocalAllowlist(), dry_run=True
        ),
    )
    result = clear_cache.execute(clear_params("browser"), context)
    again = clear_cache.execute(clear_params("browser"), context)

    assert resolved == [["browser"], ["browser"], ["browser"]]
    assert dry.outcome == Outcome.REMEDIATION_OUTCOME_DRY_RUN
    # Other processes write to this volume too, so the outcome, which
    # depends on its free space, is checked on a private tmpfs below.
    assert result.outcome != Outcome.REMEDIATION_OUTCOME_SKIPPED, result.reason
    assert result.bytes_freed == dry.bytes_freed
    assert result.bytes_freed >= 21 * 65536
    assert result.unit == "bytes"
    assert result.before > 0
    assert result.details["files_deleted"] == "21"
    assert list(chrome.iterdir()) == []
    assert again.outcome == Outcome.REMEDIATION_OUTCOME_SKIPPED


def test_execute_refuses_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_roots(cache_sets):
        raise AssertionError("an invalid request must not resolve roots")

    monkeypatch.setattr(clear_cache, "roots_for_this_machine", no_roots)
    allowlist = LocalAllowlist(cache_sets=frozenset({"thumbnails"}))
    context = ActionContext(state_dir=tmp_path, allowlist=allowlist)

    result = clear_cache.execute(clear_params("browser"), context)

    assert result.outcome == Outcome.REMEDIATION_OUTCOME_REFUSED
    assert "cache set browser is not in healing.cache_sets in this device's " in (
        result.reason
    )


def test_path_walk_skips_links(tmp_path: Path) -> None:
    # The path-based walk that Windows uses, run here on POSIX links.
    root = tmp_path / "cache"
    secret = write(tmp_path / "outside" / "secret.txt", 100)
    write(root / "a.bin")
    write(root / "sub" / "b.bin")
    (root / "link").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path / "outside")
    report = clear_cache.RootReport(cache_root(root))

    clear_cache._clear_root_by_path(report, 0, dry_run=False, now=time.time())

    assert report.files_deleted == 2
    assert report.directories_removed == 1
    assert secret.exists()
    assert sorted(p.name for p in root.iterdir()) == ["dirlink", "link"]


# Runs as an unprivileged user: clear argv[1] and print the report as JSON.
CLEAR_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path, PurePath
    from agent.healing import caches
    from agent.healing.actions import clear_cache

    root = Path(sys.argv[1])
    report = clear_cache.clear_root(
        caches.CacheRoot("browser", "test", PurePath(root), PurePath(root.parent)),
        0,
        dry_run=False,
    )
    fields = ("status", "files_deleted", "symlinks_removed", "permission_errors",
              "other_errors", "bytes_freed")
    print(json.dumps({name: getattr(report, name) for name in fields}))
    """
)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """Yield a folder that the unprivileged user can reach.

    pytest's base temporary folder is 0700, so another user could not reach
    a file in tmp_path whatever its mode.
    """
    folder = Path(tempfile.mkdtemp(prefix="fleetmend-cache-test-"))
    os.chmod(folder, 0o755)  # noqa: S103 - let the other user traverse the folder
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_unprivileged_permission_errors(shared_folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    nobody = 65534
    root = shared_folder / "cache"
    outside = write(shared_folder / "outside.txt", 100)
    mine = write(root / "mine.bin")
    theirs = write(root / "locked" / "theirs.bin")
    hidden = write(root / "sealed" / "hidden.bin")
    unreadable = write(root / "unreadable.bin")
    (root / "link").symlink_to(outside)
    for path in (root, mine, unreadable, outside):
        os.chown(path, nobody, nobody)
    os.lchown(root / "link", nobody, nobody)
    os.chmod(unreadable, 0o000)
    os.chmod(root / "sealed", 0o000)
    script = shared_folder / "clear.py"
    script.write_text(CLEAR_SCRIPT, encoding="utf-8")

    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            str(script),
            str(root),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "cleared"
    assert not mine.exists()
    assert theirs.exists()
    assert hidden.exists()
    assert unreadable.exists()
    assert outside.read_bytes() == b"x" * 100
    assert report["files_deleted"] == 1
    assert report["symlinks_removed"] == 1
    # locked/theirs.bin (folder not writable), sealed/ (folder not readable),
    # unreadable.bin (file not readable, so its lock cannot be checked).
    assert report["permission_errors"] == 3
    assert report["other_errors"] == 0


# Runs inside a private mount namespace with a tmpfs at argv[1]/mnt, below
# the cache root argv[1], and a second tmpfs at argv[2] that is itself a root,
# so that no other process changes its free space during execute.
MOUNT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path, PurePath
    from agent.healing import caches
    from agent.healing.actions import clear_cache
    from agent.healing.actions.base import ActionContext, LocalAllowlist
    from fleetmend.v1 import remediation_pb2

    def root_of(path):
        anchor = PurePath(path.parent)
        return caches.CacheRoot("browser", "test", PurePath(path), anchor)

    crossing = Path(sys.argv[1])
    (crossing / "mnt" / "on_mount.bin").write_bytes(b"x" * 8192)
    (crossing / "mnt" / "sub").mkdir()
    own = Path(sys.argv[2])
    for i in range(16):
        (own / f"f{i}.bin").write_bytes(b"x" * 65536)

    report = clear_cache.clear_root(root_of(crossing), 0, dry_run=False)
    clear_cache.roots_for_this_machine = lambda cache_sets: [root_of(own)]
    context = ActionContext(state_dir=own, allowlist=LocalAllowlist())
    params = remediation_pb2.ClearCache(cache_sets=["browser"])
    result = clear_cache.execute(params, context)
    print(json.dumps({
        "other_device": report.other_device,
        "files_deleted": report.files_deleted,
        "on_mount": (crossing / "mnt" / "on_mount.bin").exists(),
        "bound": (crossing / "bound" / "outside.bin").exists(),
        "sub": (crossing / "mnt" / "sub").is_dir(),
        "outcome": int(result.outcome),
        "before": result.before,
        "after": result.after,
        "bytes_freed": result.bytes_freed,
        "unit": result.unit,
        "reason": result.reason,
    }))
    """
)


def test_mount_point_not_crossed(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private tmpfs")
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", "/mnt"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"this machine forbids a tmpfs mount: {probe.stderr.strip()}")
    crossing = tmp_path / "cache"
    write(crossing / "on_disk.bin")
    (crossing / "mnt").mkdir()
    # A folder outside the cache, bind-mounted into it: the same file system,
    # so the same st_dev, and only the mount table shows the mount point.
    outside = tmp_path / "outside"
    write(outside / "outside.bin")
    (crossing / "bound").mkdir()
    own = tmp_path / "small"
    own.mkdir()
    script = tmp_path / "mounts.py"
    script.write_text(MOUNT_SCRIPT, encoding="utf-8")

    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs -o size=1m tmpfs "$1/mnt"'
            ' && mount -t tmpfs -o size=2m tmpfs "$2"'
            ' && mount --bind "$5" "$1/bound"'
            ' && exec "$3" "$4" "$1" "$2"',
            "sh",
            str(crossing),
            str(own),
            sys.executable,
            str(script),
            str(outside),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["other_device"] == 2
    assert report["files_deleted"] == 1
    assert report["on_mount"] is True
    assert report["bound"] is True
    assert (outside / "outside.bin").exists()
    assert report["sub"] is True
    assert not (crossing / "on_disk.bin").exists()
    assert report["outcome"] == Outcome.REMEDIATION_OUTCOME_SUCCEEDED, report
    assert report["reason"] == ("freed 1.0 MiB in 16 files from 1 cache folder")
    assert report["unit"] == "bytes"
    assert report["bytes_freed"] == 16 * 65536
    assert report["after"] - report["before"] == 16 * 65536
