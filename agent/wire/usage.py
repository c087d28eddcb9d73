"""Convert the usage summary to its wire message."""

from __future__ import annotations

from agent.usage.tracker import WINDOW_DAYS, UsageSummary
from fleetmend.v1 import report_pb2


def usage_to_proto(
    summary: UsageSummary | None, enabled: bool
) -> report_pb2.UsageSection:
    """Build the usage section; with enabled False it contains no apps.

    A None summary (collection on, nothing summarized yet) gives an enabled section
    without apps and with window_days 0.
    """
    section = report_pb2.UsageSection(enabled=enabled)
    if not enabled or summary is None:
        return section

    section.window_days = min(summary.window_days, WINDOW_DAYS)
    for app in summary.apps:
        hours = sorted((hour, minutes) for hour, minutes in app.hours if minutes > 0)
        if not hours:
            continue
        message = section.apps.add(app_id=app.app_id)
        message.hours_of_week.extend(hour for hour, _ in hours)
        message.minutes.extend(minutes for _, minutes in hours)
    return section
