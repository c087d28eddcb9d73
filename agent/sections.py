"""Read each report section from its probe and convert it to its wire message.

The probes are imported where they are used, so that a probe that cannot load
on this platform fails only its own section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
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


def read_disks() -> report_pb2.DiskSection:
    from agent.probes.disk import read_disks as probe
    from agent.wire.disk import disks_to_proto

    return disks_to_proto(probe())


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
        return usage_to_proto(
            tracker.summary(datetime.now().astimezone()), enabled=True
        )


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
