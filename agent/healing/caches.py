"""The named cache sets that clear_cache may clear, resolved to root folders per OS.

Resolution is pure: it takes the platform ("linux", "darwin" or "win32"), a
home folder and an environment mapping, and returns absolute roots without
touching the file system. Each root has an anchor, the trusted folder it was
derived from (the home, XDG_CACHE_HOME, LOCALAPPDATA, TEMP, ...). The deletion
code follows symbolic links up to the anchor but refuses a root if the root or
any folder between the anchor and the root is a symbolic link.

When the agent runs as root (administrator), it clears the caches of every
real user's home instead of its own. list_real_user_homes finds those homes
and resolve_for_homes resolves the sets for them. Another user's environment
is not known, so their roots use the default locations.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

CACHE_SETS: tuple[str, ...] = (
    "browser",
    "thumbnails",
    "user_temp",
    "package_manager",
    "chat",
)

PLATFORMS: tuple[str, ...] = ("linux", "darwin", "win32")

# The user's temp folder also contains files of programs that are running, so
# clearing it needs an age limit.
MIN_DAYS_FOR_USER_TEMP = 1

# Linux accounts below this uid are system accounts (useradd's UID_MIN default).
LINUX_FIRST_USER_UID = 1000
# The "nobody" account, which is above LINUX_FIRST_USER_UID but no real user.
LINUX_NOBODY_UID = 65534

# Folders under /Users and C:\Users that belong to no user.
DARWIN_NON_USER_FOLDERS = frozenset({"Shared", "Guest"})
WINDOWS_NON_USER_FOLDERS = frozenset({"Public", "Default", "Default User", "All Users"})


@dataclass(frozen=True)
class CacheRoot:
    """A folder whose contents clear_cache may delete."""

    cache_set: str
    # Name of the application the folder belongs to, for people: "pip".
    label: str
    path: PurePath
    # The trusted folder that path was derived from. path is anchor or below it.
    anchor: PurePath
    # Only files whose name matches one of these fnmatch patterns are
    # deleted; empty means every file.
    patterns: tuple[str, ...] = ()
    # Only files and folders owned by this uid are deleted (for shared folders
    # such as /tmp); None means any owner.
    owner_uid: int | None = None


@dataclass(frozen=True)
class UserHome:
    """A real user's home folder and uid (None where the OS has no uids)."""

    path: PurePath
    uid: int | None = None


def _pure_path(platform: str) -> type[PurePath]:
    if platform == "win32":
        return PureWindowsPath
    return PurePosixPath


def _absolute_env(
    environ: Mapping[str, str], name: str, platform: str
) -> PurePath | None:
    """Return the variable as a path if it is set to an absolute path, else None.

    The XDG base directory specification requires ignoring a relative value,
    and the same rule keeps a relative TEMP or LOCALAPPDATA from naming a
    folder relative to wherever the agent happens to run.
    """
    value = environ.get(name, "")
    if not value:
        return None
    path = _pure_path(platform)(value)
    if not path.is_absolute():
        return None
    return path


def _root(
    cache_set: str,
    label: str,
    anchor: PurePath,
    *parts: str,
    patterns: tuple[str, ...] = (),
    owner_uid: int | None = None,
) -> CacheRoot:
    return CacheRoot(
        cache_set=cache_set,
        label=label,
        path=anchor.joinpath(*parts),
        anchor=anchor,
        patterns=patterns,
        owner_uid=owner_uid,
    )


def _overridden(
    root: CacheRoot,
    environ: Mapping[str, str],
    variable: str,
    platform: str,
    *parts: str,
) -> CacheRoot:
    """Move root to the folder that variable names, when it is an absolute path."""
    folder = _absolute_env(environ, variable, platform)
    if folder is None:
        return root
    return _root(root.cache_set, root.label, folder, *parts)


