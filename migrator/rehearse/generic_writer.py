"""A writer process of the generic workload (`generic`): plays an application on any schema, following the plan.

At start it samples rows of every table it may write (`TABLESAMPLE`, a bounded number per table) and keeps its
share: the rows whose key (without a key: whose row image) hashes to its index. It updates only rows of its share
and deletes only the copies it inserted itself, so that no two writers ever write the same row and each writer's
ledger (`ledger`) holds the whole history of what it wrote. Each transaction does one to three of: update a row,
insert a copy of a row under a new key, delete a copy it inserted; at a bounded rate, until told to stop. A database
error rolls the transaction back and is counted by table, kind and SQLSTATE (what the schema refused, what a frozen
database rejected), and the writer carries on.

Sessions pin the settings migrator pins (`db.PINNED_SETTINGS`): the text forms that keys and digests are taken of
must read the same on the target.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import db
from migrator.rehearse.ledger import Key, Ledger
from migrator.rehearse.plan import UID_LENGTH, Fresh, TablePlan
from migrator.rehearse.spec import end_failed

KINDS = (("update", 60), ("insert", 25), ("delete", 15))
_TIMEOUTS = ("SET lock_timeout = '5s'", "SET statement_timeout = '30s'")
_RECONNECT_PAUSE = 0.5


@dataclass(frozen=True)
class GenericSpec:
    writers: int = 2
    rate: float = 20.0
    """Transactions per second over all writers."""
    seed: int = 1
    sample: int = 200
    """Rows sampled per table and writer (its share of them is what it updates)."""
    max_owned: int = 5000
    """Copies a writer keeps at most: beyond, it deletes before it inserts again (bounds memory and growth)."""
    max_duration: float = 24 * 3600


@dataclass
class WriterReport:
    index: int
    committed: int = 0
    writes: Counter[str] = field(default_factory=Counter)
    """Writes committed, by kind."""
    failed: Counter[str] = field(default_factory=Counter)
    """Transactions rolled back by an error: "schema.table|kind|SQLSTATE" ("connection" for no SQLSTATE)."""
    sampled: int = 0


def writer_main(dsn: str, plans: list[TablePlan], spec: GenericSpec, index: int, tag: str, ledger_path: str,
                stop: Any, ready: Any, results: Any) -> None:
    """Entry point of a writer process: sample, write until told to stop, then report (always)."""
    writer = _Writer(dsn, plans, spec, index, tag, ledger_path, stop, ready)
    try:
        writer.run()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent decides what follows
        pass
    finally:
        writer.close()
        results.put(writer.report)


def share(text: str, writers: int) -> int:
    """Which writer a key (or row image) belongs to: the same in every process, unlike hash()."""
    return zlib.crc32(text.encode()) % writers


class _Statements:
    """One table's statements, composed once."""

    def __init__(self, p: TablePlan) -> None:
        t = p.ident
        x_key = sql.SQL(", ").join(sql.SQL("x.{}::text").format(sql.Identifier(k)) for k in p.key)
        self.sample = (sql.SQL("SELECT {} FROM {} AS x TABLESAMPLE SYSTEM (%s::real) LIMIT %s").format(x_key, t) if p.key
                       else sql.SQL("SELECT x.ctid::text, md5(x::text) FROM {} AS x TABLESAMPLE SYSTEM (%s::real) LIMIT %s")
                       .format(t))
        if p.key:
            columns = [*p.copied, *(f.column for f in p.fresh)]
            values = [*(sql.SQL("y.{}").format(sql.Identifier(c)) for c in p.copied),
                      *(sql.SQL("%s::text") if f.kind == "text" else sql.Placeholder() for f in p.fresh)]
            self.insert = sql.SQL("INSERT INTO {t} AS x ({c}) SELECT {v} FROM {t} AS y WHERE {m}"
                                  " RETURNING {k}, md5(x::text)").format(
                t=t, c=sql.SQL(", ").join(map(sql.Identifier, columns)), v=sql.SQL(", ").join(values),
                m=_match("y", p.key), k=x_key)
            self.delete = sql.SQL("DELETE FROM {} AS x WHERE {}").format(t, _match("x", p.key))
            self.updates = {f.column: _update(p, f) for f in p.updates}
        else:
            self.insert = sql.SQL("INSERT INTO {t} AS x ({c}) SELECT {v} FROM {t} AS y WHERE y.ctid = %s::tid"
                                  " RETURNING x.ctid::text, md5(x::text)").format(
                t=t, c=sql.SQL(", ").join(map(sql.Identifier, p.copied)),
                v=sql.SQL(", ").join(sql.SQL("y.{}").format(sql.Identifier(c)) for c in p.copied))
            self.delete = sql.SQL("DELETE FROM {} AS x WHERE x.ctid = %s::tid AND md5(x::text) = %s").format(t)
            self.count = sql.SQL("SELECT md5(x::text), count(*) FROM {} AS x WHERE md5(x::text) = ANY(%s)"
                                 " GROUP BY 1").format(t)


