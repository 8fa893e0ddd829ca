"""The page of `migrator report` (migrator/report.py): one HTML file with its charts as inline SVG drawn here (a line
chart and a bar chart, no plotting library), no script and no external address, so that it opens offline and prints
to PDF. Every text from the data is escaped."""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import Any

W, H, PAD = 720, 220, 48


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return escape(str(v))


def line_chart(title: str, points: list[tuple[float, float]], x_label: str, y_label: str) -> str:
    """An SVG line chart of (x, y) points, with the axes' ranges written at their ends."""
    if len(points) < 2:
        return f'<p class="none">{escape(title)}: fewer than two samples.</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y1 = min(xs), max(xs), max(max(ys), 1e-9)
    sx = (W - 2 * PAD) / ((x1 - x0) or 1.0)
    sy = (H - 2 * PAD) / y1
    path = " ".join(f"{PAD + (x - x0) * sx:.1f},{H - PAD - y * sy:.1f}" for x, y in points)
    return (f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">'
            f'<title>{escape(title)}</title>'
            f'<text x="{PAD}" y="18" class="t">{escape(title)}</text>'
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" class="ax"/>'
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" class="ax"/>'
            f'<text x="{PAD - 4}" y="{PAD + 4}" class="l" text-anchor="end">{_fmt(y1)}</text>'
            f'<text x="{PAD - 4}" y="{H - PAD}" class="l" text-anchor="end">0</text>'
            f'<text x="{PAD}" y="{H - PAD + 16}" class="l">{_fmt(x0, 0)}</text>'
            f'<text x="{W - PAD}" y="{H - PAD + 16}" class="l" text-anchor="end">{_fmt(x1, 0)}</text>'
            f'<text x="{W / 2}" y="{H - 8}" class="l" text-anchor="middle">{escape(x_label)}</text>'
            f'<text x="12" y="{H / 2}" class="l" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
            f'{escape(y_label)}</text>'
            f'<polyline points="{path}" class="line"/></svg>')


