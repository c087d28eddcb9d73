"""Plain-text views of a report and of what the agent collects."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format

from agent.config import AgentConfig
from agent.spool import SPOOL_FILE, SpoolStats
from agent.text import count_text, escape_controls, format_bytes
from fleetmend.v1 import remediation_pb2, report_pb2

if TYPE_CHECKING:
    from agent.healing.actions.base import ActionResult
    from agent.healing.engine import RulePreview


# Width of the lines that the render functions wrap. show's text is narrower,
# as prose for people to read.
LINE_WIDTH = 88
DISCLOSURE_WIDTH = 78


def wrap_line(text: str, indent: str, width: int = LINE_WIDTH) -> str:
    """Wrap one line at width, indenting continuation lines by indent.

    Words longer than a line, such as paths, are kept whole. Control
    characters, such as the ESC of a terminal escape sequence in a reason
    from the collector, are printed as escapes (see escape_controls).
    """
    return textwrap.fill(
        escape_controls(text),
        width,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _duration(span: timedelta) -> str:
    """Return a span as "3d 4h", "5h 12m" or "7m"; a negative span as "0m"."""
    minutes = max(0, int(span.total_seconds() // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def _enum(enum_type: object, value: int, prefix: str) -> str:
    try:
        name = enum_type.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix(prefix).lower().replace("_", " ")


def _errors(lines: list[str], errors: object) -> None:
    for error in errors:  # type: ignore[attr-defined]
        kind = _enum(report_pb2.ProbeErrorKind, error.kind, "PROBE_ERROR_KIND_")
        lines.append(f"  ! {error.source}: {kind}: {error.reason}")


def render_host(lines: list[str], host: report_pb2.HostFacts, now: datetime) -> None:
    lines.append(f"Host {host.hostname}")
    lines.append(
        f"  OS: {host.os_name} {host.os_version}, "
        f"kernel {host.kernel_version} ({host.architecture})"
    )
    model = " ".join(p for p in (host.manufacturer, host.model) if p) or "unknown"
    serial = host.serial_number or "not readable"
    lines.append(f"  model: {model}, serial: {serial}")
    if host.HasField("boot_time"):
        uptime = now - host.boot_time.ToDatetime(UTC)
        lines.append(
            f"  up {_duration(uptime)}, memory {format_bytes(host.memory_bytes)}"
        )
    for volume in host.volumes:
        lines.append(
            f"  volume {volume.mount_point} ({volume.filesystem}): "
            f"{format_bytes(volume.free_bytes)} free of "
            f"{format_bytes(volume.total_bytes)}"
        )
    _errors(lines, host.errors)


def render_disks(lines: list[str], section: report_pb2.DiskSection) -> None:
    lines.append(f"Disks: {len(section.disks)}")
    for disk in section.disks:
        interface = _enum(report_pb2.DiskInterface, disk.interface, "DISK_INTERFACE_")
        state = _enum(report_pb2.SmartState, disk.smart_state, "SMART_STATE_")
        lines.append(
            f"  {disk.name}: {disk.model or 'unknown model'} ({interface}, "
            f"{format_bytes(disk.capacity_bytes)}), "
            f"serial {disk.serial_number or 'unknown'}"
        )
        detail = f"    SMART {state}"
        if disk.smart_state_reason:
            detail += f": {disk.smart_state_reason}"
        if disk.self_assessment:
            verdict = _enum(
                report_pb2.SelfAssessment, disk.self_assessment, "SELF_ASSESSMENT_"
            )
            detail += f"; self-assessment {verdict}"
        lines.append(detail)
        for attribute in disk.ata_attributes:
            lines.append(
                f"    {attribute.id:>3} {attribute.name}: value {attribute.value}, "
                f"threshold {attribute.threshold}, "
                f"raw {attribute.raw_text or attribute.raw}"
            )
        if disk.HasField("nvme_health"):
            health = disk.nvme_health
            lines.append(
                f"    NVMe: critical warning {health.critical_warning:#04x}, "
                f"spare {health.available_spare_percent}% (threshold "
                f"{health.available_spare_threshold_percent}%), "
                f"used {health.percentage_used}%, "
                f"media errors {health.media_errors}, unsafe shutdowns "
                f"{health.unsafe_shutdowns}, {health.temperature_celsius} °C, "
                f"{health.power_on_hours} h on"
            )
    _errors(lines, section.errors)


def render_batteries(lines: list[str], section: report_pb2.BatterySection) -> None:
    lines.append(f"Batteries: {len(section.batteries)}")
    for battery in section.batteries:
        health = (
            f"health {battery.health_percent:.1f}%"
            if battery.HasField("health_percent")
            else "health unknown (no design capacity)"
        )
        cycles = (
            str(battery.cycle_count) if battery.HasField("cycle_count") else "unknown"
        )
        status = _enum(report_pb2.BatteryStatus, battery.status, "BATTERY_STATUS_")
        lines.append(
            f"  {battery.name}: {battery.manufacturer} {battery.model}, {health}, "
            f"{cycles} cycles, {status}"
        )
    _errors(lines, section.errors)


def render_credentials(lines: list[str], section: report_pb2.CredentialSection) -> None:
    lines.append(f"Credentials: {len(section.credentials)}")
    for credential in section.credentials:
        expiry = credential.expiry
        if expiry == report_pb2.CREDENTIAL_EXPIRY_AT_TIME:
            when = "expires " + credential.expire_time.ToDatetime(UTC).strftime(
                "%Y-%m-%d %H:%M UTC"
            )
        else:
            when = _enum(report_pb2.CredentialExpiry, expiry, "CREDENTIAL_EXPIRY_")
        kind = _enum(report_pb2.CredentialKind, credential.kind, "CREDENTIAL_KIND_")
        lines.append(f"  {credential.account} ({kind}): {when}")
    _errors(lines, section.errors)


def render_usage(lines: list[str], section: report_pb2.UsageSection) -> None:
    if not section.enabled:
        lines.append("Usage: collection switched off")
        return
    lines.append(
        f"Usage over {count_text(section.window_days, 'day')}: "
        f"{count_text(len(section.apps), 'application')}"
    )

    for app in section.apps:
        total = sum(app.minutes)
        lines.append(
            f"  {app.app_id}: {count_text(total, 'minute')} in "
            f"{count_text(len(app.hours_of_week), 'hour')} of the week"
        )


def render_report(report: report_pb2.Report, now: datetime | None = None) -> str:
    """Return a report as text for people, one section after another."""
    now = now or datetime.now(UTC)
    kind = "full" if report.full else "delta"
    if report.sequence:
        title = f"Report {report.sequence} ({kind}, {report.ByteSize()} bytes)"
    else:
        title = f"Full report of this computer ({report.ByteSize()} bytes)"
    lines = [title]
    if report.HasField("host"):
        render_host(lines, report.host, now)
    if report.HasField("disks"):
        render_disks(lines, report.disks)
    if report.HasField("batteries"):
        render_batteries(lines, report.batteries)
    if report.HasField("credentials"):
        render_credentials(lines, report.credentials)
    if report.HasField("usage"):
        render_usage(lines, report.usage)
    return "\n".join(lines) + "\n"


def render_spool(stats: SpoolStats | None, path: Path, max_bytes: int) -> list[str]:
    """Describe where reports wait before the collector stores them."""
    lines = [
        "",
        f"Reports wait in {path} (at most {format_bytes(max_bytes)}) until the",
        "collector confirms that it stored them. When the cap is reached, the",
        "oldest routine reports are dropped and the collector is told how many.",
    ]
    if stats is None:
        lines.append("The spool is not created yet.")
    else:
        lines.append(
            f"Now: {count_text(stats.pending_reports, 'report')} waiting, "
            f"{format_bytes(stats.file_bytes)} on disk, "
            f"{count_text(stats.dropped_reports, 'report')} dropped and not yet "
            "reported."
        )
        if stats.quarantined:
            verb = "is" if stats.quarantined == 1 else "are"
            lines.append(
                f"{count_text(stats.quarantined, 'report')} that the collector "
                f"rejected as invalid {verb} kept aside in the same file and "
                "not sent again."
            )
    return lines


def _healing_disclosure(config: AgentConfig) -> str:
    if not config.healing_enabled:
        return (
            "OFF: no rule runs; operator commands are refused, and each refusal "
            "is reported."
        )
    return (
        "ON: a record of each time a rule or an operator command acted, failed "
        "or was skipped: the rule's name, the action and its parameters (such "
        "as cache set names or a service name), the outcome and its reason, "
        "the value the rule tested before and after (such as free bytes of a "
        "volume), the start time, the duration and the bytes freed; and which "
        "policy version runs, or why one was rejected. Never the names or "
        "contents of deleted files."
    )


def _collector_text(config: AgentConfig) -> str:
    """Return the collector that run connects to and the source of that value."""
    setting = config.settings["collector"]
    if not setting.value:
        return (
            "no collector set; enroll with fleetmend-agent enroll --collector HOST:PORT"
        )
    source = setting.source
    if source == "flag":
        origin = "set by --collector"
    elif source.startswith("env "):
        origin = f"set by {source.removeprefix('env ')}"
    elif source.startswith("file "):
        origin = f"set in {source.removeprefix('file ')}"
    elif source.startswith("enrollment "):
        origin = f"from the enrollment in {source.removeprefix('enrollment ')}"
    else:
        origin = source
    return f"{setting.value} ({origin})"


def render_disclosure(
    config: AgentConfig,
    catalog_apps: list[str] | None,
    spool: SpoolStats | None = None,
    key_store: str = "",
) -> str:
    """Describe in plain words what this agent sends to the collector.

    key_store names where the node key is kept, empty when not enrolled.
    """
    collector = _collector_text(config)
    if not config.usage_enabled:
        usage = "OFF: no information about applications or processes is collected."
    else:
        usage = (
            "ON: for each application in the catalog below, the number of minutes "
            "it was in use in each hour of the week (local time), summed over the "
            "last 28 days (fewer while the agent is new)."
        )
    lines = [
        wrap_line(
            f"This Fleetmend agent sends reports to: {collector}",
            "  ",
            DISCLOSURE_WIDTH,
        ),
        "",
        "What it sends:",
        "- Computer: host name, operating system and kernel version, manufacturer,",
        "  model and serial number, boot time, memory size, and the size and free",
        "  space of each local volume.",
        "- Disks: model, serial number, interface, capacity and the drive's own",
        "  health data (SMART attributes or the NVMe health log).",
        "- Batteries: model, capacity when new and now, cycle count, charge status.",
        "- Passwords: for each local account with a login shell, when its password",
        "  expires. Never the password itself.",
        wrap_line(f"- Application usage: {usage}", "  ", DISCLOSURE_WIDTH),
        wrap_line(
            f"- Self-healing: {_healing_disclosure(config)}", "  ", DISCLOSURE_WIDTH
        ),
        "",
        "What it never sends: file names or contents, window titles, web addresses,",
        "keystrokes, the names of processes outside the catalog, or where you are.",
        "",
        *textwrap.wrap(
            "Node key: this device's credential, issued by the collector at "
            f"enrollment and stored locally ({key_store or 'not enrolled yet'}). "
            "It is never sent except as the credential of each connection to "
            "the collector.",
            DISCLOSURE_WIDTH,
            break_long_words=False,
            break_on_hyphens=False,
        ),
    ]
    if config.usage_enabled and config.usage_resolve_hosts:
        lines += [
            "",
            "To recognize web applications, the agent looks up the catalog's host",
            "names in DNS and compares their addresses with the connections of",
            "programs on this computer. The addresses are not sent.",
        ]
    lines += render_spool(spool, config.state_dir / SPOOL_FILE, config.spool_max_bytes)
    if config.usage_enabled and catalog_apps is not None:
        lines += ["", "Applications in the catalog:"]
        lines += [f"- {name}" for name in catalog_apps]
    return "\n".join(lines) + "\n"


# A parameter string shown without quotes: a cache set, service or app name.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9@._:/-]+")


def _param_text(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(_param_text, value))
    if isinstance(value, str) and not _PLAIN_WORD.fullmatch(value):
        return repr(value)
    return str(value)


def _action_text(action: remediation_pb2.Action) -> str:
    """Return an action as its kind and its parameters, such as "notify (title 'x')".

    The names are those of the policy file, so that an administrator can find
    them there. Strings other than plain names are quoted. Commas separate
    list items, and semicolons separate parameters.
    """
    kind = action.WhichOneof("kind")
    if kind is None:
        return "none"
    params = json_format.MessageToDict(
        getattr(action, kind), preserving_proto_field_name=True
    )
    if not params:
        return kind
    words = "; ".join(f"{key} {_param_text(value)}" for key, value in params.items())
    return f"{kind} ({words})"


def _rule_state(preview: RulePreview, refusal: str | None = None) -> str:
    """Return what the rule would do at the next evaluation, in words.

    refusal is the reason the device refuses the rule, None when it runs. A
    refused or paused rule never acts, so it is shown as such whatever its
    condition. A refusal's reason is printed once, at the top.
    """
    if refusal is not None:
        return "refused on this device (see above); its action does not run"
    if preview.rule.paused:
        return (
            f"{preview.skip_reason}; the running agent skips it until the "
            "collector resumes it"
        )
    if not preview.condition.holds:
        return "nothing to do"
    if preview.skip_reason:
        return f"skipped: {preview.skip_reason}"
    if preview.rule.dry_run:
        return "would dry-run its action and report the result"
    return "would act"


def _dry_run_text(result: ActionResult) -> str:
    """Return the outcome and reason of an action's dry run.

    The reason of a DRY_RUN outcome starts with "would" in every action, so
    only the reason is shown for it.
    """
    if result.outcome == remediation_pb2.REMEDIATION_OUTCOME_DRY_RUN:
        return result.reason or "would act"
    outcome = _enum(
        remediation_pb2.RemediationOutcome, result.outcome, "REMEDIATION_OUTCOME_"
    )
    return f"{outcome}: {result.reason}" if result.reason else outcome


def render_rules(
    previews: Sequence[RulePreview],
    status: remediation_pb2.PolicyStatus,
    local_policy: str = "Built-in policy",
) -> str:
    """Describe each rule: its condition now, its limits and its action's dry run."""
    # Imported here, so that the other views load without the healing package.
    from agent.healing.policy import version_name

    if status.applied_version:
        title = _capitalized(
            version_name(status.applied_fleet_version, status.applied_version)
        )
        title += " from the collector"
    else:
        title = local_policy
    lines = [
        f"{title}, {count_text(len(previews), 'rule')}. A dry run: nothing was changed."
    ]
    if status.rejected_version:
        rejected = version_name(status.rejected_fleet_version, status.rejected_version)
        lines.append(
            wrap_line(
                f"  ! {rejected} from the collector was rejected: "
                f"{status.rejected_reason}",
                "    ",
            )
        )
    refusals = {refused.rule_name: refused.reason for refused in status.refused_rules}
    for name, reason in refusals.items():
        lines.append(
            wrap_line(f"  ! rule {name} is refused on this device: {reason}", "    ")
        )
    for preview in previews:
        rule = preview.rule
        tags = [
            tag
            for tag, on in (("paused", rule.paused), ("dry-run rule", rule.dry_run))
            if on
        ]
        suffix = f" ({', '.join(tags)})" if tags else ""
        met = "met" if preview.condition.holds else "not met"
        lines.append("")
        lines.append(f"Rule {rule.name}{suffix}")
        lines.append(
            wrap_line(f"  condition {met}: {preview.condition.detail}", "    ")
        )
        state = _rule_state(preview, refusals.get(rule.name))
        lines.append(wrap_line(f"  now: {state}", "    "))
        lines.append(wrap_line(f"  action: {_action_text(rule.action)}", "    "))
        if rule.name not in refusals:
            dry_run = _dry_run_text(preview.result)
            lines.append(wrap_line(f"  dry run: {dry_run}", "    "))
    return "\n".join(lines) + "\n"


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
