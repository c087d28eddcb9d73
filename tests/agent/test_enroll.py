"""``fleetmend-agent enroll`` and ``run`` against a real collector over TLS."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.enrollment import EnrollmentError, read_secret
from agent.keystore import FileStore
from agent.state import StateStore
from collector import tls
from collector.server import ServerHandle, start_server_thread
from collector.store import Store
from tests.conftest import BIN_DIR
from tests.trust import enrollment_secret, make_tls_dir, remember_secret

SECRET_SHAPES = re.compile(
    r"fm[kt]1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}|fme1\.[A-Za-z0-9_-]{43}|PRIVATE KEY"
)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'collector.db'}"


@pytest.fixture
def collector(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    server = start_server_thread(database_url, tls_dir=tls_dir)
    yield server
    server.stop()


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMEND_")}
    config = tmp_path / "agent.toml"
    if not config.exists():
        config.write_text(
            'key_store = "file"\n[usage]\nresolve_hosts = false\n', encoding="utf-8"
        )
    env["FLEETMEND_CONFIG"] = str(config)
    env.update(extra)
    return env


def run_agent(
    tmp_path: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run fleetmend-agent with the test's state folder; keep its output in a log."""
    result = subprocess.run(
        [
            str(BIN_DIR / "fleetmend-agent"),
            *args,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=agent_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    # The suite's leak check reads every *.log file under the session's folder.
    with (tmp_path / "agent-cli.log").open("a", encoding="utf-8") as log:
        log.write(result.stdout + result.stderr)
    return result


def secret_file(tmp_path: Path, tls_dir: Path, text: str | None = None) -> Path:
    path = tmp_path / "enroll-secret"
    path.write_text(
        (enrollment_secret(tls_dir) if text is None else text) + "\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def enrolled_devices(database_url: str) -> list[str]:
    with Store.open(database_url) as store:
        return [device.device_id for device in store.list_devices(limit=1000)]


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert SECRET_SHAPES.search(output) is None, output


def test_enroll_with_secret_file(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    state_dir = tmp_path / "state"

    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        collector.address,
        "--ca-file",
        str(tls_dir / "ca.pem"),
        "--secret-file",
        str(secret_file(tmp_path, tls_dir)),
    )

    assert result.returncode == 0, result.stderr
    device_id = StateStore(state_dir).read().device_id
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert device_id in lines[0]
    assert collector.address in lines[0]
    assert f"file {state_dir / 'node-key'}" in lines[0]
    assert_no_secret(result)
    record = json.loads((state_dir / "enrollment.json").read_text(encoding="utf-8"))
    assert record["collector"] == collector.address
    assert record["ca_file"] == str(state_dir / "collector-ca.pem")
    assert record["key_store"] == "file"
    assert datetime.fromisoformat(record["enrolled_time"]) <= datetime.now(UTC)
    assert (state_dir / "collector-ca.pem").read_bytes() == (
        tls_dir / "ca.pem"
    ).read_bytes()
    for name in ("enrollment.json", "collector-ca.pem", "node-key", "identity.json"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    key = FileStore(state_dir).read()
    assert key is not None
    remember_secret(key)
    assert key.startswith("fmk1.")
    assert enrolled_devices(database_url) == [device_id]


def test_enroll_with_env_secret(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        collector.address,
        "--ca-file",
        str(tls_dir / "ca.pem"),
        FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
    )

    assert result.returncode == 0, result.stderr
    assert "enrolled device" in result.stdout
    assert_no_secret(result)
    assert len(enrolled_devices(database_url)) == 1


def test_enroll_keeps_assigned_device_id(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle
) -> None:
    # A copied identity file: the collector already has this id enrolled, so
    # it assigns a new one, which the agent must use from then on.
    first = tmp_path / "first"
    first.mkdir()
    args = ("--collector", collector.address, "--ca-file", str(tls_dir / "ca.pem"))
    env = {"FLEETMEND_ENROLL_SECRET": enrollment_secret(tls_dir)}
    assert run_agent(first, "enroll", *args, **env).returncode == 0
    original = StateStore(first / "state").read().device_id
    second = tmp_path / "second"
    (second / "state").mkdir(parents=True, mode=0o700)
    (second / "state" / "identity.json").write_bytes(
        (first / "state" / "identity.json").read_bytes()
    )

    result = run_agent(second, "enroll", *args, **env)

    assert result.returncode == 0, result.stderr
    assigned = StateStore(second / "state").read().device_id
    assert assigned != original
    assert assigned in result.stdout
    uuid.UUID(assigned)
    notes = [line for line in result.stderr.splitlines() if assigned in line]
    assert len(notes) == 1
    assert original in notes[0]
    assert f"`fleetmend device revoke {original}`" in notes[0]


def test_enroll_again_warns_new_id(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    args = ("--collector", collector.address, "--ca-file", str(tls_dir / "ca.pem"))
    env = {"FLEETMEND_ENROLL_SECRET": enrollment_secret(tls_dir)}
    first = run_agent(tmp_path, "enroll", *args, **env)
    assert first.returncode == 0, first.stderr
    original = StateStore(tmp_path / "state").read().device_id

    again = run_agent(tmp_path, "enroll", *args, **env)

    assert again.returncode == 0, again.stderr
    assigned = StateStore(tmp_path / "state").read().device_id
    assert assigned != original
    assert first.stderr == ""
    assert again.stderr.count("\n") == 1
    assert again.stderr.startswith(
        f"fleetmend-agent: warning: this machine is now device {assigned}"
    )
    assert f"already has device {original}" in again.stderr
    assert (
        f"revoke the old device with `fleetmend device revoke {original}` if this "
        "machine replaced it" in again.stderr
    )
    assert sorted(enrolled_devices(database_url)) == sorted([original, assigned])
    assert_no_secret(again)


@pytest.mark.parametrize(
    "args",
    [
        ("--secret", "fme1." + "s" * 43),
        ("--secret=fme1." + "s" * 43,),
        ("fme1." + "s" * 43,),
    ],
)
def test_secret_argument_rejected(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        "127.0.0.1:1",
        "--ca-file",
        "ca.pem",
        *args,
    )

    assert result.returncode == 2
    assert "--secret-file" in result.stderr
    assert "s" * 43 not in result.stdout + result.stderr


def test_empty_secret_file_named(tmp_path: Path, tls_dir: Path) -> None:
    path = secret_file(tmp_path, tls_dir, text="")

    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        "127.0.0.1:1",
        "--ca-file",
        str(tls_dir / "ca.pem"),
        "--secret-file",
        str(path),
    )

    assert result.returncode == 1
    assert f"enrollment secret file {path} is empty" in result.stderr
    assert not (tmp_path / "state" / "enrollment.json").exists()


def test_unreadable_secret_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"

    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        "127.0.0.1:1",
        "--ca-file",
        "ca.pem",
        "--secret-file",
        str(missing),
    )

    assert result.returncode == 1
    assert f"enrollment secret file {missing} cannot be read" in result.stderr


def test_read_secret_strips_one_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"{FILE_SECRET}\n", encoding="utf-8")
    path.chmod(0o600)
    environ = {"FLEETMEND_ENROLL_SECRET": f"{ENV_SECRET}\n"}
    assert read_secret(path, {}) == FILE_SECRET
    assert read_secret(None, environ) == ENV_SECRET
    path.write_text(f"{FILE_SECRET}\n\n", encoding="utf-8")
    with pytest.raises(EnrollmentError, match="more than one line"):
        read_secret(path, {})


FILE_SECRET = "fme1." + "a" * 43
ENV_SECRET = "fme1." + "e" * 43


@pytest.mark.parametrize(
    "text",
    ["fme1.abc", "fme1." + "a" * 44, "fmt1." + "a" * 43, "-----BEGIN-CERTIFICATE-----"],
)
def test_read_secret_wrong_shape(tmp_path: Path, text: str) -> None:
    path = tmp_path / "secret"
    path.write_text(text + "\n", encoding="utf-8")
    path.chmod(0o600)

    with pytest.raises(EnrollmentError) as raised:
        read_secret(path, {})

    message = str(raised.value)
    assert (
        f"enrollment secret file {path} does not contain an enrollment secret"
        in message
    )
    assert text not in message


def test_read_secret_shared_file_warned(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"{FILE_SECRET}\n", encoding="utf-8")
    warnings: list[str] = []

    for mode in (0o600, 0o640, 0o604):
        path.chmod(mode)
        assert read_secret(path, {}, warn=warnings.append) == FILE_SECRET

    assert warnings == [
        f"enrollment secret file {path} is readable by other users (mode {mode:04o}); "
        f"run `chmod 600 {path}`"
        for mode in (0o640, 0o604)
    ]
    assert all(FILE_SECRET not in warning for warning in warnings)


def test_malformed_secret_file_not_sent(tmp_path: Path, tls_dir: Path) -> None:
    path = secret_file(tmp_path, tls_dir, text="hunter2-not-a-secret")

    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        "127.0.0.1:1",
        "--ca-file",
        str(tls_dir / "ca.pem"),
        "--secret-file",
        str(path),
    )

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"enrollment secret file {path} does not contain" in result.stderr
    assert "hunter2" not in result.stderr
    assert not (tmp_path / "state" / "enrollment.json").exists()


def test_shared_secret_file_warned(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle
) -> None:
    path = secret_file(tmp_path, tls_dir)
    path.chmod(0o644)

    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        collector.address,
        "--ca-file",
        str(tls_dir / "ca.pem"),
        "--secret-file",
        str(path),
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"fleetmend-agent: warning: enrollment secret file {path} is readable by "
        f"other users (mode 0644); run `chmod 600 {path}`\n"
    )
    assert_no_secret(result)


