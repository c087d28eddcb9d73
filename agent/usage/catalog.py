"""The catalog of work applications whose usage the agent measures.

A catalog is TOML. Each table under ``apps`` is one application, keyed by its id::

    [apps.slack]
    name = "Slack"
    processes.windows = ["slack.exe"]
    processes.macos = ["Slack"]
    processes.linux = ["slack"]
    hosts = ["app.slack.com"]

Process names are compared case-insensitively with psutil's ``Process.name()``, which
is the executable's file name (with ".exe" on Windows). ``hosts`` are host names that a
process (usually a browser) connects to. The sampler resolves each one to addresses and
compares those with the remote addresses of open TCP connections. A wildcard such as
``*.myworkday.com`` cannot be used because DNS cannot list the names under a suffix, so
each concrete host name must be given.

The shipped default catalog is loaded first, then each extra file in order. An entry
whose id already exists replaces the earlier one, and ``enabled = false`` removes it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

OsName = Literal["linux", "windows", "macos"]
OS_NAMES: tuple[OsName, ...] = ("linux", "windows", "macos")

DEFAULT_CATALOG_RESOURCE = "default_catalog.toml"

_APP_ID_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
_HOST_LABEL_PATTERN = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_ENTRY_KEYS = frozenset({"name", "processes", "hosts", "enabled"})
_MAX_HOST_LENGTH = 253


class CatalogError(ValueError):
    """An invalid catalog file, with the file, the entry and the bad value in words."""

    def __init__(self, source: str, app_id: str | None, problem: str) -> None:
        where = source if app_id is None else f"{source}: app {app_id!r}"
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.app_id = app_id


@dataclass(frozen=True)
class CatalogApp:
    """One catalogued application and the process names and hosts that identify it.

    Process names are stored in lower case; hosts are lower-case host names or IP
    address literals.
    """

    app_id: str
    name: str
    linux_processes: frozenset[str]
    windows_processes: frozenset[str]
    macos_processes: frozenset[str]
    hosts: tuple[str, ...]
    source: str

    def process_names(self, os_name: OsName) -> frozenset[str]:
        """Return the lower-case process names that identify the app on os_name."""
        if os_name == "linux":
            return self.linux_processes
        if os_name == "windows":
            return self.windows_processes
        return self.macos_processes


@dataclass(frozen=True)
class Catalog:
    """The applications to measure, in load order."""

    apps: tuple[CatalogApp, ...]

    @property
    def app_ids(self) -> frozenset[str]:
        return frozenset(app.app_id for app in self.apps)

    def get(self, app_id: str) -> CatalogApp | None:
        """Return the app with this id, or None."""
        for app in self.apps:
            if app.app_id == app_id:
                return app
        return None

    def process_index(self, os_name: OsName) -> dict[str, frozenset[str]]:
        """Map each lower-case process name on os_name to the ids of its apps."""
        index: dict[str, set[str]] = {}
        for app in self.apps:
            for process_name in app.process_names(os_name):
                index.setdefault(process_name, set()).add(app.app_id)
        return {name: frozenset(ids) for name, ids in index.items()}

    def host_index(self) -> dict[str, frozenset[str]]:
        """Map each catalog host name to the ids of the apps that list it."""
        index: dict[str, set[str]] = {}
        for app in self.apps:
            for host in app.hosts:
                index.setdefault(host, set()).add(app.app_id)
        return {host: frozenset(ids) for host, ids in index.items()}


@dataclass(frozen=True)
class _Removal:
    app_id: str
    source: str


def current_os() -> OsName | None:
    """Return the catalog's name for the running OS, or None for any other OS."""
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "win32":
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return None


CURRENT_OS = current_os()


def load_catalog(
    extra_paths: Sequence[Path] = (), *, include_default: bool = True
) -> Catalog:
    """Load the default catalog, then apply each extra file in order.

    Raises CatalogError for a missing, unreadable or invalid file.
    """
    apps: dict[str, CatalogApp] = {}
    if include_default:
        default = resources.files("agent.usage").joinpath(DEFAULT_CATALOG_RESOURCE)
        _apply(apps, _parse_catalog(default.read_text(encoding="utf-8"), str(default)))
    for path in extra_paths:
        _apply(apps, _parse_catalog(_read_catalog_file(path), str(path)))
    logger.debug("loaded catalog with %d apps: %s", len(apps), sorted(apps))
    return Catalog(apps=tuple(apps.values()))


def _parse_catalog(text: str, source: str) -> list[CatalogApp | _Removal]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(
            source, None, f"invalid TOML ({exc}); fix the syntax at that position"
        ) from exc

    unknown = sorted(set(document) - {"apps"})
    if unknown:
        raise CatalogError(
            source,
            None,
            f"unknown top-level key {unknown[0]!r}; a catalog file contains only "
            "[apps.<id>] tables",
        )
    apps = document.get("apps", {})
    if not isinstance(apps, dict):
        raise CatalogError(
            source,
            None,
            f"'apps' is {_describe(apps)}, expected a table; write each app as "
            "[apps.<id>]",
        )
    return [_parse_entry(source, app_id, entry) for app_id, entry in apps.items()]


def _read_catalog_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CatalogError(
            str(path), None, "catalog file not found; check the configured path"
        ) from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(
            str(path), None, f"not UTF-8 text ({exc}); save the file as UTF-8"
        ) from exc
    except OSError as exc:
        raise CatalogError(
            str(path),
            None,
            f"cannot read the catalog file ({exc.strerror}); check its permissions",
        ) from exc


