"""`/metrics` for the site's monitoring, in Prometheus' text format (version 0.0.4), from the poller's last view: lag,
pending events (also per table), the delta log's size, copy progress, the last verify, frozen, held. Table names are
the only labels; no row values."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(v: Any) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{float(v):g}" if isinstance(v, float) else str(int(v))


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(view: dict[str, Any], source_statements: int) -> str:
    lines: list[str] = []

    def metric(name: str, help_: str, value: Any, kind: str = "gauge",
               labelled: list[tuple[dict[str, str], Any]] | None = None) -> None:
        lines.append(f"# HELP migrator_{name} {help_}")
        lines.append(f"# TYPE migrator_{name} {kind}")
        if labelled is None:
            lines.append(f"migrator_{name} {_value(value)}")
        for labels, v in labelled or []:
            text = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            lines.append(f"migrator_{name}{{{text}}} {_value(v)}")

    lag = view.get("lag") or {}
    copy = view.get("copy") or {}
    verify = view.get("verify") or {}
    phase = (view.get("phase") or {}).get("name", "unknown")
    metric("up", "1 when the console reads the control schema on the target", "error" not in view)
    metric("phase", "The migration's phase (1 for the current one)", None,
           labelled=[({"phase": phase}, 1)])
    metric("lag_seconds", "Age of the oldest committed change not yet applied on the target (0: none pending)",
           lag.get("seconds") or (0.0 if lag.get("pending") is not None else None))
    metric("pending_events", "Committed changes not yet applied on the target", lag.get("pending"))
    metric("pending_events_by_table", "Committed changes not yet applied, per table", None,
           labelled=[({"table": t["table"]}, t["pending"]) for t in view.get("tables") or []])
    metric("delta_log_bytes", "Size of the delta log on the legacy database", lag.get("log_bytes"))
    metric("events_applied_total", "Events sync has applied", lag.get("applied"), "counter")
    metric("copy_bytes", "Bytes copied so far", copy.get("bytes"))
    metric("copy_estimated_bytes", "Bytes the copy's chunks hold by the source's estimate",
           copy.get("estimated_bytes"))
    metric("copy_chunks", "Chunks the copy planned", copy.get("chunks"))
    metric("copy_chunks_done", "Chunks copied", copy.get("chunks_copied"))
    metric("copy_tables", "Captured tables", copy.get("tables"))
    metric("copy_tables_done", "Tables copied", copy.get("copied"))
    metric("copy_is_paused", "1 while the copy is paused by an operator", bool(copy.get("paused")))
    metric("last_verify_identical", "1 when the last verify found both sides identical (NaN: none recorded)",
           verify.get("identical") if verify else None)
    metric("last_verify_differences", "Differences the last verify found", verify.get("differences"))
    since = verify.get("since")
    metric("last_verify_timestamp_seconds", "When the last verify started (Unix time)",
           since.timestamp() if isinstance(since, dt.datetime) else None)
    metric("frozen", "1 while the legacy database is frozen (rejects writes)", view.get("frozen"))
    metric("cutover_held", "1 while an operator holds the cutover", view.get("hold") is not None)
    metric("console_source_statements_total", "Statements the console's own session sent the legacy database",
           source_statements, "counter")
    return "\n".join(lines) + "\n"
