"""Convert a host reading to its wire message."""

from __future__ import annotations

from agent.probes.host import HostReading, VolumeReading
from agent.wire import probe_error_to_proto
from fleetmend.v1 import report_pb2

__all__ = ["FREE_BYTES_STEP", "host_to_proto"]

# Free space is sent rounded down to a multiple of 64 MiB. Writing a few files
# then leaves the host section unchanged, so delta reports can leave it out.
FREE_BYTES_STEP = 64 * 1024 * 1024


def host_to_proto(reading: HostReading) -> report_pb2.HostFacts:
    """Build the host section. Unknown boot time and memory are left unset."""
    message = report_pb2.HostFacts(
        hostname=reading.hostname,
        os_name=reading.os_name,
        os_version=reading.os_version,
        kernel_version=reading.kernel_version,
        architecture=reading.architecture,
        manufacturer=reading.manufacturer,
        model=reading.model,
        serial_number=reading.serial_number,
        memory_bytes=reading.memory_bytes or 0,
        volumes=[_volume_to_proto(volume) for volume in reading.volumes],
        errors=[probe_error_to_proto(error) for error in reading.errors],
    )
    if reading.boot_time is not None:
        message.boot_time.FromDatetime(reading.boot_time)
    return message


def _volume_to_proto(volume: VolumeReading) -> report_pb2.Volume:
    return report_pb2.Volume(
        mount_point=volume.mount_point,
        device=volume.device,
        filesystem=volume.filesystem,
        total_bytes=volume.total_bytes,
        free_bytes=volume.free_bytes // FREE_BYTES_STEP * FREE_BYTES_STEP,
    )
