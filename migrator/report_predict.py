"""The report's prediction for cutover night: production's copy time, sync lag and freeze window, from what a
rehearsal recorded in the control schema and production's size. Every part of a prediction is a measured cost,
kept fixed or scaled by a stated rule, and every rule is printed beside the number (`assumptions`); each figure
comes with a range (`low`, `high`) that spans the model's own choices (rows or bytes as the measure of size, index
builds linear or n log n), not the machine's noise, which only rehearsing again shows (bench/predict.py does).

Production's size is given in `[rehearsal]` as figures (production_bytes, production_rows) or as a DSN
(production_dsn) whose catalog is read here, read-only: the tables' sizes, their row estimates, their indexes'
sizes and the server version; nothing else is read there, nothing written.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from migrator import catalog, db, state
from migrator.config import Config
from migrator.redaction import redact

ANALYZE_SAMPLE_NOTE = "ANALYZE reads a sample (300 × default_statistics_target rows a table), not the whole table"


@dataclass(frozen=True)
class Production:
    """Production's size: from `[rehearsal]`'s figures or read from production_dsn's catalog."""

    source: str
    tables_bytes: float | None = None
    rows: float | None = None
    tables: int | None = None
    index_bytes: float | None = None
    server_version: str | None = None
    unreachable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def production(cfg: Config) -> Production | None:
    """Production's size as `[rehearsal]` gives it; production_dsn wins over the figures (they are then ignored)."""
    r = cfg.rehearsal
    if r.production_dsn:
        return read_production(r.production_dsn, cfg)
    if r.production_bytes is None and r.production_rows is None:
        return None
    return Production("[rehearsal] production_bytes / production_rows", tables_bytes=r.production_bytes,
                      rows=r.production_rows)


def read_production(dsn: str, cfg: Config) -> Production:
    """Read production's size from its catalog, as `migrator inspect` measures a table (pg_total_relation_size,
    the row estimate pg_class.reltuples), in a read-only transaction with short lock and statement timeouts; what
    failed, when it cannot be read (the password never shown)."""
    where = f"[rehearsal] production_dsn ({db.describe_dsn(dsn)})"
    try:
        with db.connect(dsn, role="production", connect_timeout=10) as conn:
            conn.read_only = True
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', '2s', true), "
                             "set_config('statement_timeout', '30s', true)")
                tables = catalog.list_tables(conn, cfg.tables)
                row = conn.execute("SELECT current_setting('server_version'), coalesce(sum(pg_indexes_size(t)), 0) "
                                   "FROM unnest(%s::oid[]) AS t", ([t.oid for t in tables],)).fetchone()
            assert row is not None
    except (psycopg.Error, Exception) as exc:  # noqa: BLE001 - an unreadable production is a line of the report
        return Production(where, unreachable=redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
    known = [t.est_rows for t in tables]
    return Production(where, tables_bytes=float(sum(t.bytes for t in tables)),
                      rows=float(sum(known)) if known and all(n > 0 for n in known) else None,
                      tables=len(tables), index_bytes=float(row[1]), server_version=str(row[0]))


def copy_parts(m: state.Migration | None, chunks: list[state.Chunk], workers: int) -> dict[str, Any] | None:
    """The copy's parts as the control schema recorded them: setup (from the copy's start to its first chunk:
    snapshot, workers starting), the rows (chunks, each with its bytes and seconds, and the gap a worker spent
    between two chunks), post-data (from the last chunk to post_data_at) and ANALYZE (to copy_finished_at). Of a
    copy run in one go: one stopped and resumed shows its interruption as setup or rows."""
    done = [c for c in chunks if c.copy_started_at and c.copy_finished_at]
    if m is None or not done or not (m.copy_started_at and m.copy_finished_at and m.post_data_at):
        return None
    first = min(c.copy_started_at for c in done if c.copy_started_at)
    last = max(c.copy_finished_at for c in done if c.copy_finished_at)
    gaps = []
    for worker in {c.worker for c in done}:
        mine = sorted((c for c in done if c.worker == worker), key=lambda c: c.copy_started_at or first)
        gaps += [max(0.0, (b.copy_started_at - a.copy_finished_at).total_seconds())  # type: ignore[operator]
                 for a, b in zip(mine, mine[1:], strict=False)]
    tables: dict[str, dict[str, Any]] = {}
    for c in done:
        t = tables.setdefault(c.display, {"chunks": 0, "est_bytes": 0, "bytes": 0})
        t["chunks"] += 1
        t["est_bytes"] += c.est_bytes
        t["bytes"] += c.bytes_copied or 0
    return {
        "setup_seconds": (first - m.copy_started_at).total_seconds(),
        "rows_seconds": (last - first).total_seconds(),
        "post_data_seconds": max(0.0, (m.post_data_at - last).total_seconds()),
        "analyze_seconds": max(0.0, (m.copy_finished_at - m.post_data_at).total_seconds()),
        "workers": workers, "gap_seconds": statistics.mean(gaps) if gaps else 0.0,
        "chunks": [{"table": c.display, "bytes": c.bytes_copied or 0, "seconds": _span(c)} for c in done],
        "tables": tables}


def _span(c: state.Chunk) -> float:
    assert c.copy_started_at and c.copy_finished_at
    return (c.copy_finished_at - c.copy_started_at).total_seconds()


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, per unit) of seconds = fixed + per_unit × x, least squares, neither below zero (a single point, or
    points with the same x, give no slope: all per unit, through the origin)."""
    if not points:
        return 0.0, 0.0
    xs = [x for x, _ in points]
    if len(points) < 2 or max(xs) == min(xs):
        total = sum(x for x, _ in points)
        return (0.0, sum(y for _, y in points) / total) if total else (statistics.mean(y for _, y in points), 0.0)
    mx, my = statistics.mean(xs), statistics.mean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return my, 0.0
    fixed = my - slope * mx
    if fixed < 0:
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs)
    return fixed, slope


def fit_fixed_first(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, per unit) where one large item outweighs the others (a schema's biggest table): the fixed cost is the
    median item's seconds (no more than the mean), the rest of the total is per unit. A least-squares line there
    follows the one large item and its noise."""
    if not points:
        return 0.0, 0.0
    seconds = [y for _, y in points]
    fixed = min(statistics.median(seconds), statistics.mean(seconds))
    units = sum(x for x, _ in points)
    return fixed, (max(0.0, sum(seconds) - fixed * len(points)) / units if units else 0.0)


