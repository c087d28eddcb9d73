"""Host facts on Linux: OS release, DMI model and serial, memory, boot time, volumes.

Files are read below a root folder so that tests can point the probe at a
fixture tree. Hostname, kernel, architecture and volumes always come from the
running system.
"""

from __future__ import annotations

import logging
import platform
import re
import shlex
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

import psutil

from agent.probes import ProbeError, ProbeErrorKind

logger = logging.getLogger(__name__)

__all__ = [
    "DmiFacts",
    "HostReading",
    "OsRelease",
    "Partition",
    "VolumeReading",
    "parse_boot_time",
    "parse_dmi",
    "parse_memory_total",
    "parse_os_release",
    "read_dmi",
    "read_host",
    "read_volumes",
    "select_volumes",
]

# os-release(5) puts /etc/os-release first and /usr/lib/os-release, the copy that
# distributions ship, second.
OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
DMI_DIR = "sys/class/dmi/id"
DMI_FILES = (
    "sys_vendor",
    "board_vendor",
    "bios_vendor",
    "product_name",
    "product_version",
    "product_serial",
)

# Strings that firmware vendors leave in DMI fields they did not fill in,
# compared in lower case.
DMI_PLACEHOLDERS = frozenset(
    {
        "",
        "0123456789",
        "default string",
        "invalid",
        "n/a",
        "none",
        "not applicable",
        "not available",
        "not defined",
        "not specified",
        "o.e.m.",
        "oem",
        "system manufacturer",
        "system product name",
        "system serial number",
        "system version",
        "to be filled by o.e.m.",
        "type1productconfigid",
        "unknown",
    }
)

# Lenovo firmware puts the machine type and model code (for example
# "20SNZ5GNUS": four characters of type, six of model) in product_name and the
# marketing name ("ThinkPad P17 Gen 1") in product_version.
_LENOVO_MACHINE_TYPE = re.compile(r"[0-9A-Z]{10}")

# Filesystems that hold no user files or cannot fill up: kernel pseudo
# filesystems, memory-backed ones, container layers and read-only images.
SKIPPED_FILESYSTEMS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "erofs",
        "fusectl",
        "hugetlbfs",
        "iso9660",
        "mqueue",
        "nsfs",
        "overlay",
        "proc",
        "pstore",
        "ramfs",
        "rpc_pipefs",
        "securityfs",
        "squashfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)
NETWORK_FILESYSTEMS = frozenset(
    {"9p", "afs", "ceph", "cifs", "glusterfs", "nfs", "nfs4", "smb3", "smbfs"}
)

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_T = TypeVar("_T")


@dataclass(frozen=True)
class OsRelease:
    name: str
    # Empty on rolling releases such as Arch Linux, which set no VERSION_ID.
    version: str


@dataclass(frozen=True)
class DmiFacts:
    manufacturer: str
    model: str
    # Empty when product_serial is unreadable, which it is for non-root users.
    serial_number: str


@dataclass(frozen=True)
class VolumeReading:
    mount_point: str
    device: str
    filesystem: str
    total_bytes: int
    # Space available to unprivileged users, as df reports it.
    free_bytes: int


@dataclass
class HostReading:
    hostname: str
    os_name: str
    os_version: str
    kernel_version: str
    architecture: str
    manufacturer: str
    model: str
    serial_number: str
    boot_time: datetime | None
    memory_bytes: int | None
    volumes: list[VolumeReading] = field(default_factory=list)
    errors: list[ProbeError] = field(default_factory=list)


class Partition(Protocol):
    """A mounted filesystem as psutil.disk_partitions() returns it."""

    @property
    def device(self) -> str: ...

    @property
    def mountpoint(self) -> str: ...

    @property
    def fstype(self) -> str: ...

    @property
    def opts(self) -> str: ...


def parse_os_release(
    text: str, source: str = "/etc/os-release"
) -> OsRelease | ProbeError:
    """Parse os-release(5) content into the OS name and version.

    The name is NAME, else PRETTY_NAME, else "Linux" (the default that
    os-release(5) gives). The version is VERSION_ID. Lines that are not a valid
    assignment are skipped, but content without a single one is unparsed.
    """
    fields = _parse_assignments(text)
    if not fields:
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNPARSED,
            reason="no KEY=value assignment found",
        )
    name = fields.get("NAME") or fields.get("PRETTY_NAME") or "Linux"
    return OsRelease(name=name, version=fields.get("VERSION_ID", ""))