def _linux_roots(
    cache_set: str,
    home: PurePath,
    environ: Mapping[str, str],
    uid: int | None,
    privileged: bool,
) -> list[CacheRoot]:
    cache = _absolute_env(environ, "XDG_CACHE_HOME", "linux") or home / ".cache"
    config = _absolute_env(environ, "XDG_CONFIG_HOME", "linux") or home / ".config"
    if cache_set == "browser":
        return [
            _root(cache_set, "Google Chrome", cache, "google-chrome"),
            _root(cache_set, "Chromium", cache, "chromium"),
            _root(cache_set, "Firefox", cache, "mozilla", "firefox"),
            _root(cache_set, "Microsoft Edge", cache, "microsoft-edge"),
        ]

    if cache_set == "thumbnails":
        # The freedesktop.org thumbnail specification's folder.
        return [_root(cache_set, "desktop thumbnails", cache, "thumbnails")]

    if cache_set == "user_temp":
        # The shared /tmp is cleared only of files that this user owns.
        system_temp = PurePosixPath("/tmp")  # noqa: S108
        temp = _absolute_env(environ, "TMPDIR", "linux") or system_temp
        return [_root(cache_set, "temporary files", temp, owner_uid=uid)]

    if cache_set == "package_manager":
        pip = _root(cache_set, "pip", cache, "pip")
        npm = _root(cache_set, "npm", home, ".npm", "_cacache")
        brew = _root(cache_set, "Homebrew", cache, "Homebrew")
        roots = [
            _overridden(pip, environ, "PIP_CACHE_DIR", "linux"),
            _overridden(npm, environ, "npm_config_cache", "linux", "_cacache"),
            _overridden(brew, environ, "HOMEBREW_CACHE", "linux"),
        ]
        if privileged:
            # Only the downloaded packages, because the folder also contains apt's
            # lock file and partial/ folder, which apt-get clean keeps (apt-get(8)).
            roots.append(
                _root(
                    cache_set,
                    "apt",
                    PurePosixPath("/var/cache/apt"),
                    "archives",
                    patterns=("*.deb",),
                )
            )
        return roots

    if cache_set == "chat":
        return [
            _root(cache_set, "Slack", config, "Slack", "Cache"),
            _root(cache_set, "Slack", config, "Slack", "Code Cache"),
            _root(
                cache_set,
                "Microsoft Teams",
                config,
                "Microsoft",
                "Microsoft Teams",
                "Cache",
            ),
            _root(cache_set, "Discord", config, "discord", "Cache"),
            _root(cache_set, "Discord", config, "discord", "Code Cache"),
        ]

    raise ValueError(_unknown_set_message(cache_set))


def _darwin_roots(
    cache_set: str, home: PurePath, environ: Mapping[str, str], uid: int | None
) -> list[CacheRoot]:
    library_caches = home / "Library" / "Caches"
    support = home / "Library" / "Application Support"
    containers = home / "Library" / "Containers"
    # TMPDIR is the per-user folder /var/folders/xx/yyyy/T/ that
    # confstr(_CS_DARWIN_USER_TEMP_DIR) returns; its sibling C/ is the per-user
    # cache folder.
    temp = _absolute_env(environ, "TMPDIR", "darwin")
    if cache_set == "browser":
        return [
            _root(cache_set, "Google Chrome", library_caches, "Google", "Chrome"),
            _root(cache_set, "Chromium", library_caches, "Chromium"),
            _root(cache_set, "Firefox", library_caches, "Firefox", "Profiles"),
            _root(cache_set, "Microsoft Edge", library_caches, "Microsoft Edge"),
        ]

    if cache_set == "thumbnails":
        if temp is None or temp.name != "T":
            return []
        user_cache = temp.parent / "C"
        return [
            _root(
                cache_set,
                "Quick Look thumbnails",
                user_cache,
                "com.apple.QuickLook.thumbnailcache",
            )
        ]

    if cache_set == "user_temp":
        # NOTE: another user's TMPDIR is not known to a root agent, so for
        # other users' homes this set resolves to nothing.
        if temp is None:
            return []
        return [_root(cache_set, "temporary files", temp, owner_uid=uid)]

    if cache_set == "package_manager":
        pip = _root(cache_set, "pip", library_caches, "pip")
        npm = _root(cache_set, "npm", home, ".npm", "_cacache")
        brew = _root(cache_set, "Homebrew", library_caches, "Homebrew")
        return [
            _overridden(pip, environ, "PIP_CACHE_DIR", "darwin"),
            _overridden(npm, environ, "npm_config_cache", "darwin", "_cacache"),
            _overridden(brew, environ, "HOMEBREW_CACHE", "darwin"),
        ]

    if cache_set == "chat":
        slack_store = containers / "com.tinyspeck.slackmacgap" / "Data" / "Library"
        return [
            _root(cache_set, "Slack", support, "Slack", "Cache"),
            _root(cache_set, "Slack", support, "Slack", "Code Cache"),
            _root(
                cache_set,
                "Slack (App Store)",
                slack_store,
                "Application Support",
                "Slack",
                "Cache",
            ),
            _root(
                cache_set,
                "Microsoft Teams",
                containers,
                "com.microsoft.teams2",
                "Data",
                "Library",
                "Caches",
            ),
            _root(
                cache_set,
                "Microsoft Teams classic",
                support,
                "Microsoft",
                "Teams",
                "Cache",
            ),
            _root(cache_set, "Discord", support, "discord", "Cache"),
            _root(cache_set, "Discord", support, "discord", "Code Cache"),
        ]

    raise ValueError(_unknown_set_message(cache_set))


