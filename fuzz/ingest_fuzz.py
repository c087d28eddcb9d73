"""Atheris fuzz target over the collector's parse and validate path.

Run by hand, for example ``make fuzz`` or
``.venv/bin/python fuzz/ingest_fuzz.py -atheris_runs=200000``; the arguments
are libFuzzer's. Each input is parsed as a ConnectRequest and its hello or
report validated. Any exception other than InvalidMessageError is a crash that
libFuzzer reports with the input that caused it. At exit the target prints how
many inputs it ran and how many were accepted.
"""

from __future__ import annotations

import atexit
import sys
import tempfile
import uuid
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from collector._validation import (
        InvalidMessageError,
        parse_connect_request,
        validate_hello,
        validate_report,
    )
    from fleetmend.v1 import agent_pb2, report_pb2

inputs_run = 0
inputs_accepted = 0


def check_input(data: bytes) -> None:
    """Parse and validate one input, letting unexpected exceptions escape."""
    global inputs_run, inputs_accepted
    inputs_run += 1
    try:
        request = parse_connect_request(data)
        kind = request.WhichOneof("message")
        if kind == "hello":
            validate_hello(request.hello)
        elif kind == "report":
            validate_report(request.report)
        else:
            return
    except InvalidMessageError:
        return
    inputs_accepted += 1


def print_counts() -> None:
    print(
        f"ingest_fuzz: {inputs_run} inputs run, {inputs_accepted} accepted",
        file=sys.stderr,
        flush=True,
    )


def seed_inputs() -> list[bytes]:
    """Return valid messages for libFuzzer to start mutating from."""
    hello = agent_pb2.Hello(device_id=str(uuid.uuid4()), agent_version="0.1.0")
    report = report_pb2.Report(sequence=7, full=True)
    report.collect_time.seconds = 1_780_000_000
    report.host.hostname = "laptop-17"
    report.host.volumes.add(mount_point="/", total_bytes=500, free_bytes=100)
    report.disks.disks.add(name="nvme0n1", interface=2).nvme_health.percentage_used = 3
    report.batteries.batteries.add(
        name="BAT0", design_capacity=50, full_capacity=40, health_percent=80.0
    )
    report.credentials.credentials.add(account="ana", expiry=1)
    report.usage.enabled = True
    report.usage.apps.add(app_id="slack", hours_of_week=[9, 10], minutes=[5, 60])
    return [
        agent_pb2.ConnectRequest(hello=hello).SerializeToString(),
        agent_pb2.ConnectRequest(report=report).SerializeToString(),
        agent_pb2.ConnectRequest(
            report=report_pb2.Report(sequence=1)
        ).SerializeToString(),
    ]


def with_seed_corpus(argv: list[str]) -> list[str]:
    """Append a folder of seed inputs unless argv already names a corpus folder."""
    if any(not arg.startswith("-") for arg in argv[1:]):
        return argv
    folder = Path(tempfile.mkdtemp(prefix="ingest-fuzz-corpus-"))
    for number, seed in enumerate(seed_inputs()):
        (folder / f"seed-{number}").write_bytes(seed)
    print(f"ingest_fuzz: corpus in {folder}", file=sys.stderr, flush=True)
    return [*argv, str(folder)]


def main() -> None:
    atexit.register(print_counts)
    atheris.Setup(with_seed_corpus(sys.argv), check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
