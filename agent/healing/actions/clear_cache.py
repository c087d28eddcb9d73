"""clear_cache: delete files in named cache sets, never outside their roots.

Each cache set resolves to root folders (agent.healing.caches). A root is
opened with O_DIRECTORY|O_NOFOLLOW, one component at a time below its anchor,
so a root that is a symbolic link, or lies below one within its anchor, is
rejected. The walk is
os.fwalk over that descriptor with follow_symlinks=False, bottom-up, and
every check and deletion is relative to the descriptor of the file's own
folder (os.stat / os.unlink / os.rmdir with dir_fd). Swapping a file or a
folder for a symbolic link during the walk therefore cannot redirect a
deletion: unlink removes the link itself, and a folder already opened stays
the folder that was checked.

A file is deleted when it is a regular file on the root's device, old enough,
owned by the root's owner (if the root names one), and not in use. On Linux
a file is in use when it is open in a process visible in /proc or locked with
flock. A root agent can read the open files of every process in /proc, an
unprivileged one only those of its own user's processes. On macOS a file is
in use when it is locked with flock, and on Windows when its deletion fails
with a sharing violation.

Bytes freed are the allocated blocks of files whose last link the deletion
removed, as fstat of a descriptor opened before the unlink confirms. A file
with other hard links frees nothing and is counted apart.

When the agent's stop event is set, the walk ends before the next entry, and
the result reports what was freed until then.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from agent import paths
from agent.healing import caches
from agent.healing.actions.base import (
    ActionContext,
    ActionResult,
    LocalAllowlist,
    Outcome,
    allowlist_refusal_text,
)
from agent.healing.bounds import quote
from agent.text import count_text, format_bytes
from fleetmend.v1 import remediation_pb2

NAME = "clear_cache"

MAX_OLDER_THAN_DAYS = 3650
SECONDS_PER_DAY = 86400

# Windows error code of a file that another process opened without
# FILE_SHARE_DELETE.
WINDOWS_SHARING_VIOLATION = 32
# st_file_attributes bit of a symbolic link or junction on Windows.
WINDOWS_REPARSE_POINT = 0x400

log = logging.getLogger(__name__)

# A hook called with the folder descriptor and the name after a file passed
# its checks and before it is unlinked. Tests use it to swap the file.
BeforeUnlink = Callable[[int, str], None]


class RootRejected(Exception):
    """A cache root that may not be walked: a symbolic link, or not a folder."""


@dataclass
class RootReport:
    """Counts of what clearing one root did, or would do in a dry run."""

    root: caches.CacheRoot
    # "cleared", "missing" (nothing at the path) or "rejected".
    status: str = "cleared"
    reason: str = ""
    device: int | None = None
    files_deleted: int = 0
    bytes_freed: int = 0
    # Files deleted that had other hard links, so freed no space.
    hard_links: int = 0
    symlinks_removed: int = 0
    directories_removed: int = 0
    in_use: int = 0
    permission_errors: int = 0
    other_errors: int = 0
    # Files on another device than the root or below a mount point, such as
    # a bind mount of the same file system.
    other_device: int = 0
    too_new: int = 0
    # Files that changed between the check and the deletion.
    changed: int = 0
    changed_dirs: set[str] = field(default_factory=set, repr=False)
    # True when the stop event ended the walk before its last entry.
    interrupted: bool = False


def validate(
    params: remediation_pb2.ClearCache, allowlist: LocalAllowlist
) -> list[str]:
    """Return what is wrong with the parameters; empty when they are valid."""
    problems: list[str] = []
    if not params.cache_sets:
        problems.append(
            "needs at least one cache set: use one of " + ", ".join(caches.CACHE_SETS)
        )
    if len(params.cache_sets) > len(caches.CACHE_SETS):
        return [
            f"names {len(params.cache_sets)} cache sets, more than the "
            f"{len(caches.CACHE_SETS)} that exist: use each of "
            + ", ".join(caches.CACHE_SETS)
            + " at most once"
        ]
    for name in params.cache_sets:
        if name not in caches.CACHE_SETS:
            problems.append(
                f"unknown cache set {quote(name)}: use one of "
                + ", ".join(caches.CACHE_SETS)
            )
        elif allowlist.cache_sets and name not in allowlist.cache_sets:
            problems.append(
                allowlist_refusal_text(
                    "cache set",
                    [name],
                    "healing.cache_sets",
                    allowlist.cache_sets,
                    "this rule",
                )
            )
    days = params.older_than_days
    if days > MAX_OLDER_THAN_DAYS:
        problems.append(
            f"older_than_days {days} is out of range: use 0 to {MAX_OLDER_THAN_DAYS}"
        )
    if "user_temp" in params.cache_sets and days < caches.MIN_DAYS_FOR_USER_TEMP:
        problems.append(
            f"cache set 'user_temp' needs older_than_days of at least "
            f"{caches.MIN_DAYS_FOR_USER_TEMP}, not {days}"
        )
    return problems


def open_file_ids(proc: Path = Path("/proc")) -> frozenset[tuple[int, int]]:
    """Return (st_dev, st_ino) of every file open in a process visible under /proc.

    The set is a snapshot, so a file opened after it is not seen. Processes
    of other users are invisible to an unprivileged agent, and an empty set
    is returned where there is no /proc (macOS, Windows).
    """
    ids: set[tuple[int, int]] = set()
    try:
        pids = [entry.name for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:
        return frozenset()
    for pid in pids:
        fd_folder = proc / pid / "fd"
        try:
            names = os.listdir(fd_folder)
        except OSError:
            continue
        for name in names:
            try:
                target = os.stat(fd_folder / name)
            except OSError:
                continue
            if stat.S_ISREG(target.st_mode):
                ids.add((target.st_dev, target.st_ino))
    return frozenset(ids)


def _open_root(root: caches.CacheRoot) -> int:
    """Open the root folder without following a link below its anchor.

    Raises FileNotFoundError when the root or its anchor does not exist, and
    RootRejected when a component is a symbolic link or not a folder.
    """
    path = Path(root.path)
    anchor = Path(root.anchor)
    components = path.relative_to(anchor).parts
    start = anchor
    if not components:
        start = anchor.parent
        components = (anchor.name,)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(start, flags)
    try:
        for component in components:
            try:
                next_fd = os.open(component, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    mode = os.stat(component, dir_fd=fd, follow_symlinks=False).st_mode
                    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
                    raise RootRejected(
                        f"{start.joinpath(component)} is {what}"
                    ) from None
                raise
            os.close(fd)
            fd = next_fd
            start = start / component
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unescape_mountinfo(field: str) -> str:
    """Decode the octal escapes (\\040 for a space) of a /proc/self/mountinfo field."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def mount_points_below(
    root: str, mountinfo: Path = Path("/proc/self/mountinfo")
) -> frozenset[str]:
    """Return the mount points strictly below root, relative to it as "./a/b".

    Bind mounts of root's own file system have root's st_dev, so only the
    mount table shows them. The set is empty where there is no mountinfo
    (macOS, Windows) or it cannot be read.
    """
    try:
        lines = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return frozenset()
    prefix = root.rstrip("/") + "/"
    found: set[str] = set()
    for line in lines.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        mount_point = _unescape_mountinfo(fields[4])
        if mount_point.startswith(prefix):
            found.add("./" + mount_point[len(prefix) :].rstrip("/"))
    return frozenset(found)


