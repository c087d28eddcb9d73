"""Agent settings: command-line flags, then FLEETMEND_* variables, then a TOML file.

Every setting remembers where its value came from, so that ``fleetmend-agent
diagnose`` can print it. The TOML file looks like this::

    collector = "collector.example.com:50051"
    insecure = false
    log_level = "info"

    [usage]
    enabled = true
    catalogs = ["/etc/fleetmend/apps.d/site.toml"]

    [intervals]          # seconds
    host = 900
    report_min = 300
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import paths

ENV_PREFIX = "FLEETMEND_"

# Seconds between two runs of each probe, between reports, and between full reports.
DEFAULT_INTERVALS: dict[str, int] = {
    "host": 900,
    "battery": 1800,
    "credentials": 21600,
    "disks": 21600,
    "usage_sample": 60,
    "report_min": 300,
    "full_report": 86400,
}

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """An invalid setting; the message names the setting, its value and its source."""


@dataclass(frozen=True)
class Setting:
    """A setting's value and its source: flag, env FLEETMEND_X, a file or default."""

    value: Any
    source: str


@dataclass
class AgentConfig:
    """The resolved settings of one agent run."""

    settings: dict[str, Setting] = field(default_factory=dict)
    config_file: Path | None = None
    config_file_found: bool = False

    def get(self, name: str) -> Any:
        return self.settings[name].value

    @property
    def collector(self) -> str:
        return str(self.get("collector"))

    @property
    def insecure(self) -> bool:
        return bool(self.get("insecure"))

    @property
    def state_dir(self) -> Path:
        return Path(self.get("state_dir"))

    @property
    def usage_enabled(self) -> bool:
        return bool(self.get("usage.enabled"))

    @property
    def usage_catalogs(self) -> list[Path]:
        return [Path(p) for p in self.get("usage.catalogs")]

    @property
    def log_level(self) -> str:
        return str(self.get("log_level"))

    def interval(self, name: str) -> int:
        return int(self.get(f"intervals.{name}"))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_interval(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number of seconds, got {value!r}")
    seconds = int(value)
    if seconds < 1:
        raise ValueError(f"expected at least 1 second, got {value!r}")
    return seconds


def _parse_collector(value: Any) -> str:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return text


def _parse_log_level(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return text


def _parse_paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p for p in value.split(os.pathsep) if p]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"expected a list of file paths, got {value!r}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return _parse_bool(str(value))


@dataclass(frozen=True)
class _Spec:
    name: str
    parse: Callable[[Any], Any]
    default: Callable[[], Any]


def _specs() -> list[_Spec]:
    specs = [
        _Spec("collector", _parse_collector, lambda: ""),
        _Spec("insecure", _as_bool, lambda: False),
        _Spec("state_dir", lambda v: str(Path(str(v)).expanduser()), lambda: ""),
        _Spec("log_level", _parse_log_level, lambda: "info"),
        _Spec("usage.enabled", _as_bool, lambda: True),
        _Spec("usage.catalogs", _parse_paths, list),
    ]
    for name, seconds in DEFAULT_INTERVALS.items():
        specs.append(
            _Spec(f"intervals.{name}", _parse_interval, functools.partial(int, seconds))
        )
    return specs


def env_name(setting: str) -> str:
    """Return a setting's variable: intervals.host is FLEETMEND_INTERVALS_HOST."""
    return ENV_PREFIX + setting.replace(".", "_").upper()


def _file_values(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc

    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    privileged: bool | None = None,
) -> AgentConfig:
    """Resolve every setting from flags, environment, file and defaults, in that order.

    flags holds only the options given on the command line (None values are
    ignored). config_file is --config; without it FLEETMEND_CONFIG or the
    default file for this kind of run is used, and a missing default file is
    not an error.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ

    explicit_file = config_file or (
        Path(environ[ENV_PREFIX + "CONFIG"])
        if environ.get(ENV_PREFIX + "CONFIG")
        else None
    )
    path = explicit_file or paths.default_config_file(privileged)
    found = path.is_file()
    if explicit_file is not None and not found:
        raise ConfigError(
            f"config file {path} does not exist; create it or drop --config"
        )
    file_values = _file_values(path) if found else {}

    known = {spec.name for spec in _specs()}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown settings: {', '.join(unknown)}; "
            f"known settings are {', '.join(sorted(known))}"
        )

    config = AgentConfig(config_file=path, config_file_found=found)
    for spec in _specs():
        config.settings[spec.name] = _resolve(spec, flags, environ, file_values, path)

    if not config.settings["state_dir"].value:
        config.settings["state_dir"] = Setting(
            str(paths.default_state_dir(privileged)), "default"
        )
    return config


def _resolve(
    spec: _Spec,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    path: Path,
) -> Setting:
    variable = env_name(spec.name)
    if spec.name in flags:
        raw, source = flags[spec.name], "flag"
    elif variable in environ:
        raw, source = environ[variable], f"env {variable}"
    elif spec.name in file_values:
        raw, source = file_values[spec.name], f"file {path}"
    else:
        return Setting(spec.default(), "default")

    try:
        return Setting(spec.parse(raw), source)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting {spec.name} from {source} is invalid: {exc}"
        ) from exc
