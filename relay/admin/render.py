"""The ``status`` and ``inspect`` reports as aligned text for a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.admin.common import snippet
from relay.admin.report import STATUSES

LABEL = 22


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: int = 2) -> list[str]:
    """Columns as wide as their widest cell; numbers right-aligned, the last column ragged."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return (" " * indent + "  ".join(parts)).rstrip()

    return [line(headers), *(line(r) for r in cells)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_status(report: dict[str, Any]) -> str:
    lines: list[str] = []

    def row(label: str, value: Any, indent: int = 0) -> None:
        lines.append(f"{' ' * indent}{label:<{LABEL - indent}} {value}".rstrip())

    wal = report.get("wal_bytes", 0)
    row("outbox", report.get("path", "?"))
    wal_text = f" (+ {human_bytes(wal)} WAL)" if wal else ""
    row("size", human_bytes(report.get("size_bytes", 0)) + wal_text)
    row("schema version", report["schema_version"])
    row("generated at", report["generated_at"])
    lines.extend(["", "positions"])
    counts = report["counts"]
    width = max(len(f"{n:,}") for n in [*counts.values(), report["quarantine"]])
    for state in STATUSES:
        row(state, f"{counts[state]:>{width},}", indent=2)
    row("quarantine", f"{report['quarantine']:>{width},}", indent=2)
    lines.append("")

    oldest = report["oldest_pending"]
    if oldest is None:
        row("oldest pending", "none")
    else:
        row("oldest pending", f"{oldest['event_ts']}  vehicle {oldest['vehicle_id']}")
        row("age", age(oldest["age_seconds"]), indent=2)
        row("received", f"{oldest['received_at']} ({age(oldest['waiting_seconds'])})", indent=2)
        row("attempts", oldest["attempts"], indent=2)
        if oldest["attempts"]:
            row("next attempt", oldest["next_attempt_at"], indent=2)
        if oldest["last_error"]:
            row("last error", answer(oldest["last_status"], oldest["last_error"]), indent=2)

    backlog = report["backlog_vehicles"]
    if backlog:
        lines.extend(
            ["", _title("backlog (pending)", len(backlog), report["pending_vehicle_count"])]
        )
        lines += table(
            ("VEHICLE", "PENDING", "OLDEST", "AGE", "ATTEMPTS", "LAST ANSWER"),
            [
                (
                    e["vehicle_id"],
                    e["count"],
                    e["oldest_event_ts"],
                    age(e["oldest_age_seconds"]),
                    e["attempts"],
                    _answered(e),
                )
                for e in backlog
            ],
        )

    held = report["held_vehicles"]
    if held:
        lines.extend(["", _title("held (no VIN)", len(held), report["held_vehicle_count"])])
        lines += table(("VEHICLE", "HELD"), [(e["vehicle_id"], e["count"]) for e in held])
        lines.append("  add their VINs to [vehicles] and reload (SIGHUP) to send them")

    if report["failed_by_status"]:
        lines.extend(["", "failed by last status"])
        for entry in report["failed_by_status"]:
            code = entry["last_status"]
            row("no answer" if code is None else f"HTTP {code}", f"{entry['count']:,}", indent=2)
        lines.append("  `cartrack-relay requeue` sends them again")

    recent = report["recent_errors"]
    if recent:
        lines.extend(["", "recent errors, newest first"])
        lines += table(
            ("WHEN", "VEHICLE", "EVENT TS", "STATUS", "ATTEMPTS", "ANSWER"),
            [
                (
                    e["updated_at"],
                    e["vehicle_id"],
                    e["event_ts"],
                    "failed" if e["status"] == "failed" else "retrying",
                    e["attempts"],
                    answer(e["last_status"], e["last_error"]),
                )
                for e in recent
            ],
        )

    lines.append("")
    last = report["last_error"]
    if last is None:
        row("last Cartrack error", "none")
    else:
        row("last Cartrack error", last["updated_at"])
        row("", snippet(last["message"] or "", 200), indent=2)
    others = {k: v for k, v in report["relay_state"].items() if k != "last_error"}
    if others:
        lines.extend(["", "relay state"])
        for key, entry in others.items():
            row(key, f"{snippet(entry['value']) or '-'}  (since {entry['updated_at']})", indent=2)
    return "\n".join(lines)


def render_inspect(report: dict[str, Any]) -> str:
    lines = [summary(report)]
    positions = report["positions"]
    if positions:
        lines.append("")
        lines += table(
            ("EVENT TS", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "SENT AT", "CARTRACK", "EVENT ID"),
            [
                (
                    p["event_ts"],
                    p["status"],
                    p["attempts"],
                    p["next_attempt_at"],
                    p["sent_at"],
                    _answered(p),
                    p["provider_event_id"],
                )
                for p in positions
            ],
        )
    quarantine = report["quarantine"]
    if quarantine and quarantine["total"]:
        shown = len(quarantine["rows"])
        more = f", newest {shown}" if shown < quarantine["total"] else ""
        lines.extend(["", f"quarantined input for this vehicle: {quarantine['total']:,}{more}"])
        lines += table(
            ("RECEIVED", "REASON", "RAW"),
            [(q["received_at"], q["reason"], q["raw"]) for q in quarantine["rows"]],
        )
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    """One line: what was looked for, and where its positions are."""
    counts = report["counts"]
    total = report["total"]
    if report["event_id"] is not None:
        if not total:
            return (
                f"event {report['event_id']}: not in the outbox (never received, quarantined,"
                " or purged after being sent)"
            )
        only = report["positions"][0]
        return f"event {report['event_id']}: {only['status']}, vehicle {report['vehicle_id']}"
    window = ""
    if report["since"] or report["until"]:
        window = f" from {report['since'] or 'the start'} to {report['until'] or 'now'}"
    by_status = ", ".join(f"{counts[s]:,} {s}" for s in STATUSES if counts[s])
    text = f"vehicle {report['vehicle_id']}{window}: {plural(total, 'position')}"
    if by_status:
        text += f" ({by_status})"
    quarantined = report["quarantine"]["total"] if report["quarantine"] else 0
    if quarantined:
        text += f", {plural(quarantined, 'quarantined input')}"
    shown = len(report["positions"])
    if shown < total:
        which = "first" if report["since"] else "newest"
        text += f"; showing the {which} {shown} (--limit, --from, --to)"
    return text


def answer(status: int | None, detail: str | None) -> str:
    """Cartrack's last answer in a cell: the HTTP status and the start of its detail."""
    head = "no answer" if status is None else f"HTTP {status}"
    return f"{head}: {snippet(detail, 80)}" if detail else head


def _answered(row: dict[str, Any]) -> str | None:
    if row["last_status"] is None and not row["last_error"]:
        return None  # never tried, or tried and the answer is not known
    return answer(row["last_status"], row["last_error"])


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _title(title: str, shown: int, total: int) -> str:
    top = f", top {shown}" if total > shown else ""
    return f"{title}: {plural(total, 'vehicle')}{top}"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(abs(seconds)), 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    # The two largest units are precise enough for an operator.
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), 3)
    text = " ".join(f"{n}{unit}" for n, unit in parts[first : first + 2])
    return f"{text} in the future" if seconds < 0 else f"{text} ago"


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007 -- the last unit reached is used below
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"