def _match(alias: str, key: tuple[str, ...]) -> sql.Composed:
    """(alias.k1, alias.k2) = (%s, %s): the key's text forms, which the server reads as the columns' types."""
    return sql.SQL("({}) = ({})").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(k)) for k in key),
        sql.SQL(", ").join(sql.Placeholder() for _ in key))


def _update(p: TablePlan, f: Fresh) -> sql.Composed:
    column = sql.Identifier(f.column)
    if f.kind == "text":
        value: sql.Composable = sql.SQL("%s::text")
    else:  # another row's value, of the column's type; the row's own when that row is gone or holds NULL
        value = sql.SQL("coalesce((SELECT y.{c} FROM {t} AS y WHERE {m}), x.{c})").format(
            c=column, t=p.ident, m=_match("y", p.key))
    return sql.SQL("UPDATE {t} AS x SET {c} = {v} WHERE {m} RETURNING md5(x.{c}::text)").format(
        t=p.ident, c=column, v=value, m=_match("x", p.key))


class _Writer:
    def __init__(self, dsn: str, plans: list[TablePlan], spec: GenericSpec, index: int, tag: str,
                 ledger_path: str, stop: Any, ready: Any) -> None:
        self.dsn, self.plans, self.spec, self.index, self.tag = dsn, plans, spec, index, tag
        self.stop, self.ready = stop, ready
        self.rng = random.Random(spec.seed * 1_000_003 + index)
        self.report = WriterReport(index)
        self.ledger = Ledger(ledger_path)
        self.conn: psycopg.Connection[Any] | None = None
        self.statements = {p.index: _Statements(p) for p in plans}
        self.sources: dict[int, list[Key]] = {}
        """Sampled rows of every share (keyed tables): what a copy copies, where an update's value comes from."""
        self.mine: dict[int, list[Key]] = {}
        """Sampled rows of this writer's share: what it updates (keyed) or copies (without a key: ctid, image)."""
        self.owned: dict[int, list[Key]] = {}
        """Copies this writer inserted and has not deleted: key, or (ctid, image) without a key."""
        self.images: dict[tuple[int, str], int] = {}
        """Tables without a key: how many rows carry each image of this writer's share."""
        self.counters: Counter[tuple[int, str]] = Counter()

    # The loop -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        deadline = time.monotonic() + self.spec.max_duration
        parent = multiprocessing.parent_process()
        rate = self.spec.rate / max(1, self.spec.writers)
        next_at = time.monotonic()
        while not self.stop.is_set() and time.monotonic() < deadline and (parent is None or parent.is_alive()):
            if self.conn is None or self.conn.closed:
                self._connect()
                continue
            if self.ready is not None:
                self._sample()
                self.ready.release()
                self.ready = None
                next_at = time.monotonic()
                continue
            self._transaction()
            next_at += 1 / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            elif delay < -1:  # fell behind (a frozen database, lock waits): do not burst to catch up
                next_at = time.monotonic()

    def _connect(self) -> None:
        try:
            self.conn = db.connect(self.dsn, role="source", application_name=f"rehearsal-workload-{self.index}",
                                   connect_timeout=10)
            for statement in _TIMEOUTS:
                self.conn.execute(statement)
            self.conn.commit()
        except Exception as exc:  # noqa: BLE001 - ConnectionFailed (db.connect's), or the server went away after it
            self.report.failed[f"-|connect|{getattr(exc, 'sqlstate', None) or 'connection'}"] += 1
            self.conn = None
            self.stop.wait(_RECONNECT_PAUSE)

    def close(self) -> None:
        self.ledger.close()
        if self.conn is not None and not self.conn.closed:
            self.conn.close()

    def _sample(self) -> None:
        assert self.conn is not None
        n = self.spec.sample * self.spec.writers
        for p in self.plans:
            percent = min(100.0, 100.0 * 4 * n / p.est_rows) if p.est_rows > 0 else 100.0
            rows = [tuple(r) for r in self.conn.execute(self.statements[p.index].sample, (percent, n)).fetchall()]
            if p.key:
                self.sources[p.index] = rows
                self.mine[p.index] = [r for r in rows if share("\x1f".join(r), self.spec.writers) == self.index]
            else:
                self.mine[p.index] = [r for r in rows if share(r[1], self.spec.writers) == self.index]
                images = sorted({r[1] for r in self.mine[p.index]})
                if images and not p.no_insert:
                    for image, count in self.conn.execute(self.statements[p.index].count, (images,)).fetchall():
                        self.images[(p.index, image)] = int(count)
            self.report.sampled += len(self.mine[p.index])
        self.conn.commit()

    # Transactions ---------------------------------------------------------------------------------------------

    def _choose(self) -> tuple[str, TablePlan] | None:
        full = sum(len(v) for v in self.owned.values()) >= self.spec.max_owned
        kinds = ["delete"] if full else self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS], k=1)
        for kind in [*kinds, "insert", "update"]:
            eligible = [p for p in self.plans if self._eligible(kind, p)]
            if eligible:
                return kind, self.rng.choice(eligible)
        return None

    def _eligible(self, kind: str, p: TablePlan) -> bool:
        if kind == "update":
            return bool(p.updates and self.mine.get(p.index))
        if kind == "insert":
            return not p.no_insert and bool(self.sources.get(p.index) if p.key else self.mine.get(p.index))
        return bool(self.owned.get(p.index))

    def _transaction(self) -> None:
        assert self.conn is not None
        effects: list[tuple[Any, ...]] = []
        where = "-|-"
        try:
            for _ in range(self.rng.randint(1, 3)):
                chosen = self._choose()
                if chosen is None:
                    break
                kind, p = chosen
                where = f"{p.display}|{kind}"
                effects += getattr(self, f"_{kind}")(p)
            where = "-|commit"
            self._commit(effects)
        except psycopg.Error as exc:
            self._failed(f"{where}|{exc.sqlstate or 'connection'}", exc.sqlstate)

    def _commit(self, effects: list[tuple[Any, ...]]) -> None:
        assert self.conn is not None
        try:
            self.conn.commit()
        except psycopg.OperationalError:
            if self.conn.broken:  # the COMMIT may or may not have happened
                for effect in effects:
                    self._unknown(effect)
            raise
        self.report.committed += 1
        for effect in effects:
            self._apply(effect)
        self.ledger.commit()

    def _failed(self, where: str, sqlstate: str | None) -> None:
        self.report.failed[where] += 1
        end_failed(self.conn, sqlstate, self.stop)

    def _apply(self, effect: tuple[Any, ...]) -> None:
        kind, tbl = effect[0], effect[1]
        self.report.writes[kind] += 1
        if kind == "update":
            self.ledger.updated(tbl, effect[2], effect[3], effect[4])
        elif kind == "insert":
            self.owned.setdefault(tbl, []).append(effect[2])
            if len(effect) == 4:
                self.ledger.inserted(tbl, effect[2], effect[3])
            else:
                self._image(tbl, effect[2][1], +1)
        elif kind == "delete":
            self.owned[tbl].remove(effect[2])
            if self.plans[tbl].key:
                self.ledger.deleted(tbl, effect[2])
            else:
                self._image(tbl, effect[2][1], -1)

    def _image(self, tbl: int, image: str, delta: int) -> None:
        count = self.images.get((tbl, image))
        if count is not None:
            self.images[(tbl, image)] = count + delta
            self.ledger.image(tbl, image, count + delta)

    def _unknown(self, effect: tuple[Any, ...]) -> None:
        kind, tbl = effect[0], effect[1]
        if kind == "update":
            self.ledger.updated(tbl, effect[2], effect[3], None, known=False)
        elif self.plans[tbl].key:
            self.ledger.unknown(tbl, effect[2])
        else:  # the image's count is unknown from now on: no longer counted, nor checked
            self.images.pop((tbl, effect[2][1]), None)
            self.ledger.image(tbl, effect[2][1], None)
        if kind == "delete" and effect[2] in self.owned.get(tbl, []):
            self.owned[tbl].remove(effect[2])

    def _x(self, query: sql.Composed, params: Any) -> psycopg.Cursor[Any]:
        assert self.conn is not None
        return self.conn.execute(query, params)

    def _update(self, p: TablePlan) -> list[tuple[Any, ...]]:
        key = self.rng.choice(self.mine[p.index])
        f = self.rng.choice(p.updates)
        if f.kind == "text":
            params: tuple[Any, ...] = (self._text(f.limit), *key)
        else:
            params = (*self.rng.choice(self.sources[p.index]), *key)
        row = self._x(self.statements[p.index].updates[f.column], params).fetchone()
        return [("update", p.index, key, f.column, row[0])] if row is not None else []

    def _insert(self, p: TablePlan) -> list[tuple[Any, ...]]:
        if not p.key:
            ctid, _ = self.rng.choice(self.mine[p.index])
            row = self._x(self.statements[p.index].insert, (ctid,)).fetchone()
            return [("insert", p.index, (row[0], row[1]))] if row is not None else []
        values = [self._fresh(p.index, f) for f in p.fresh]
        row = self._x(self.statements[p.index].insert, (*values, *self.rng.choice(self.sources[p.index]))).fetchone()
        return [("insert", p.index, tuple(row[:-1]), row[-1])] if row is not None else []

    def _delete(self, p: TablePlan) -> list[tuple[Any, ...]]:
        owned = self.owned[p.index][self.rng.randrange(len(self.owned[p.index]))]
        deleted = self._x(self.statements[p.index].delete, owned).rowcount
        return [("delete", p.index, owned)] if deleted == 1 else []

    def _fresh(self, tbl: int, f: Fresh) -> Any:
        if f.kind == "uuid":
            return uuid.uuid4()
        if f.kind == "text":
            return self._text(f.limit)
        n = self.counters[(tbl, f.column)]
        self.counters[(tbl, f.column)] += 1
        return f.base + 1 + self.index + self.spec.writers * n

    def _text(self, limit: int | None) -> str:
        if limit is None or limit >= UID_LENGTH:
            return f"2.25.{uuid.uuid4().int}"
        n = self.counters[(-1, "text")]
        self.counters[(-1, "text")] += 1
        return f"{self.tag}{self.index:x}.{n:x}"