def _apply(
    apps: dict[str, CatalogApp], entries: Iterable[CatalogApp | _Removal]
) -> None:
    for entry in entries:
        if isinstance(entry, _Removal):
            if apps.pop(entry.app_id, None) is None:
                logger.debug(
                    "%s disables app %r, which no earlier catalog file defines",
                    entry.source,
                    entry.app_id,
                )
            continue
        # Assignment keeps a replaced app at the position of the one it replaces.
        apps[entry.app_id] = entry


def _parse_entry(source: str, app_id: str, entry: Any) -> CatalogApp | _Removal:
    if not _APP_ID_PATTERN.fullmatch(app_id):
        raise CatalogError(
            source,
            app_id,
            "invalid app id; use 1 to 64 lower-case letters, digits, '_' or '-'",
        )
    if not isinstance(entry, dict):
        raise CatalogError(
            source,
            app_id,
            f"entry is {_describe(entry)}, expected a table; write it as "
            f"[apps.{app_id}] with name, processes and hosts",
        )
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise CatalogError(
            source,
            app_id,
            f"unknown key {unknown[0]!r}; the allowed keys are "
            f"{', '.join(sorted(_ENTRY_KEYS))}",
        )

    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise CatalogError(
            source,
            app_id,
            f"enabled = {enabled!r} is invalid; write enabled = true or false",
        )
    # A disabled entry is still checked, so that a typo in it is reported.
    processes = _parse_processes(source, app_id, entry.get("processes", {}))
    hosts = _parse_hosts(source, app_id, entry.get("hosts", []))
    name = entry.get("name")
    if not enabled:
        if name is not None:
            _check_name(source, app_id, name)
        return _Removal(app_id, source)

    if name is None:
        raise CatalogError(source, app_id, 'missing name; add name = "<display name>"')
    _check_name(source, app_id, name)
    if not hosts and not any(processes.values()):
        raise CatalogError(
            source,
            app_id,
            "no process names and no hosts, so it can never match; add processes "
            "or hosts, or set enabled = false",
        )
    return CatalogApp(
        app_id=app_id,
        name=name.strip(),
        linux_processes=processes.get("linux", frozenset()),
        windows_processes=processes.get("windows", frozenset()),
        macos_processes=processes.get("macos", frozenset()),
        hosts=hosts,
        source=source,
    )


def _check_name(source: str, app_id: str, name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(
            source,
            app_id,
            f"name = {name!r} is invalid; give a non-empty display name as a string",
        )


def _parse_processes(
    source: str, app_id: str, value: Any
) -> Mapping[OsName, frozenset[str]]:
    if not isinstance(value, dict):
        raise CatalogError(
            source,
            app_id,
            f"processes is {_describe(value)}, expected a table; write "
            'processes.windows = ["example.exe"]',
        )
    parsed: dict[OsName, frozenset[str]] = {}
    for os_name, names in value.items():
        if os_name not in OS_NAMES:
            raise CatalogError(
                source,
                app_id,
                f"unknown OS {os_name!r} in processes; use linux, windows or macos",
            )
        parsed[os_name] = _parse_process_names(source, app_id, os_name, names)
    return parsed


def _parse_process_names(
    source: str, app_id: str, os_name: OsName, names: Any
) -> frozenset[str]:
    if not isinstance(names, list):
        raise CatalogError(
            source,
            app_id,
            f"processes.{os_name} is {_describe(names)}, expected a list of "
            "process names",
        )
    for name in names:
        _check_process_name(source, app_id, os_name, name)
    return frozenset(name.lower() for name in names)


def _check_process_name(source: str, app_id: str, os_name: OsName, name: Any) -> None:
    field = f"processes.{os_name} entry {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(
            source, app_id, f"{field} is invalid; give a non-empty string"
        )
    if "/" in name or "\\" in name:
        raise CatalogError(
            source,
            app_id,
            f"{field} is a path; give only the executable's file name",
        )
    if os_name == "windows" and not name.lower().endswith(".exe"):
        raise CatalogError(
            source,
            app_id,
            f"{field} has no .exe suffix; Windows process names include it, "
            f"so write {name + '.exe'!r}",
        )


def _parse_hosts(source: str, app_id: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise CatalogError(
            source,
            app_id,
            f"hosts is {_describe(value)}, expected a list of host names",
        )
    hosts: list[str] = []
    for host in value:
        normalized = _normalize_host(source, app_id, host)
        if normalized not in hosts:
            hosts.append(normalized)
    return tuple(hosts)


def _normalize_host(source: str, app_id: str, host: Any) -> str:
    field = f"hosts entry {host!r}"
    if not isinstance(host, str) or not host.strip():
        raise CatalogError(
            source, app_id, f"{field} is invalid; give a host name as a string"
        )
    if "*" in host:
        raise CatalogError(
            source,
            app_id,
            f"{field} is a wildcard, which cannot be resolved to addresses; list "
            "each concrete host name, for example 'wd5.myworkday.com'",
        )
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if "/" in host or ":" in host:
        raise CatalogError(
            source,
            app_id,
            f"{field} is not a host name; give only the host, without scheme, "
            "port or path",
        )
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > _MAX_HOST_LENGTH or not all(
        _HOST_LABEL_PATTERN.fullmatch(label) for label in labels
    ):
        raise CatalogError(
            source,
            app_id,
            f"{field} is not a valid host name; use letters, digits, '-' and '.', "
            "at most 63 characters between dots and 253 in all, for example "
            "'app.slack.com'",
        )
    return name


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"
