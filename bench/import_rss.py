"""Measure the RSS that importing each heavy dependency of the agent adds.

Each figure comes from a fresh Python process, which reads VmRSS, RssAnon and
RssFile from /proc/self/status before and after the import (Linux only). The
"alone" column imports the module into a bare interpreter. The "on the agent"
column imports it after the modules that ``fleetmend-agent run`` loads at start
(agent.cli and agent.runtime), which is what it costs the running agent.

    .venv/bin/python -m bench.import_rss
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# The run command's own modules first, then the dependencies one by one.
MODULES = (
    "agent.cli,agent.runtime",
    "grpc",
    "fleetmend.v1.agent_pb2_grpc,fleetmend.v1.report_pb2",
    "google.protobuf.json_format",
    "psutil",
    "pySMART",
    "chardet",
    "humanfriendly",
    "keyring",
    "keyring.backends.SecretService",
    "secretstorage",
    "jeepney",
    "cryptography.hazmat.primitives.ciphers",
    "platformdirs",
    "sqlite3",
    "tomllib",
    "asyncio",
    "ssl",
    "ctypes",
)

AGENT_BASE = "agent.cli,agent.runtime"

MEASURE = """
import importlib, json, sys

def status():
    fields = {}
    with open("/proc/self/status") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return fields

for name in filter(None, sys.argv[1].split(",")):
    importlib.import_module(name)
before = status()
for name in sys.argv[2].split(","):
    importlib.import_module(name)
after = status()
print(json.dumps({"before": before, "after": after}))
"""


def measure(base: str, modules: str) -> dict[str, dict[str, float]]:
    """Return /proc/self/status sizes in MiB before and after importing modules."""
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, base, modules],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, float]] = json.loads(completed.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()

    bare = measure("", "sys")["after"]
    print(f"bare interpreter: VmRSS {bare['VmRSS']:.1f} MiB")
    print(f"{'module':55} {'alone':>8} {'on the agent':>14}  (MiB of VmRSS added)")
    for modules in MODULES:
        alone = measure("", modules)
        added_alone = alone["after"]["VmRSS"] - alone["before"]["VmRSS"]
        if modules == AGENT_BASE:
            on_agent = "-"
        else:
            onto = measure(AGENT_BASE, modules)
            added = onto["after"]["VmRSS"] - onto["before"]["VmRSS"]
            anonymous = onto["after"]["RssAnon"] - onto["before"]["RssAnon"]
            on_agent = f"{added:+.1f} ({anonymous:+.1f} anon)"
        print(f"{modules:55} {added_alone:+8.1f} {on_agent:>14}")


if __name__ == "__main__":
    main()