def parse_dmi(values: Mapping[str, str]) -> DmiFacts:
    """Pick manufacturer, model and serial number from DMI id values.

    ``values`` maps file names under /sys/class/dmi/id to their stripped content
    and leaves out files that were missing or unreadable. The model is
    product_name, except where that is a placeholder or a Lenovo machine type
    code: then it is product_version, if that is meaningful.
    """
    manufacturer = _meaningful(values.get("sys_vendor")) or _meaningful(
        values.get("board_vendor")
    )
    name = _meaningful(values.get("product_name"))
    version = _meaningful(values.get("product_version"))

    model = name
    if version and (not name or _is_lenovo_machine_type(values, name)):
        model = version

    return DmiFacts(
        manufacturer=manufacturer,
        model=model,
        serial_number=_meaningful(values.get("product_serial")),
    )


def parse_memory_total(text: str, source: str = "/proc/meminfo") -> int | ProbeError:
    """Return MemTotal from /proc/meminfo content in bytes.

    The kernel prints the value in KiB with the unit "kB".
    """
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key != "MemTotal":
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1] == "kB":
            return int(parts[0]) * 1024
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNPARSED,
            reason=f"unexpected MemTotal line {line!r}",
        )
    return ProbeError(
        source=source, kind=ProbeErrorKind.UNPARSED, reason="no MemTotal line"
    )


def parse_boot_time(text: str, source: str = "/proc/stat") -> datetime | ProbeError:
    """Return the boot time from the btime line of /proc/stat content.

    btime is in seconds since the epoch, which is where psutil.boot_time() takes
    it from as well.
    """
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "btime":
            continue
        if len(parts) == 2 and parts[1].isdigit():
            return datetime.fromtimestamp(int(parts[1]), tz=UTC)
        return ProbeError(
            source=source,
            kind=ProbeErrorKind.UNPARSED,
            reason=f"unexpected btime line {line!r}",
        )
    return ProbeError(
        source=source, kind=ProbeErrorKind.UNPARSED, reason="no btime line"
    )


def select_volumes(partitions: Iterable[Partition]) -> list[Partition]:
    """Keep the local filesystems that hold user files, one per device.

    Pseudo, memory-backed, network and user-space (fuse.*) filesystems are
    dropped, and so are read-only loop mounts such as snap packages. A device
    mounted more than once (bind mounts, btrfs subvolumes) is kept at its first
    mount point, because all its mount points share the same free space.
    """
    kept: list[Partition] = []
    seen_devices: set[str] = set()
    for partition in partitions:
        if not _is_user_volume(partition) or partition.device in seen_devices:
            continue
        seen_devices.add(partition.device)
        kept.append(partition)
    return kept


def read_volumes(errors: list[ProbeError]) -> list[VolumeReading]:
    """Measure size and free space of each volume that select_volumes() keeps.

    A volume that cannot be measured adds an unreadable error to ``errors``.
    """
    volumes: list[VolumeReading] = []
    for partition in select_volumes(psutil.disk_partitions(all=False)):
        try:
            usage = psutil.disk_usage(partition.mountpoint)
        except OSError as error:
            errors.append(
                ProbeError(
                    source=partition.mountpoint,
                    kind=ProbeErrorKind.UNREADABLE,
                    reason=f"cannot measure free space: {error.strerror}",
                )
            )
            continue
        volumes.append(
            VolumeReading(
                mount_point=partition.mountpoint,
                device=partition.device,
                filesystem=partition.fstype,
                total_bytes=usage.total,
                free_bytes=usage.free,
            )
        )
    return volumes


def read_dmi(dmi_dir: Path) -> dict[str, str]:
    """Read the DMI id files that parse_dmi() uses, leaving out unreadable ones.

    product_serial is readable by root only, and machines without DMI (many ARM
    laptops, some virtual machines) have no such folder at all.
    """
    values: dict[str, str] = {}
    for name in DMI_FILES:
        try:
            values[name] = (
                (dmi_dir / name).read_text(encoding="utf-8", errors="replace").strip()
            )
        except OSError as error:
            logger.debug("cannot read %s: %s", dmi_dir / name, error)
    return values


