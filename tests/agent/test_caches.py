"""Resolution of the named cache sets to root folders, for Linux, macOS and Windows."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from agent.healing import caches


def paths_of(cache_set: str, platform: str, home: str, environ: dict[str, str], **kw):
    return [
        str(root.path)
        for root in caches.resolve(cache_set, platform, home, environ, **kw)
    ]


def test_linux_defaults_under_home() -> None:
    home = "/home/alice"

    assert paths_of("browser", "linux", home, {}) == [
        "/home/alice/.cache/google-chrome",
        "/home/alice/.cache/chromium",
        "/home/alice/.cache/mozilla/firefox",
        "/home/alice/.cache/microsoft-edge",
    ]
    assert paths_of("thumbnails", "linux", home, {}) == [
        "/home/alice/.cache/thumbnails"
    ]
    assert paths_of("user_temp", "linux", home, {}) == ["/tmp"]
    assert paths_of("package_manager", "linux", home, {}) == [
        "/home/alice/.cache/pip",
        "/home/alice/.npm/_cacache",
        "/home/alice/.cache/Homebrew",
    ]
    assert paths_of("chat", "linux", home, {}) == [
        "/home/alice/.config/Slack/Cache",
        "/home/alice/.config/Slack/Code Cache",
        "/home/alice/.config/Microsoft/Microsoft Teams/Cache",
        "/home/alice/.config/discord/Cache",
        "/home/alice/.config/discord/Code Cache",
    ]


def test_linux_environment_moves_roots() -> None:
    environ = {
        "XDG_CACHE_HOME": "/data/cache",
        "XDG_CONFIG_HOME": "/data/config",
        "TMPDIR": "/data/tmp",
        "PIP_CACHE_DIR": "/data/pip",
        "npm_config_cache": "/data/npm",
        "HOMEBREW_CACHE": "/data/brew",
    }

    browser = caches.resolve("browser", "linux", "/home/alice", environ)
    temp = caches.resolve("user_temp", "linux", "/home/alice", environ, uid=1000)
    packages = paths_of("package_manager", "linux", "/home/alice", environ)

    assert browser[0].path == PurePosixPath("/data/cache/google-chrome")
    assert browser[0].anchor == PurePosixPath("/data/cache")
    assert [str(r.path) for r in temp] == ["/data/tmp"]
    assert temp[0].owner_uid == 1000
    assert packages == ["/data/pip", "/data/npm/_cacache", "/data/brew"]
    assert (
        paths_of("chat", "linux", "/home/alice", environ)[0]
        == "/data/config/Slack/Cache"
    )


def test_linux_relative_environment_ignored() -> None:
    environ = {"XDG_CACHE_HOME": "cache", "TMPDIR": "tmp", "PIP_CACHE_DIR": "./pip"}

    assert paths_of("thumbnails", "linux", "/home/bob", environ) == [
        "/home/bob/.cache/thumbnails"
    ]
    assert paths_of("user_temp", "linux", "/home/bob", environ) == ["/tmp"]
    assert paths_of("package_manager", "linux", "/home/bob", environ)[0] == (
        "/home/bob/.cache/pip"
    )


def test_linux_apt_only_when_privileged() -> None:
    user = caches.resolve("package_manager", "linux", "/home/alice", {})
    root = caches.resolve(
        "package_manager", "linux", "/home/alice", {}, privileged=True
    )

    assert all(r.label != "apt" for r in user)
    apt = [r for r in root if r.label == "apt"]
    assert len(apt) == 1
    assert apt[0].path == PurePosixPath("/var/cache/apt/archives")
    assert apt[0].patterns == ("*.deb",)


def test_darwin_defaults_under_library() -> None:
    home = "/Users/alice"
    environ = {"TMPDIR": "/var/folders/zz/abc123/T/"}

    assert paths_of("browser", "darwin", home, environ) == [
        "/Users/alice/Library/Caches/Google/Chrome",
        "/Users/alice/Library/Caches/Chromium",
        "/Users/alice/Library/Caches/Firefox/Profiles",
        "/Users/alice/Library/Caches/Microsoft Edge",
    ]
    assert paths_of("thumbnails", "darwin", home, environ) == [
        "/var/folders/zz/abc123/C/com.apple.QuickLook.thumbnailcache"
    ]
    assert paths_of("user_temp", "darwin", home, environ) == [
        "/var/folders/zz/abc123/T"
    ]
    assert paths_of("package_manager", "darwin", home, environ) == [
        "/Users/alice/Library/Caches/pip",
        "/Users/alice/.npm/_cacache",
        "/Users/alice/Library/Caches/Homebrew",
    ]
    chat = paths_of("chat", "darwin", home, environ)
    assert "/Users/alice/Library/Application Support/Slack/Cache" in chat
    assert (
        "/Users/alice/Library/Containers/com.microsoft.teams2/Data/Library/Caches"
        in chat
    )
    assert "/Users/alice/Library/Application Support/discord/Cache" in chat


def test_darwin_without_tmpdir_has_no_temp() -> None:
    assert caches.resolve("user_temp", "darwin", "/Users/alice", {}) == []
    assert caches.resolve("thumbnails", "darwin", "/Users/alice", {}) == []


def test_windows_defaults_under_appdata() -> None:
    home = "C:\\Users\\alice"

    browser = paths_of("browser", "win32", home, {})
    assert browser[0] == (
        "C:\\Users\\alice\\AppData\\Local\\Google\\Chrome\\User Data\\Default\\Cache"
    )
    assert "C:\\Users\\alice\\AppData\\Local\\Mozilla\\Firefox\\Profiles" in browser
    assert paths_of("user_temp", "win32", home, {}) == [
        "C:\\Users\\alice\\AppData\\Local\\Temp"
    ]
    thumbnails = caches.resolve("thumbnails", "win32", home, {})
    assert str(thumbnails[0].path) == (
        "C:\\Users\\alice\\AppData\\Local\\Microsoft\\Windows\\Explorer"
    )
    assert thumbnails[0].patterns == ("thumbcache_*.db",)
    assert paths_of("package_manager", "win32", home, {}) == [
        "C:\\Users\\alice\\AppData\\Local\\pip\\Cache",
        "C:\\Users\\alice\\AppData\\Local\\npm-cache\\_cacache",
    ]
    assert paths_of("chat", "win32", home, {})[0] == (
        "C:\\Users\\alice\\AppData\\Roaming\\Slack\\Cache"
    )


def test_windows_environment_moves_roots() -> None:
    environ = {"LOCALAPPDATA": "D:\\Local", "APPDATA": "D:\\Roaming", "TEMP": "E:\\Tmp"}

    browser = caches.resolve("browser", "win32", "C:\\Users\\alice", environ)

    assert browser[0].anchor == PureWindowsPath("D:\\Local")
    assert paths_of("user_temp", "win32", "C:\\Users\\alice", environ) == ["E:\\Tmp"]
    assert (
        paths_of("chat", "win32", "C:\\Users\\alice", environ)[0]
        == "D:\\Roaming\\Slack\\Cache"
    )
    relative = {"TEMP": "Tmp", "LOCALAPPDATA": "Local"}
    assert paths_of("user_temp", "win32", "C:\\Users\\alice", relative) == [
        "C:\\Users\\alice\\AppData\\Local\\Temp"
    ]


@pytest.mark.parametrize("platform", caches.PLATFORMS)
@pytest.mark.parametrize("cache_set", caches.CACHE_SETS)
def test_every_root_absolute_below_anchor(platform: str, cache_set: str) -> None:
    home = "C:\\Users\\alice" if platform == "win32" else "/home/alice"
    environ = {"TMPDIR": "/var/folders/zz/abc/T"} if platform == "darwin" else {}

    roots = caches.resolve(
        cache_set, platform, home, environ, uid=1000, privileged=True
    )

    for root in roots:
        assert root.path.is_absolute(), root
        assert root.anchor.is_absolute(), root
        assert root.path == root.anchor or root.anchor in root.path.parents, root
        assert root.cache_set == cache_set


def test_resolve_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown cache set 'cookies'"):
        caches.resolve("cookies", "linux", "/home/alice", {})
    with pytest.raises(ValueError, match="unknown platform 'plan9'"):
        caches.resolve("browser", "plan9", "/home/alice", {})
    with pytest.raises(ValueError, match="not an absolute path"):
        caches.resolve("browser", "linux", "home/alice", {})


def test_linux_real_user_homes_from_passwd() -> None:
    passwd = [
        ("root", 0, "/root"),
        ("daemon", 1, "/usr/sbin"),
        ("alice", 1000, "/home/alice"),
        ("bob", 1001, "/home/bob"),
        ("nobody", 65534, "/nonexistent"),
        ("broken", 1002, "relative"),
        ("slash", 1003, "/"),
    ]

    homes = caches.list_real_user_homes("linux", passwd=passwd)

    assert homes == [
        caches.UserHome(PurePosixPath("/home/alice"), 1000),
        caches.UserHome(PurePosixPath("/home/bob"), 1001),
    ]


def test_darwin_real_user_homes_from_folder(tmp_path: Path) -> None:
    for name in ("alice", "bob", "Shared", "Guest", ".localized"):
        (tmp_path / name).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "alice")
    (tmp_path / "file").write_text("not a home")

    homes = caches.list_real_user_homes("darwin", users_folder=tmp_path)

    assert [Path(home.path).name for home in homes] == ["alice", "bob"]
    assert homes[0].uid == os.stat(tmp_path / "alice").st_uid


def test_resolve_for_homes_each_user() -> None:
    homes = [
        caches.UserHome(PurePosixPath("/home/alice"), 1000),
        caches.UserHome(PurePosixPath("/home/bob"), 1001),
    ]

    roots = caches.resolve_for_homes(["user_temp", "package_manager"], "linux", homes)

    temp = [r for r in roots if r.cache_set == "user_temp"]
    assert [(str(r.path), r.owner_uid) for r in temp] == [
        ("/tmp", 1000),
        ("/tmp", 1001),
    ]
    assert len([r for r in roots if r.label == "apt"]) == 1
    pip = [str(r.path) for r in roots if r.label == "pip"]
    assert pip == ["/home/alice/.cache/pip", "/home/bob/.cache/pip"]