@dataclass(frozen=True)
class Size:
    """Production's size over the rehearsal's: by rows and by table bytes (either may be unknown)."""

    by_rows: float | None
    by_bytes: float | None
    how: list[str]

    @property
    def known(self) -> list[float]:
        return [k for k in (self.by_rows, self.by_bytes) if k is not None]

    @property
    def mid(self) -> float:
        k = self.known
        return math.sqrt(k[0] * k[-1]) if k else 1.0


def size_ratio(data: dict[str, Any], prod: Production | None) -> Size:
    c, sized = data["copy"], data["environment"]["source"].get("tables_bytes")
    how: list[str] = []
    by_rows = by_bytes = None
    if prod is not None and prod.rows and c["rows"]:
        by_rows = prod.rows / c["rows"]
        how.append(f"by rows: {prod.rows:.0f} ({prod.source}) / {c['rows']} copied = × {by_rows:.2f}")
    if prod is not None and prod.tables_bytes and sized:
        by_bytes = prod.tables_bytes / sized
        how.append(f"by size: {prod.tables_bytes / 1e9:.3f} GB ({prod.source}) / the rehearsal's tables "
                   f"{sized / 1e6:.1f} MB, measured the same way (pg_total_relation_size) = × {by_bytes:.2f}")
    return Size(by_rows, by_bytes, how)


def _part(name: str, measured: float, low: float, mid: float, high: float, rule: str) -> dict[str, Any]:
    return {"part": name, "measured": round(measured, 3), "low": round(low, 3), "predicted": round(mid, 3),
            "high": round(high, 3), "rule": rule}


def _fixed(name: str, measured: float, rule: str) -> dict[str, Any]:
    return _part(name, measured, measured, measured, measured, rule)


def _total(out: dict[str, Any]) -> None:
    for key in ("low", "predicted", "high"):
        out["seconds" if key == "predicted" else f"{key}_seconds"] = sum(p[key] for p in out["parts"])


