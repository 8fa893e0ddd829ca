"""The objects query (`[objects] query`): one object per row with `key` and `location`, listed whole or for some
keys or locations, and which tables it reads (their changes, in the delta log, say which rows to list again)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, LiteralString, cast

import psycopg
from psycopg import sql

from migrator.config import Config, ObjectSettings, redact
from migrator.errors import ConfigError

MAX_LISTED = 100
"""Findings (and orphans, and quarantined files) listed in a report; the rest are only counted."""

DICOM_COLUMNS: dict[str, str] = {
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "patient_id": "PatientID",
}
"""Query column -> the DICOM header keyword it must agree with."""

_TEXT_TYPES = {25, 1043}  # text, varchar: compared as they are, so an index on the column serves


@dataclass(frozen=True)
class ObjectRow:
    """One object as the query lists it."""

    key: str
    location: str
    size: int | None = None
    sha256: bytes | None = None
    identifiers: tuple[tuple[str, str], ...] = ()
    """(DICOM keyword, value the row holds) for each identifier column the query gives a value for."""

    @property
    def dicom(self) -> bool:
        """A DICOM file is expected exactly when the row names some DICOM identifier."""
        return bool(self.identifiers)


def settings(cfg: Config) -> ObjectSettings:
    if not cfg.objects.query:
        raise ConfigError("no [objects] query in the configuration",
                          hint="Add [objects] query, source_root and target_root to migration.toml.")
    return cfg.objects


def message(exc: BaseException) -> str:
    """What to say of an error about a file: the system's words, never a path's contents beyond the location."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return redact(str(exc).strip() or type(exc).__name__)


def _query(query: str) -> sql.SQL:
    return sql.SQL(cast(LiteralString, query.strip().rstrip(";")))


def _lacking(names: list[str]) -> None:
    lacking = [c for c in ("key", "location") if c not in names]
    if lacking:
        raise ConfigError(f"[objects] query gives no column(s) {', '.join(lacking)}",
                          hint="Name the query's columns: key, location, and optionally size, sha256, "
                               + ", ".join(DICOM_COLUMNS) + ".")


def list_objects(conn: psycopg.Connection[Any], query: str, *, keys: list[str] | None = None,
                 locations: list[str] | None = None) -> Iterator[ObjectRow]:
    """Stream the rows of the objects query (server-side cursor, in the caller's transaction); with `keys` or
    `locations`, only the rows with one of these keys (their text) or locations."""
    statement: sql.SQL | sql.Composed = _query(query)
    if keys is not None or locations is not None:
        column, values = ("key", keys) if keys is not None else ("location", locations)
        typed = _column_types(conn, query)
        compared = sql.SQL("q.{}").format(sql.Identifier(column))
        if typed.get(column) not in _TEXT_TYPES:
            compared = sql.SQL("{}::text").format(compared)
        statement = sql.SQL("SELECT * FROM ({}) AS q WHERE {} = ANY({}::text[])").format(
            statement, compared, sql.Literal(values))
    with conn.cursor(name="migrator_objects") as cur:
        cur.execute(statement)
        names = [d.name.lower() for d in cur.description or ()]
        _lacking(names)
        at = {n: i for i, n in enumerate(names)}
        while batch := cur.fetchmany(2000):
            for r in batch:
                yield _row(r, at)


def _column_types(conn: psycopg.Connection[Any], query: str) -> dict[str, int]:
    """The type (oid) of each column the query gives (planned, not run)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(_query(query)))
        known = {d.name.lower(): d.type_code for d in cur.description or ()}
    _lacking(list(known))
    return known


def query_tables(conn: psycopg.Connection[Any], query: str) -> list[int]:
    """The tables (oids) the objects query reads, as the server plans it (views resolved to their tables)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("EXPLAIN (VERBOSE, FORMAT JSON) {}").format(_query(query)))
        row = cur.fetchone()
        assert row is not None
        plan = row[0]
        found: set[tuple[str, str]] = set()

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if "Relation Name" in node and "Schema" in node:
                    found.add((node["Schema"], node["Relation Name"]))
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(plan)
        if not found:
            return []
        cur.execute("SELECT c.oid::bigint FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
                    "WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])) ORDER BY 1",
                    ([s for s, _ in found], [t for _, t in found]))
        return [int(r[0]) for r in cur.fetchall()]


def _row(r: tuple[Any, ...], at: dict[str, int]) -> ObjectRow:
    def get(name: str) -> Any:
        return r[at[name]] if name in at else None

    size = get("size")
    digest = get("sha256")
    if isinstance(digest, str):
        try:
            digest = bytes.fromhex(digest)
        except ValueError:
            digest = None
    elif digest is not None:
        digest = bytes(digest)
    if digest is not None and len(digest) != 32:
        digest = None
    idents = tuple((keyword, str(get(col))) for col, keyword in DICOM_COLUMNS.items() if get(col) is not None)
    return ObjectRow(str(get("key")), "" if get("location") is None else str(get("location")),
                     None if size is None else int(size), digest, idents)