def _root_path(root_fd: int) -> str | None:
    """Return the absolute path of an open folder, None where /proc cannot tell."""
    try:
        return os.readlink(f"/proc/self/fd/{root_fd}")
    except OSError:
        return None


def _old_enough(mtime: float, older_than_days: int, now: float) -> bool:
    return older_than_days == 0 or now - mtime >= older_than_days * SECONDS_PER_DAY


def _matches(root: caches.CacheRoot, name: str) -> bool:
    return not root.patterns or any(fnmatch.fnmatch(name, p) for p in root.patterns)


def _allocated_bytes(status: os.stat_result) -> int:
    blocks = getattr(status, "st_blocks", None)
    if blocks is None:
        return status.st_size
    return int(blocks) * 512


def _count_os_error(report: RootReport, error: OSError) -> None:
    if isinstance(error, PermissionError):
        report.permission_errors += 1
    else:
        report.other_errors += 1
        log.debug(
            "clear_cache: %s under %s: %s",
            type(error).__name__,
            report.root.path,
            error,
        )


class _RootWalker:
    """Clears one opened root; see the module docstring for the rules."""

    def __init__(
        self,
        report: RootReport,
        root_fd: int,
        older_than_days: int,
        dry_run: bool,
        now: float,
        in_use_ids: frozenset[tuple[int, int]],
        before_unlink: BeforeUnlink | None,
        stop: threading.Event,
    ) -> None:
        self.report = report
        self.root = report.root
        self.root_fd = root_fd
        self.older_than_days = older_than_days
        self.dry_run = dry_run
        self.now = now
        self.in_use_ids = in_use_ids
        self.before_unlink = before_unlink
        self.stop = stop
        self.device = os.fstat(root_fd).st_dev
        report.device = self.device
        path = _root_path(root_fd)
        self.mount_points = frozenset() if path is None else mount_points_below(path)

    def _below_mount_point(self, dirpath: str) -> bool:
        """Return True if dirpath (relative, "./a/b") is at or below a mount point."""
        return any(
            dirpath == mount or dirpath.startswith(mount + "/")
            for mount in self.mount_points
        )

    def _stopped(self) -> bool:
        if self.stop.is_set():
            self.report.interrupted = True
        return self.report.interrupted

    def walk(self) -> None:
        # fwalk descends below mount points too, but the st_dev check and the
        # mount points of /proc/self/mountinfo keep anything there from being
        # deleted. NOTE: a mount made during the walk is not in the set, and
        # where there is no mountinfo a bind mount of the same file system is
        # not detected. Python 3.11's fwalk opens subfolders without
        # O_NONBLOCK, so a folder swapped for a FIFO mid-walk can block it.
        # os.fwalk is a generator, though typeshed declares an Iterator.
        walk = cast(
            Generator[tuple[str, list[str], list[str], int], None, None],
            os.fwalk(
                ".",
                dir_fd=self.root_fd,
                topdown=False,
                follow_symlinks=False,
                onerror=lambda error: _count_os_error(self.report, error),
            ),
        )
        try:
            for dirpath, dirnames, filenames, dir_fd in walk:
                if not self._clear_folder_entries(dirpath, dirnames, filenames, dir_fd):
                    return
        finally:
            # Closing the generator closes the folder descriptors it holds.
            walk.close()

    def _clear_folder_entries(
        self, dirpath: str, dirnames: list[str], filenames: list[str], dir_fd: int
    ) -> bool:
        """Clear one folder's entries; return False when the stop event ended it."""
        mounted = self._below_mount_point(dirpath)
        for name in filenames:
            if self._stopped():
                return False
            if self._clear_entry(dir_fd, name, mounted):
                self.report.changed_dirs.add(dirpath)
        for name in dirnames:
            if self._stopped():
                return False
            if mounted or self._below_mount_point(os.path.join(dirpath, name)):
                continue
            if self._clear_subfolder(dir_fd, dirpath, name):
                self.report.changed_dirs.add(dirpath)
        return True

    def _owned(self, status: os.stat_result) -> bool:
        return self.root.owner_uid is None or status.st_uid == self.root.owner_uid

    def _lstat(self, dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as error:
            _count_os_error(self.report, error)
            return None

    def _remove_symlink(self, dir_fd: int, name: str, status: os.stat_result) -> bool:
        """Unlink a symbolic link itself, never its target."""
        if not self._owned(status) or not _old_enough(
            status.st_mtime, self.older_than_days, self.now
        ):
            return False
        if not self.dry_run:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
            except OSError as error:
                _count_os_error(self.report, error)
                return False
        self.report.symlinks_removed += 1
        return True

    def _clear_entry(self, dir_fd: int, name: str, mounted: bool = False) -> bool:
        """Delete one non-folder entry if it passes the checks; True if removed.

        mounted marks an entry below a mount point, which is never touched.
        """
        if not _matches(self.root, name):
            return False
        status = self._lstat(dir_fd, name)
        if status is None:
            return False
        if stat.S_ISLNK(status.st_mode):
            if mounted:
                return False
            return self._remove_symlink(dir_fd, name, status)
        if not stat.S_ISREG(status.st_mode) or not self._owned(status):
            return False
        if mounted or status.st_dev != self.device:
            self.report.other_device += 1
            return False
        if not _old_enough(status.st_mtime, self.older_than_days, self.now):
            self.report.too_new += 1
            return False
        if (status.st_dev, status.st_ino) in self.in_use_ids:
            self.report.in_use += 1
            return False
        try:
            file_fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return False
        except OSError as error:
            if error.errno == errno.ELOOP:
                self.report.changed += 1
            else:
                _count_os_error(self.report, error)
            return False
        try:
            return self._delete_open_file(dir_fd, name, file_fd, status)
        finally:
            os.close(file_fd)

    def _delete_open_file(
        self, dir_fd: int, name: str, file_fd: int, checked: os.stat_result
    ) -> bool:
        opened = os.fstat(file_fd)
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            self.report.changed += 1
            return False
        try:
            import fcntl

            fcntl.flock(file_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.report.in_use += 1
            return False
        except OSError as error:
            # Some file systems (for example some FUSE ones) have no flock.
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                _count_os_error(self.report, error)
                return False
        if self.dry_run:
            self._count_deleted(opened.st_nlink - 1, opened)
            return True
        if self.before_unlink is not None:
            self.before_unlink(dir_fd, name)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            self.report.changed += 1
            return False
        except OSError as error:
            _count_os_error(self.report, error)
            return False
        after = os.fstat(file_fd)
        if after.st_nlink >= opened.st_nlink:
            # By the time of the unlink the name pointed at another file.
            # That entry is gone now, but its size is not counted.
            self.report.changed += 1
            return True
        self._count_deleted(after.st_nlink, opened)
        return True

    def _count_deleted(self, links_after: int, status: os.stat_result) -> None:
        self.report.files_deleted += 1
        if links_after == 0:
            self.report.bytes_freed += _allocated_bytes(status)
        else:
            self.report.hard_links += 1

    def _clear_subfolder(self, dir_fd: int, dirpath: str, name: str) -> bool:
        """Remove an empty subfolder, or a symbolic link listed as one; True if removed.

        A folder is removed when the walk deleted something in it or its own
        modification time passes the age limit, so a fresh empty folder that
        a program just made stays. A root with name patterns keeps its folders
        (apt needs archives/partial) and links whose name does not match.
        """
        status = self._lstat(dir_fd, name)
        if status is None:
            return False
        if stat.S_ISLNK(status.st_mode):
            if not _matches(self.root, name):
                return False
            return self._remove_symlink(dir_fd, name, status)
        if self.root.patterns:
            return False
        if not stat.S_ISDIR(status.st_mode) or status.st_dev != self.device:
            return False
        if not self._owned(status) or self.dry_run:
            return False
        emptied = os.path.join(dirpath, name) in self.report.changed_dirs
        if not emptied and not _old_enough(
            status.st_mtime, self.older_than_days, self.now
        ):
            return False
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError as error:
            if error.errno not in (
                errno.ENOTEMPTY,
                errno.EEXIST,
                errno.EBUSY,
                errno.ENOENT,
            ):
                _count_os_error(self.report, error)
            return False
        self.report.directories_removed += 1
        return True


def clear_root(
    root: caches.CacheRoot,
    older_than_days: int,
    dry_run: bool,
    *,
    now: float | None = None,
    in_use_ids: frozenset[tuple[int, int]] = frozenset(),
    before_unlink: BeforeUnlink | None = None,
    stop: threading.Event | None = None,
) -> RootReport:
    """Delete (or, in a dry run, count) what may go in one root, and report it.

    in_use_ids are (st_dev, st_ino) of files open elsewhere (open_file_ids).
    When stop is set, the walk ends before the next entry and the report is
    marked interrupted.
    """
    report = RootReport(root)
    if now is None:
        now = time.time()
    if stop is None:
        stop = threading.Event()
    if sys.platform == "win32":
        _clear_root_by_path(report, older_than_days, dry_run, now, stop)
        return report
    try:
        root_fd = _open_root(root)
    except FileNotFoundError:
        report.status = "missing"
        return report
    except RootRejected as rejected:
        report.status = "rejected"
        report.reason = str(rejected)
        return report
    except OSError as error:
        report.status = "rejected"
        report.reason = f"failed to open {root.path}: {error.strerror}"
        return report
    try:
        walker = _RootWalker(
            report,
            root_fd,
            older_than_days,
            dry_run,
            now,
            in_use_ids,
            before_unlink,
            stop,
        )
        walker.walk()
    finally:
        os.close(root_fd)
    return report


def _is_link(status: os.stat_result) -> bool:
    attributes = getattr(status, "st_file_attributes", 0)
    return stat.S_ISLNK(status.st_mode) or bool(attributes & WINDOWS_REPARSE_POINT)


def _clear_root_by_path(
    report: RootReport,
    older_than_days: int,
    dry_run: bool,
    now: float,
    stop: threading.Event | None = None,
) -> None:
    """Clear a root by path names, for Windows, where there is no dir_fd.

    NOTE: this walk is path-based, so a folder swapped for a junction between
    its check and a deletion inside it is not caught as the dir_fd walk
    catches it. Links and junctions found in the walk are skipped, not removed.
    """
    root_path = Path(report.root.path)
    try:
        status = os.lstat(root_path)
    except FileNotFoundError:
        report.status = "missing"
        return
    if _is_link(status):
        report.status = "rejected"
        report.reason = f"{root_path} is a symbolic link or junction"
        return
    if not stat.S_ISDIR(status.st_mode):
        report.status = "rejected"
        report.reason = f"{root_path} is not a folder"
        return
    report.device = status.st_dev
    if stop is None:
        stop = threading.Event()
    _clear_folder_by_path(report, root_path, older_than_days, dry_run, now, stop)


def _clear_folder_by_path(
    report: RootReport,
    folder: Path,
    older_than_days: int,
    dry_run: bool,
    now: float,
    stop: threading.Event,
) -> bool:
    """Clear folder's contents bottom-up; True if something in it was removed.

    The walk ends before the next entry once stop is set.
    """
    removed_any = False
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        _count_os_error(report, error)
        return False
    for entry in entries:
        if stop.is_set():
            report.interrupted = True
        if report.interrupted:
            return removed_any
        try:
            status = entry.stat(follow_symlinks=False)
        except OSError as error:
            _count_os_error(report, error)
            continue
        if _is_link(status):
            continue
        if stat.S_ISDIR(status.st_mode):
            if report.root.patterns:
                continue
            emptied = _clear_folder_by_path(
                report, Path(entry.path), older_than_days, dry_run, now, stop
            )
            if emptied:
                removed_any = True
            if report.interrupted:
                return removed_any
            if not emptied and (
                dry_run or not _old_enough(status.st_mtime, older_than_days, now)
            ):
                continue
            if not dry_run:
                try:
                    os.rmdir(entry.path)
                    report.directories_removed += 1
                    removed_any = True
                except OSError:
                    pass
            continue
        if not stat.S_ISREG(status.st_mode) or not _matches(report.root, entry.name):
            continue
        if not _old_enough(status.st_mtime, older_than_days, now):
            report.too_new += 1
            continue
        if not dry_run:
            try:
                os.unlink(entry.path)
            except PermissionError as error:
                if getattr(error, "winerror", None) == WINDOWS_SHARING_VIOLATION:
                    report.in_use += 1
                else:
                    report.permission_errors += 1
                continue
            except OSError as error:
                _count_os_error(report, error)
                continue
        removed_any = True
        report.files_deleted += 1
        if status.st_nlink <= 1:
            report.bytes_freed += _allocated_bytes(status)
        else:
            report.hard_links += 1
    return removed_any


def _free_bytes(path: object) -> int | None:
    try:
        return shutil.disk_usage(str(path)).free
    except OSError:
        return None


def clear_roots(
    roots: Iterable[caches.CacheRoot],
    older_than_days: int,
    dry_run: bool,
    *,
    now: float | None = None,
    in_use_ids: frozenset[tuple[int, int]] | None = None,
    before_unlink: BeforeUnlink | None = None,
    stop: threading.Event | None = None,
) -> tuple[ActionResult, list[RootReport]]:
    """Clear every root, measure the free space of their volumes, and judge the outcome.

    The outcome is DRY_RUN in a dry run, SKIPPED when nothing was freed (and
    no root was rejected), SUCCEEDED when bytes were freed and the volumes'
    free space did not fall, and FAILED otherwise, with the reason. When stop
    is set, the walk ends before the next entry or root, and the reason says
    that shutdown interrupted it after what it freed.
    """
    if in_use_ids is None:
        in_use_ids = open_file_ids()
    reports: list[RootReport] = []
    free_before: dict[int, int] = {}
    volume_paths: dict[int, object] = {}
    interrupted = False
    for root in roots:
        if stop is not None and stop.is_set():
            interrupted = True
            break
        free = _free_bytes(root.path)
        report = clear_root(
            root,
            older_than_days,
            dry_run,
            now=now,
            in_use_ids=in_use_ids,
            before_unlink=before_unlink,
            stop=stop,
        )
        reports.append(report)
        interrupted = interrupted or report.interrupted
        if (
            report.device is not None
            and free is not None
            and report.device not in free_before
        ):
            free_before[report.device] = free
            volume_paths[report.device] = root.path
    free_after = {
        device: _free_bytes(path) or 0 for device, path in volume_paths.items()
    }
    result = _judge(
        reports,
        sum(free_before.values()),
        sum(free_after.values()),
        dry_run,
        interrupted,
    )
    return result, reports


def _judge(
    reports: list[RootReport],
    before: int,
    after: int,
    dry_run: bool,
    interrupted: bool = False,
) -> ActionResult:
    cleared = [r for r in reports if r.status == "cleared"]
    rejected = [r for r in reports if r.status == "rejected"]
    bytes_freed = sum(r.bytes_freed for r in cleared)
    files = sum(r.files_deleted for r in cleared)
    details = _details(reports)
    result = ActionResult(
        outcome=Outcome.REMEDIATION_OUTCOME_SKIPPED,
        before=float(before),
        after=float(after),
        unit="bytes",
        bytes_freed=bytes_freed,
        details=details,
    )
    rejections = "; ".join(f"rejected {r.reason}" for r in rejected)
    where = count_text(len(cleared), "cache folder")
    if interrupted:
        details["interrupted"] = "by shutdown"
    if interrupted and not dry_run and files == 0:
        result.reason = "shutdown interrupted the walk before anything was freed"
        if rejections:
            result.reason += f"; {rejections}"
        return result
    if dry_run:
        result.outcome = Outcome.REMEDIATION_OUTCOME_DRY_RUN
        result.reason = (
            f"would free {format_bytes(bytes_freed)} in "
            f"{count_text(files, 'file')} from {where}"
        )
        result.after = result.before
    elif bytes_freed > 0 and after >= before:
        result.outcome = Outcome.REMEDIATION_OUTCOME_SUCCEEDED
        result.reason = (
            f"freed {format_bytes(bytes_freed)} in {count_text(files, 'file')} "
            f"from {where}"
        )
    elif bytes_freed > 0:
        result.outcome = Outcome.REMEDIATION_OUTCOME_FAILED
        result.reason = (
            f"free space fell from {format_bytes(before)} to {format_bytes(after)} "
            f"although {format_bytes(bytes_freed)} were freed from {where}: another "
            "program is filling the volume"
        )
    elif rejected:
        result.outcome = Outcome.REMEDIATION_OUTCOME_FAILED
        result.reason = f"nothing freed: {rejections}"
        return result
    elif not cleared:
        result.reason = "nothing to free: no cache folder of these sets exists"
    else:
        skipped = _skipped_summary(cleared)
        result.reason = f"nothing to free in {where}" + (
            f" ({skipped})" if skipped else ""
        )
    if rejections:
        result.reason += f"; {rejections}"
    if interrupted:
        counted = "the count" if dry_run else "the walk"
        result.reason += (
            f"; shutdown interrupted {counted}, so the rest waits for the next run"
        )
    return result


def _skipped_summary(reports: list[RootReport]) -> str:
    parts = []
    counts = (
        ("file in use", "files in use", sum(r.in_use for r in reports)),
        (
            "file newer than the age limit",
            "files newer than the age limit",
            sum(r.too_new for r in reports),
        ),
        (
            "permission error",
            "permission errors",
            sum(r.permission_errors for r in reports),
        ),
        (
            "hard-linked file removed",
            "hard-linked files removed",
            sum(r.hard_links for r in reports),
        ),
    )
    for singular, plural, count in counts:
        if count:
            parts.append(f"{count} {singular if count == 1 else plural}")
    return ", ".join(parts)


def _details(reports: list[RootReport]) -> dict[str, str]:
    cleared = [r for r in reports if r.status == "cleared"]
    details = {
        "roots": ", ".join(str(r.root.path) for r in cleared),
        "files_deleted": str(sum(r.files_deleted for r in cleared)),
        "hard_links": str(sum(r.hard_links for r in cleared)),
        "symlinks_removed": str(sum(r.symlinks_removed for r in cleared)),
        "directories_removed": str(sum(r.directories_removed for r in cleared)),
        "in_use": str(sum(r.in_use for r in cleared)),
        "too_new": str(sum(r.too_new for r in cleared)),
        "permission_errors": str(sum(r.permission_errors for r in cleared)),
        "other_errors": str(sum(r.other_errors for r in cleared)),
        "other_device": str(sum(r.other_device for r in cleared)),
        "changed_during_walk": str(sum(r.changed for r in cleared)),
    }
    rejected = [r.reason for r in reports if r.status == "rejected"]
    if rejected:
        details["rejected"] = "; ".join(rejected)
    return details


def current_platform() -> str:
    """Return the caches module's platform name for this machine."""
    if sys.platform in caches.PLATFORMS:
        return sys.platform
    # Other Unix systems keep caches in the freedesktop.org locations.
    return "linux"


def roots_for_this_machine(cache_sets: Iterable[str]) -> list[caches.CacheRoot]:
    """Resolve the sets for this agent: every real user's home when it runs as root."""
    platform = current_platform()
    sets = list(cache_sets)
    if paths.is_privileged():
        return caches.resolve_for_homes(
            sets, platform, caches.list_real_user_homes(platform)
        )
    uid = os.getuid() if hasattr(os, "getuid") else None
    roots: list[caches.CacheRoot] = []
    for cache_set in sets:
        roots.extend(
            caches.resolve(cache_set, platform, Path.home(), os.environ, uid=uid)
        )
    return roots


def execute(params: remediation_pb2.ClearCache, context: ActionContext) -> ActionResult:
    """Clear the cache sets, or count what would go in a dry run, and verify.

    The walk ends early when context.stop is set.
    """
    problems = validate(params, context.allowlist)
    if problems:
        return ActionResult(
            outcome=Outcome.REMEDIATION_OUTCOME_REFUSED,
            reason="; ".join(problems),
            unit="bytes",
        )
    roots = roots_for_this_machine(params.cache_sets)
    result, reports = clear_roots(
        roots, params.older_than_days, context.dry_run, stop=context.stop
    )
    for report in reports:
        if report.status == "rejected":
            log.warning("clear_cache rejected a cache root: %s", report.reason)
    return result
