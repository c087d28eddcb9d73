"""Host probe on recorded os-release and DMI files, and against this machine."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from agent.probes import ProbeError, ProbeErrorKind
from agent.probes.host import (
    HostReading,
    OsRelease,
    VolumeReading,
    parse_boot_time,
    parse_dmi,
    parse_memory_total,
    parse_os_release,
    read_host,
    select_volumes,
)
from agent.wire.host import FREE_BYTES_STEP, host_to_proto
from fleetmend.v1 import report_pb2

DATA = Path(__file__).parents[1] / "data" / "host"

_CAT_PROMPT = re.compile(r"\$ cat /sys/(?:class|devices/virtual)/dmi/id/(\w+)\s*")
# Kernel dmi-id file for each dmidecode field, by DMI structure type.
_DMIDECODE_FILES = {
    ("BIOS Information", "Vendor"): "bios_vendor",
    ("System Information", "Manufacturer"): "sys_vendor",
    ("System Information", "Product Name"): "product_name",
    ("System Information", "Version"): "product_version",
    ("System Information", "Serial Number"): "product_serial",
    ("Base Board Information", "Manufacturer"): "board_vendor",
}


class Mount(NamedTuple):
    device: str
    mountpoint: str
    fstype: str
    opts: str


def recording(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def dmi_from_name_value_dump(text: str) -> dict[str, str]:
    """Read a `for f in *; do echo -n "$f="; cat "$f"; done` dump.

    Where cat failed, the dump shows its error message in place of the value.
    Those files were unreadable and are left out.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, separator, value = line.partition("=")
        if separator and re.fullmatch(r"\w+", name) and not value.startswith("cat: "):
            values[name] = value.strip()
    return values


