"""read_node_key: a keyring-stored key read by a child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.keystore import FileStore, KeyStoreError, read_node_key
from tests.agent.test_keystore import (
    SAMPLE_KEY,
    _in_secret_service,
    _no_dbus_env,
    secret_service,  # noqa: F401 - the fixture of the Secret Service tests
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Stores the key in the keyring from another process, then reads it with
# read_node_key and reports whether this process loaded keyring's modules.
CHILD_READ = textwrap.dedent(
    """
    import subprocess, sys
    from pathlib import Path

    state_dir, key = sys.argv[1], sys.stdin.read().strip()
    store = (
        "import sys; from pathlib import Path; "
        "from agent.keystore import open_key_store; "
        "open_key_store('keyring', Path(sys.argv[1])).write(sys.stdin.read())"
    )
    subprocess.run(
        [sys.executable, "-c", store, state_dir], input=key, text=True, check=True
    )

    from agent.keystore import read_node_key
    print("read back:", read_node_key("keyring", Path(state_dir)) == key)
    print("keyring loaded:", "keyring" in sys.modules)
    print("secretstorage loaded:", "secretstorage" in sys.modules)
    """
)

NO_BACKEND_READ = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.keystore import KeyStoreError, read_node_key

    try:
        read_node_key("keyring", Path(sys.argv[1]))
    except KeyStoreError as exc:
        print("error:", exc)
    print("keyring loaded:", "keyring" in sys.modules)
    """
)


def write_fake_python(path: Path, body: str) -> str:
    """Write an executable shell script to run in place of the Python interpreter."""
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


def test_file_kind_read_here(tmp_path: Path) -> None:
    FileStore(tmp_path).write(SAMPLE_KEY)

    assert read_node_key("file", tmp_path, python="/nonexistent/python") == SAMPLE_KEY


def test_file_kind_missing_key(tmp_path: Path) -> None:
    assert read_node_key("file", tmp_path) is None


def test_unknown_kind_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="unknown node key store 'vault'"):
        read_node_key("vault", tmp_path)


def test_no_backend_error_from_child(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_BACKEND_READ, str(tmp_path)],
        env=_no_dbus_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )

    assert result.returncode == 0, result.stderr
    assert "error: the node key was stored in the keyring at enrollment" in (
        result.stdout
    )
    assert "DBUS_SESSION_BUS_ADDRESS" in result.stdout
    assert "keyring loaded: False" in result.stdout


@pytest.mark.usefixtures("secret_service")
def test_keyring_key_read_by_child(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)

    result = _in_secret_service(
        tmp_path, sys.executable, "-c", CHILD_READ, str(state_dir), stdin=SAMPLE_KEY
    )

    assert result.returncode == 0, result.stderr
    assert "read back: True" in result.stdout
    assert "keyring loaded: False" in result.stdout
    assert "secretstorage loaded: False" in result.stdout
    assert SAMPLE_KEY not in result.stdout + result.stderr


@pytest.mark.usefixtures("secret_service")
def test_keyring_without_key_is_none(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.keystore import read_node_key\n"
        "print('key:', read_node_key('keyring', Path(sys.argv[1])))\n"
    )

    result = _in_secret_service(tmp_path, sys.executable, "-c", script, str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "key: None" in result.stdout


def test_child_crash_names_status(tmp_path: Path) -> None:
    python = write_fake_python(
        tmp_path / "python", 'echo "Segmentation fault" >&2\nexit 5'
    )

    with pytest.raises(KeyStoreError) as raised:
        read_node_key("keyring", tmp_path, python=python)

    assert "exited with status 5: Segmentation fault" in str(raised.value)


def test_child_timeout_named(tmp_path: Path) -> None:
    python = write_fake_python(tmp_path / "python", "exec sleep 60")

    with pytest.raises(KeyStoreError) as raised:
        read_node_key("keyring", tmp_path, python=python, timeout_seconds=0.5)

    assert "did not finish within 0.5 s" in str(raised.value)


def test_child_not_startable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-python")

    with pytest.raises(KeyStoreError) as raised:
        read_node_key("keyring", tmp_path, python=missing)

    assert f"could not be started with {missing}" in str(raised.value)
