"""`migrator report`: one self-contained HTML file (and its JSON) for the current migration, rehearsal or real, read
from the control schema on the target: the phases' timeline, each table's copy time and throughput, sync's lag,
pending events and events applied per second (its samples), the cutover and rollback attempts with their steps, the
write freeze and the client pause, the last verify, the go/no-go checklist recorded with the last attempt, the
operator actions (audit trail) and the environment (server versions, sizes, migrator version, the configuration with
its secrets removed); then the prediction for cutover night from `[rehearsal]`'s production figures, every
assumption beside its number; and the history: each report's JSON stays in the output directory, and a report
compares its run with the earlier ones there. Counts, sizes and timings only: never a row value.
The page itself is made by migrator/report_html.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator import __version__, db, report_predict, state
from migrator.config import Config, redact
from migrator.log import get

DEFAULT_DIR = Path(".migrator/reports")
"""Where reports are written (and their history kept) unless --out names another directory."""
HISTORY_MAX = 50
"""The earlier reports a report compares with: the newest this many of the directory."""
_SECRET_KEYS = re.compile(r"password|token|secret|key$", re.IGNORECASE)


@dataclass
class Written:
    html: Path
    json: Path
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def render_text(self) -> str:
        p = self.data["prediction"]
        lines = [f"report: {self.html}", f"  (figures: {self.json})"]
        for part in ("copy", "lag", "freeze"):
            if p[part].get("text"):
                lines.append(f"  {p[part]['text']}")
        if len(self.data["history"]) > 1:
            lines.append(f"  compared with {len(self.data['history']) - 1} earlier report(s) in {self.html.parent}")
        return "\n".join(lines)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def _tables(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    out = []
    for t in state.tables(conn):
        seconds = _seconds(t.copy_started_at, t.copy_finished_at)
        out.append({"table": t.display, "status": t.status, "rows": t.rows_copied, "bytes": t.bytes_copied,
                    "started_at": _iso(t.copy_started_at), "seconds": seconds,
                    "rows_per_second": (t.rows_copied or 0) / seconds if seconds else None,
                    "bytes_per_second": (t.bytes_copied or 0) / seconds if seconds else None})
    return out


def _samples(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    previous: state.SyncSample | None = None
    for s in state.samples(conn):
        rate = None
        if previous is not None:
            span = (s.at - previous.at).total_seconds()
            rate = max(0.0, (s.events_applied - previous.events_applied) / span) if span > 0 else None
        rows.append({"at": s.at.isoformat(), "lag_seconds": s.lag_seconds, "pending_events": s.pending_events,
                     "events_applied": s.events_applied, "applied_per_second": rate})
        previous = s
    return rows


def _attempts(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    out = []
    for a in state.attempts(conn):
        steps = [{"step": s["step"], "status": s["status"], "started_at": _iso(s["started_at"]),
                  "seconds": _seconds(s["started_at"], s["finished_at"]), "detail": redact(s["detail"] or ""),
                  "figures": s.get("figures")}
                 for s in a.pop("steps")]
        row = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in a.items()}
        if row.get("error"):
            row["error"] = redact(str(row["error"]))
        row["steps"] = steps
        out.append(row)
    return out


def _timeline(m: state.Migration | None, samples: list[dict[str, Any]], attempts: list[dict[str, Any]],
              verify: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The phases as (name, start, end): from the migration row's times, the samples' span and the attempts."""
    spans: list[tuple[str, str | None, str | None]] = []
    if m is not None:
        spans += [("prepare", _iso(m.created_at), _iso(m.prepared_at)),
                  ("copy", _iso(m.copy_started_at), _iso(m.copy_finished_at)),
                  ("post-data", _iso(m.copy_finished_at), _iso(m.post_data_at))]
    if samples:
        spans.append(("sync (samples)", samples[0]["at"], samples[-1]["at"]))
    spans += [(f"{a.get('kind') or 'cutover'} #{a['id']}", a.get("started_at"), a.get("finished_at"))
              for a in attempts]
    if verify and verify.get("started_at"):
        spans.append(("verify", verify["started_at"], verify.get("recorded_at")))
    return [{"phase": n, "start": s, "end": e,
             "seconds": _seconds(dt.datetime.fromisoformat(s), dt.datetime.fromisoformat(e)) if s and e else None}
            for n, s, e in spans if s and not (e and e < s)]  # post-data may end before the copy's last chunk


