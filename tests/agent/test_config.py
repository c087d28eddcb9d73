"""Settings precedence: flag, then environment, then TOML file, then default."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_INTERVALS, ConfigError, env_name, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file(tmp_path: Path) -> None:
    config = load_config(environ={}, config_file=None, privileged=False)

    for name, seconds in DEFAULT_INTERVALS.items():
        assert config.interval(name) == seconds
        assert config.settings[f"intervals.{name}"].source == "default"
    assert config.usage_enabled is True
    assert config.insecure is False
    assert config.settings["state_dir"].source == "default"


def test_default_intervals_match_documented_values() -> None:
    assert DEFAULT_INTERVALS == {
        "host": 900,
        "battery": 1800,
        "credentials": 21600,
        "disks": 21600,
        "usage_sample": 60,
        "report_min": 300,
        "full_report": 86400,
        "healing": 60,
    }


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    config_file = write(
        tmp_path / "agent.toml",
        'collector = "file.example:1"\nlog_level = "debug"\n'
        "[intervals]\nhost = 10\nbattery = 20\n",
    )
    environ = {"FLEETMEND_COLLECTOR": "env.example:2", "FLEETMEND_INTERVALS_HOST": "30"}

    config = load_config(
        flags={"collector": "flag.example:3"},
        environ=environ,
        config_file=config_file,
    )

    assert config.collector == "flag.example:3"
    assert config.settings["collector"].source == "flag"
    assert config.interval("host") == 30
    assert config.settings["intervals.host"].source == "env FLEETMEND_INTERVALS_HOST"
    assert config.interval("battery") == 20
    assert config.settings["intervals.battery"].source == f"file {config_file}"
    assert config.log_level == "debug"


def test_config_from_environment_variable(tmp_path: Path) -> None:
    config_file = write(tmp_path / "site.toml", "[usage]\nenabled = false\n")

    config = load_config(environ={"FLEETMEND_CONFIG": str(config_file)})

    assert config.config_file == config_file
    assert config.usage_enabled is False


def test_usage_switch_from_env() -> None:
    config = load_config(environ={"FLEETMEND_USAGE_ENABLED": "off"}, privileged=False)

    assert config.usage_enabled is False
    assert config.settings["usage.enabled"].source == "env FLEETMEND_USAGE_ENABLED"


def test_none_flags_are_ignored() -> None:
    config = load_config(flags={"collector": None}, environ={}, privileged=False)

    assert config.settings["collector"].source == "default"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[intervals]\nhost = 0\n", "intervals.host"),
        ("[intervals]\nhost = 'soon'\n", "'soon'"),
        ('collector = "no-port"\n', "HOST:PORT"),
        ('log_level = "loud"\n', "loud"),
        ("colector = 'x:1'\n", "unknown settings: colector"),
        ("[intervals\n", "not valid TOML"),
    ],
)
def test_invalid_file_names_value(tmp_path: Path, text: str, fragment: str) -> None:
    config_file = write(tmp_path / "agent.toml", text)

    with pytest.raises(ConfigError) as info:
        load_config(environ={}, config_file=config_file)

    assert fragment in str(info.value)
    assert str(config_file) in str(info.value)


def test_invalid_env_names_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"FLEETMEND_INTERVALS_DISKS": "-5"}, privileged=False)

    assert "env FLEETMEND_INTERVALS_DISKS" in str(info.value)
    assert "-5" in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={}, config_file=tmp_path / "absent.toml")


def test_env_name_of_nested_setting() -> None:
    assert env_name("intervals.report_min") == "FLEETMEND_INTERVALS_REPORT_MIN"
    assert env_name("usage.enabled") == "FLEETMEND_USAGE_ENABLED"


def test_privileged_default_state_dir() -> None:
    config = load_config(environ={}, privileged=True, config_file=None)

    assert config.state_dir == Path("/var/lib/fleetmend")
    assert config.config_file == Path("/etc/fleetmend/agent.toml")


def test_spool_cap_default_and_env() -> None:
    default = load_config(environ={}, privileged=False)
    from_env = load_config(
        environ={"FLEETMEND_SPOOL_MAX_BYTES": "65536"}, privileged=False
    )

    assert default.spool_max_bytes == 16 * 1024 * 1024
    assert default.settings["spool.max_bytes"].source == "default"
    assert from_env.spool_max_bytes == 65536
    assert env_name("spool.max_bytes") == "FLEETMEND_SPOOL_MAX_BYTES"


def test_spool_cap_too_small(tmp_path: Path) -> None:
    config_file = write(tmp_path / "agent.toml", "[spool]\nmax_bytes = 100\n")

    with pytest.raises(ConfigError, match="at least 4096 bytes, got 100"):
        load_config(environ={}, config_file=config_file)


def test_healing_defaults(tmp_path: Path) -> None:
    config = load_config(environ={}, config_file=None, privileged=False)

    assert config.healing_enabled is True
    assert config.healing_services == []
    assert config.healing_cache_sets == []
    assert config.healing_policy_file is None


def test_healing_from_file_and_env(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        "[healing]\n"
        "enabled = false\n"
        'services = ["cups.service"]\n'
        'policy_file = "/etc/fleetmend/policy.toml"\n',
    )
    environ = {"FLEETMEND_HEALING_CACHE_SETS": "browser, thumbnails"}

    config = load_config(environ=environ, config_file=path, privileged=False)

    assert config.healing_enabled is False
    assert config.healing_services == ["cups.service"]
    assert config.healing_cache_sets == ["browser", "thumbnails"]
    assert config.settings["healing.cache_sets"].source == (
        "env FLEETMEND_HEALING_CACHE_SETS"
    )
    assert config.healing_policy_file == Path("/etc/fleetmend/policy.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('services = "cups.service"', "expected a list of names"),
        ('services = ["cups service; rm -rf /"]', "is not a name"),
        ("cache_sets = [1]", "expected a list of names"),
    ],
)
def test_healing_invalid_values(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "agent.toml", f"[healing]\n{text}\n")

    with pytest.raises(ConfigError) as error:
        load_config(environ={}, config_file=path, privileged=False)

    assert expected in str(error.value)
    assert "healing." in str(error.value)
