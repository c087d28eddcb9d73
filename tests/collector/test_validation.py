"""Validation of agent messages: values out of range and values that contradict.

The clock checks flag reports instead of rejecting them.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from collector._validation import (
    MAX_TIMESTAMP_SECONDS,
    MIN_TIMESTAMP_SECONDS,
    ClockLimits,
    InvalidMessageError,
    clock_offset,
    clock_skew_reason,
    is_offset_skewed,
    validate_enroll_request,
    validate_hello,
    validate_report,
)
from fleetmend.v1 import agent_pb2, report_pb2

NIL_UUID = "00000000-0000-0000-0000-000000000000"
DEVICE_ID = "3f0c8a52-93c4-4f5e-9d47-0b6f2f4d1a6e"
# 2026-05-04 09:00 UTC.
SOME_TIME = Timestamp(seconds=1_777_885_200)


def with_collect_time(seconds: int, nanos: int = 0) -> report_pb2.Report:
    return report_pb2.Report(
        sequence=1, collect_time=Timestamp(seconds=seconds, nanos=nanos)
    )


def with_volume(total_bytes: int, free_bytes: int) -> report_pb2.Report:
    volume = report_pb2.Volume(
        mount_point="/", total_bytes=total_bytes, free_bytes=free_bytes
    )
    return report_pb2.Report(sequence=1, host=report_pb2.HostFacts(volumes=[volume]))


def with_credential(
    expiry: int, expire_time: Timestamp | None = None
) -> report_pb2.Report:
    credential = report_pb2.Credential(
        kind=report_pb2.CREDENTIAL_KIND_LOCAL_PASSWORD,
        account="dave",
        expiry=expiry,  # type: ignore[arg-type]
        expire_time=expire_time,
    )
    section = report_pb2.CredentialSection(credentials=[credential])
    return report_pb2.Report(sequence=1, credentials=section)


def with_apps(*apps: report_pb2.AppUsage, enabled: bool = True) -> report_pb2.Report:
    usage = report_pb2.UsageSection(enabled=enabled, window_days=28, apps=apps)
    return report_pb2.Report(sequence=1, usage=usage)


def app(app_id: str, hours: list[int], minutes: list[int]) -> report_pb2.AppUsage:
    return report_pb2.AppUsage(app_id=app_id, hours_of_week=hours, minutes=minutes)


def with_battery(**fields: object) -> report_pb2.Report:
    battery = report_pb2.Battery(name="BAT1", **fields)  # type: ignore[arg-type]
    section = report_pb2.BatterySection(batteries=[battery])
    return report_pb2.Report(sequence=1, batteries=section)


def with_temperature(celsius: int) -> report_pb2.Report:
    disk = report_pb2.Disk(
        name="nvme0n1", nvme_health=report_pb2.NvmeHealth(temperature_celsius=celsius)
    )
    return report_pb2.Report(sequence=1, disks=report_pb2.DiskSection(disks=[disk]))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(
            report_pb2.Report(sequence=2**63),
            "sequence 9223372036854775808",
            id="sequence-above-int64",
        ),
        pytest.param(
            report_pb2.Report(sequence=2**64 - 1),
            "outside 1 to 9223372036854775807",
            id="sequence-max-uint64",
        ),
        pytest.param(
            with_collect_time(MAX_TIMESTAMP_SECONDS + 1),
            "Report.collect_time has seconds 253402300800",
            id="collect-after-9999",
        ),
        pytest.param(
            with_collect_time(MIN_TIMESTAMP_SECONDS - 1),
            "Report.collect_time has seconds -62135596801",
            id="collect-before-1",
        ),
        pytest.param(
            with_collect_time(0, nanos=2_000_000_000),
            "nanos 2000000000",
            id="collect-nanos-big",
        ),
        pytest.param(
            with_collect_time(0, nanos=-1), "nanos -1", id="collect-nanos-negative"
        ),
        pytest.param(
            report_pb2.Report(
                sequence=1,
                host=report_pb2.HostFacts(boot_time=Timestamp(seconds=2**40)),
            ),
            "HostFacts.boot_time has seconds",
            id="boot-time",
        ),
        pytest.param(
            with_credential(
                report_pb2.CREDENTIAL_EXPIRY_AT_TIME, Timestamp(seconds=-(2**40))
            ),
            "Credential.expire_time has seconds",
            id="expire-time",
        ),
        pytest.param(
            with_credential(report_pb2.CREDENTIAL_EXPIRY_AT_TIME),
            "CREDENTIAL_EXPIRY_AT_TIME but no expire_time",
            id="at-time-without-time",
        ),
        pytest.param(
            with_credential(report_pb2.CREDENTIAL_EXPIRY_NEVER, SOME_TIME),
            "its expiry is CREDENTIAL_EXPIRY_NEVER",
            id="never-with-time",
        ),
        pytest.param(
            with_credential(report_pb2.CREDENTIAL_EXPIRY_UNSPECIFIED, SOME_TIME),
            "its expiry is CREDENTIAL_EXPIRY_UNSPECIFIED",
            id="unspecified-with-time",
        ),
        pytest.param(
            with_volume(total_bytes=100, free_bytes=500),
            "free_bytes 500 of volume '/' is larger than its total_bytes 100",
            id="free-above-total",
        ),
        pytest.param(
            with_apps(app("sap", [9], [241])),
            "minutes 241 in hour_of_week 9",
            id="minutes-above-240",
        ),
        pytest.param(
            with_apps(app("sap", [9], [10**9])), "minutes 1000000000", id="minutes-huge"
        ),
        pytest.param(
            with_apps(app("sap", [9], [0])),
            "minutes 0 in hour_of_week 9",
            id="minutes-zero",
        ),
        pytest.param(
            with_apps(app("sap", [9, 9], [5, 5])),
            "hour_of_week 9 more than once",
            id="hour-twice",
        ),
        pytest.param(
            with_apps(app("", [9], [5])), "AppUsage.app_id ''", id="app-id-empty"
        ),
        pytest.param(
            with_apps(app("Bad Id!", [9], [5])),
            "AppUsage.app_id 'Bad Id!' does not match",
            id="app-id-bad",
        ),
        pytest.param(
            with_apps(app("a" * 65, [9], [5])), "does not match", id="app-id-long"
        ),
        pytest.param(
            with_apps(app("sap", [9], [5]), app("sap", [10], [5])),
            "'sap' is listed more than once",
            id="app-id-twice",
        ),
        pytest.param(
            with_apps(app("sap", [9], [5]), enabled=False),
            "enabled is false but apps lists 1",
            id="disabled-with-apps",
        ),
        pytest.param(
            with_battery(
                design_capacity=50_000_000,
                full_capacity=20_000_000,
                health_percent=99.0,
            ),
            "health_percent 99 of battery 'BAT1' disagrees",
            id="health-disagrees",
        ),
        pytest.param(
            with_battery(health_percent=math.nan), "health_percent nan", id="health-nan"
        ),
        pytest.param(
            with_battery(health_percent=-5.0),
            "health_percent -5.0",
            id="health-negative",
        ),
        pytest.param(
            with_temperature(-300),
            "temperature_celsius -300 of disk 'nvme0n1'",
            id="temperature-low",
        ),
        pytest.param(
            with_temperature(201), "temperature_celsius 201", id="temperature-high"
        ),
        pytest.param(
            report_pb2.Report(sequence=1, host=report_pb2.HostFacts(hostname="a\x00b")),
            "HostFacts.hostname 'a\\\\x00b' contains a NUL character",
            id="hostname-nul",
        ),
    ],
)
def test_report_invalid(bad: report_pb2.Report, reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        validate_report(bad)


@pytest.mark.parametrize(
    "good",
    [
        pytest.param(report_pb2.Report(sequence=2**63 - 1), id="sequence-max"),
        pytest.param(
            with_collect_time(MAX_TIMESTAMP_SECONDS, nanos=999_999_999),
            id="collect-last",
        ),
        pytest.param(with_collect_time(MIN_TIMESTAMP_SECONDS), id="collect-first"),
        pytest.param(
            with_credential(report_pb2.CREDENTIAL_EXPIRY_AT_TIME, SOME_TIME),
            id="at-time",
        ),
        pytest.param(
            with_credential(report_pb2.CREDENTIAL_EXPIRY_MUST_CHANGE_NOW),
            id="must-change",
        ),
        pytest.param(with_credential(9, SOME_TIME), id="unknown-expiry-with-time"),
        pytest.param(
            with_volume(total_bytes=100, free_bytes=100), id="free-equals-total"
        ),
        pytest.param(
            with_apps(app("sap-gui", [9, 3], [240, 1])), id="minutes-240-unsorted"
        ),
        pytest.param(
            with_apps(app("a" * 64, [0], [1]), app("vpn_2", [167], [60])), id="app-ids"
        ),
        pytest.param(with_apps(enabled=False), id="disabled-empty"),
        pytest.param(
            with_battery(
                design_capacity=50_000, full_capacity=20_000, health_percent=40.9
            ),
            id="health-within-1",
        ),
        pytest.param(
            with_battery(design_capacity=0, full_capacity=20_000, health_percent=40.0),
            id="health-zero-design",
        ),
        pytest.param(with_battery(health_percent=103.0), id="health-alone"),
        pytest.param(with_temperature(-60), id="temperature-lowest"),
        pytest.param(with_temperature(200), id="temperature-highest"),
    ],
)
def test_report_valid(good: report_pb2.Report) -> None:
    validate_report(good)


def test_hello_nil_uuid_invalid() -> None:
    hello = agent_pb2.Hello(device_id=NIL_UUID, agent_version="0.1.0")

    with pytest.raises(InvalidMessageError, match="nil UUID"):
        validate_hello(hello)


def test_hello_nul_version_invalid() -> None:
    hello = agent_pb2.Hello(device_id=DEVICE_ID, agent_version="0.1\x00")

    with pytest.raises(InvalidMessageError, match="agent_version"):
        validate_hello(hello)


CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9b"]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS)
def test_hello_control_version_invalid(character: str) -> None:
    hello = agent_pb2.Hello(device_id=DEVICE_ID, agent_version=f"0.1{character}x")

    with pytest.raises(InvalidMessageError) as raised:
        validate_hello(hello)

    message = str(raised.value)
    assert message.startswith("Hello.agent_version ")
    assert f"U+{ord(character):04X}" in message
    assert character not in message


@pytest.mark.parametrize("field", ["hostname", "agent_version"])
@pytest.mark.parametrize("character", CONTROL_CHARACTERS)
def test_enroll_request_control_invalid(field: str, character: str) -> None:
    request = enroll_request(**{field: f"lab{character}07"})

    with pytest.raises(InvalidMessageError) as raised:
        validate_enroll_request(request)

    message = str(raised.value)
    assert message.startswith(f"EnrollRequest.{field} ")
    assert f"U+{ord(character):04X}" in message
    assert character not in message


@pytest.mark.parametrize("text", ["0.2.0+build.7", "lab-07 (Ünïcode ü)", "Ꮭ-Δ"])
def test_printable_text_accepted(text: str) -> None:
    validate_hello(agent_pb2.Hello(device_id=DEVICE_ID, agent_version=text))
    validate_enroll_request(enroll_request(hostname=text, agent_version=text))


def test_hello_valid() -> None:
    validate_hello(agent_pb2.Hello(device_id=DEVICE_ID, agent_version="0.1.0"))


def test_hello_send_time_out_of_range() -> None:
    hello = agent_pb2.Hello(
        device_id=DEVICE_ID, send_time=Timestamp(seconds=MAX_TIMESTAMP_SECONDS + 1)
    )

    with pytest.raises(InvalidMessageError, match="Hello.send_time has seconds"):
        validate_hello(hello)


def test_hello_send_time_valid() -> None:
    validate_hello(agent_pb2.Hello(device_id=DEVICE_ID, send_time=SOME_TIME))


# Clock skew

RECEIVED = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
LIMITS = ClockLimits(skew_limit=timedelta(minutes=5), max_report_age=timedelta(days=30))


def collected_at(moment: datetime) -> report_pb2.Report:
    report = report_pb2.Report(sequence=1)
    report.collect_time.FromDatetime(moment)
    return report


def test_offset_from_send_time() -> None:
    hello = agent_pb2.Hello(device_id=DEVICE_ID)
    hello.send_time.FromDatetime(RECEIVED + timedelta(minutes=7, microseconds=5))

    assert clock_offset(hello, RECEIVED) == timedelta(minutes=7, microseconds=5)


def test_offset_unknown_without_send_time() -> None:
    assert clock_offset(agent_pb2.Hello(device_id=DEVICE_ID), RECEIVED) is None


@pytest.mark.parametrize(
    ("offset", "skewed"),
    [
        (None, False),
        (timedelta(0), False),
        (timedelta(minutes=5), False),
        (timedelta(minutes=-5), False),
        (timedelta(minutes=5, seconds=1), True),
        (timedelta(minutes=-5, seconds=-1), True),
    ],
)
def test_offset_skewed(offset: timedelta | None, skewed: bool) -> None:
    assert is_offset_skewed(offset, LIMITS) is skewed


@pytest.mark.parametrize(
    ("collected", "offset"),
    [
        pytest.param(RECEIVED - timedelta(seconds=2), timedelta(0), id="just-now"),
        pytest.param(RECEIVED - timedelta(hours=9), timedelta(0), id="backlog"),
        pytest.param(
            RECEIVED - timedelta(days=29, hours=23), timedelta(0), id="backlog-29d"
        ),
        pytest.param(
            RECEIVED + timedelta(minutes=4), timedelta(seconds=-1), id="slightly-ahead"
        ),
        pytest.param(
            RECEIVED + timedelta(minutes=7), timedelta(minutes=4), id="ahead-in-limit"
        ),
        pytest.param(RECEIVED + timedelta(minutes=4), None, id="unknown-offset-near"),
    ],
)
def test_report_not_skewed(collected: datetime, offset: timedelta | None) -> None:
    report = collected_at(collected)

    assert clock_skew_reason(report, RECEIVED, offset, LIMITS) is None


@pytest.mark.parametrize(
    ("report", "offset", "reason"),
    [
        pytest.param(
            collected_at(RECEIVED + timedelta(hours=2)),
            timedelta(hours=2),
            "the device's clock is +7200.0 s off",
            id="offset-ahead",
        ),
        pytest.param(
            report_pb2.Report(sequence=1),
            timedelta(hours=-3),
            "the device's clock is -10800.0 s off",
            id="offset-behind-no-collect-time",
        ),
        pytest.param(
            collected_at(RECEIVED + timedelta(minutes=6)),
            timedelta(seconds=-1),
            "later than the device's own clock",
            id="future-stamp",
        ),
        pytest.param(
            collected_at(RECEIVED + timedelta(minutes=6)),
            None,
            "later than the device's own clock",
            id="future-unknown-offset",
        ),
        pytest.param(
            collected_at(RECEIVED - timedelta(days=31)),
            timedelta(0),
            "31.0 days before the report arrived",
            id="too-old",
        ),
    ],
)
def test_report_skewed(
    report: report_pb2.Report, offset: timedelta | None, reason: str
) -> None:
    found = clock_skew_reason(report, RECEIVED, offset, LIMITS)

    assert found is not None
    assert reason in found


def test_no_collect_time_not_skewed() -> None:
    report = report_pb2.Report(sequence=1)

    assert clock_skew_reason(report, RECEIVED, timedelta(0), LIMITS) is None


@pytest.mark.parametrize("name", ["skew_limit", "max_report_age"])
def test_clock_limits_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ClockLimits(**{name: timedelta(0)})


# Enroll requests


def enroll_request(**fields: str) -> agent_pb2.EnrollRequest:
    values = {"device_id": DEVICE_ID, "hostname": "lab-07", "agent_version": "0.1.0"}
    values.update(fields)
    return agent_pb2.EnrollRequest(**values)


def test_enroll_request_valid() -> None:
    validate_enroll_request(enroll_request())


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"device_id": "laptop-17"}, "not a canonical lowercase UUID"),
        ({"device_id": DEVICE_ID.upper()}, "not a canonical lowercase UUID"),
        ({"device_id": NIL_UUID}, "nil UUID"),
        ({"hostname": "h" * 4097}, "hostname has 4097 characters"),
        ({"hostname": "lab\x0007"}, "EnrollRequest.hostname .* U\\+0000"),
        ({"agent_version": "v" * 129}, "agent_version has 129 characters"),
        ({"agent_version": "0.1\x00"}, "EnrollRequest.agent_version .* U\\+0000"),
    ],
)
def test_enroll_request_rejected(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        validate_enroll_request(enroll_request(**fields))


def test_enroll_request_error_omits_secret() -> None:
    secret = "fme1." + "s" * 43
    request = enroll_request(device_id="laptop-17")
    request.enrollment_secret = secret

    with pytest.raises(InvalidMessageError) as raised:
        validate_enroll_request(request)

    assert secret not in str(raised.value)