def _safe(value: Any, key: str = "") -> Any:
    """The configuration as data with every secret removed: passwords in DSNs, and keys that name a secret."""
    if isinstance(value, dict):
        return {k: _safe(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    if isinstance(value, str):
        return "***" if _SECRET_KEYS.search(key) and not key.endswith("file") else redact(value)
    return value if value is None or isinstance(value, bool | int | float) else redact(str(value))


def _busy(tables: list[dict[str, Any]]) -> float | None:
    """Seconds in which some table was being copied (the union of the tables' copy intervals): the copy's time
    without its setup (snapshot, workers starting) and its end."""
    spans = sorted((dt.datetime.fromisoformat(t["started_at"]), t["seconds"]) for t in tables
                   if t["started_at"] and t["seconds"] is not None)
    total, end = 0.0, None
    for start, seconds in spans:
        stop = start + dt.timedelta(seconds=seconds)
        if end is None or start >= end:
            total, end = total + seconds, stop
        elif stop > end:
            total, end = total + (stop - end).total_seconds(), stop
    return total if spans else None


def _server(dsn: str, role: str, tables: list[str] | None = None) -> dict[str, Any]:
    """A server's version and its database's size (and the total size of `tables`, schema.table, as `inspect`
    measures a table: pg_total_relation_size, and their indexes' size); what failed, when it is not reachable."""
    try:
        with db.connect(dsn, role=role, connect_timeout=5) as conn:
            row = conn.execute("SELECT current_setting('server_version'), pg_database_size(current_database()), "
                               "current_setting('default_statistics_target')::int").fetchone()
            assert row is not None
            found: dict[str, Any] = {"server_version": row[0], "database_bytes": int(row[1]),
                                     "statistics_target": int(row[2])}
            if tables:
                size = conn.execute("SELECT sum(pg_total_relation_size(to_regclass(t)))::bigint, "
                                    "sum(pg_indexes_size(to_regclass(t)))::bigint FROM unnest(%s::text[]) AS t",
                                    ([sql.Identifier(*t.split(".", 1)).as_string(conn) for t in tables],)).fetchone()
                found["tables_bytes"] = int(size[0]) if size and size[0] is not None else None
                found["index_bytes"] = int(size[1]) if size and size[1] is not None else None
            return found
    except (psycopg.Error, Exception) as exc:  # noqa: BLE001 - an unreachable server is a line of the report
        return {"unreachable": redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}


def gather(cfg: Config) -> dict[str, Any]:
    """Everything the report shows, from the control schema (and each server's version and size)."""
    with db.connect(cfg.target_dsn, role="target") as conn:
        m = state.migration(conn)
        tables = _tables(conn) if m else []
        samples = _samples(conn) if m else []
        attempts = _attempts(conn) if m else []
        found = state.last_verify(conn) if m else None
        audit = [r.to_dict() for r in state.audit_rows(conn)] if m and state.audit_present(conn) else []
        rehearsals = [dataclasses.asdict(r) for r in state.rehearsals(conn)]
        run = state.copy_run(conn) if m else None
        parts = report_predict.copy_parts(m, state.chunks(conn), cfg.copy.workers) if m else None
    verify = None
    if found is not None:
        verify = dict(found[0], started_at=found[1].isoformat())
    copy_seconds = _seconds(m.copy_started_at, m.copy_finished_at) if m else None
    busy = _busy(tables)
    copied_rows = sum(t["rows"] or 0 for t in tables)
    copied_bytes = sum(t["bytes"] or 0 for t in tables)
    lags = [s["lag_seconds"] or 0.0 for s in samples]
    rates = [s["applied_per_second"] for s in samples if s["applied_per_second"] is not None]
    last = attempts[-1] if attempts else None
    source = _server(cfg.source_dsn, "source", [t["table"] for t in tables])
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(),
        "migration": None if m is None else {
            "source": m.source, "id": str(m.migration_id) if m.migration_id else None,
            **{k: _iso(getattr(m, k)) for k in ("created_at", "prepared_at", "target_schema_at", "copy_started_at",
                                                 "copy_finished_at", "post_data_at", "cutover_at")},
            "frozen": m.frozen},
        "timeline": _timeline(m, samples, attempts, verify),
        "copy": {"seconds": copy_seconds, "rows": copied_rows, "bytes": copied_bytes, "busy_seconds": busy,
                 "workers_rate_limit_mb_s": run.max_rate if run else None,
                 "rows_per_second": copied_rows / copy_seconds if copy_seconds else None,
                 "bytes_per_second": copied_bytes / copy_seconds if copy_seconds else None, "tables": tables,
                 "parts": parts, "index_bytes": source.get("index_bytes")},
        "sync": {"samples": samples, "lag_median": statistics.median(lags) if lags else None,
                 "lag_worst": max(lags) if lags else None,
                 "pending_worst": max((s["pending_events"] for s in samples), default=None),
                 "applied_per_second_median": statistics.median(rates) if rates else None},
        "attempts": attempts,
        "last_attempt": None if last is None else {
            "id": last["id"], "kind": last.get("kind"), "status": last.get("status"),
            "freeze_seconds": last.get("freeze_seconds"), "pause_seconds": last.get("pause_seconds"),
            "checklist": last.get("checklist") or []},
        "verify": verify,
        "audit": _safe(audit),
        "rehearsals": rehearsals,
        "environment": {"migrator_version": __version__,
                        "source": source,
                        "target": _server(cfg.target_dsn, "target"),
                        "config": _safe(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))},
    }


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """What the history compares: this run's copy time, freeze window and lag."""
    last = data.get("last_attempt") or {}
    return {"generated_at": data["generated_at"], "source": (data.get("migration") or {}).get("source"),
            "copy_seconds": data["copy"]["seconds"], "copy_bytes": data["copy"]["bytes"],
            "freeze_seconds": last.get("freeze_seconds"), "pause_seconds": last.get("pause_seconds"),
            "lag_median": data["sync"]["lag_median"], "lag_worst": data["sync"]["lag_worst"]}


def _history(out: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(out.glob("report-*.json"))[-HISTORY_MAX:]:
        try:
            found.append(dict(summary(json.loads(path.read_text())), file=path.name))
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours, or from an older format: left out of the comparison
    return found


def write(cfg: Config, out: Path | None = None) -> Written:
    """Write report-<time>.html and .json into `out` (default .migrator/reports) and return them."""
    from migrator import report_html

    out = out or DEFAULT_DIR
    out.mkdir(parents=True, exist_ok=True)
    data = gather(cfg)
    data["prediction"] = report_predict.predict(data, cfg, report_predict.production(cfg))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    data["history"] = _history(out) + [dict(summary(data), file=f"report-{stamp}.json")]
    json_path, html_path = out / f"report-{stamp}.json", out / f"report-{stamp}.html"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    html_path.write_text(report_html.render(data))
    get(phase="report").info("report.written", html=str(html_path), tables=len(data["copy"]["tables"]),
                             samples=len(data["sync"]["samples"]), history=len(data["history"]))
    return Written(html_path, json_path, data)