def _rows_phase(parts: dict[str, Any], k: float, chunk_bytes: float,
                at_once: float | None = None) -> tuple[float, str]:
    """The rows' wall time at `k` times the size: per chunk fixed + per byte (fitted on the rehearsal's chunks),
    production's chunks from each table's planned size at `k` times, `at_once` of them at a time (default: as many as
    the rehearsal loaded at once)."""
    fixed, per_byte = fit_line([(c["bytes"], c["seconds"]) for c in parts["chunks"]])
    fixed += parts["gap_seconds"]
    n, work, longest = 0, 0.0, 0.0
    for t in parts["tables"].values():
        count = max(t["chunks"], math.ceil(t["est_bytes"] * k / chunk_bytes))
        each = fixed + per_byte * t["bytes"] * k / count
        n, work, longest = n + count, work + count * each, max(longest, each)
    at_once = at_once or concurrency(parts)
    rule = (f"{n} chunks (each table's planned size × {k:.2f} in chunks of {chunk_bytes / 1e6:.0f} MB), each "
            f"{fixed:.3f} s + {per_byte * 1e6 * 1000:.1f} ms per MB (fitted on the rehearsal's "
            f"{len(parts['chunks'])} chunks, with the {parts['gap_seconds']:.3f} s a worker took between two), "
            f"{at_once:.2f} at once (as many as the rehearsal's chunks ran at once on average; the low figure: all "
            f"{parts['workers']} workers)")
    return max(longest, work / at_once), rule


def concurrency(parts: dict[str, Any]) -> float:
    """How many chunks the rehearsal loaded at once on average (their seconds over the rows' wall time), between
    one and the workers: what the workers gained together on these servers, cores shared with the databases."""
    busy = sum(c["seconds"] for c in parts["chunks"])
    return min(float(max(1, parts["workers"])), max(1.0, busy / parts["rows_seconds"] if parts["rows_seconds"] else 1.0))


def predict_copy(data: dict[str, Any], cfg: Config, prod: Production | None) -> dict[str, Any]:
    c, parts = data["copy"], data["copy"].get("parts")
    out: dict[str, Any] = {"assumptions": [], "parts": []}
    if not c["seconds"] or parts is None:
        out["text"] = "copy time: no finished copy recorded in one run; nothing to predict from"
        return out
    size = size_ratio(data, prod)
    out["assumptions"] = [
        f"measured: {c['bytes'] / 1e6:.1f} MB, {c['rows']} rows in {c['seconds']:.1f} s = setup "
        f"{parts['setup_seconds']:.2f} s + rows {parts['rows_seconds']:.2f} s + post-data "
        f"{parts['post_data_seconds']:.2f} s + ANALYZE {parts['analyze_seconds']:.2f} s",
        f"the same servers, network, load and [copy] workers ({cfg.copy.workers}) for production"]
    if prod is not None and prod.unreachable:
        out["assumptions"].append(f"{prod.source} could not be read: {prod.unreachable}")
    if not size.known:
        out["text"] = ("copy time: give [rehearsal] production_dsn, or production_bytes or production_rows, to "
                       "predict production's")
        return out
    out["assumptions"] += size.how
    low_k, mid_k, high_k = min(size.known), size.mid, max(size.known)
    out["size_ratio"] = mid_k
    if len(size.known) > 1:
        out["assumptions"].append(f"the size ratio used: × {mid_k:.2f} (the geometric mean; the range takes each)")
    chunk = cfg.copy.chunk_mb * 1e6
    rows = [_rows_phase(parts, k, chunk) for k in (low_k, mid_k, high_k)]
    rows[0] = (min(rows[0][0], _rows_phase(parts, low_k, chunk, float(max(1, parts["workers"])))[0]), "")
    index = c.get("index_bytes") or 0.0
    rate = sum(x["bytes"] for x in parts["chunks"]) / max(1e-9, sum(x["seconds"] for x in parts["chunks"]))
    rate *= concurrency(parts)
    built = min(parts["post_data_seconds"], index / rate) if rate else 0.0
    prod_index = prod.index_bytes if prod is not None and prod.index_bytes else None
    grow = [((prod_index / index) if prod_index and index else k) for k in (low_k, mid_k, high_k)]
    n_log_n = math.log(max(2.0, c["rows"] * high_k)) / math.log(max(2.0, c["rows"]))
    post_fixed = parts["post_data_seconds"] - built
    out["parts"] = [
        _fixed("setup", parts["setup_seconds"], "fixed: the snapshot and the workers starting do not depend on the size"),
        _part("rows", parts["rows_seconds"], rows[0][0], rows[1][0], rows[2][0], rows[1][1]),
        _part("post-data", parts["post_data_seconds"], post_fixed + built * grow[0], post_fixed + built * grow[1],
              post_fixed + built * grow[2] * n_log_n,
              f"index builds: the target's {index / 1e6:.1f} MB of indexes at the rows' load rate "
              f"({rate / 1e6:.1f} MB/s) = {built:.2f} s, grown × {grow[1]:.2f}"
              + (" (production's indexes, read from its catalog)" if prod_index else " (the size ratio)")
              + f", up to n log n (× {n_log_n:.2f} more) in the high figure; the other {post_fixed:.2f} s "
              "(pg_dump, pg_restore, small items) fixed"),
        _analyze_part(data, parts["analyze_seconds"], (low_k, mid_k, high_k))]
    _total(out)
    out["assumptions"] += [f"{p['part']}: {p['rule']}" for p in out["parts"]]
    out["text"] = (f"predicted copy time for production: {duration(out['seconds'])} (range "
                   f"{duration(out['low_seconds'])} to {duration(out['high_seconds'])})")
    return out