def _windows_roots(
    cache_set: str, home: PurePath, environ: Mapping[str, str]
) -> list[CacheRoot]:
    local = (
        _absolute_env(environ, "LOCALAPPDATA", "win32") or home / "AppData" / "Local"
    )
    roaming = _absolute_env(environ, "APPDATA", "win32") or home / "AppData" / "Roaming"
    if cache_set == "browser":
        # NOTE: Chromium-based browsers keep one cache per profile; only the
        # Default profile's is resolved.
        return [
            _root(
                cache_set,
                "Google Chrome",
                local,
                "Google",
                "Chrome",
                "User Data",
                "Default",
                "Cache",
            ),
            _root(
                cache_set,
                "Google Chrome",
                local,
                "Google",
                "Chrome",
                "User Data",
                "Default",
                "Code Cache",
            ),
            _root(
                cache_set,
                "Chromium",
                local,
                "Chromium",
                "User Data",
                "Default",
                "Cache",
            ),
            _root(
                cache_set,
                "Microsoft Edge",
                local,
                "Microsoft",
                "Edge",
                "User Data",
                "Default",
                "Cache",
            ),
            _root(
                cache_set,
                "Microsoft Edge",
                local,
                "Microsoft",
                "Edge",
                "User Data",
                "Default",
                "Code Cache",
            ),
            # Firefox's local (not roaming) profile folders contain only caches.
            _root(cache_set, "Firefox", local, "Mozilla", "Firefox", "Profiles"),
        ]

    if cache_set == "thumbnails":
        return [
            _root(
                cache_set,
                "Explorer thumbnails",
                local,
                "Microsoft",
                "Windows",
                "Explorer",
                patterns=("thumbcache_*.db",),
            )
        ]

    if cache_set == "user_temp":
        temp = (
            _absolute_env(environ, "TEMP", "win32")
            or _absolute_env(environ, "TMP", "win32")
            or local / "Temp"
        )
        return [_root(cache_set, "temporary files", temp)]

    if cache_set == "package_manager":
        pip = _root(cache_set, "pip", local, "pip", "Cache")
        npm = _root(cache_set, "npm", local, "npm-cache", "_cacache")
        return [
            _overridden(pip, environ, "PIP_CACHE_DIR", "win32"),
            _overridden(npm, environ, "npm_config_cache", "win32", "_cacache"),
        ]

    if cache_set == "chat":
        return [
            _root(cache_set, "Slack", roaming, "Slack", "Cache"),
            _root(cache_set, "Slack", roaming, "Slack", "Code Cache"),
            _root(
                cache_set,
                "Microsoft Teams classic",
                roaming,
                "Microsoft",
                "Teams",
                "Cache",
            ),
            _root(cache_set, "Discord", roaming, "discord", "Cache"),
            _root(cache_set, "Discord", roaming, "discord", "Code Cache"),
        ]

    raise ValueError(_unknown_set_message(cache_set))


