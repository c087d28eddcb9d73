"""Test helpers around the fake smartctl in this folder.

``replay_environment`` builds the environment variables that tell the fake which
recordings to replay for which device. ``read_call_log`` returns the calls the
fake received. ``build_sysfs_tree`` lays out a sysfs tree from a JSON spec such as
tests/data/sysblock/mixed.json, and ``scan_with_replay`` runs read_disks on such a
tree against the fake.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.probes.disk import DiskScan, read_disks

FAKES_DIR = Path(__file__).resolve().parent
FAKE_SMARTCTL = FAKES_DIR / "smartctl"
DATA_DIR = FAKES_DIR.parent / "data"
RECORDINGS_DIR = DATA_DIR / "smartctl"
SYSBLOCK_DIR = DATA_DIR / "sysblock"

# The recording case replayed for each disk of tests/data/sysblock/mixed.json.
# mmcblk0 has none on purpose: it stands for a disk smartctl cannot see.
MIXED_CASES = {
    "/dev/nvme0n1": "nvme_healthy",
    "/dev/nvme1n1": "nvme_critical_warning",
    "/dev/nvme2n1": "nvme_latin1_digit_groups",
    "/dev/sda": "ata_ssd_healthy",
    "/dev/sdb": "usb_unknown_bridge",
    "/dev/sdc": "ata_hdd_reallocated",
    "/dev/sdd": "ata_hdd_pending",
    "/dev/sde": "megaraid_virtual_disk",
    "/dev/sdf": "standby",
    "/dev/sdg": "permission_denied",
    "/dev/sdh": "operation_not_permitted",
    "/dev/sdi": "garbage_json",
    "/dev/vda": "virtio_disk",
}


@dataclass(frozen=True)
class LoggedCall:
    """One call the fake smartctl received."""

    argv: tuple[str, ...]
    lc_all: str | None
    lang: str | None
    answered: bool


def replay_environment(cases: dict[str, str], log_path: Path) -> dict[str, str]:
    """Map device paths to recording case names, with the fake first on PATH."""
    case_dirs = {device: str(RECORDINGS_DIR / case) for device, case in cases.items()}
    return {
        "PATH": f"{FAKES_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_SMARTCTL_CASES": json.dumps(case_dirs),
        "FAKE_SMARTCTL_LOG": str(log_path),
    }


def read_call_log(log_path: Path) -> list[LoggedCall]:
    """Return the calls in the order the fake received them."""
    if not log_path.exists():
        return []
    calls = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        calls.append(
            LoggedCall(
                argv=tuple(entry["argv"]),
                lc_all=entry["lc_all"],
                lang=entry["lang"],
                answered=entry["answered"],
            )
        )
    return calls


def build_sysfs_tree(spec: dict, root: Path) -> Path:
    """Create the sysfs tree that spec describes under root and return root.

    Each entry of spec["disks"] has a name, the folder path of the disk under
    root, its files, and optionally the parent device folder ("device") with its
    files. <root>/block/<name> and <disk folder>/device become relative
    symlinks, as in /sys.
    """
    block_dir = root / "block"
    block_dir.mkdir(parents=True, exist_ok=True)
    for disk in spec["disks"]:
        disk_dir = root / disk["path"]
        _write_files(disk_dir, disk.get("files", {}))
        if "device" in disk:
            device_dir = root / disk["device"]
            _write_files(device_dir, disk.get("device_files", {}))
            (disk_dir / "device").symlink_to(os.path.relpath(device_dir, disk_dir))
        (block_dir / disk["name"]).symlink_to(os.path.relpath(disk_dir, block_dir))
    return root


def load_sysfs_spec(name: str) -> dict:
    """Load tests/data/sysblock/<name>.json."""
    return json.loads((SYSBLOCK_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _write_files(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


@dataclass(frozen=True)
class ReplayedScan:
    """A read_disks result with the calls the fake smartctl received for it."""

    scan: DiskScan
    calls: list[LoggedCall]


def scan_with_replay(
    sys_root: Path,
    cases: dict[str, str],
    work_dir: Path,
    dev_root: Path = Path("/dev"),
    timeout_seconds: float | None = None,
) -> ReplayedScan:
    """Run read_disks on sys_root with the fake smartctl first on PATH.

    timeout_seconds None keeps read_disks' default.
    """
    log_path = work_dir / "smartctl-calls.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in replay_environment(cases, log_path).items():
            patch.setenv(name, value)
        if timeout_seconds is None:
            scan = read_disks(sys_root=sys_root, dev_root=dev_root)
        else:
            scan = read_disks(
                sys_root=sys_root, dev_root=dev_root, timeout_seconds=timeout_seconds
            )
    return ReplayedScan(scan=scan, calls=read_call_log(log_path))