def read_host(root: Path = Path("/")) -> HostReading:
    """Read the host facts, taking os-release, DMI and /proc files below ``root``."""
    errors: list[ProbeError] = []
    os_release = _read_os_release(root, errors)
    # NOTE: machines without DMI get an empty manufacturer and model. The device
    # tree model (/proc/device-tree/model) of ARM laptops is not read.
    dmi = parse_dmi(read_dmi(root / DMI_DIR))
    boot_time = _read_and_parse(root / "proc/stat", parse_boot_time, errors)
    memory_bytes = _read_and_parse(root / "proc/meminfo", parse_memory_total, errors)
    volumes = read_volumes(errors)

    return HostReading(
        hostname=socket.gethostname(),
        os_name=os_release.name,
        os_version=os_release.version,
        kernel_version=platform.release(),
        architecture=platform.machine(),
        manufacturer=dmi.manufacturer,
        model=dmi.model,
        serial_number=dmi.serial_number,
        boot_time=boot_time,
        memory_bytes=memory_bytes,
        volumes=volumes,
        errors=errors,
    )


def _parse_assignments(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, separator, raw_value = stripped.partition("=")
        if not separator or not _KEY.fullmatch(key):
            logger.debug("skipping os-release line %r", line)
            continue
        # Values follow shell quoting rules: double or single quotes, and
        # backslash escapes inside double quotes.
        try:
            words = shlex.split(raw_value)
        except ValueError:
            logger.debug("skipping os-release line %r", line)
            continue
        if len(words) > 1:
            logger.debug("skipping os-release line %r", line)
            continue
        fields[key] = words[0] if words else ""
    return fields


def _meaningful(value: str | None) -> str:
    if value is None or value.lower() in DMI_PLACEHOLDERS:
        return ""
    return value


def _is_lenovo_machine_type(values: Mapping[str, str], product_name: str) -> bool:
    vendors = (
        values.get(name, "") for name in ("sys_vendor", "board_vendor", "bios_vendor")
    )
    is_lenovo = any(vendor.upper() == "LENOVO" for vendor in vendors)
    return is_lenovo and _LENOVO_MACHINE_TYPE.fullmatch(product_name) is not None


def _is_user_volume(partition: Partition) -> bool:
    filesystem = partition.fstype
    if filesystem in SKIPPED_FILESYSTEMS or filesystem in NETWORK_FILESYSTEMS:
        return False
    # fuse.* are user-space mounts such as sshfs or the desktop's gvfs. fuseblk is
    # kept, because it is a FUSE driver on a local block device (NTFS, exFAT).
    if filesystem.startswith("fuse.") or filesystem == "fuse":
        return False
    if not partition.device or partition.device == "none":
        return False
    read_only = "ro" in partition.opts.split(",")
    return not (read_only and partition.device.startswith("/dev/loop"))


def _read_os_release(root: Path, errors: list[ProbeError]) -> OsRelease:
    for relative in OS_RELEASE_PATHS:
        path = root / relative
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as error:
            errors.append(_unreadable(path, error))
            return OsRelease(name="", version="")
        parsed = parse_os_release(text, str(path))
        if isinstance(parsed, ProbeError):
            errors.append(parsed)
            return OsRelease(name="", version="")
        return parsed

    errors.append(
        ProbeError(
            source=str(root / OS_RELEASE_PATHS[0]),
            kind=ProbeErrorKind.UNREADABLE,
            reason="neither /etc/os-release nor /usr/lib/os-release exists",
        )
    )
    return OsRelease(name="", version="")


def _read_and_parse(
    path: Path,
    parse: Callable[[str, str], _T | ProbeError],
    errors: list[ProbeError],
) -> _T | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        errors.append(_unreadable(path, error))
        return None
    parsed = parse(text, str(path))
    if isinstance(parsed, ProbeError):
        errors.append(parsed)
        return None
    return parsed


def _unreadable(path: Path, error: OSError) -> ProbeError:
    return ProbeError(
        source=str(path),
        kind=ProbeErrorKind.UNREADABLE,
        reason=f"cannot read: {error.strerror or error}",
    )
