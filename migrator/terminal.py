"""What the operator sees on a terminal: copy progress, the status page (drawn with rich). Rendering only; no database
access. The web page for cutover night is `migrator console` (migrator/console/)."""

from __future__ import annotations

import io
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from migrator.status import Status


class CopyProgress:
    """A per-table progress display (bytes, rate) on a terminal; a no-op otherwise (logs carry the progress)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._tasks: dict[str, Any] = {}
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        ) if enabled else None

    def __enter__(self) -> CopyProgress:
        # The display (and its refresh thread) starts with the first figure: the copy forks its workers before, and
        # forks only while no other thread runs (copyworker.LocalWorkers).
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress:
            self._progress.stop()

    def overall(self, done: int, total: int) -> None:
        """The whole run, in the chunks' estimated bytes: its bar carries the time left."""
        self._show(_OVERALL, completed=done, total=total)

    def update(self, table: str, rows: int, nbytes: int) -> None:
        """One table (or chunk, rows -1 while it loads): bytes so far; its total once the rows are known."""
        if rows >= 0:
            self._show(table, completed=nbytes, total=nbytes, rows=rows)
        else:
            self._show(table, completed=nbytes, rows="…")

    def _show(self, name: str, **fields: Any) -> None:
        if not self._progress:
            return
        with self._lock:
            if not self._tasks:
                self._progress.start()
            task = self._tasks.get(name)
            if task is None:
                task = self._tasks[name] = self._progress.add_task(name, total=None, rows="…")
            self._progress.update(task, **fields)


_OVERALL = "all tables (estimated)"


def _age(v: Any) -> str:
    return v.isoformat(timespec="seconds") if hasattr(v, "isoformat") else str(v or "-")


def render_status(st: Status) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(f"[bold]migration[/] {st.source} → {st.target}: {st.phase}"
                  + ("" if st.frozen is None else f"; legacy {'FROZEN' if st.frozen else 'writable'}")
                  + ("; target FROZEN (after the rollback: `migrator release --target` ends it)"
                     if st.target_frozen else ""))
    if st.copy:
        c = st.copy
        console.print(f"copy: {c['copied']}/{c['tables']} tables, {c['rows']} rows, {c['bytes'] / 1e6:.1f} MB; "
                      f"started {_age(c['started_at'])}, finished {_age(c['finished_at'])}")
        if c.get("chunks"):
            console.print(f"  chunks {c['chunks_copied']}/{c['chunks']} (≈{c['estimated_bytes'] / 1e6:.0f} MB on the "
                          f"source){'; running' if c['running'] else ''}{'; PAUSED' if c['paused'] else ''}")
            for w in c["workers"]:
                console.print(f"  worker {w['worker']}: {w['chunk'] or 'idle'} {w['bytes'] / 1e6:.1f} MB")
    if st.sync:
        s = st.sync
        lag = s.get("lag_seconds")
        console.print(f"sync: {s.get('events_applied', 0)} events applied in {s.get('batches', 0)} batches; "
                      f"pending {s.get('pending_events', '?')}, lag {lag if lag is None else f'{lag:.1f}s'}")
        if s.get("delta_log"):
            d = s["delta_log"]
            console.print(f"  delta log on the legacy database: ≈{d['rows']} events, {d['bytes'] / 1e6:.1f} MB; "
                          + ", ".join(f"child {c['child']} {c['state']}" for c in d["children"]))
    if st.tables:
        t = Table("table", "status", "rows", "MB", "key")
        for row in st.tables:
            t.add_row(row["table"], row["status"], str(row["rows"] if row["rows"] is not None else "-"),
                      f"{(row['bytes'] or 0) / 1e6:.1f}", ", ".join(row["key"]) or "(none: multiset)")
        console.print(t)
    for a in st.cutover:
        console.print(f"cutover attempt {a['id']}: {a['status']}"
                      + (f", freeze {a['freeze_seconds']:.2f}s" if a.get("freeze_seconds") else "")
                      + (f", failed at {a['failed_step']}: {a['error']}" if a.get("failed_step") else ""))
        if a.get("health"):
            h = a["health"]
            console.print(f"    health gate: {h.get('verdict')} (on unhealthy: {h.get('on_unhealthy')}); probe "
                          f"{h.get('probe')}, canary {h.get('canary')}, {h.get('client_transactions')} client "
                          f"transactions, {h.get('rollbacks')} rolled back, {h.get('waiting')} waiting", highlight=False)
        for step in a["steps"]:
            console.print(f"    {step['step']:<10} {step['status']:<8} {_age(step['started_at'])}")
    for o in st.overrides:
        console.print(f"[yellow]blocker {escape(o['name'])} overridden[/] at prepare by {escape(o['os_user'])} "
                      f"(role {escape(o['db_role'])}) at {o['overridden_at']}: {escape(o['detail'])}", highlight=False)
    for w in st.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    return console.export_text().rstrip()

