"""Node key storage: the owner-only file and a real Secret Service keyring."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.keystore import (
    KEYRING_SERVICE,
    FileStore,
    KeyStoreError,
    keyring_username,
)

# A key of the node key's shape; tests/trust.py's leak check looks for it.
SAMPLE_KEY = "fmk1.0123456789abcdef." + "k" * 43


def _no_dbus_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment without a D-Bus session or keyring settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DBUS_", "PYTHON_KEYRING", "XDG_"))
    }
    env["HOME"] = str(tmp_path / "home")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "home" / ".config")
    env["XDG_DATA_HOME"] = str(tmp_path / "home" / ".local" / "share")
    return env


def test_file_store_mode_0600(tmp_path: Path) -> None:
    store = FileStore(tmp_path)

    store.write(SAMPLE_KEY)

    mode = stat.S_IMODE(store.path.stat().st_mode)
    assert mode == 0o600
    assert store.read() == SAMPLE_KEY
    assert [path.name for path in tmp_path.iterdir()] == ["node-key"]


def test_file_store_replaces_key(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write(SAMPLE_KEY)
    newer = "fmk1.fedcba9876543210." + "n" * 43

    store.write(newer)

    assert store.read() == newer
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_file_store_missing_key(tmp_path: Path) -> None:
    assert FileStore(tmp_path).read() is None


def test_file_store_unreadable_by_other_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    store = FileStore(tmp_path)
    store.write(SAMPLE_KEY)
    os.chmod(tmp_path, 0o755)  # noqa: S103 - let the other user reach the folder

    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            str(store.path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert SAMPLE_KEY not in result.stdout


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_file_store_rejects_open_mode(tmp_path: Path, mode: int) -> None:
    store = FileStore(tmp_path)
    store.write(SAMPLE_KEY)
    store.path.chmod(mode)

    with pytest.raises(KeyStoreError) as caught:
        store.read()

    message = str(caught.value)
    assert str(store.path) in message
    assert f"chmod 600 {store.path}" in message
    assert f"{mode:04o}" in message
    assert SAMPLE_KEY not in message


def test_file_store_rejects_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(SAMPLE_KEY, encoding="utf-8")
    target.chmod(0o600)
    (tmp_path / "node-key").symlink_to(target)

    with pytest.raises(KeyStoreError, match="cannot be read"):
        FileStore(tmp_path).read()


# Runs in a child process so that keyring chooses its backend from the
# child's environment, not from the test process's cached choice.
STORE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.keystore import KeyStoreError, open_key_store

    mode, state_dir, action = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    try:
        store = open_key_store(mode, state_dir)
    except KeyStoreError as exc:
        print("error:", exc)
        sys.exit(3)
    print("kind:", store.kind)
    print("describe:", store.describe())
    if action == "write":
        store.write(sys.stdin.read().strip())
    elif action == "read":
        print("matches:", store.read() == sys.stdin.read().strip())
    """
)


def _run_store(
    env: dict[str, str], mode: str, state_dir: Path, action: str, key: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT, mode, str(state_dir), action],
        input=key,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_auto_without_dbus_uses_file(tmp_path: Path) -> None:
    env = _no_dbus_env(tmp_path)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)

    result = _run_store(env, "auto", state_dir, "write", SAMPLE_KEY)

    assert result.returncode == 0, result.stderr
    assert "kind: file" in result.stdout
    assert f"describe: file {state_dir / 'node-key'} (no keyring backend: " in (
        result.stdout
    )
    # keyring's Secret Service backend names the missing D-Bus session.
    assert "DBUS_SESSION_BUS_ADDRESS" in result.stdout
    assert FileStore(state_dir).read() == SAMPLE_KEY


def test_keyring_mode_without_backend_fails(tmp_path: Path) -> None:
    result = _run_store(_no_dbus_env(tmp_path), "keyring", tmp_path, "describe")

    assert result.returncode == 3
    assert "no keyring backend works" in result.stdout
    assert "FLEETMEND_KEY_STORE=file" in result.stdout
    assert not (tmp_path / "node-key").exists()


SECRET_SERVICE_TOOLS = ("dbus-run-session", "gnome-keyring-daemon", "secret-tool")

# Starts gnome-keyring-daemon in the D-Bus session that dbus-run-session made.
# --unlock with a password on stdin creates the login collection unlocked in
# the test's HOME. With an empty password, gnome-keyring 42.1 requests a prompt
# for a new collection instead, which fails without a display.
SESSION_SCRIPT = """
set -eu
printf 'test-password' \
    | gnome-keyring-daemon --unlock --components=secrets --daemonize >/dev/null
"$@"
"""


def _in_secret_service(
    tmp_path: Path, *command: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run command in a new D-Bus session with gnome-keyring's Secret Service."""
    env = _no_dbus_env(tmp_path)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return subprocess.run(
        ["dbus-run-session", "--", "sh", "-c", SESSION_SCRIPT, "sh", *command],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.fixture
def secret_service() -> None:
    missing = [tool for tool in SECRET_SERVICE_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (Debian packages dbus, "
            "gnome-keyring, libsecret-tools)"
        )


KEYRING_ROUND_TRIP = textwrap.dedent(
    """
    import subprocess, sys
    from pathlib import Path
    from agent.keystore import KEYRING_SERVICE, keyring_username, open_key_store

    state_dir, key = Path(sys.argv[1]), sys.stdin.read().strip()
    store = open_key_store("auto", state_dir)
    print("describe:", store.describe())
    store.write(key)
    print("read back:", store.read() == key)
    lookup = subprocess.run(
        ["secret-tool", "lookup", "service", KEYRING_SERVICE,
         "username", keyring_username(state_dir)],
        capture_output=True, text=True, check=False,
    )
    print("secret-tool:", lookup.stdout.strip() == key)
    """
)


@pytest.mark.usefixtures("secret_service")
def test_keyring_in_secret_service(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)

    result = _in_secret_service(
        tmp_path,
        sys.executable,
        "-c",
        KEYRING_ROUND_TRIP,
        str(state_dir),
        stdin=SAMPLE_KEY,
    )

    assert result.returncode == 0, result.stderr
    assert "describe: keyring (SecretService Keyring)" in result.stdout
    assert "read back: True" in result.stdout
    assert "secret-tool: True" in result.stdout
    assert not (state_dir / "node-key").exists()
    assert SAMPLE_KEY not in result.stdout + result.stderr


LOCKED_COLLECTION = textwrap.dedent(
    """
    import secretstorage
    from pathlib import Path
    from agent.keystore import open_key_store

    connection = secretstorage.dbus_init()
    secretstorage.get_default_collection(connection).lock()
    connection.close()
    print("describe:", open_key_store("auto", Path("state")).describe())
    """
)


@pytest.mark.usefixtures("secret_service")
def test_locked_collection_uses_file(tmp_path: Path) -> None:
    result = _in_secret_service(tmp_path, sys.executable, "-c", LOCKED_COLLECTION)

    assert result.returncode == 0, result.stderr
    assert "describe: file state/node-key (no keyring backend: " in result.stdout
    assert "collection is locked" in result.stdout


def test_keyring_username_names_state_dir(tmp_path: Path) -> None:
    assert keyring_username(tmp_path) == f"node-key {tmp_path}"
    assert KEYRING_SERVICE == "fleetmend"
