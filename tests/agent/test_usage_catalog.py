from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.usage.catalog import OS_NAMES, CatalogError, load_catalog

DATA = Path(__file__).parent.parent / "data" / "usage"

DEFAULT_APP_IDS = {
    "sap-gui",
    "workday",
    "microsoft-teams",
    "microsoft-outlook",
    "slack",
    "zoom",
    "cisco-secure-client",
    "globalprotect",
    "forticlient",
    "openconnect",
    "openvpn",
}


def write(tmp_path: Path, text: str, name: str = "extra.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_default_catalog_ids() -> None:
    catalog = load_catalog()

    assert catalog.app_ids == DEFAULT_APP_IDS


def test_default_catalog_disabled_templates_absent() -> None:
    catalog = load_catalog()

    for app_id in ("salesforce", "servicenow", "jira", "confluence"):
        assert catalog.get(app_id) is None, app_id


@pytest.mark.parametrize("app_id", sorted(DEFAULT_APP_IDS))
def test_default_entry_valid(app_id: str) -> None:
    app = load_catalog().get(app_id)

    assert app is not None
    assert re.fullmatch(r"[a-z0-9_-]+", app.app_id)
    assert app.name.strip() == app.name
    assert app.name
    assert app.hosts or any(app.process_names(os_name) for os_name in OS_NAMES)
    assert all(name == name.lower() for name in app.linux_processes)
    assert all(name.endswith(".exe") for name in app.windows_processes)
    assert all("*" not in host for host in app.hosts)
    assert app.source.endswith("default_catalog.toml")


def test_default_workday_lists_concrete_hosts() -> None:
    workday = load_catalog().get("workday")

    assert workday is not None
    assert "wd5.myworkday.com" in workday.hosts


def test_default_process_names_lowercased() -> None:
    teams = load_catalog().get("microsoft-teams")

    assert teams is not None
    assert "msteams" in teams.macos_processes


def test_extension_replaces_entry() -> None:
    catalog = load_catalog([DATA / "it_catalog.toml"])
    slack = catalog.get("slack")

    assert slack is not None
    assert slack.name == "Slack (web)"
    assert slack.linux_processes == frozenset()
    assert slack.hosts == ("app.slack.com",)
    assert slack.source == str(DATA / "it_catalog.toml")


def test_extension_removes_entry() -> None:
    catalog = load_catalog([DATA / "it_catalog.toml"])

    assert catalog.get("zoom") is None


def test_extension_enables_template() -> None:
    servicenow = load_catalog([DATA / "it_catalog.toml"]).get("servicenow")

    assert servicenow is not None
    assert servicenow.hosts == ("example.service-now.com",)


def test_extension_adds_entry() -> None:
    expenses = load_catalog([DATA / "it_catalog.toml"]).get("expense-tool")

    assert expenses is not None
    assert expenses.windows_processes == frozenset({"expenses.exe"})


def test_extension_keeps_order_of_replaced() -> None:
    default_ids = [app.app_id for app in load_catalog().apps]
    extended_ids = [app.app_id for app in load_catalog([DATA / "it_catalog.toml"]).apps]

    assert extended_ids.index("slack") == default_ids.index("slack")


def test_later_extension_wins(tmp_path: Path) -> None:
    first = write(tmp_path, '[apps.tool]\nname = "One"\nhosts = ["one.example"]\n', "a")
    second = write(
        tmp_path, '[apps.tool]\nname = "Two"\nhosts = ["two.example"]\n', "b"
    )

    tool = load_catalog([first, second], include_default=False).get("tool")

    assert tool is not None
    assert tool.name == "Two"


def test_removal_then_redefinition(tmp_path: Path) -> None:
    remove = write(tmp_path, "[apps.slack]\nenabled = false\n", "remove.toml")
    add = write(tmp_path, '[apps.slack]\nname = "S"\nhosts = ["s.example"]\n', "add")

    slack = load_catalog([remove, add]).get("slack")

    assert slack is not None
    assert slack.hosts == ("s.example",)


def test_removal_of_unknown_id_ignored(tmp_path: Path) -> None:
    extra = write(tmp_path, "[apps.not-defined]\nenabled = false\n")

    catalog = load_catalog([extra])

    assert catalog.app_ids == DEFAULT_APP_IDS


def test_empty_extension_file(tmp_path: Path) -> None:
    extra = write(tmp_path, "# nothing yet\n")

    assert load_catalog([extra]).app_ids == DEFAULT_APP_IDS


def test_hosts_normalized(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        '[apps.tool]\nname = "Tool"\n'
        'hosts = ["Tool.Example.COM.", "tool.example.com", "::FFFF:10.0.0.1"]\n',
    )

    tool = load_catalog([extra], include_default=False).get("tool")

    assert tool is not None
    assert tool.hosts == ("tool.example.com", "::ffff:a00:1")


def test_process_index_case_insensitive(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        '[apps.a]\nname = "A"\nprocesses.windows = ["Shared.EXE"]\n'
        '[apps.b]\nname = "B"\nprocesses.windows = ["shared.exe"]\n',
    )

    index = load_catalog([extra], include_default=False).process_index("windows")

    assert index == {"shared.exe": frozenset({"a", "b"})}


def test_missing_file_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"

    with pytest.raises(CatalogError) as caught:
        load_catalog([missing])

    assert str(missing) in str(caught.value)
    assert "not found" in str(caught.value)


def test_non_utf8_file_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[apps.caf\xe9]\nname = "Caf\xe9"\n'.encode("latin-1"))

    with pytest.raises(CatalogError) as caught:
        load_catalog([path])

    assert str(path) in str(caught.value)
    assert "UTF-8" in str(caught.value)


# (case id, TOML text, app id named in the message or None, fragments that the
# message contains: the bad value and the advice)
INVALID_CATALOGS = [
    ("toml-syntax", "[apps.x\nname = 1\n", None, ["invalid TOML", "fix the syntax"]),
    ("top-level-key", 'title = "x"\n', None, ["'title'", "[apps.<id>]"]),
    ("apps-not-table", "apps = [1]\n", None, ["list [1]", "[apps.<id>]"]),
    ("entry-not-table", "[apps]\nzoom = 3\n", "zoom", ["int 3", "[apps.zoom]"]),
    (
        "uppercase-id",
        '[apps.Zoom]\nname = "Z"\n',
        "Zoom",
        ["invalid app id", "lower-case letters"],
    ),
    (
        "id-with-space",
        '[apps."my app"]\nname = "Z"\n',
        "my app",
        ["invalid app id", "lower-case letters"],
    ),
    ("unknown-key", '[apps.z]\nname = "Z"\nhost = ["a"]\n', "z", ["'host'", "hosts"]),
    ("missing-name", '[apps.z]\nhosts = ["a.example"]\n', "z", ["missing name"]),
    ("empty-name", '[apps.z]\nname = " "\nhosts = ["a"]\n', "z", ["' '", "non-empty"]),
    ("name-not-string", "[apps.z]\nname = 5\n", "z", ["name = 5", "string"]),
    ("enabled-not-bool", '[apps.z]\nenabled = "no"\n', "z", ["'no'", "true or false"]),
    ("no-matchers", '[apps.z]\nname = "Z"\n', "z", ["never match", "enabled = false"]),
    (
        "empty-matchers",
        '[apps.z]\nname = "Z"\nhosts = []\nprocesses.linux = []\n',
        "z",
        ["never match"],
    ),
    (
        "processes-not-table",
        '[apps.z]\nname = "Z"\nprocesses = ["z"]\n',
        "z",
        ["list ['z']", "processes.windows"],
    ),
    (
        "unknown-os",
        '[apps.z]\nname = "Z"\nprocesses.win = ["z.exe"]\n',
        "z",
        ["'win'", "linux, windows or macos"],
    ),
    (
        "process-list-not-list",
        '[apps.z]\nname = "Z"\nprocesses.linux = "zoom"\n',
        "z",
        ["str 'zoom'", "list of process names"],
    ),
    (
        "process-not-string",
        '[apps.z]\nname = "Z"\nprocesses.linux = [7]\n',
        "z",
        ["entry 7", "non-empty string"],
    ),
    (
        "process-path",
        '[apps.z]\nname = "Z"\nprocesses.linux = ["/opt/zoom/zoom"]\n',
        "z",
        ["'/opt/zoom/zoom'", "file name"],
    ),
    (
        "windows-without-exe",
        '[apps.z]\nname = "Z"\nprocesses.windows = ["Zoom"]\n',
        "z",
        ["'Zoom'", "'Zoom.exe'"],
    ),
    (
        "disabled-entry-still-checked",
        '[apps.z]\nenabled = false\nprocesses.windows = ["Zoom"]\n',
        "z",
        ["'Zoom'", ".exe"],
    ),
    (
        "hosts-not-list",
        '[apps.z]\nname = "Z"\nhosts = "a.example"\n',
        "z",
        ["str 'a.example'", "list of host names"],
    ),
    (
        "host-not-string",
        '[apps.z]\nname = "Z"\nhosts = [1]\n',
        "z",
        ["hosts entry 1", "string"],
    ),
    (
        "host-wildcard",
        '[apps.workday]\nname = "W"\nhosts = ["*.myworkday.com"]\n',
        "workday",
        ["'*.myworkday.com'", "wildcard", "concrete host name"],
    ),
    (
        "host-url",
        '[apps.z]\nname = "Z"\nhosts = ["https://z.example/login"]\n',
        "z",
        ["'https://z.example/login'", "without scheme, port or path"],
    ),
    (
        "host-with-port",
        '[apps.z]\nname = "Z"\nhosts = ["z.example:443"]\n',
        "z",
        ["'z.example:443'", "without scheme, port or path"],
    ),
    (
        "host-invalid-characters",
        '[apps.z]\nname = "Z"\nhosts = ["z_app.example"]\n',
        "z",
        ["'z_app.example'", "not a valid host name"],
    ),
    (
        "host-empty-label",
        '[apps.z]\nname = "Z"\nhosts = ["z..example"]\n',
        "z",
        ["'z..example'", "not a valid host name"],
    ),
    (
        "host-label-hyphen",
        '[apps.z]\nname = "Z"\nhosts = ["-z.example"]\n',
        "z",
        ["'-z.example'", "not a valid host name"],
    ),
    (
        "host-too-long",
        '[apps.z]\nname = "Z"\nhosts = ["' + "a." * 127 + 'com"]\n',
        "z",
        ["not a valid host name"],
    ),
]


@pytest.mark.parametrize(
    ("text", "app_id", "fragments"),
    [case[1:] for case in INVALID_CATALOGS],
    ids=[case[0] for case in INVALID_CATALOGS],
)
def test_invalid_catalog_error(
    tmp_path: Path, text: str, app_id: str | None, fragments: list[str]
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(CatalogError) as caught:
        load_catalog([path])

    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert caught.value.app_id == app_id
    if app_id is not None:
        assert f"app {app_id!r}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_error_in_second_file_names_it(tmp_path: Path) -> None:
    good = write(tmp_path, '[apps.a]\nname = "A"\nhosts = ["a.example"]\n', "good")
    bad = write(tmp_path, '[apps.b]\nname = "B"\nhosts = ["*.b.example"]\n', "bad")

    with pytest.raises(CatalogError) as caught:
        load_catalog([good, bad])

    assert caught.value.source == str(bad)