def dmi_from_cat_session(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    lines = text.splitlines()
    for prompt, value in zip(lines, lines[1:], strict=False):
        if match := _CAT_PROMPT.fullmatch(prompt):
            values[match[1]] = value.strip()
    return values


def dmi_from_dmidecode(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if line and not line.startswith(("\t", "Handle ", "#")):
            section = line
            continue
        key, _, value = line.strip().partition(": ")
        if name := _DMIDECODE_FILES.get((section, key)):
            values[name] = value.strip()
    return values


def write_tree(root: Path, files: Mapping[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def c_locale_output(*argv: str) -> str:
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    return subprocess.run(
        argv, capture_output=True, text=True, env=environment, check=True
    ).stdout


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("os-release-arch-linux.txt", OsRelease("Arch Linux", "")),
        ("os-release-debian-13.txt", OsRelease("Debian GNU/Linux", "13")),
        ("os-release-fedora-42.txt", OsRelease("Fedora Linux", "42")),
        ("os-release-lmde-6.txt", OsRelease("LMDE", "6")),
        ("os-release-opensuse-leap-15.1.txt", OsRelease("openSUSE Leap", "15.1")),
        ("os-release-pop-os-20.04.txt", OsRelease("Pop!_OS", "20.04")),
        ("os-release-rhel-9.6.txt", OsRelease("Red Hat Enterprise Linux", "9.6")),
        ("os-release-ubuntu-24.04.txt", OsRelease("Ubuntu", "24.04")),
    ],
)
def test_os_release_recordings(name: str, expected: OsRelease) -> None:
    assert parse_os_release(recording(name)) == expected


def test_os_release_pretty_name_fallback() -> None:
    text = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_ID="13"\n'

    assert parse_os_release(text) == OsRelease("Debian GNU/Linux 13 (trixie)", "13")


def test_os_release_escapes_and_bad_lines() -> None:
    text = 'NAME="Acme \\"Field\\" OS"\nthis line is not an assignment\nVERSION_ID=7\n'

    assert parse_os_release(text) == OsRelease('Acme "Field" OS', "7")


def test_os_release_unknown_content() -> None:
    result = parse_os_release(recording("dmidecode-dell-latitude-3310-excerpt.txt"))

    assert isinstance(result, ProbeError)
    assert result.kind is ProbeErrorKind.UNPARSED
    assert result.source == "/etc/os-release"
    assert "KEY=value" in result.reason


def test_dmi_chromebook_nonroot() -> None:
    values = dmi_from_name_value_dump(
        recording("sysfs-dmi-id-all-files-chromebook-nonroot.txt")
    )

    facts = parse_dmi(values)

    assert "product_serial" not in values
    assert facts.manufacturer == "GOOGLE"
    assert facts.model == "Peppy"
    assert facts.serial_number == ""


def test_dmi_thinkpad_machine_type() -> None:
    values = dmi_from_cat_session(
        recording("sysfs-dmi-id-thinkpad-p17-product-name-vs-version.txt")
    )

    facts = parse_dmi(values)

    assert values["product_name"] == "20SNZ5GNUS"
    assert facts.model == "ThinkPad P17 Gen 1"


def test_dmi_macbook_product_name() -> None:
    values = dmi_from_cat_session(recording("sysfs-dmi-id-macbookpro-product-name.txt"))

    assert parse_dmi(values).model == "MacBookPro13,1"


@pytest.mark.parametrize(
    ("name", "manufacturer", "model"),
    [
        ("dmidecode-lenovo-thinkpad-a485-excerpt.txt", "LENOVO", "ThinkPad A485"),
        ("dmidecode-dell-latitude-3310-excerpt.txt", "Dell Inc.", "Latitude 3310"),
    ],
)
def test_dmi_from_dmidecode(name: str, manufacturer: str, model: str) -> None:
    facts = parse_dmi(dmi_from_dmidecode(recording(name)))

    assert facts.manufacturer == manufacturer
    assert facts.model == model


def test_dmi_placeholders_dropped() -> None:
    facts = parse_dmi(
        {
            "sys_vendor": "To Be Filled By O.E.M.",
            "board_vendor": "ASRock",
            "product_name": "To Be Filled By O.E.M.",
            "product_version": "Default string",
            "product_serial": "System Serial Number",
        }
    )

    assert facts.manufacturer == "ASRock"
    assert facts.model == ""
    assert facts.serial_number == ""


def test_memory_total_kib() -> None:
    assert parse_memory_total("MemTotal:       24683664 kB\nMemFree: 1 kB\n") == (
        24683664 * 1024
    )


def test_memory_total_unknown_unit() -> None:
    result = parse_memory_total("MemTotal:       24683664 MB\n")

    assert isinstance(result, ProbeError)
    assert result.kind is ProbeErrorKind.UNPARSED
    assert "'MemTotal:" in result.reason


def test_boot_time_btime() -> None:
    text = "cpu  1 2 3\nintr 5\nbtime 1796396686\nprocesses 9\n"

    assert parse_boot_time(text) == datetime.fromtimestamp(1796396686, tz=UTC)


def test_boot_time_missing() -> None:
    result = parse_boot_time("cpu  1 2 3\n")

    assert isinstance(result, ProbeError)
    assert result.reason == "no btime line"


def test_read_host_fixture_tree(tmp_path: Path) -> None:
    values = dmi_from_name_value_dump(
        recording("sysfs-dmi-id-all-files-chromebook-nonroot.txt")
    )
    write_tree(
        tmp_path,
        {
            "etc/os-release": recording("os-release-ubuntu-24.04.txt"),
            **{
                f"sys/class/dmi/id/{name}": f"{value}\n"
                for name, value in values.items()
            },
            "proc/meminfo": Path("/proc/meminfo").read_text(),
            "proc/stat": Path("/proc/stat").read_text(),
        },
    )
    # Root can read files of any mode, so a directory replaces the product_serial
    # file to make its read fail as it does for non-root users.
    (tmp_path / "sys/class/dmi/id/product_serial").mkdir()

    reading = read_host(tmp_path)

    assert reading.errors == []
    assert reading.os_name == "Ubuntu"
    assert reading.os_version == "24.04"
    assert reading.manufacturer == "GOOGLE"
    assert reading.model == "Peppy"
    assert reading.serial_number == ""
    assert reading.memory_bytes == psutil.virtual_memory().total
    assert reading.boot_time == datetime.fromtimestamp(psutil.boot_time(), tz=UTC)


def test_read_host_usr_lib_fallback(tmp_path: Path) -> None:
    write_tree(tmp_path, {"usr/lib/os-release": recording("os-release-fedora-42.txt")})

    reading = read_host(tmp_path)

    assert reading.os_name == "Fedora Linux"
    assert reading.os_version == "42"


def test_read_host_empty_tree(tmp_path: Path) -> None:
    reading = read_host(tmp_path)

    sources = {error.source: error.kind for error in reading.errors}
    assert sources == {
        str(tmp_path / "etc/os-release"): ProbeErrorKind.UNREADABLE,
        str(tmp_path / "proc/stat"): ProbeErrorKind.UNREADABLE,
        str(tmp_path / "proc/meminfo"): ProbeErrorKind.UNREADABLE,
    }
    assert reading.os_name == ""
    assert reading.manufacturer == ""
    assert reading.boot_time is None
    assert reading.memory_bytes is None


def test_read_host_unparsed_os_release(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {"etc/os-release": recording("dmidecode-lenovo-thinkpad-a485-excerpt.txt")},
    )

    reading = read_host(tmp_path)

    kinds = {error.source: error.kind for error in reading.errors}
    assert kinds[str(tmp_path / "etc/os-release")] is ProbeErrorKind.UNPARSED


def test_select_volumes_this_machine() -> None:
    kept = [
        part.mountpoint for part in select_volumes(psutil.disk_partitions(all=True))
    ]

    assert "/" in kept
    assert "/proc" not in kept
    assert "/sys" not in kept
    assert "/dev" not in kept
    assert "/dev/shm" not in kept


def test_select_volumes_laptop_mounts() -> None:
    """Mount table entries as a laptop's /proc/self/mounts lists them.

    The entries are written by the test in the kernel's format.
    """
    mounts = [
        Mount("/dev/nvme0n1p3", "/", "btrfs", "rw,relatime,ssd,subvol=/root"),
        Mount("/dev/nvme0n1p3", "/home", "btrfs", "rw,relatime,ssd,subvol=/home"),
        Mount("/dev/nvme0n1p1", "/boot/efi", "vfat", "rw,relatime,fmask=0077"),
        Mount("/dev/loop3", "/snap/core22/1380", "squashfs", "ro,nodev,relatime"),
        Mount("/dev/loop7", "/media/iso", "iso9660", "ro,relatime"),
        Mount("/dev/loop8", "/mnt/image", "ext4", "rw,relatime"),
        Mount("/dev/sdb1", "/media/alice/USB", "fuseblk", "rw,nosuid,nodev"),
        Mount("alice@nas:/", "/mnt/nas", "fuse.sshfs", "rw,nosuid,nodev"),
        Mount("nas:/export", "/mnt/export", "nfs4", "rw,relatime,vers=4.2"),
        Mount("overlay", "/var/lib/docker/overlay2/x/merged", "overlay", "rw"),
        Mount("tmpfs", "/run", "tmpfs", "rw,nosuid,nodev"),
    ]

    kept = [mount.mountpoint for mount in select_volumes(mounts)]

    assert kept == ["/", "/boot/efi", "/mnt/image", "/media/alice/USB"]


@pytest.mark.skipif(shutil.which("df") is None, reason="df is not installed")
def test_read_host_matches_this_machine() -> None:
    reading = read_host()

    assert reading.hostname == c_locale_output("hostname").strip()
    assert reading.kernel_version == c_locale_output("uname", "-r").strip()
    assert reading.architecture == c_locale_output("uname", "-m").strip()
    assert reading.memory_bytes == psutil.virtual_memory().total
    assert reading.boot_time is not None
    assert abs(reading.boot_time.timestamp() - psutil.boot_time()) < 1

    root_volumes = [volume for volume in reading.volumes if volume.mount_point == "/"]
    assert len(root_volumes) == 1
    _, total, _, available, *_ = (
        c_locale_output("df", "-B1", "/").splitlines()[1].split()
    )
    # Other processes write while the test runs, so free space may move a bit.
    tolerance = max(int(total) // 100, 256 * 1024 * 1024)
    assert root_volumes[0].total_bytes == pytest.approx(int(total), abs=tolerance)
    assert root_volumes[0].free_bytes == pytest.approx(int(available), abs=tolerance)


def test_read_host_os_release_this_machine() -> None:
    try:
        expected = platform.freedesktop_os_release()
    except OSError:
        pytest.skip("this machine has no os-release file")

    reading = read_host()

    assert reading.os_name == expected.get("NAME", expected.get("PRETTY_NAME"))
    assert reading.os_version == expected.get("VERSION_ID", "")


def test_wire_free_bytes_rounded() -> None:
    step = FREE_BYTES_STEP
    reading = HostReading(
        hostname="laptop-17",
        os_name="Ubuntu",
        os_version="24.04",
        kernel_version="6.8.0-45-generic",
        architecture="x86_64",
        manufacturer="LENOVO",
        model="ThinkPad P17 Gen 1",
        serial_number="",
        boot_time=datetime(2026, 5, 1, 8, 30, tzinfo=UTC),
        memory_bytes=32 * 1024**3,
        volumes=[
            VolumeReading("/", "/dev/nvme0n1p3", "ext4", 500 * 1024**3, 3 * step + 5),
            VolumeReading("/boot/efi", "/dev/nvme0n1p1", "vfat", 512 * 1024**2, 100),
        ],
    )

    message = host_to_proto(reading)

    assert [volume.free_bytes for volume in message.volumes] == [3 * step, 0]
    assert message.volumes[0].total_bytes == 500 * 1024**3
    assert message.boot_time.ToDatetime(tzinfo=UTC) == reading.boot_time
    assert message.memory_bytes == 32 * 1024**3
    assert message.model == "ThinkPad P17 Gen 1"


def test_wire_unknown_boot_time_unset(tmp_path: Path) -> None:
    message = host_to_proto(read_host(tmp_path))

    assert not message.HasField("boot_time")
    assert message.memory_bytes == 0
    assert len(message.errors) == 3
    for error in message.errors:
        assert error.kind == report_pb2.PROBE_ERROR_KIND_UNREADABLE, error
