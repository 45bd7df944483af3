"""Operator commands behind the CLI: ``status``, ``inspect``, ``requeue`` and ``purge``.

They use their own synchronous connection to the outbox file, so they work while the
daemon runs (WAL plus the busy timeout). Every query is served by an index, so
millions of delivered rows cost nothing except in the per-status count.

- common: the connection, its errors, time filters
- report: ``status`` data;  inspect: ``inspect`` data
- changes: ``requeue`` and ``purge``
- render: both reports as text
"""

from relay.admin.changes import REQUEUE_STATUSES, RequeueResult, purge, requeue
from relay.admin.common import AdminError, FilterError, open_outbox, parse_time, time_window
from relay.admin.inspect import inspect_event, inspect_vehicle
from relay.admin.render import render_inspect, render_status
from relay.admin.report import STATUSES, TOP, collect_status, status

__all__ = [
    "REQUEUE_STATUSES",
    "STATUSES",
    "TOP",
    "AdminError",
    "FilterError",
    "RequeueResult",
    "collect_status",
    "inspect_event",
    "inspect_vehicle",
    "open_outbox",
    "parse_time",
    "purge",
    "render_inspect",
    "render_status",
    "requeue",
    "status",
    "time_window",
]