def test_wrong_secret_rejected(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    wrong = "fme1." + "w" * 43

    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        collector.address,
        "--ca-file",
        str(tls_dir / "ca.pem"),
        FLEETMEND_ENROLL_SECRET=wrong,
    )

    assert result.returncode == 1
    assert "the collector rejected the enrollment secret" in result.stderr
    assert wrong not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert enrolled_devices(database_url) == []
    assert not (tmp_path / "state" / "enrollment.json").exists()


def test_run_after_enroll_needs_no_flags(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    enrolled = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        collector.address,
        "--ca-file",
        str(tls_dir / "ca.pem"),
        FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
    )
    assert enrolled.returncode == 0, enrolled.stderr
    key = FileStore(tmp_path / "state").read()
    assert key is not None
    remember_secret(key)

    result = run_agent(tmp_path, "run", "--no-usage", "--exit-after", "1", timeout=120)

    assert result.returncode == 0, result.stderr
    device_id = StateStore(tmp_path / "state").read().device_id
    with Store.open(database_url) as store:
        assert store.count_reports(device_id) >= 1
    assert_no_secret(result)


def test_run_not_enrolled_exits_2(tmp_path: Path) -> None:
    result = run_agent(tmp_path, "run", "--collector", "127.0.0.1:1", "--no-usage")

    assert result.returncode == 2
    assert "not enrolled: run fleetmend-agent enroll" in result.stderr


