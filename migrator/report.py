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

from migrator import __version__, db, state
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
                  "seconds": _seconds(s["started_at"], s["finished_at"]), "detail": redact(s["detail"] or "")}
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
    measures a table: pg_total_relation_size); what failed, when it is not reachable."""
    try:
        with db.connect(dsn, role=role, connect_timeout=5) as conn:
            row = conn.execute("SELECT current_setting('server_version'), pg_database_size(current_database())"
                               ).fetchone()
            assert row is not None
            found: dict[str, Any] = {"server_version": row[0], "database_bytes": int(row[1])}
            if tables:
                size = conn.execute("SELECT sum(pg_total_relation_size(to_regclass(t)))::bigint FROM unnest(%s::text[])"
                                    " AS t", ([sql.Identifier(*t.split(".", 1)).as_string(conn)
                                               for t in tables],)).fetchone()
                found["tables_bytes"] = int(size[0]) if size and size[0] is not None else None
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
                 "bytes_per_second": copied_bytes / copy_seconds if copy_seconds else None, "tables": tables},
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
                        "source": _server(cfg.source_dsn, "source", [t["table"] for t in tables]),
                        "target": _server(cfg.target_dsn, "target"),
                        "config": _safe(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))},
    }


def _drain(attempt: dict[str, Any] | None) -> tuple[float, int] | None:
    """The drain step of a done cutover attempt: its seconds and the events it applied (from the step's detail)."""
    for s in (attempt or {}).get("steps", []):
        found = re.match(r"(\d+) events applied", s["detail"] or "")
        if s["step"] == "drain" and s["seconds"] is not None and found:
            return s["seconds"], int(found.group(1))
    return None


def _predict_copy(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    c, r = data["copy"], cfg.rehearsal
    out: dict[str, Any] = {"assumptions": []}
    if not c["seconds"]:
        out["text"] = "copy time: no finished copy recorded; nothing to predict from"
        return out
    out["assumptions"] = [f"measured: {c['bytes'] / 1e6:.1f} MB, {c['rows']} rows in {c['seconds']:.1f} s "
                          f"({c['bytes_per_second'] / 1e6:.2f} MB/s, {c['rows_per_second']:.0f} rows/s)",
                          f"the same servers, network and [copy] workers ({cfg.copy.workers}) for production",
                          "throughput stays the same at production's size (copy time grows linearly)"]
    busy = c["busy_seconds"] or c["seconds"]
    fixed = max(0.0, c["seconds"] - busy)
    out["fixed_seconds"] = fixed
    out["assumptions"].append(f"of the {c['seconds']:.1f} s, {busy:.1f} s copied tables' rows and {fixed:.1f} s went "
                              "before the first table (snapshot, workers) and after the last (post-data: indexes, "
                              "constraints): taken as fixed, although index builds grow with the size")
    guesses = []
    sized = data["environment"]["source"].get("tables_bytes")
    if r.production_bytes and sized:
        out["tables_bytes_per_second"] = sized / busy
        out["seconds_by_bytes"] = fixed + r.production_bytes / out["tables_bytes_per_second"]
        guesses.append(out["seconds_by_bytes"])
        out["assumptions"] += [
            f"production size: {r.production_bytes / 1e9:.2f} GB ([rehearsal] production_bytes: the tables' total "
            "size, as `migrator inspect` reports it)",
            f"the rehearsal's tables measure {sized / 1e6:.1f} MB the same way now (after the workload's writes): "
            f"{out['tables_bytes_per_second'] / 1e6:.2f} MB/s of table size copied"]
    if r.production_rows and c["rows"]:
        out["seconds_by_rows"] = fixed + r.production_rows * busy / c["rows"]
        guesses.append(out["seconds_by_rows"])
        out["assumptions"].append(f"production rows: {r.production_rows:.0f} ([rehearsal] production_rows)")
    if not guesses:
        out["text"] = "copy time: give [rehearsal] production_bytes or production_rows to predict production's"
        return out
    out["seconds"] = max(guesses)
    out["text"] = f"predicted copy time for production: {_duration(out['seconds'])} (the larger of the estimates)"
    return out


def _predict_lag(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    s, rate = data["sync"], cfg.rehearsal.production_write_rate
    drain = _drain(data["attempts"][-1] if data["attempts"] else None)
    capacity = drain[1] / drain[0] if drain and drain[0] > 0 and drain[1] > 0 else None
    out: dict[str, Any] = {"capacity_events_per_second": capacity, "assumptions": [
        f"measured: lag median {_num(s['lag_median'])} s, worst {_num(s['lag_worst'])} s; applied "
        f"{_num(s['applied_per_second_median'])} events/s (median of the samples: the rehearsal's write rate)",
        "sync's capacity: the cutover's drain, which applies pending events as fast as it can: "
        + (f"{capacity:.0f} events/s" if capacity else "not measured (no drain with events)")]}
    if rate is None or s["lag_median"] is None:
        out["text"] = ("sync lag: give [rehearsal] production_write_rate to predict it" if rate is None
                       else "sync lag: no samples recorded; nothing to predict from")
        return out
    out["assumptions"].append(f"production write rate: {rate:g} row changes/s ([rehearsal] production_write_rate)")
    if capacity is not None and rate >= capacity:
        out["seconds"] = None
        out["text"] = (f"sync lag at {rate:g}/s: GROWS without bound — above the measured capacity "
                       f"({capacity:.0f}/s); more apply capacity or a lower write rate is needed")
        return out
    out["seconds"] = s["lag_median"]
    out["assumptions"].append("below capacity the lag is set by sync's batch interval, not by the rate: the median "
                              "measured stays")
    out["text"] = f"expected sync lag at {rate:g}/s: about {s['lag_median']:.2f} s (the rehearsal's median)"
    return out


def _step_seconds(attempt: dict[str, Any] | None, name: str) -> float:
    return sum(s["seconds"] or 0.0 for s in (attempt or {}).get("steps", []) if s["step"] == name)


def _size_ratio(data: dict[str, Any], cfg: Config) -> tuple[float, str]:
    """Production's size over the rehearsal's (rows, else table bytes), and how it was found."""
    r, c = cfg.rehearsal, data["copy"]
    if r.production_rows and c["rows"]:
        return r.production_rows / c["rows"], f"production_rows / the {c['rows']} rows copied"
    sized = data["environment"]["source"].get("tables_bytes")
    if r.production_bytes and sized:
        return r.production_bytes / sized, "production_bytes / the rehearsal's tables' size"
    return 1.0, "no production size given: the rehearsal's"


def _predict_freeze(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    last, rate = data["last_attempt"], cfg.rehearsal.production_write_rate
    attempt = data["attempts"][-1] if data["attempts"] else None
    drain = _drain(attempt)
    out: dict[str, Any] = {"assumptions": []}
    if not last or last.get("freeze_seconds") is None or drain is None:
        out["text"] = "freeze window: no finished cutover recorded; nothing to predict from"
        return out
    freeze, (drain_s, drained) = float(last["freeze_seconds"]), drain
    verify_s = _step_seconds(attempt, "verify") if cfg.cutover.verify != "none" else 0.0
    ratio, how = _size_ratio(data, cfg)
    fixed = max(0.0, freeze - drain_s - verify_s)
    measured_rate = data["sync"]["applied_per_second_median"]
    expected = drained * (rate / measured_rate) if rate and measured_rate else float(drained)
    per_event = drain_s / drained if drained else 0.0
    out.update(fixed_seconds=fixed, expected_pending_events=expected, drain_seconds=expected * per_event,
               verify_seconds=verify_s * ratio)
    out["seconds"] = fixed + out["drain_seconds"] + out["verify_seconds"]
    out["assumptions"] = [
        f"measured: freeze {freeze:.2f} s = fixed step costs {fixed:.2f} s + verify {verify_s:.2f} s + drain "
        f"{drain_s:.2f} s of {drained} events",
        "the fixed steps (freeze, sequences, switch...) cost the same on production",
        f"the verify inside the freeze ([cutover] verify = {cfg.cutover.verify}) grows with the size: × {ratio:.1f} "
        f"({how})",
        f"events pending at the freeze scale with the write rate: {drained} × {rate or 0:g}/"
        f"{_num(measured_rate)} = {expected:.0f}" if rate and measured_rate
        else "events pending at the freeze: as in the rehearsal (no production_write_rate given)",
        f"drain time per event as measured: {per_event * 1000:.2f} ms"]
    pause = last.get("pause_seconds")
    out["client_pause_seconds"] = None if pause is None else float(pause) - freeze + out["seconds"]
    if pause is None:
        out["assumptions"].append("client pause: no pooler pause measured (clients were not paused)")
    else:
        out["assumptions"].append(f"client pause = measured pause {float(pause):.2f} s − measured freeze + "
                                  "expected freeze")
    out["text"] = (f"expected freeze window: {out['seconds']:.2f} s" +
                   ("" if pause is None else f"; client pause {out['client_pause_seconds']:.2f} s"))
    return out


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"


def predict(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    return {"copy": _predict_copy(data, cfg), "lag": _predict_lag(data, cfg), "freeze": _predict_freeze(data, cfg)}


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
    data["prediction"] = predict(data, cfg)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    data["history"] = _history(out) + [dict(summary(data), file=f"report-{stamp}.json")]
    json_path, html_path = out / f"report-{stamp}.json", out / f"report-{stamp}.html"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    html_path.write_text(report_html.render(data))
    get(phase="report").info("report.written", html=str(html_path), tables=len(data["copy"]["tables"]),
                             samples=len(data["sync"]["samples"]), history=len(data["history"]))
    return Written(html_path, json_path, data)
