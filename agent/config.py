"""Agent settings: command-line flags, then FLEETMEND_* variables, then a TOML file.

Every setting remembers where its value came from, so that ``fleetmend-agent
diagnose`` can print it. The TOML file looks like this::

    collector = "collector.example.com:50051"
    insecure = false
    key_store = "auto"   # auto, keyring or file: where the node key is kept
    log_level = "info"

    [usage]
    enabled = true
    resolve_hosts = true
    catalogs = ["/etc/fleetmend/apps.d/site.toml"]

    [intervals]          # seconds
    host = 900
    report_min = 300

    [spool]
    max_bytes = 16777216 # reports kept while the collector is unreachable

    [healing]
    enabled = true
    services = ["cups.service"]          # services restart_service may restart
    cache_sets = ["browser", "thumbnails"] # empty: every known cache set
    policy_file = "/etc/fleetmend/policy.toml" # replaces the built-in policy

List settings from a FLEETMEND_* variable are comma-separated names
(FLEETMEND_HEALING_SERVICES=cups.service,sshd.service); path lists use the
OS path separator.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import paths
from agent.keystore import KEY_STORES
from agent.spool import DEFAULT_MAX_BYTES

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
    "healing": 60,
}

LOG_LEVELS = ("debug", "info", "warning", "error")

# FLEETMEND_* variables that the agent reads besides its settings: the config
# file path (agent.paths) and the enrollment secret (agent.enrollment).
AGENT_VARIABLES = frozenset({"FLEETMEND_CONFIG", "FLEETMEND_ENROLL_SECRET"})
# FLEETMEND_* variables of other Fleetmend programs. An operator's shell may
# set them, so the agent does not warn about them. The operators' CLI fleetmend
# reads FLEETMEND_CA_FILE and FLEETMEND_TOKEN_FILE (collector/_ops_transport.py).
# Its FLEETMEND_COLLECTOR is also the agent's collector setting. The test suite
# reads FLEETMEND_TEST_POSTGRES_URL.
OTHER_PROGRAM_VARIABLES = frozenset(
    {"FLEETMEND_CA_FILE", "FLEETMEND_TOKEN_FILE", "FLEETMEND_TEST_POSTGRES_URL"}
)
# Minimum similarity (difflib ratio, 0 to 1) of the parts after FLEETMEND_ at
# which the message about an unknown variable suggests a known one. At 0.75,
# COLECTOR and INTERVAL_HOST match COLLECTOR and INTERVALS_HOST, and names such
# as FOO match nothing.
SUGGESTION_CUTOFF = 0.75


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
    # FLEETMEND_* variables that no setting reads, often a misspelt name.
    unknown_variables: list[str] = field(default_factory=list)

    def get(self, name: str) -> Any:
        return self.settings[name].value

    @property
    def collector(self) -> str:
        return str(self.get("collector"))

    @property
    def insecure(self) -> bool:
        return bool(self.get("insecure"))

    @property
    def key_store(self) -> str:
        return str(self.get("key_store"))

    @property
    def state_dir(self) -> Path:
        return Path(self.get("state_dir"))

    @property
    def usage_enabled(self) -> bool:
        return bool(self.get("usage.enabled"))

    @property
    def usage_resolve_hosts(self) -> bool:
        return bool(self.get("usage.resolve_hosts"))

    @property
    def usage_catalogs(self) -> list[Path]:
        return [Path(p) for p in self.get("usage.catalogs")]

    @property
    def log_level(self) -> str:
        return str(self.get("log_level"))

    @property
    def spool_max_bytes(self) -> int:
        return int(self.get("spool.max_bytes"))

    @property
    def healing_enabled(self) -> bool:
        return bool(self.get("healing.enabled"))

    @property
    def healing_services(self) -> list[str]:
        return list(self.get("healing.services"))

    @property
    def healing_cache_sets(self) -> list[str]:
        return list(self.get("healing.cache_sets"))

    @property
    def healing_policy_file(self) -> Path | None:
        value = str(self.get("healing.policy_file"))
        return Path(value) if value else None

    def interval(self, name: str) -> int:
        return int(self.get(f"intervals.{name}"))


_KIND_WORDS = {
    "bool": "true or false",
    "int": "a whole number",
    "str": "a string",
    "paths": "a list of file paths",
    "names": "a list of names",
}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _coerce(kind: str, raw: Any, from_text: bool) -> Any:
    """Turn a raw value into the setting's type.

    Environment variables are text and are parsed; TOML values already have a
    type, which must be the right one (so ``host = 1.5`` is an error, not 1).
    """
    if from_text:
        text = str(raw)
        if kind == "bool":
            return _parse_bool(text)
        if kind == "int":
            if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
                raise ValueError(f"expected a whole number, got {text!r}")
            return int(text)
        if kind == "paths":
            return [p for p in text.split(os.pathsep) if p]
        if kind == "names":
            return [name.strip() for name in text.split(",") if name.strip()]
        return text

    expected = {"bool": bool, "int": int, "str": str, "paths": list, "names": list}[
        kind
    ]
    wrong_type = not isinstance(raw, expected) or (
        kind == "int" and isinstance(raw, bool)
    )
    if kind in ("paths", "names") and not wrong_type:
        wrong_type = not all(isinstance(p, str) for p in raw)
    if wrong_type:
        raise ValueError(f"expected {_KIND_WORDS[kind]}, got {raw!r}")
    return raw


def _check_interval(seconds: int) -> int:
    if seconds < 1:
        raise ValueError(f"expected at least 1 second, got {seconds}")
    return seconds


# Below this a single full report may not fit.
MIN_SPOOL_BYTES = 4096


def _check_spool_bytes(value: int) -> int:
    if value < MIN_SPOOL_BYTES:
        raise ValueError(f"expected at least {MIN_SPOOL_BYTES} bytes, got {value}")
    return value


def check_collector_address(value: str) -> str:
    """Return value if it is HOST:PORT (IPv6 in brackets); else raise ValueError."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        bare_host = host[1:-1]
    else:
        bare_host = host
        if ":" in host:
            raise ValueError(
                f"expected HOST:PORT, got {value!r}; write an IPv6 address in "
                "brackets, as [::1]:50051"
            )
    if "/" in text or not sep or not bare_host:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:50051, got {value!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a port from 1 to 65535 in {value!r}")
    return text


def _check_log_level(value: str) -> str:
    text = value.strip().lower()
    if text not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return text


def _check_key_store(value: str) -> str:
    text = value.strip().lower()
    if text not in KEY_STORES:
        raise ValueError(f"expected one of {', '.join(KEY_STORES)}, got {value!r}")
    return text


def _check_state_dir(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a folder path, got an empty string")
    return str(Path(value).expanduser())


# A service or cache set name: what service managers and the cache catalog use.
_NAME = re.compile(r"[A-Za-z0-9@._:\\-]{1,256}")


def _check_names(values: list[str]) -> list[str]:
    for value in values:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a name (1 to 256 letters, digits and @._:-)"
            )
    return values


def _check_optional_file(value: str) -> str:
    return str(Path(value).expanduser()) if value.strip() else ""


def _unchanged(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    check: Callable[[Any], Any]
    default: Callable[[], Any]


def _specs() -> list[_Spec]:
    specs = [
        _Spec("collector", "str", check_collector_address, str),
        _Spec("insecure", "bool", _unchanged, bool),
        _Spec("state_dir", "str", _check_state_dir, str),
        _Spec("key_store", "str", _check_key_store, lambda: "auto"),
        _Spec("log_level", "str", _check_log_level, lambda: "info"),
        _Spec("usage.enabled", "bool", _unchanged, lambda: True),
        _Spec("usage.resolve_hosts", "bool", _unchanged, lambda: True),
        _Spec("usage.catalogs", "paths", _unchanged, list),
        _Spec("healing.enabled", "bool", _unchanged, lambda: True),
        _Spec("healing.services", "names", _check_names, list),
        _Spec("healing.cache_sets", "names", _check_names, list),
        _Spec("healing.policy_file", "str", _check_optional_file, str),
        _Spec(
            "spool.max_bytes",
            "int",
            _check_spool_bytes,
            functools.partial(int, DEFAULT_MAX_BYTES),
        ),
    ]
    for name, seconds in DEFAULT_INTERVALS.items():
        specs.append(
            _Spec(
                f"intervals.{name}",
                "int",
                _check_interval,
                functools.partial(int, seconds),
            )
        )
    return specs


def env_name(setting: str) -> str:
    """Return a setting's variable: intervals.host is FLEETMEND_INTERVALS_HOST."""
    return ENV_PREFIX + setting.replace(".", "_").upper()


def unknown_variable_message(name: str) -> str:
    """Describe an unknown FLEETMEND_* variable, naming the setting it may misspell."""
    settings = {env_name(spec.name): spec.name for spec in _specs()}
    candidates = {
        variable.removeprefix(ENV_PREFIX): variable
        for variable in [*settings, *AGENT_VARIABLES]
    }
    matches = difflib.get_close_matches(
        name.removeprefix(ENV_PREFIX), candidates, n=1, cutoff=SUGGESTION_CUTOFF
    )
    message = f"environment variable {name} is not an agent setting"
    if not matches:
        return f"{message}; check its spelling, or unset it"
    variable = candidates[matches[0]]
    if variable in settings:
        return f"{message}; did you mean {variable} (setting {settings[variable]})?"
    return f"{message}; did you mean {variable}?"


def _file_values(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from exc
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
    if explicit_file is not None and path.is_dir():
        raise ConfigError(f"config file {path} is a folder; name a TOML file")
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
    known_variables = (
        {env_name(spec.name) for spec in _specs()}
        | AGENT_VARIABLES
        | OTHER_PROGRAM_VARIABLES
    )
    config.unknown_variables = sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX) and name not in known_variables
    )
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
        raw, source, from_text = (
            flags[spec.name],
            "flag",
            isinstance(flags[spec.name], str),
        )
    elif variable in environ:
        raw, source, from_text = environ[variable], f"env {variable}", True
    elif spec.name in file_values:
        raw, source, from_text = file_values[spec.name], f"file {path}", False
    else:
        return Setting(spec.default(), "default")

    try:
        value = _coerce(spec.kind, raw, from_text)
        return Setting(spec.check(value), source)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting {spec.name} from {source} is invalid: {exc}"
        ) from exc