def test_run_insecure_needs_loopback(tmp_path: Path, tls_dir: Path) -> None:
    result = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        "collector.example.com:50051",
        "--insecure",
        FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
    )

    assert result.returncode == 2
    assert "loopback" in result.stderr
    assert "collector.example.com:50051" in result.stderr


def test_diagnose_after_enroll(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle
) -> None:
    enrolled = run_agent(
        tmp_path,
        "enroll",
        "--collector",
        collector.address,
        "--ca-file",
        str(tls_dir / "ca.pem"),
        FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
    )
    assert enrolled.returncode == 0, enrolled.stderr
    remember_secret(FileStore(tmp_path / "state").read() or "")

    result = run_agent(tmp_path, "diagnose")
    disclosure = run_agent(tmp_path, "show", "--no-usage")

    state_dir = tmp_path / "state"
    assert f"node key store: file {state_dir / 'node-key'}" in result.stdout
    assert f"enrollment: collector {collector.address}" in result.stdout
    assert f"CA file {state_dir / 'collector-ca.pem'}" in result.stdout
    assert "not enrolled" not in result.stdout
    assert "never sent" in disclosure.stdout
    assert "except as the credential of each connection" in disclosure.stdout
    assert_no_secret(result)
    assert_no_secret(disclosure)


def test_diagnose_not_enrolled_problem(tmp_path: Path) -> None:
    result = run_agent(tmp_path, "diagnose", "--collector", "127.0.0.1:50051")

    assert result.returncode == 1
    assert "enrollment: none" in result.stdout
    assert "  - not enrolled: run fleetmend-agent enroll" in result.stdout


# -- TLS failures: one line naming the reason, nothing stored ---------------------


