"""Measure the wire size of this machine's full report and of a quiet delta.

Prints the protobuf size in bytes next to the size of the same content as
compact JSON (protobuf's JSON mapping, no whitespace).

    .venv/bin/python bench/report_size.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from google.protobuf import json_format

from agent.config import load_config
from agent.report import ReportBuilder
from agent.sections import probe_sources, read_safely, usage_source
from agent.state import StateStore
from fleetmend.v1 import report_pb2


def json_size(report: report_pb2.Report) -> int:
    as_dict = json_format.MessageToDict(report, preserving_proto_field_name=True)
    return len(json.dumps(as_dict, separators=(",", ":")).encode())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # No DNS look-ups: the bench machine has no network.
        config = load_config(
            flags={"state_dir": tmp, "usage.resolve_hosts": False}, environ={}
        )
        state = StateStore(Path(tmp))
        builder = ReportBuilder(state, state.load_or_create())
        sources = probe_sources()
        usage = usage_source(config)

        def read_all() -> None:
            for source in sources:
                reading = read_safely(source)
                if reading is not None:
                    builder.update(source.section, reading)
            builder.update("usage", usage.read())

        read_all()
        full = builder.build(full=True)
        read_all()
        delta = builder.build(full=False)

    print(f"{'report':<14}{'protobuf bytes':>16}{'JSON bytes':>12}")
    for name, report in (("full", full), ("quiet delta", delta)):
        size = len(report.SerializeToString())
        print(f"{name:<14}{size:>16}{json_size(report):>12}")
    sections = [f.name for f, _ in delta.ListFields() if f.message_type is not None]
    print(f"sections in the delta besides collect_time: {sections[1:] or 'none'}")


if __name__ == "__main__":
    main()
