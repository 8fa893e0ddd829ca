"""Connections to the legacy (source) and new (target) databases.

Every session migrator opens pins the settings that decide how values are written as text, so that a row's text form
is the same on both sides and parses back to the same bits. The capture function pins the same settings (see
triggers/capture.sql); they must agree with `PINNED_SETTINGS`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import redact
from migrator.errors import ConfigError, ConnectionFailed

PINNED_SETTINGS: dict[str, str] = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
}
CLIENT_ENCODING = "UTF8"
"""Pinned too, as a connection parameter (which a DSN's client_encoding or PGCLIENTENCODING cannot override): text
then crosses the wire as UTF-8 from either side, whatever each server's own encoding, so that binary COPY and
verify's binary row forms carry the same bytes for the same text."""


DEAD_PEER: dict[str, int] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
                             "keepalives_count": 3, "tcp_user_timeout": 30000}
"""TCP settings for every session (where the DSN does not set its own): a server that stops answering (unplugged,
its network dropping packets) is noticed in about 20 to 30 s instead of the kernel's quarter of an hour of retries,
so that a cutover step blocked on it fails, and is undone, instead of holding clients paused."""


def connect(dsn: str, *, role: str, autocommit: bool = False, application_name: str | None = None,
            **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection with the pinned settings; `role` ("source" or "target") only names it in errors."""
    options = " ".join(f"-c {k.replace(' ', '')}={v.replace(' ', '')}" for k, v in PINNED_SETTINGS.items())
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        given = {}
    kwargs = {**{k: v for k, v in DEAD_PEER.items() if k not in given}, **kwargs}
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name or f"migrator-{role}",
            options=options,
            **{**kwargs, "client_encoding": CLIENT_ENCODING},
        )
    except psycopg.Error as exc:
        raise ConnectionFailed(f"cannot connect to the {role} database: {redact(str(exc)).strip()}") from exc
    return conn


@contextmanager
def session(dsn: str, *, role: str, autocommit: bool = False, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(dsn, role=role, autocommit=autocommit, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def lock_wait(monitor: psycopg.Connection[Any], pid: int) -> str | None:
    """What the session `pid` waits for, read from another session (`monitor`) of the same database: the lock it
    has not been granted and the sessions holding it (pid, role, application, state; never their queries, which may
    carry patient data). None when it waits for no lock."""
    row = monitor.execute(
        "SELECT (SELECT coalesce(format('%%I.%%I', n.nspname, c.relname), l.locktype) || ' (to take ' || l.mode "
        "               || ')' FROM pg_locks l LEFT JOIN pg_class c ON c.oid = l.relation "
        "               LEFT JOIN pg_namespace n ON n.oid = c.relnamespace WHERE l.pid = %(p)s AND NOT l.granted "
        "               LIMIT 1), "
        "       array(SELECT format('pid %%s (%%s, %%s, %%s)', b.pid, b.usename, "
        "                           coalesce(nullif(b.application_name, ''), 'no application name'), b.state) "
        "             FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(%(p)s)) ORDER BY b.pid)",
        {"p": pid}).fetchone()
    if row is None or row[0] is None:
        return None
    return f"a lock on {row[0]}" + (f", blocked by {', '.join(row[1])}" if row[1] else "")


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages; never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return redact(dsn)
    host = info.get("host") or "local"
    port = info.get("port") or "5432"
    return redact(f"{host}:{port}/{info.get('dbname', '')}")


def refuse_same_database(source_dsn: str, target_dsn: str) -> None:
    """Raise ConfigError when the two DSNs reach the same database, however they are spelled.

    The source session is opened under a one-off application_name; the target session looks for it in
    pg_stat_activity, which any role may read (pid, datid and application_name of every session). Found there, the
    two are one server, and one database when its datid is the target's database. A physical clone of the legacy
    server (same system_identifier, same oids) is told apart, which comparing pg_control_system() would not do.
    """
    token = f"migrator-identity-{uuid.uuid4().hex}"
    with session(source_dsn, role="source", autocommit=True, application_name=token) as source, \
            session(target_dsn, role="target", autocommit=True) as target:
        row = source.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        same = target.execute(
            "SELECT a.datid = d.oid, d.datname FROM pg_stat_activity a JOIN pg_database d"
            " ON d.datname = current_database() WHERE a.pid = %s AND a.application_name = %s",
            (row[0], token)).fetchone()
    if same is not None and same[0]:
        raise ConfigError(
            f"the source and the target are the same database ({same[1]} on one server); refused before anything "
            "was done",
            hint="Point [target] dsn (or MIGRATOR_TARGET_DSN) at the new, empty database on the new server.")
