"""The fleetmend CLI against a real collector on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from collector import __version__, auth
from collector._address import split_host_port
from collector._ops_render import (
    enum_label,
    format_duration,
    format_offset,
    render_table,
)
from collector._ops_transport import CliError, OpsClient
from collector.ops_cli import main
from collector.server import ServerHandle, start_server_thread
from collector.store import IncomingReport, Store
from fleetmend.v1 import ops_pb2, ops_pb2_grpc, report_pb2
from tests.conftest import BIN_DIR, free_port
from tests.trust import (
    bearer,
    channel_to,
    create_token,
    remember_secret,
    write_token_file,
)


@dataclass(frozen=True)
class Fleet:
    """Devices stored for these tests: one full laptop and two namesakes."""

    address: str
    laptop: str
    twins: tuple[str, str]
    ca_file: Path
    token_file: Path


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def laptop_report(now: datetime) -> report_pb2.Report:
    host = report_pb2.HostFacts(
        hostname="lab-01",
        os_name="Debian GNU/Linux",
        os_version="12",
        kernel_version="6.1.0-18-amd64",
        architecture="x86_64",
        manufacturer="LENOVO",
        model="20XW",
        memory_bytes=16 * 1024**3,
        boot_time=timestamp(now - timedelta(days=2)),
        volumes=[
            report_pb2.Volume(
                mount_point="/",
                device="/dev/nvme0n1p2",
                filesystem="ext4",
                total_bytes=500 * 1024**3,
                free_bytes=50 * 1024**3,
            )
        ],
    )
    ata = report_pb2.Disk(
        name="sda",
        model="WDC WD10EZEX",
        interface=report_pb2.DISK_INTERFACE_ATA,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        self_assessment=report_pb2.SELF_ASSESSMENT_PASSED,
        ata_attributes=[
            report_pb2.AtaAttribute(
                id=5, name="Reallocated_Sector_Ct", value=90, raw=8, raw_text="8"
            ),
            report_pb2.AtaAttribute(id=1, name="Raw_Read_Error_Rate", raw_text="0"),
        ],
    )
    nvme = report_pb2.Disk(
        name="nvme0n1",
        interface=report_pb2.DISK_INTERFACE_NVME,
        smart_state=report_pb2.SMART_STATE_AVAILABLE,
        nvme_health=report_pb2.NvmeHealth(
            percentage_used=3, available_spare_percent=100
        ),
    )
    strange = report_pb2.Disk(name="sdb", smart_state=99)  # type: ignore[arg-type]
    battery = report_pb2.Battery(
        name="BAT0",
        model="5B10W13930",
        design_capacity=57_000_000,
        full_capacity=28_500_000,
        health_percent=50.0,
        cycle_count=812,
        status=report_pb2.BATTERY_STATUS_DISCHARGING,
    )
    password = report_pb2.Credential(
        kind=report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
        account="alice",
        expiry=report_pb2.CREDENTIAL_EXPIRY_AT_TIME,
        expire_time=timestamp(now + timedelta(days=5)),
        source="chage -l alice",
    )
    usage = report_pb2.UsageSection(
        enabled=True,
        window_days=28,
        apps=[
            report_pb2.AppUsage(app_id="sap", hours_of_week=[9, 10], minutes=[90, 30])
        ],
    )
    return report_pb2.Report(
        sequence=1,
        full=True,
        collect_time=timestamp(now),
        dropped_reports=12,
        host=host,
        disks=report_pb2.DiskSection(
            disks=[ata, nvme, strange],
            errors=[
                report_pb2.ProbeError(
                    source="smartctl -a /dev/sdc",
                    kind=report_pb2.PROBE_ERROR_KIND_UNREADABLE,
                    reason="permission denied",
                )
            ],
        ),
        batteries=report_pb2.BatterySection(batteries=[battery]),
        credentials=report_pb2.CredentialSection(credentials=[password]),
        usage=usage,
    )


def twin_report() -> report_pb2.Report:
    host = report_pb2.HostFacts(hostname="twin", os_name="Windows", os_version="11")
    return report_pb2.Report(sequence=1, full=True, host=host)


@pytest.fixture
def server(database_url: str, tls_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server_thread(database_url, tls_dir=tls_dir)
    yield handle
    handle.stop()


@pytest.fixture
def token_file(database_url: str, server: ServerHandle, tmp_path: Path) -> Path:
    """A file with a viewer token, the role that the queries need."""
    token = create_token(database_url, "viewer", "cli-viewer")
    return write_token_file(tmp_path, token)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEETMEND_COLLECTOR", "FLEETMEND_CA_FILE", "FLEETMEND_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fleet(
    server: ServerHandle, database_url: str, tls_dir: Path, token_file: Path
) -> Fleet:
    now = datetime.now(UTC)
    laptop = str(uuid.uuid4())
    twins = (str(uuid.uuid4()), str(uuid.uuid4()))
    store = Store.open(database_url)
    try:
        # The first twin's clock is 3 h ahead, so its report is flagged.
        batch = [
            IncomingReport(laptop, laptop_report(now), now),
            IncomingReport(twins[0], twin_report(), now, clock_skewed=True),
            IncomingReport(twins[1], twin_report(), now),
        ]
        # Network delay makes the offset of a correct clock slightly negative.
        store.record_hello(
            laptop, "0.1.0", now, clock_offset=timedelta(milliseconds=-4)
        )
        store.record_hello(
            twins[0],
            "0.1.0",
            now,
            clock_offset=timedelta(hours=3, minutes=5),
            clock_skewed=True,
        )
        store.record_hello(twins[1], "0.1.0", now)
        store.ingest(batch)
    finally:
        store.close()
    return Fleet(server.address, laptop, twins, tls_dir / "ca.pem", token_file)


def run(fleet: Fleet, *args: str) -> int:
    return main(connect_args(fleet) + list(args))


def connect_args(fleet: Fleet) -> list[str]:
    return [
        "--collector",
        fleet.address,
        "--ca-file",
        str(fleet.ca_file),
        "--token-file",
        str(fleet.token_file),
    ]


@pytest.fixture
def offline_token_file(tmp_path: Path) -> Path:
    """A file with a well-formed token that no collector has stored."""
    token = remember_secret(auth.issue_operator_token().text)
    return write_token_file(tmp_path, token)


def closed_port_address() -> str:
    """Return a 127.0.0.1 address whose port was bound and closed again."""
    return f"127.0.0.1:{free_port()}"


def stub_client(fleet: Fleet, channel: grpc.Channel) -> OpsClient:
    token = fleet.token_file.read_text(encoding="utf-8").strip()
    return OpsClient(
        ops_pb2_grpc.OpsServiceStub(channel), fleet.address, 10, metadata=bearer(token)
    )


# devices


def test_devices_table(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(fleet, "devices")

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "DEVICE",
        "ID",
        "HOSTNAME",
        "OS",
        "AGENT",
        "LAST",
        "SEEN",
    ]
    assert len(lines) == 4
    assert fleet.laptop in out
    assert "Debian GNU/Linux 12" in out
    assert "ago (" in out


def test_devices_columns_aligned(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    run(fleet, "devices")

    lines = capsys.readouterr().out.splitlines()
    starts = {line.index("0.1.0") for line in lines[1:]}
    assert len(starts) == 1
    assert lines[0].index("AGENT") in starts


def test_devices_follows_pages(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(fleet, "--page-size", "1", "devices")

    out = capsys.readouterr().out
    assert code == 0
    for device_id in (fleet.laptop, *fleet.twins):
        assert device_id in out


def test_devices_json(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(fleet, "--json", "devices")

    listed = json.loads(capsys.readouterr().out)
    assert code == 0
    ids = {device["device_id"] for device in listed["devices"]}
    assert ids == {fleet.laptop, *fleet.twins}


def test_options_after_command(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["devices", *connect_args(fleet), "--json"])

    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["devices"]) == 3


def test_environment_selects_collector(
    fleet: Fleet,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEETMEND_COLLECTOR", fleet.address)
    monkeypatch.setenv("FLEETMEND_CA_FILE", str(fleet.ca_file))
    monkeypatch.setenv("FLEETMEND_TOKEN_FILE", str(fleet.token_file))

    code = main(["devices"])

    assert code == 0
    assert fleet.laptop in capsys.readouterr().out


# device show


def test_show_by_hostname(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(fleet, "device", "show", "LAB-01")

    out = capsys.readouterr().out
    assert code == 0
    assert f"Device {fleet.laptop} (lab-01)" in out
    assert "6.1.0-18-amd64" in out
    assert "LENOVO 20XW" in out
    assert "16.0 GiB" in out


def test_show_sections(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(fleet, "device", "show", fleet.laptop)

    out = capsys.readouterr().out
    volume = next(line for line in out.splitlines() if "/dev/nvme0n1p2" in line)
    assert volume.split()[-1] == "10%"
    assert "5 Reallocated_Sector_Ct=8" in out
    assert "Raw_Read_Error_Rate" not in out
    assert "used 3%" in out
    assert "unknown(99)" in out
    battery = next(line for line in out.splitlines() if "BAT0" in line)
    assert battery.split()[2:5] == ["50%", "812", "discharging"]
    account = next(line for line in out.splitlines() if "alice" in line)
    assert "(in 4d)" in account
    assert "sap" in out
    assert "Mon 09:00" in out
    assert "permission denied" in out


def test_show_lists_findings(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(fleet, "device", "show", fleet.laptop)

    findings = capsys.readouterr().out.split("Findings\n", 1)[1]
    lines = findings.splitlines()
    assert lines[0].split() == ["SEVERITY", "KIND", "SUBJECT", "DETAIL"]
    kinds = [line.split()[1] for line in lines[1:]]
    assert kinds == ["disk_failing", "battery_worn", "password_expiring"]


def summary_value(out: str, label: str) -> str:
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return line.strip().removeprefix(label).strip()


def test_show_dropped_reports(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(fleet, "device", "show", fleet.laptop)

    out = capsys.readouterr().out
    assert summary_value(out, "dropped reports") == "12"


def test_show_clock_in_step(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(fleet, "device", "show", fleet.laptop)

    out = capsys.readouterr().out
    assert summary_value(out, "clock") == "within 1 s of the collector"


def test_show_clock_skewed(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(fleet, "device", "show", fleet.twins[0])

    clock = summary_value(capsys.readouterr().out, "clock")
    assert clock.startswith("3h ahead of the collector")
    assert "skewed" in clock


def test_show_clock_unknown(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(fleet, "device", "show", fleet.twins[1])

    out = capsys.readouterr().out
    assert summary_value(out, "clock") == "offset unknown"
    assert summary_value(out, "dropped reports") == "0"


def test_show_json_clock_fields(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    run(fleet, "--json", "device", "show", fleet.twins[0])

    device = json.loads(capsys.readouterr().out)["device"]
    assert device["clock_offset"] == "11100s"
    assert device["clock_skewed"] is True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "within 1 s of the collector"),
        (-0.9, "within 1 s of the collector"),
        (-90, "1m behind the collector"),
        (7200, "2h ahead of the collector"),
    ],
)
def test_offset_words(seconds: float, text: str) -> None:
    assert format_offset(seconds) == text


def test_show_unreported_sections(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    run(fleet, "device", "show", fleet.twins[0])

    out = capsys.readouterr().out
    assert "Windows 11" in out
    assert "Disks\n  not reported yet\n" in out
    assert "Findings\n  No findings.\n" in out


def test_show_json(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(fleet, "--json", "device", "show", "lab-01")

    shown = json.loads(capsys.readouterr().out)
    assert code == 0
    assert shown["device"]["device_id"] == fleet.laptop
    assert shown["device"]["host"]["kernel_version"] == "6.1.0-18-amd64"
    assert shown["findings"][0]["kind"] == "FINDING_KIND_DISK_FAILING"


def test_show_unknown_hostname(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(fleet, "device", "show", "nowhere")

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "unknown device 'nowhere'" in captured.err


def test_show_unknown_id(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    device_id = str(uuid.uuid4())

    code = run(fleet, "device", "show", device_id)

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("\n") == 1
    assert f"unknown device {device_id}" in captured.err


def test_show_ambiguous_hostname(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(fleet, "device", "show", "twin")

    captured = capsys.readouterr()
    assert code == 1
    for twin in fleet.twins:
        assert twin in captured.out
    assert fleet.laptop not in captured.out
    assert captured.err.count("\n") == 1
    assert "2 devices have the hostname 'twin'" in captured.err


def test_show_ambiguous_json_stderr(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(fleet, "--json", "device", "show", "twin")

    captured = capsys.readouterr()
    candidates, error_line = captured.err.rsplit("\n", 2)[:2]
    assert code == 1
    assert captured.out == ""
    listed = {device["device_id"] for device in json.loads(candidates)["devices"]}
    assert listed == set(fleet.twins)
    assert "2 devices have the hostname 'twin'" in error_line


@pytest.mark.parametrize(
    "args",
    [
        ["device", "show", ""],
        ["device", "show", "  "],
        ["findings", "--device", ""],
    ],
)
def test_empty_device_rejected(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--collector", closed_port_address(), "--insecure", *args])

    assert raised.value.code == 2
    assert (
        ": must not be empty; give a device id or a hostname" in capsys.readouterr().err
    )


# findings


def test_findings_table(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(fleet, "findings")

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "SEVERITY",
        "DEVICE",
        "ID",
        "HOSTNAME",
        "KIND",
        "SUBJECT",
        "DETAIL",
    ]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["critical", fleet.laptop, "lab-01", "disk_failing", "sda"],
        ["warning", fleet.laptop, "lab-01", "battery_worn", "BAT0"],
        ["warning", fleet.laptop, "lab-01", "password_expiring", "alice"],
    ]


def test_findings_namesakes_apart(
    server: ServerHandle,
    database_url: str,
    tls_dir: Path,
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = datetime.now(UTC)
    namesakes = sorted(str(uuid.uuid4()) for _ in range(2))
    store = Store.open(database_url)
    try:
        store.ingest([IncomingReport(d, worn_twin_report(), now) for d in namesakes])
    finally:
        store.close()

    fleet = Fleet(server.address, "", ("", ""), tls_dir / "ca.pem", token_file)
    code = run(fleet, "findings")

    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert code == 0
    assert [row[1:4] for row in rows] == [
        [namesakes[0], "twin", "battery_worn"],
        [namesakes[1], "twin", "battery_worn"],
    ]


def worn_twin_report() -> report_pb2.Report:
    battery = report_pb2.Battery(
        name="BAT0", design_capacity=50_000, full_capacity=25_000, health_percent=50.0
    )
    return report_pb2.Report(
        sequence=1,
        full=True,
        host=report_pb2.HostFacts(hostname="twin"),
        batteries=report_pb2.BatterySection(batteries=[battery]),
    )


def test_findings_device_filter(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(fleet, "findings", "--device", fleet.twins[0])

    assert code == 0
    assert capsys.readouterr().out == "No findings.\n"


def test_findings_json_pages(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(fleet, "--json", "--page-size", "1", "findings", "--device", "lab-01")

    listed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [f["subject"] for f in listed["findings"]] == ["sda", "BAT0", "alice"]


# errors


def test_requires_ca_file(
    offline_token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--collector",
            closed_port_address(),
            "--token-file",
            str(offline_token_file),
            "devices",
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "fleetmend: error: pass --ca-file (the collector's ca.pem) or set "
        "FLEETMEND_CA_FILE, or --insecure for a loopback collector\n"
    )


def test_unreachable_collector(
    offline_token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = closed_port_address()

    code = main(
        [
            "--collector",
            address,
            "--insecure",
            "--token-file",
            str(offline_token_file),
            "devices",
        ]
    )

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert f"cannot reach the collector at {address}" in err
    assert "FLEETMEND_COLLECTOR" in err


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1:99999", "port 99999, outside 1 to 65535"),
        ("127.0.0.1:0", "port 0, outside 1 to 65535"),
        ("http://127.0.0.1:50051", "has a scheme"),
        ("127.0.0.1:50051:1", "write an IPv6 address in brackets"),
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:", "has no port"),
        (":50051", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
        ("[lab-01]:50051", "not an IPv6 address"),
    ],
)
def test_invalid_collector_address(
    capsys: pytest.CaptureFixture[str], address: str, reason: str
) -> None:
    code = main(["--collector", address, "--insecure", "devices"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("fleetmend: error: invalid collector address in --collector")
    assert reason in err


def test_invalid_address_names_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETMEND_COLLECTOR", "127.0.0.1:99999")

    code = main(["--insecure", "devices"])

    assert code == 2
    assert (
        "address in FLEETMEND_COLLECTOR: '127.0.0.1:99999'" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::1]:1", ("::1", 1)),
        ("collector.example.org:65535", ("collector.example.org", 65535)),
    ],
)
def test_split_host_port_valid(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


def test_unresolvable_host_hint() -> None:
    # grpc's "dns://SERVER/NAME" target sends the lookup to SERVER, here a
    # closed port on loopback, so the lookup fails without leaving the machine.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        dns_port = closed.getsockname()[1]
    target = f"dns://127.0.0.1:{dns_port}/nonsense:50051"
    with grpc.insecure_channel(target) as channel:
        client = OpsClient(ops_pb2_grpc.OpsServiceStub(channel), "nonsense:50051", 10)

        with pytest.raises(CliError) as raised:
            client.call("ListDevices", ops_pb2.ListDevicesRequest())

    message = str(raised.value)
    assert "cannot resolve the host of the collector at nonsense:50051" in message
    assert message.endswith("check the host name or use an IP address")


def test_invalid_page_token(fleet: Fleet) -> None:
    with channel_to(fleet.address, fleet.ca_file.parent) as channel:
        client = stub_client(fleet, channel)
        request = ops_pb2.ListDevicesRequest(page_token="forged")

        with pytest.raises(
            CliError, match="rejected ListDevices: page token"
        ) as raised:
            client.call("ListDevices", request)

    assert raised.value.exit_code == 1


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "abc"])
def test_bad_timeout_rejected(capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--insecure", "--timeout", timeout, "devices"])

    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert "argument --timeout: expected a number of seconds greater than 0" in err


def test_page_size_not_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--insecure", "devices", "--page-size", "abc"])

    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert "_positive_int" not in err
    assert "expected a whole number of at least 1, got 'abc'" in err


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["devices"],
        ["device"],
        ["device", "show"],
        ["device", "revoke"],
        ["findings"],
        ["audit"],
        ["token"],
        ["token", "list"],
        ["token", "revoke"],
        ["outage"],
        ["outage", "declare"],
        ["outage", "list"],
    ],
)
def test_help_every_command(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*args, "--help"])

    out = capsys.readouterr().out
    assert raised.value.code == 0
    assert out.startswith("usage: fleetmend")


def test_help_states_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["findings", "--help"])

    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 30)" in out
    assert "(default: 1000)" in out


def test_outage_help_catalog_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["outage", "declare", "--help"])

    out = " ".join(capsys.readouterr().out.split())
    assert '"sap-gui"' in out
    assert '"sap"' not in out
    assert "no catalog of its own" in out


def test_version_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--version"])

    assert raised.value.code == 0
    assert capsys.readouterr().out == f"{__version__}\n"


def test_usage_error_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--insecure", "devices", "--page-size", "0"])

    assert raised.value.code == 2
    assert "at least 1" in capsys.readouterr().err


# rendering


def test_enum_label_unknown_value() -> None:
    assert enum_label(ops_pb2.Severity, 42) == "unknown(42)"


def test_enum_label_strips_prefix() -> None:
    assert enum_label(ops_pb2.FindingKind, 6) == "device_silent"


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5s"), (125, "2m"), (7200, "2h"), (90000, "1d")]
)
def test_duration_largest_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_table_pads_columns() -> None:
    table = render_table(["A", "BB"], [["long", "x"], ["s", "yy"]])

    assert table == "A     BB\nlong  x\ns     yy\n"


# the installed console script


def fleetmend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "fleetmend"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_script_unreachable_one_line(offline_token_file: Path) -> None:
    address = closed_port_address()

    result = fleetmend(
        "--collector",
        address,
        "--insecure",
        "--token-file",
        str(offline_token_file),
        "devices",
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert address in result.stderr
    assert "Traceback" not in result.stderr


def test_script_ambiguous_lists(fleet: Fleet) -> None:
    result = fleetmend(*connect_args(fleet), "device", "show", "twin")

    assert result.returncode == 1
    for twin in fleet.twins:
        assert twin in result.stdout
    assert result.stderr.count("\n") == 1


def test_script_json_parses(fleet: Fleet) -> None:
    result = fleetmend(*connect_args(fleet), "--json", "findings")

    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert {f["device_id"] for f in findings} == {fleet.laptop}


def test_script_help_names_default(tmp_path: Path) -> None:
    result = fleetmend("--help")

    assert result.returncode == 0
    assert "127.0.0.1:50051" in result.stdout