def bar_chart(title: str, bars: list[tuple[str, float, float]], unit: str) -> str:
    """An SVG chart of horizontal bars (label, start, length): a Gantt chart, or plain bars with start 0."""
    if not bars:
        return f'<p class="none">{escape(title)}: nothing recorded.</p>'
    row, label_w = 18, 170
    height = PAD + row * len(bars) + 20
    end = max(s + n for _, s, n in bars) or 1.0
    scale = (W - label_w - 90) / end
    parts = [f'<svg class="chart" viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img">'
             f'<title>{escape(title)}</title><text x="4" y="18" class="t">{escape(title)}</text>']
    for i, (label, start, length) in enumerate(bars):
        y = 32 + i * row
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" class="l" text-anchor="end">{escape(label[:28])}</text>'
                     f'<rect x="{label_w + start * scale:.1f}" y="{y}" width="{max(length * scale, 1):.1f}" '
                     f'height="{row - 4}" class="bar"/>'
                     f'<text x="{label_w + (start + length) * scale + 4:.1f}" y="{y + 12}" class="l">'
                     f'{_fmt(length)} {escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return '<p class="none">none recorded</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _t(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _timeline(data: dict[str, Any]) -> str:
    spans = [s for s in data["timeline"] if s["seconds"] is not None]
    if not spans:
        return '<p class="none">no phase recorded</p>'
    t0 = min(_t(s["start"]) for s in spans)  # type: ignore[type-var]
    bars = [(s["phase"], (_t(s["start"]) - t0).total_seconds(), s["seconds"]) for s in spans]  # type: ignore[operator]
    return bar_chart("phases (seconds from the first)", bars, "s")


def _rehearsal(data: dict[str, Any]) -> str:
    """The last rehearsal's phases as it recorded them (a rehearsal on configured test databases records them)."""
    if not data["rehearsals"]:
        return ""
    r = data["rehearsals"][-1]
    bars, start = [], 0.0
    for p in r["phases"]:
        bars.append((p["name"], start, float(p["seconds"])))
        start += float(p["seconds"])
    outcome = {True: "ok", False: "FAILED", None: "unfinished"}[r["ok"]]
    return (f"<h3>rehearsal {r['id']} ({escape(r['workload'])} workload): {outcome}</h3>"
            + bar_chart(f"rehearsal {r['id']} phases", bars, "s")
            + _table(["phase", "seconds", "detail"], [[p["name"], p["seconds"], p["detail"]] for p in r["phases"]]))


def _sync_charts(data: dict[str, Any]) -> str:
    samples = data["sync"]["samples"]
    if not samples:
        return '<p class="none">no sync samples recorded</p>'
    t0 = _t(samples[0]["at"])
    assert t0 is not None

    def series(key: str) -> list[tuple[float, float]]:
        return [((_t(s["at"]) - t0).total_seconds(), float(s[key]))  # type: ignore[operator]
                for s in samples if s[key] is not None]

    return (line_chart("sync lag", series("lag_seconds"), "seconds since the first sample", "lag (s)")
            + line_chart("pending events", series("pending_events"), "seconds since the first sample", "events")
            + line_chart("events applied per second", series("applied_per_second"), "seconds since the first sample",
                         "events/s"))


def _attempts(data: dict[str, Any]) -> str:
    out = []
    for a in data["attempts"]:
        steps = a["steps"]
        t0 = min((dt.datetime.fromisoformat(s["started_at"]) for s in steps if s["started_at"]), default=None)
        bars = [(s["step"], (_t(s["started_at"]) - t0).total_seconds(), s["seconds"])  # type: ignore[operator]
                for s in steps if s["seconds"] is not None and s["started_at"] and t0]
        out.append(f"<h3>{escape(str(a.get('kind') or 'cutover'))} attempt {a['id']}: {_fmt(a.get('status'))}</h3>"
                   f"<p>write freeze: <b>{_fmt(a.get('freeze_seconds'))} s</b>; client pause (pooler): "
                   f"<b>{_fmt(a.get('pause_seconds'))} s</b>"
                   + (f"; failed step {_fmt(a.get('failed_step'))}: {_fmt(a.get('error'))}" if a.get("error") else "")
                   + "</p>" + bar_chart(f"steps of attempt {a['id']}", bars, "s")
                   + _table(["step", "status", "seconds", "detail"],
                            [[s["step"], s["status"], s["seconds"], s["detail"]] for s in steps]))
    return "".join(out) or '<p class="none">no cutover or rollback attempt recorded</p>'


def _prediction(data: dict[str, Any]) -> str:
    out = []
    prod = data["prediction"].get("production")
    if prod:
        shown = {k: v for k, v in prod.items() if v is not None and k != "source"}
        out.append(f"<p>production, from {escape(prod['source'])}: "
                   + (", ".join(f"{escape(k)} {_fmt(v, 0)}" for k, v in shown.items()) or "no figure") + "</p>")
    for name, title in (("copy", "Copy time"), ("lag", "Sync lag"), ("freeze", "Freeze window and client pause")):
        p = data["prediction"][name]
        items = "".join(f"<li>{escape(a)}</li>" for a in p["assumptions"])
        parts = _table(["part", "measured s", "low s", "predicted s", "high s"],
                       [[x["part"], x["measured"], x["low"], x["predicted"], x["high"]] for x in p["parts"]]
                       ) if p.get("parts") else ""
        out.append(f"<h3>{title}</h3><p class='big'>{escape(p.get('text', ''))}</p>{parts}<ul>{items}</ul>")
    return "".join(out)


def _history(data: dict[str, Any]) -> str:
    h = data["history"]
    rows = [[r["generated_at"][:19], r["source"], r["copy_seconds"], r["copy_bytes"], r["freeze_seconds"],
             r["pause_seconds"], r["lag_median"], r["lag_worst"]] for r in h]
    chart = bar_chart("copy time per report", [(r["generated_at"][:19], 0.0, r["copy_seconds"]) for r in h
                                                if r["copy_seconds"] is not None], "s")
    return _table(["report", "source", "copy s", "copy bytes", "freeze s", "pause s", "lag median s", "lag worst s"],
                  rows) + chart


def _environment(data: dict[str, Any]) -> str:
    env = data["environment"]
    servers = _table(["side", "server version", "database bytes", "unreachable"],
                     [[side, env[side].get("server_version"), env[side].get("database_bytes"),
                       env[side].get("unreachable")] for side in ("source", "target")])
    return (f"<p>migrator {escape(env['migrator_version'])}</p>{servers}"
            f"<h3>configuration (secrets removed)</h3><pre>{escape(json.dumps(env['config'], indent=1))}</pre>")


CSS = """body{font:13px sans-serif;margin:24px;max-width:900px;color:#222}h1{font-size:20px}h2{font-size:16px;
border-bottom:1px solid #999;margin-top:28px}table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;
padding:2px 6px;text-align:left;font-size:12px}.chart{display:block;margin:8px 0}.t{font-size:13px;font-weight:bold}
.l{font-size:11px;fill:#333}.ax{stroke:#555}.line{fill:none;stroke:#1f5fa8;stroke-width:1.5}.bar{fill:#1f5fa8}
.none{color:#777}.big{font-size:15px;font-weight:bold}pre{font-size:11px;background:#f4f4f4;padding:6px;
white-space:pre-wrap}@media print{h2{page-break-after:avoid}.chart,table{page-break-inside:avoid}}"""


def render(data: dict[str, Any]) -> str:
    m = data.get("migration") or {}
    c = data["copy"]
    v = data["verify"]
    last = data["last_attempt"] or {}
    tables = sorted(c["tables"], key=lambda t: -(t["seconds"] or 0))
    sections = [
        ("The prediction for cutover night", _prediction(data)),
        ("Timeline", _timeline(data) + _rehearsal(data)),
        ("Copy", f"<p>{_fmt(c['rows'])} rows, {_fmt(c['bytes'])} bytes in {_fmt(c['seconds'])} s "
                 f"({_fmt(c['rows_per_second'], 0)} rows/s, {_fmt((c['bytes_per_second'] or 0) / 1e6)} MB/s)</p>"
                 + bar_chart("copy throughput per table (MB/s)", [(t["table"], 0.0, (t["bytes_per_second"] or 0) / 1e6)
                                                                   for t in tables[:30]], "MB/s")
                 + _table(["table", "rows", "bytes", "seconds", "rows/s", "MB/s"],
                          [[t["table"], t["rows"], t["bytes"], t["seconds"], t["rows_per_second"],
                            (t["bytes_per_second"] or 0) / 1e6] for t in tables])),
        ("Sync", f"<p>lag median {_fmt(data['sync']['lag_median'])} s, worst {_fmt(data['sync']['lag_worst'])} s; "
                 f"pending events at worst {_fmt(data['sync']['pending_worst'])}</p>" + _sync_charts(data)),
        ("Cutover and rollback", _attempts(data)),
        ("Verify", "<p>none recorded</p>" if not v else
         f"<p>{'identical' if v.get('identical') else 'NOT identical'}: {_fmt(v.get('differences'))} differences, "
         f"{_fmt(v.get('not_verified'))} tables not verified; started {_fmt(v.get('started_at'))}</p>"),
        ("Go/no-go checklist (as recorded with the last attempt)",
         _table(["item", "state", "detail"], [[i.get("item"), i.get("state"), i.get("detail")]
                                          for i in last.get("checklist") or []])),
        ("Operator actions", _table(["at", "actor", "via", "action", "outcome", "seconds"],
                                    [[a["at"][:19], a["actor"], a["via"], a["action"], a["outcome"], a["seconds"]]
                                     for a in data["audit"]])),
        ("History (this run and the earlier reports of the directory)", _history(data)),
        ("Environment", _environment(data)),
    ]
    body = "".join(f"<h2>{escape(t)}</h2>{html}" for t, html in sections)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>migrator report</title>"
            f"<style>{CSS}</style></head><body><h1>migrator report: {escape(str(m.get('source') or '?'))}</h1>"
            f"<p>generated {escape(data['generated_at'][:19])} UTC from the control schema; counts and timings only"
            f"</p>{body}</body></html>")