def _unknown_set_message(cache_set: str) -> str:
    return f"unknown cache set {cache_set!r}: use one of {', '.join(CACHE_SETS)}"


def resolve(
    cache_set: str,
    platform: str,
    home: PurePath | str,
    environ: Mapping[str, str],
    *,
    uid: int | None = None,
    privileged: bool = False,
) -> list[CacheRoot]:
    """Resolve one cache set to its roots for one user, without touching the disk.

    uid is the user's, for sets in shared folders (user_temp on Linux and
    macOS), and privileged adds system-wide roots (apt's archives on Linux).
    Raises ValueError for an unknown set or platform, or a relative home.
    """
    if platform not in PLATFORMS:
        raise ValueError(
            f"unknown platform {platform!r}: use one of {', '.join(PLATFORMS)}"
        )
    home_path = _pure_path(platform)(home)
    if not home_path.is_absolute():
        raise ValueError(f"home folder {str(home)!r} is not an absolute path")
    if platform == "linux":
        roots = _linux_roots(cache_set, home_path, environ, uid, privileged)
    elif platform == "darwin":
        roots = _darwin_roots(cache_set, home_path, environ, uid)
    else:
        roots = _windows_roots(cache_set, home_path, environ)
    for root in roots:
        if not root.path.is_absolute():
            raise ValueError(f"cache root {str(root.path)!r} is not an absolute path")
    return roots


def resolve_for_homes(
    cache_sets: Iterable[str], platform: str, homes: Iterable[UserHome]
) -> list[CacheRoot]:
    """Resolve the sets for each home, as a root agent does, with no user environment.

    System-wide roots (apt's archives) come once, and a root that two homes
    share (the same /tmp for two uids) stays per uid.
    """
    roots: list[CacheRoot] = []
    seen: set[CacheRoot] = set()
    for home in homes:
        for cache_set in cache_sets:
            for root in resolve(
                cache_set, platform, home.path, {}, uid=home.uid, privileged=True
            ):
                if root not in seen:
                    seen.add(root)
                    roots.append(root)
    return roots


def list_real_user_homes(
    platform: str = sys.platform,
    passwd: Iterable[tuple[str, int, str]] | None = None,
    users_folder: Path | None = None,
) -> list[UserHome]:
    """List the homes of the machine's real users, for an agent that runs as root.

    Linux: passwd entries (name, uid, home; default pwd.getpwall()) with uid
    at least 1000, not nobody, and an absolute home. macOS and Windows: the
    folders in /Users or C:\\Users (users_folder) except shared ones, with the
    folder owner's uid on macOS.
    """
    if platform == "linux":
        if passwd is None:
            import pwd

            passwd = [
                (entry.pw_name, entry.pw_uid, entry.pw_dir) for entry in pwd.getpwall()
            ]
        homes: list[UserHome] = []
        for _name, uid, home in passwd:
            if uid < LINUX_FIRST_USER_UID or uid == LINUX_NOBODY_UID:
                continue
            if not home.startswith("/") or home == "/":
                continue
            homes.append(UserHome(PurePosixPath(home), uid))
        return homes
    if platform == "darwin":
        folder = users_folder or Path("/Users")
        excluded = DARWIN_NON_USER_FOLDERS
    elif platform == "win32":
        drive = os.environ.get("SYSTEMDRIVE", "C:")
        folder = users_folder or Path(drive + "\\Users")
        excluded = WINDOWS_NON_USER_FOLDERS
    else:
        raise ValueError(
            f"unknown platform {platform!r}: use one of {', '.join(PLATFORMS)}"
        )
    homes = []
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name in excluded or entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            owner: int | None = None
            if platform == "darwin":
                owner = entry.stat(follow_symlinks=False).st_uid
        except OSError:
            continue
        homes.append(UserHome(PurePath(entry.path), owner))
    return homes
