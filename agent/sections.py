"""Read each report section from its probe and convert it to its wire message.

The probes are imported where they are used, so that a probe that cannot load
on this platform fails only its own section.

The disk probe runs in a child Python process (``python -m agent.sections
disks``). In the long-running agent, pySMART and what it imports (chardet,
humanfriendly) would stay loaded for a probe that runs every 6 hours by
default, and cost about 2.8 MiB of RSS (bench/agent_process.py). The child
prints the section and the probe's log records, and the agent logs those
records under their own logger names.

NOTE: a frozen build of the agent, which cannot run ``python -m``, needs its
own way to start that child.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from agent.config import AgentConfig
from fleetmend.v1 import report_pb2

if TYPE_CHECKING:
    from agent.usage.catalog import Catalog
    from agent.usage.sampler import HostResolver
    from agent.usage.tracker import UsageTracker

log = logging.getLogger(__name__)

# Bound on the whole disk probe process. Each smartctl call in it has its own
# 60 s timeout (agent.probes._disk_smart), and a disk takes one to three calls.
# NOTE: a machine with more than three disks that all time out exceeds it, and
# then the section keeps its previous reading.
DISK_PROCESS_TIMEOUT_SECONDS = 600.0

# The folder that contains the agent package.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class DiskProcessError(Exception):
    """The disk probe process failed or printed something other than a section."""


@dataclass(frozen=True)
class SectionSource:
    """A report section, the interval setting that paces it and how to read it."""

    section: str
    interval: str
    read: Callable[[], Message]


def read_host() -> report_pb2.HostFacts:
    from agent.probes.host import read_host as probe
    from agent.wire.host import host_to_proto

    return host_to_proto(probe())


def read_disks(
    sys_root: Path = Path("/sys"),
    dev_root: Path = Path("/dev"),
    *,
    python: str = sys.executable,
    timeout_seconds: float = DISK_PROCESS_TIMEOUT_SECONDS,
) -> report_pb2.DiskSection:
    """Run the disk probe in a child Python process and return its section.

    The child inherits the environment, so smartctl is looked up on the same
    PATH. Its log records at or above the level of the ``agent.probes`` logger
    are logged here again, under their own logger names. Raises
    DiskProcessError when the child cannot be started, exits with an error,
    times out or prints no valid section.
    """
    level = logging.getLogger("agent.probes").getEffectiveLevel()
    argv = [
        python,
        "-m",
        "agent.sections",
        "disks",
        "--sys-root",
        str(sys_root.absolute()),
        "--dev-root",
        str(dev_root.absolute()),
        "--log-level",
        str(level),
    ]
    try:
        # python -m puts the working directory first on sys.path, so the child
        # runs in the folder that contains this agent package and imports it.
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=_PACKAGE_PARENT,
            timeout=timeout_seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DiskProcessError(
            f"the disk probe process did not finish within {timeout_seconds:g} s "
            "and was killed"
        ) from None
    except OSError as exc:
        raise DiskProcessError(
            f"the disk probe process could not be started with {python}: "
            f"{exc.strerror or exc}"
        ) from None

    if completed.returncode != 0:
        stderr = completed.stderr.decode("utf-8", errors="replace").strip()
        last_line = stderr.splitlines()[-1] if stderr else "no output on stderr"
        raise DiskProcessError(
            f"the disk probe process exited with status {completed.returncode}: "
            f"{last_line}"
        )
    return _parse_disk_output(completed.stdout)


def _parse_disk_output(stdout: bytes) -> report_pb2.DiskSection:
    try:
        output = json.loads(stdout)
        section = report_pb2.DiskSection.FromString(base64.b64decode(output["section"]))
        records = [
            (str(name), int(level), str(message))
            for name, level, message in output["logs"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise DiskProcessError(
            f"the disk probe process printed no valid section "
            f"({type(exc).__name__}: {exc}); its output starts with {stdout[:80]!r}"
        ) from None
    for name, level, message in records:
        logging.getLogger(name).log(level, "%s", message)
    return section


def read_batteries() -> report_pb2.BatterySection:
    from agent.probes.battery import read_batteries as probe
    from agent.wire.battery import batteries_to_proto

    return batteries_to_proto(probe())


def read_credentials() -> report_pb2.CredentialSection:
    from agent.probes.credentials import read_credentials as probe
    from agent.wire.credentials import credentials_to_proto

    return credentials_to_proto(probe())


class UsageSource:
    """Sample catalogued applications and summarize the 28-day history.

    With usage collection switched off, nothing is sampled or stored, and the
    section is sent with enabled set to false. With resolve_hosts off, only
    process names are matched and no catalog host name is looked up in DNS.
    """

    def __init__(
        self,
        enabled: bool,
        catalogs: list[Path],
        db_path: Path,
        resolve_hosts: bool = True,
    ) -> None:
        self.enabled = enabled
        self._catalog_paths = catalogs
        self._db_path = db_path
        self._resolve_hosts = resolve_hosts
        self._catalog: Catalog | None = None
        self._tracker: UsageTracker | None = None
        self._resolver: HostResolver | None = None

    def catalog(self) -> Catalog:
        """Load the catalog once; CatalogError names the bad file and entry."""
        if self._catalog is None:
            from agent.usage.catalog import load_catalog

            self._catalog = load_catalog(self._catalog_paths)
        return self._catalog

    def _tracker_for_writing(self) -> UsageTracker:
        if self._tracker is None:
            from agent.usage.sampler import HostResolver
            from agent.usage.tracker import UsageTracker

            self._tracker = UsageTracker(self._db_path)
            if self._resolve_hosts:
                self._resolver = HostResolver()
        return self._tracker

    def sample(self, minutes: int) -> None:
        """Record which catalogued applications run now, as minutes of use."""
        if not self.enabled:
            return
        from agent.usage.sampler import sample_running_apps

        catalog = self.catalog()
        tracker = self._tracker_for_writing()
        running = sample_running_apps(catalog, self._resolver)
        tracker.record(running, minutes=minutes)

    def read(self) -> report_pb2.UsageSection:
        """Return the usage section; a history not yet created reads as empty."""
        from agent.wire.usage import usage_to_proto

        if not self.enabled:
            return usage_to_proto(None, enabled=False)
        self.catalog()
        if self._tracker is None and not self._db_path.exists():
            return usage_to_proto(None, enabled=True)
        tracker = self._tracker_for_writing()
        return usage_to_proto(tracker.summary(), enabled=True)


def probe_sources() -> list[SectionSource]:
    """Return the probe-backed sections in the order they are read at start."""
    return [
        SectionSource("host", "host", read_host),
        SectionSource("batteries", "battery", read_batteries),
        SectionSource("credentials", "credentials", read_credentials),
        SectionSource("disks", "disks", read_disks),
    ]


def usage_source(config: AgentConfig) -> UsageSource:
    return UsageSource(
        enabled=config.usage_enabled,
        catalogs=config.usage_catalogs,
        db_path=config.state_dir / "usage.db",
        resolve_hosts=config.usage_resolve_hosts,
    )


def read_safely(source: SectionSource) -> Message | None:
    """Run one probe; a probe that raises is logged with its traceback and yields None.

    The agent keeps the previous reading of that section, and keeps running.
    """
    try:
        return source.read()
    except Exception:
        log.exception(
            "probe for section %s failed; keeping its previous reading", source.section
        )
        return None


class _RecordList(logging.Handler):
    """Keeps each record as (logger name, level, message with any traceback)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, str]] = []
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, self.format(record)))


def _disk_process_main(argv: Sequence[str]) -> int:
    """Print the disk section and the probe's log records as one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m agent.sections")
    parser.add_argument("section", choices=["disks"])
    parser.add_argument("--sys-root", type=Path, default=Path("/sys"))
    parser.add_argument("--dev-root", type=Path, default=Path("/dev"))
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    args = parser.parse_args(argv)

    # The root logger also collects the records of pySMART's own loggers.
    handler = _RecordList()
    root_log = logging.getLogger()
    root_log.addHandler(handler)
    root_log.setLevel(args.log_level)

    from agent.probes.disk import read_disks as probe
    from agent.wire.disk import disks_to_proto

    section = disks_to_proto(probe(sys_root=args.sys_root, dev_root=args.dev_root))
    output = {
        "section": base64.b64encode(section.SerializeToString()).decode("ascii"),
        "logs": handler.records,
    }
    sys.stdout.write(json.dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(_disk_process_main(sys.argv[1:]))
