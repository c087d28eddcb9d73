"""Which devices an outage affects: usage hours of the week against a span.

A device's UsageSection lists, per catalogued application, the minutes of use
in each hour of the week (0 is Monday 00:00 to 00:59, 167 is Sunday 23:00 to
23:59), summed over the usage window. An outage affects a device when the
device's users used the application in at least one hour of the week that
the outage's span touches, with any number of minutes.

NOTE: agents report hours of the week in the device's local time but not the
device's time zone, so the span is matched in the time zone that the operator
gives for the outage. Devices in another time zone are matched as if they
were in that one.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from fleetmend.v1 import report_pb2

HOURS_PER_WEEK = 168
_HOUR = timedelta(hours=1)
# Time zone offsets change on whole seconds, which bounds the search for the
# instant of a change.
_OFFSET_RESOLUTION = timedelta(seconds=1)


def covered_hours_of_week(
    start: datetime, end: datetime, zone: ZoneInfo
) -> frozenset[int]:
    """Return the hours of the week, in zone's local time, that [start, end) touches.

    start and end must be timezone-aware; end is exclusive, so a span from
    09:00 to 10:00 covers hour 9 only. An empty or reversed span covers none.
    Daylight saving time follows zone: a local hour that a change skips is
    not covered, and one that a change repeats is covered once.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware datetimes")
    hours: set[int] = set()
    moment = start
    while moment < end and len(hours) < HOURS_PER_WEEK:
        local = moment.astimezone(zone)
        hours.add(local.weekday() * 24 + local.hour)
        moment = _next_local_hour(moment, zone)
    return frozenset(hours)


def _next_local_hour(moment: datetime, zone: ZoneInfo) -> datetime:
    """Return the first instant after moment at which zone's local hour changes."""
    local = moment.astimezone(zone)
    into_hour = timedelta(
        minutes=local.minute, seconds=local.second, microseconds=local.microsecond
    )
    candidate = moment + (_HOUR - into_hour)
    if candidate.astimezone(zone).utcoffset() == local.utcoffset():
        return candidate
    # The offset changes before the local hour ends, for example in a zone
    # that moves its clocks by 30 minutes, and the local hour changes with it.
    # Bisect for the first second with the new offset.
    low, high = moment, candidate
    while high - low > _OFFSET_RESOLUTION:
        middle = low + (high - low) / 2
        if middle.astimezone(zone).utcoffset() == local.utcoffset():
            low = middle
        else:
            high = middle
    return high


def uses_app_in_hours(
    usage: report_pb2.UsageSection, app_id: str, hours: frozenset[int]
) -> bool:
    """Return whether usage shows minutes of app_id in any of hours.

    A section with usage collection switched off shows none.
    """
    if not usage.enabled:
        return False
    for app in usage.apps:
        if app.app_id != app_id:
            continue
        for hour, minutes in zip(app.hours_of_week, app.minutes, strict=False):
            if minutes > 0 and hour in hours:
                return True
    return False


def usually_uses_app(
    usage: report_pb2.UsageSection,
    app_id: str,
    start: datetime,
    end: datetime,
    zone: ZoneInfo,
) -> bool:
    """Return whether a device's users usually use app_id in the span's hours.

    The span [start, end) is matched against the device's hours of the week in
    zone (see the module's note on time zones).
    """
    return uses_app_in_hours(usage, app_id, covered_hours_of_week(start, end, zone))
