"""Measure what reading a keyring-stored node key adds to the agent's RSS.

Starts a D-Bus session with gnome-keyring's Secret Service in a temporary HOME
and stores a node key in it. Then two fresh Python processes import the modules
of ``fleetmend-agent run`` and read the key. One reads it in process
(``store_of_kind("keyring", ...).read()``), the other through
``read_node_key``, which reads it in a child process. Each prints its VmRSS
before and after the read. Needs the Debian packages dbus, gnome-keyring and
libsecret-tools.

    .venv/bin/python -m bench.keyring_read
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TOOLS = ("dbus-run-session", "gnome-keyring-daemon", "secret-tool")

# Stores the key, then runs each measuring process in the same session.
# gnome-keyring-daemon --unlock with a password on stdin creates an unlocked
# login collection in the temporary HOME without a prompt.
SESSION_SCRIPT = """
set -eu
printf 'bench-password' \
    | gnome-keyring-daemon --unlock --components=secrets --daemonize >/dev/null
"$PYTHON" -c "$STORE" "$STATE_DIR"
"$PYTHON" -c "$MEASURE" in-process "$STATE_DIR"
"$PYTHON" -c "$MEASURE" child "$STATE_DIR"
"""

STORE = textwrap.dedent(
    """
    import secrets, sys
    from pathlib import Path
    from agent.keystore import open_key_store

    store = open_key_store("keyring", Path(sys.argv[1]))
    store.write("fmk1." + secrets.token_hex(8) + "." + secrets.token_urlsafe(32))
    print("stored in", store.describe())
    """
)

MEASURE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import agent.cli, agent.runtime
    from agent.keystore import read_node_key, store_of_kind

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    way, state_dir = sys.argv[1], Path(sys.argv[2])
    before = rss_mib()
    if way == "in-process":
        key = store_of_kind("keyring", state_dir).read()
    else:
        key = read_node_key("keyring", state_dir)
    after = rss_mib()
    loaded = sorted(
        name for name in ("keyring", "secretstorage", "jeepney", "cryptography")
        if name in sys.modules
    )
    print(
        f"{way}: key read {key is not None}, VmRSS {before:.1f} MiB before the "
        f"read, {after:.1f} MiB after (+{after - before:.1f}); "
        f"loaded: {', '.join(loaded) or 'none of keyring, secretstorage, ...'}"
    )
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"{', '.join(missing)} not found; install the Debian packages dbus, "
            "gnome-keyring and libsecret-tools"
        )

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        runtime = Path(tmp) / "runtime"
        state_dir = Path(tmp) / "state"
        for folder in (home, runtime, state_dir):
            folder.mkdir(mode=0o700)
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("DBUS_", "XDG_", "PYTHON_KEYRING"))
        }
        env.update(
            HOME=str(home),
            XDG_RUNTIME_DIR=str(runtime),
            PYTHON=sys.executable,
            STORE=STORE,
            MEASURE=MEASURE,
            STATE_DIR=str(state_dir),
        )
        subprocess.run(
            ["dbus-run-session", "--", "sh", "-c", SESSION_SCRIPT],
            env=env,
            check=True,
            timeout=300,
        )


if __name__ == "__main__":
    main()