def _analyze_part(data: dict[str, Any], seconds: float, ks: tuple[float, float, float]) -> dict[str, Any]:
    """ANALYZE samples at most 300 × default_statistics_target rows of a table: its work grows with the rows it
    samples, which stop growing once a table is larger than the sample."""
    target = data["environment"]["target"].get("statistics_target") or 100
    cap = 300 * target
    rows = [t["rows"] or 0 for t in data["copy"]["tables"]]
    sampled = sum(min(n, cap) for n in rows)
    grown = [sum(min(n * k, cap) for n in rows) / sampled if sampled else 1.0 for k in ks]
    return _part("ANALYZE", seconds, seconds * grown[0], seconds * grown[1], seconds * grown[2],
                 f"{ANALYZE_SAMPLE_NOTE}: grows with the rows sampled, min(rows, {cap}) a table: {sampled} in the "
                 f"rehearsal, × {grown[1]:.2f} on production")


def predict_lag(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    s, rate = data["sync"], cfg.rehearsal.production_write_rate
    drain = _figures(data["attempts"][-1] if data["attempts"] else None, "drain")
    events = (drain or {}).get("events")
    capacity = events / drain["seconds"] if drain and events and drain["seconds"] else None
    out: dict[str, Any] = {"capacity_events_per_second": capacity, "assumptions": [
        f"measured: lag median {num(s['lag_median'])} s, worst {num(s['lag_worst'])} s; applied "
        f"{num(s['applied_per_second_median'])} events/s (median of the samples: the rehearsal's write rate)",
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
    out["low_seconds"], out["high_seconds"] = s["lag_median"], s["lag_worst"]
    out["assumptions"].append("below capacity the lag is set by sync's batch interval, not by the rate: the median "
                              "measured stays (the range: up to the worst measured)")
    out["text"] = f"expected sync lag at {rate:g}/s: about {s['lag_median']:.2f} s (the rehearsal's median)"
    return out


def _figures(attempt: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """A step of an attempt: its seconds and the figures it recorded (events, tables counted)."""
    for s in (attempt or {}).get("steps", []):
        if s["step"] == name and s["seconds"] is not None:
            return dict(s.get("figures") or {}, seconds=s["seconds"])
    return None


def _drain_model(attempt: dict[str, Any], drain: dict[str, Any]) -> tuple[float, float, str]:
    """(fixed, per event) seconds of applying pending events: the line through the attempt's two syncs (catch-up
    and drain) when it rises; else the drain's seconds, all per event."""
    catch = _figures(attempt, "catch_up")
    n, s = drain["events"], drain["seconds"]
    if catch and catch.get("events") is not None and catch["events"] != n:
        slope = (s - catch["seconds"]) / (n - catch["events"])
        fixed = s - slope * n
        if slope > 0 and fixed >= 0:
            return fixed, slope, (f"a sync costs {fixed:.3f} s + {slope * 1000:.3f} ms per event (the line through "
                                  f"the catch-up: {catch['events']} events in {catch['seconds']:.2f} s, and the drain)")
    per = s / n if n else 0.0
    return (s, 0.0, "the drain's time, as measured (no events to scale)") if not n else (
        0.0, per, f"{per * 1000:.3f} ms per event, as the drain measured (no fixed part separable)")


def predict_freeze(data: dict[str, Any], cfg: Config, prod: Production | None) -> dict[str, Any]:
    last, rate = data["last_attempt"], cfg.rehearsal.production_write_rate
    attempt = data["attempts"][-1] if data["attempts"] else None
    drain = _figures(attempt, "drain")
    out: dict[str, Any] = {"assumptions": [], "parts": []}
    if not last or last.get("freeze_seconds") is None or attempt is None or drain is None \
            or drain.get("events") is None:
        out["text"] = "freeze window: no finished cutover with its figures recorded; nothing to predict from"
        return out
    freeze = float(last["freeze_seconds"])
    verify = _figures(attempt, "verify") if cfg.cutover.verify != "none" else None
    verify_s = verify["seconds"] if verify else 0.0
    fixed = max(0.0, freeze - drain["seconds"] - verify_s)
    measured_rate = data["sync"]["applied_per_second_median"]
    expected = drain["events"] * (rate / measured_rate) if rate and measured_rate else float(drain["events"])
    d_fixed, per_event, d_rule = _drain_model(attempt, drain)
    drain_s = d_fixed + per_event * expected
    size = size_ratio(data, prod)
    ks = sorted(size.known) or [1.0]
    out["parts"] = [
        _fixed("fixed steps", fixed, "the steps inside the freeze other than drain and verify "
              "(freeze, sequences, arm_rollback, switch, resume, health) cost the same on production"),
        _part("drain", drain["seconds"], drain_s, drain_s, drain_s,
              f"{expected:.0f} events pending at the freeze; {d_rule}"),
        _verify_part(verify, verify_s, cfg, size, prod, ks)]
    _total(out)
    out.update(fixed_seconds=fixed, expected_pending_events=expected, drain_seconds=drain_s,
               verify_seconds=out["parts"][2]["predicted"])
    out["assumptions"] = [
        f"measured: freeze {freeze:.2f} s = fixed step costs {fixed:.2f} s + verify {verify_s:.2f} s + drain "
        f"{drain['seconds']:.2f} s of {drain['events']} events",
        (f"events pending at the freeze scale with the write rate: {drain['events']} × {rate:g}/"
         f"{num(measured_rate)} = {expected:.0f}") if rate and measured_rate
        else "events pending at the freeze: as in the rehearsal (no production_write_rate given)",
        *size.how, *[f"{p['part']}: {p['rule']}" for p in out["parts"]]]
    pause = last.get("pause_seconds")
    out["client_pause_seconds"] = None if pause is None else float(pause) - freeze + out["seconds"]
    out["assumptions"].append("client pause: no pooler pause measured (clients were not paused)" if pause is None
                              else f"client pause = measured pause {float(pause):.2f} s − measured freeze + "
                                   "expected freeze")
    out["text"] = (f"expected freeze window: {out['seconds']:.2f} s (range {out['low_seconds']:.2f} to "
                   f"{out['high_seconds']:.2f} s)"
                   + ("" if pause is None else f"; client pause {out['client_pause_seconds']:.2f} s"))
    return out


def _verify_part(verify: dict[str, Any] | None, seconds: float, cfg: Config, size: Size, prod: Production | None,
                 ks: list[float]) -> dict[str, Any]:
    mode = cfg.cutover.verify
    if verify is None:
        return _part("verify", 0.0, 0.0, 0.0, 0.0, f"[cutover] verify = {mode}: no verify inside the freeze"
                     if mode == "none" else "no verify step recorded")
    counted = verify.get("tables") or []
    if mode != "counts" or not counted:
        return _part("verify", seconds, seconds * ks[0], seconds * size.mid, seconds * ks[-1],
                     f"[cutover] verify = {mode}: grows with the size (× {size.mid:.2f})")
    per_table, per_row = fit_fixed_first([(float(t["rows"]), float(t["seconds"])) for t in counted])
    rows = sum(t["rows"] for t in counted)
    tables = prod.tables if prod is not None and prod.tables else len(counted)
    # The measured step plus what more tables and more rows add: the step's own overhead (the lag check, two
    # connections) stays, and at the rehearsal's size the prediction is what was measured.
    mid = [seconds + (tables - len(counted)) * per_table + per_row * rows * (k - 1) for k in (ks[0], size.mid, ks[-1])]
    return _part("verify", seconds, min(mid[0], seconds * ks[0]), mid[1], max(mid[2], seconds * ks[-1]),
                 f"counts: the measured {seconds:.3f} s + {per_table * 1000:.1f} ms per table more + "
                 f"{per_row * 1e6:.3f} µs per row more (the median table's count, and the rest per row, of the {len(counted)} tables' counts), {tables} "
                 f"tables, the rows × {size.mid:.2f}; the range runs to all of it per row (the verify × the ratio)")


def num(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"


def predict(data: dict[str, Any], cfg: Config, prod: Production | None = None) -> dict[str, Any]:
    return {"production": prod.to_dict() if prod else None, "copy": predict_copy(data, cfg, prod),
            "lag": predict_lag(data, cfg), "freeze": predict_freeze(data, cfg, prod),
            "made_at": dt.datetime.now(dt.UTC).isoformat()}
