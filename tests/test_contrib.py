"""contrib/: the Grafana dashboard and the Prometheus alerts use only the relay's metric names.

The names below are the ones agreed for relay/metrics.py; a dashboard or rule that
queries anything else shows "No data" or never fires, silently.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_metrics import AGREED as METRICS_EXPORTED

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
DASHBOARD = CONTRIB / "grafana-dashboard.json"
ALERTS = CONTRIB / "prometheus-alerts.yml"

# What the relay exports (test_metrics checks the relay against this very table), so a
# dashboard or alert on a name the relay does not have fails here.
AGREED: dict[str, set[str]] = METRICS_EXPORTED
HISTOGRAMS = {"relay_webhook_ack_seconds", "relay_cartrack_request_seconds"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
OUTBOX_STATUSES = {"pending", "held", "failed", "sent"}


def series_labels() -> dict[str, set[str]]:
    """Every series name a query may use, with the labels it carries."""
    names = {name: labels | TARGET_LABELS for name, labels in AGREED.items()}
    for name in HISTOGRAMS:
        del names[name]
        names[f"{name}_bucket"] = {"le"} | TARGET_LABELS
        names[f"{name}_sum"] = names[f"{name}_count"] = set(TARGET_LABELS)
    names["up"] = set(TARGET_LABELS)  # Prometheus's own: is the target scraped
    return names


SERIES = series_labels()


def check_expr(expr: str) -> set[str]:
    """The series an expression reads; fails on a name or label nobody exports."""
    used = set(re.findall(r"\brelay_[a-z0-9_]+", expr))
    assert used <= set(SERIES), (expr, used - set(SERIES))
    for name, matchers in re.findall(r"\b(relay_[a-z0-9_]+|up)\{([^}]*)\}", expr):
        for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', matchers):
            assert label in SERIES[name], (expr, name, label)
            if name == "relay_outbox_positions" and label == "status" and "$" not in value:
                assert set(value.split("|")) <= OUTBOX_STATUSES, (expr, value)
    # Grouping labels must exist on what is grouped.
    available = set().union(*(SERIES[n] for n in used | {"up"} if n in SERIES))
    for clause in re.findall(r"\b(?:by|on|without)\s*\(([^)]*)\)", expr):
        labels = {part.strip() for part in clause.split(",") if part.strip()}
        assert labels <= available, (expr, labels - available)
    return used


# -- Grafana ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in exprs(value)]
    if isinstance(node, list):
        return [e for value in node for e in exprs(value)]
    return []


def test_dashboard_queries_only_agreed_metrics() -> None:
    data = dashboard()
    queries = exprs(data)
    assert len(queries) >= 15
    used = set().union(*(check_expr(q) for q in queries))
    # Every agreed metric has a panel (histograms through their buckets).
    wanted = {f"{n}_bucket" if n in HISTOGRAMS else n for n in AGREED}
    assert wanted <= used, wanted - used
    # Nowhere else (titles, variables, descriptions) names a metric that does not exist.
    everywhere = set(re.findall(r"\brelay_[a-z0-9_]+", DASHBOARD.read_text(encoding="utf-8")))
    assert everywhere <= set(SERIES), everywhere - set(SERIES)


def test_dashboard_structure() -> None:
    data = dashboard()
    assert data["title"] == "cartrack-relay"
    assert data["uid"]
    panels = data["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in data["templating"]["list"]}
    assert variables == {"datasource", "job"}
    titles = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            # Every query follows the job picker, so two relays are not summed by accident.
            assert '$job"' in target["expr"], (panel["title"], target["expr"])
    for title in (
        "Ingest rate",
        "Stored, duplicate, quarantined, held",
        "Outbox rows by status",
        "Oldest pending age",
        "Events sent, failed, retried",
        "Cartrack responses by status",
        "Cartrack request latency",
        "Webhook ack latency",
        "Forwarder paused",
    ):
        assert title in titles
    latency = next(p for p in panels if p["title"] == "Cartrack request latency")
    assert [t["expr"][:24] for t in latency["targets"]] == [
        "histogram_quantile(0.5, ",
        "histogram_quantile(0.99,",
    ]


# -- Prometheus rules --------------------------------------------------------------------


def parse_rules(text: str) -> list[dict[str, Any]]:
    """The rules of our alerts file, read without PyYAML.

    Understands the subset the file uses: two-space indents, ``key: value``,
    ``key: >-`` folded blocks and ``- `` list items. Anything else fails the test, so
    the file stays in a shape both this and Prometheus read the same way.
    """
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "\t" not in text
    assert lines[0] == "groups:"
    rules: list[dict[str, Any]] = []
    rule: dict[str, Any] | None = None
    section: dict[str, Any] | None = None
    block: tuple[dict[str, Any], str, int] | None = None
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip())
        if block is not None and indent > block[2]:
            target, key, _ = block
            target[key] = (target[key] + " " + line.strip()).strip()
            continue
        block = None
        m = re.fullmatch(r"( *)(- )?([a-z_]+): ?(.*)", line)
        assert m, line
        key, value = m.group(3), m.group(4)
        depth = len(m.group(1)) + (2 if m.group(2) else 0)
        if depth == 4 and key == "name":
            assert m.group(2), line
            continue
        if depth == 4 and key == "rules":
            continue
        if depth == 8 and m.group(2):
            assert key == "alert", line
            rule = {"alert": value}
            rules.append(rule)
            continue
        assert rule is not None, line
        if depth == 8:
            if key in ("labels", "annotations"):
                section = rule[key] = {}
                assert value == "", line
                continue
            target = rule
        else:
            assert depth == 10, line
            assert section is not None, line
            target = section
        if value in (">-", ">", "|", "|-"):
            target[key] = ""
            block = (target, key, depth)
        else:
            target[key] = value.strip('"')
    return rules


def load_rules() -> list[dict[str, Any]]:
    text = ALERTS.read_text(encoding="utf-8")
    rules = parse_rules(text)
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return rules
    # PyYAML happens to be installed: it must read the same rules.
    (group,) = yaml.safe_load(text)["groups"]
    parsed = [{k: str(v) if k == "for" else v for k, v in r.items()} for r in group["rules"]]
    assert parsed == rules
    return rules


DURATION = re.compile(r"\d+[smhd]")


def test_alert_rules_use_only_agreed_metrics() -> None:
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        used = check_expr(rule["expr"])
        assert used or "up{" in rule["expr"], rule["alert"]
        assert 'job="cartrack-relay"' in rule["expr"], rule["alert"]
        assert DURATION.fullmatch(rule.get("for", "0s")), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
    # What an operator must be woken for, each covered by a rule on the right metric.
    by_name = {r["alert"]: r["expr"] for r in rules}
    for alert, metric in {
        "CartrackRelayDown": "up{",
        "CartrackRelayNotReady": "relay_outbox_positions",
        "CartrackRelayStoreErrors": "relay_outbox_store_errors_total",
        "CartrackRelayBacklogOld": "relay_outbox_oldest_pending_age_seconds",
        "CartrackRelayDeadLetters": "relay_events_failed_total",
        "CartrackRelayRetriesRising": "relay_events_retried_total",
        "CartrackRelayForwarderPaused": "relay_forwarder_paused",
    }.items():
        assert metric in by_name[alert], alert


def test_the_rule_reader_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(AssertionError):
        parse_rules(
            "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: [1, 2]\n  oops\n"
        )
    rules = parse_rules(
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: >-\n"
        '          up{job="cartrack-relay"}\n          == 0\n        labels:\n'
        "          severity: info\n"
    )
    assert rules == [
        {"alert": "A", "expr": 'up{job="cartrack-relay"} == 0', "labels": {"severity": "info"}}
    ]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_expr_catches_wrong_names_and_labels() -> None:
    assert check_expr('sum by (reason) (rate(relay_events_failed_total{job="x"}[5m]))') == {
        "relay_events_failed_total"
    }
    for wrong in (
        "rate(relay_events_sent[5m])",  # without _total
        'relay_outbox_positions{state="pending"}',
        'relay_outbox_positions{status="queued"}',
        "sum by (reason) (rate(relay_events_sent_total[5m]))",
        "relay_webhook_ack_seconds",  # a histogram is read through _bucket/_sum/_count
    ):
        with pytest.raises(AssertionError):
            check_expr(wrong)