def _enroll_failure(
    tmp_path: Path, address: str, ca_file: Path | None, secret_dir: Path
) -> subprocess.CompletedProcess[str]:
    args = ["enroll", "--collector", address]
    args += ["--ca-file", str(ca_file)] if ca_file is not None else ["--insecure"]
    return run_agent(
        tmp_path, *args, FLEETMEND_ENROLL_SECRET=enrollment_secret(secret_dir)
    )


def _assert_failed_cleanly(
    result: subprocess.CompletedProcess[str], database_url: str, fragment: str
) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert_no_secret(result)
    assert enrolled_devices(database_url) == []


def _serve(database_url: str, tls_dir: Path, *, insecure: bool = False) -> ServerHandle:
    return start_server_thread(database_url, tls_dir=tls_dir, insecure=insecure)


def test_certificate_from_other_ca(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    other = make_tls_dir(tmp_path / "other-tls")

    result = _enroll_failure(tmp_path, collector.address, other / "ca.pem", tls_dir)

    _assert_failed_cleanly(result, database_url, "not signed by the CA in the CA file")


def test_expired_certificate(tmp_path: Path, database_url: str) -> None:
    expired_dir = tmp_path / "expired-tls"
    tls.init_tls_dir(
        expired_dir,
        ["127.0.0.1", "localhost"],
        now=datetime.now(UTC) - timedelta(days=30),
        server_days=2,
    )
    remember_secret(enrollment_secret(expired_dir))
    server = _serve(database_url, expired_dir)
    try:
        result = _enroll_failure(
            tmp_path, server.address, expired_dir / "ca.pem", expired_dir
        )
    finally:
        server.stop()

    _assert_failed_cleanly(result, database_url, "has expired")


def test_certificate_for_other_name(tmp_path: Path, database_url: str) -> None:
    named_dir = make_tls_dir(tmp_path / "named-tls", names=("collector.invalid",))
    server = _serve(database_url, named_dir)
    try:
        result = _enroll_failure(
            tmp_path, server.address, named_dir / "ca.pem", named_dir
        )
    finally:
        server.stop()

    _assert_failed_cleanly(result, database_url, "is issued for another name")


def test_tls_to_plaintext_port(
    tmp_path: Path, tls_dir: Path, database_url: str
) -> None:
    server = _serve(database_url, tls_dir, insecure=True)
    try:
        result = _enroll_failure(tmp_path, server.address, tls_dir / "ca.pem", tls_dir)
    finally:
        server.stop()

    _assert_failed_cleanly(result, database_url, "does not speak TLS")


def test_plaintext_to_tls_port(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle, database_url: str
) -> None:
    result = _enroll_failure(tmp_path, collector.address, None, tls_dir)

    _assert_failed_cleanly(result, database_url, "expects TLS and refused plaintext")


def test_insecure_enroll_then_run(
    tmp_path: Path, tls_dir: Path, database_url: str
) -> None:
    server = _serve(database_url, tls_dir, insecure=True)
    try:
        enrolled = run_agent(
            tmp_path,
            "enroll",
            "--collector",
            server.address,
            "--insecure",
            FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir),
        )
        assert enrolled.returncode == 0, enrolled.stderr
        remember_secret(FileStore(tmp_path / "state").read() or "")
        record = json.loads(
            (tmp_path / "state" / "enrollment.json").read_text(encoding="utf-8")
        )

        result = run_agent(
            tmp_path, "run", "--no-usage", "--exit-after", "1", timeout=120
        )
    finally:
        server.stop()

    assert record["insecure"] is True
    assert record["ca_file"] is None
    assert not (tmp_path / "state" / "collector-ca.pem").exists()
    assert result.returncode == 0, result.stderr
    assert_no_secret(result)


def test_relative_state_dir_absolute_ca(
    tmp_path: Path, tls_dir: Path, collector: ServerHandle
) -> None:
    result = subprocess.run(
        [
            str(BIN_DIR / "fleetmend-agent"),
            "enroll",
            "--collector",
            collector.address,
            "--ca-file",
            str(tls_dir / "ca.pem"),
            "--state-dir",
            "relative-state",
        ],
        env=agent_env(tmp_path, FLEETMEND_ENROLL_SECRET=enrollment_secret(tls_dir)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    state_dir = tmp_path / "relative-state"
    remember_secret(FileStore(state_dir).read() or "")
    record = json.loads((state_dir / "enrollment.json").read_text(encoding="utf-8"))
    assert record["ca_file"] == str(state_dir / "collector-ca.pem")
