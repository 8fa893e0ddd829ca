"""PgBouncer: the pooler clients reach the database through, driven from its admin console and its [databases] file.

The cutover moves clients without them reconnecting: `PAUSE db` lets transactions in flight finish and holds new ones
in PgBouncer's queue (clients see a slow query, not an error); the file holding the database's `[databases]` entry is
rewritten to point at the new server and `RELOAD` reads it; `RESUME db` lets the queued transactions run, now on the
new server. PAUSE itself has no timeout, so it is sent without waiting and abandoned with RESUME (from a second admin
connection) when it does not complete in time: the pooler is never left paused.

In transaction pooling PAUSE completes when no transaction is in flight; in session pooling only when every client
has disconnected, which is why sites run the cutover in transaction (or statement) mode.
"""

from __future__ import annotations

import os
import re
import select
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from migrator.config import redact
from migrator.errors import PoolerError

_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_ENTRY = re.compile(r"^(\s*)(\"[^\"]+\"|[^=\s;#]+)(\s*=\s*)(.*?)(\s*)$")


@dataclass(frozen=True)
class PoolDatabase:
    """One row of `SHOW DATABASES`: where the pooler sends a database name's connections, and whether it is paused."""

    name: str
    host: str | None
    port: int | None
    database: str | None
    paused: bool
    disabled: bool
    pool_mode: str | None


class Admin:
    """A connection to PgBouncer's admin console (simple-query commands only, in autocommit)."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                                   prepare_threshold=None)
        except psycopg.Error as exc:
            raise PoolerError(f"cannot reach PgBouncer's admin console: {redact(str(exc)).strip()}") from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, text: str) -> None:
        """Run one admin command (PAUSE, RESUME, RELOAD, ...); names come from the configuration, never from data."""
        try:
            self._conn.execute(text.encode())
        except psycopg.Error as exc:
            raise PoolerError(f"PgBouncer refused `{text}`: {str(exc).strip()}") from exc

    def databases(self) -> dict[str, PoolDatabase]:
        try:
            rows = self._conn.cursor(row_factory=dict_row).execute(b"SHOW DATABASES").fetchall()
        except psycopg.Error as exc:
            raise PoolerError(f"SHOW DATABASES failed: {str(exc).strip()}") from exc
        return {r["name"]: PoolDatabase(r["name"], r.get("host"), r.get("port"), r.get("database"),
                                        bool(r.get("paused")), bool(r.get("disabled")), r.get("pool_mode") or None)
                for r in rows}

    def reload(self) -> None:
        self.command("RELOAD")

    def _rows(self, command: bytes) -> list[dict[str, Any]]:
        try:
            return self._conn.cursor(row_factory=dict_row).execute(command).fetchall()
        except psycopg.Error as exc:
            raise PoolerError(f"{command.decode()} failed: {str(exc).strip()}") from exc

    def version(self) -> tuple[int, ...]:
        """PgBouncer's version from `SHOW VERSION` ("PgBouncer 1.18.0" -> (1, 18, 0)); () when unreadable."""
        rows = self._rows(b"SHOW VERSION")
        m = re.search(r"(\d+(?:\.\d+)+)", str(next(iter(rows[0].values()))) if rows else "")
        return tuple(int(p) for p in m.group(1).split(".")) if m else ()

    def settings(self) -> dict[str, str]:
        """`SHOW CONFIG`: every setting's current value by name (a setting this version lacks is absent)."""
        return {str(r["key"]): str(r["value"]) for r in self._rows(b"SHOW CONFIG")}

    def pools(self) -> list[dict[str, Any]]:
        """`SHOW POOLS`: one row per (database, user) pool: clients active and waiting, the longest wait."""
        return self._rows(b"SHOW POOLS")

    def stats(self) -> dict[str, dict[str, Any]]:
        """`SHOW STATS` by database: totals since the pooler started (transactions, queries), counted as they
        happen."""
        return {str(r["database"]): r for r in self._rows(b"SHOW STATS")}

    def kill(self, name: str) -> None:
        """KILL one database: every client and server connection of it is dropped, and it stays paused until
        RESUME (clients then reconnect, as after a database restart)."""
        self.command(f"KILL {_name(name)}")

    def resume(self, name: str) -> None:
        """RESUME one database; one that is not paused is left as it is."""
        try:
            self._conn.execute(f"RESUME {_name(name)}".encode())
        except psycopg.Error as exc:
            if "not paused" in str(exc):
                return
            raise PoolerError(f"PgBouncer refused `RESUME {name}`: {str(exc).strip()}") from exc

    def pause(self, name: str, timeout: float) -> None:
        """PAUSE one database, waiting at most `timeout` seconds for the transactions in flight through it.

        On timeout the pending PAUSE is cancelled with RESUME from another admin connection and PoolerError is
        raised: the database serves clients again, as before.
        """
        pgconn = self._conn.pgconn
        pgconn.send_query(f"PAUSE {_name(name)}".encode())
        deadline = time.monotonic() + timeout
        while pgconn.is_busy():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([pgconn.socket], [], [], min(left, 0.2))
            pgconn.consume_input()
        if pgconn.is_busy():
            # The console cannot cancel its own PAUSE: a second connection resumes the database, and this one,
            # still waiting for a reply that will never come, is replaced.
            with Admin(self.dsn, connect_timeout=self.connect_timeout) as other:
                other.resume(name)
            self._conn.close()
            self._conn = self._connect()
            raise PoolerError(f"PAUSE {name} did not complete within {timeout}s: transactions through the pooler "
                              "were still running; the pooler was resumed",
                              hint="Find the long transaction (SHOW CLIENTS / pg_stat_activity), let it finish, "
                                   "or raise [cutover] pause_timeout, and run the cutover again.")
        error = None
        while (res := pgconn.get_result()) is not None:
            if res.error_message:
                error = res.error_message.decode(errors="replace").strip()
        if error:
            raise PoolerError(f"PgBouncer refused `PAUSE {name}`: {error}")


def _name(name: str) -> str:
    """A database name as the admin console's parser takes it (it has no quoting for names)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise PoolerError(f"pooler database name {name!r} cannot be passed to PgBouncer's admin console")
    return name


# --- the [databases] file ---------------------------------------------------------------------------------------

def read_entries(path: str | Path, names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The connect strings of `names` in the file's [databases] section; PoolerError when one is missing."""
    found = _scan(Path(path).read_text(), names)
    missing = [n for n in names if n not in found]
    if missing:
        raise PoolerError(f"no entry for {', '.join(missing)} in the [databases] section of {path}")
    return {n: found[n][1] for n in names}


def _scan(text: str, names: tuple[str, ...] | list[str]) -> dict[str, tuple[int, str]]:
    """name -> (line number, connect string) for the wanted names in [databases]."""
    section = None
    found: dict[str, tuple[int, str]] = {}
    for i, line in enumerate(text.splitlines()):
        m = _SECTION.match(line)
        if m:
            section = m.group(1).strip().lower()
            continue
        if section != "databases" or line.lstrip().startswith((";", "#")):
            continue
        e = _ENTRY.match(line)
        if e and e.group(2).strip('"') in names:
            found[e.group(2).strip('"')] = (i, e.group(4))
    return found


def rewrite_entries(path: str | Path, entries: dict[str, str]) -> str:
    """Give `entries` (name -> connect string) their new values in [databases]; returns the file's former text.

    Written to a temporary file beside it, flushed and renamed over it, keeping its mode and owner, so that PgBouncer
    never reads half a file.
    """
    p = Path(path)
    old = p.read_text()
    found = _scan(old, list(entries))
    missing = [n for n in entries if n not in found]
    if missing:
        raise PoolerError(f"no entry for {', '.join(missing)} in the [databases] section of {p}")
    lines = old.splitlines(keepends=True)
    for name, (i, _) in found.items():
        e = _ENTRY.match(lines[i].rstrip("\r\n"))
        assert e is not None
        ending = lines[i][len(lines[i].rstrip("\r\n")):]
        lines[i] = f"{e.group(1)}{e.group(2)}{e.group(3)}{entries[name]}{ending}"
    write_text(p, "".join(lines))
    return old


def write_text(p: Path, text: str) -> None:
    st = p.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_connstr(value: str) -> list[tuple[str, str]]:
    """PgBouncer's `key=value key='quoted value'` connect string, in order."""
    out = []
    for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", value):
        v = m.group(2)
        if v.startswith("'"):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        out.append((m.group(1), v))
    return out


def format_connstr(pairs: list[tuple[str, str]]) -> str:
    def q(v: str) -> str:
        return v if v and re.fullmatch(r"[^\s'\\]+", v) else "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return " ".join(f"{k}={q(v)}" for k, v in pairs)


def repoint(entry: str, where: dict[str, str]) -> str:
    """The entry with host, port and dbname replaced by `where`'s; its other keys (user, pool_size...) kept."""
    pairs = [(k, v) for k, v in parse_connstr(entry) if k not in where]
    return format_connstr(list(where.items()) + pairs)


def serves(shown: PoolDatabase, entry: str) -> bool:
    """Whether a `SHOW DATABASES` row sends its clients where the connect string `entry` points (its host, port and
    dbname, those it names)."""
    want = dict(parse_connstr(entry))
    got = {"host": shown.host, "port": shown.port, "dbname": shown.database}
    return all(str(got[k]) == want[k] for k in ("host", "port", "dbname") if k in want)


def target_location(target_dsn: str, pooler_target: str | None) -> dict[str, str]:
    """host, port and dbname the pooler's entries get: from [cutover] pooler_target, else from the target DSN."""
    if pooler_target:
        pairs = dict(parse_connstr(pooler_target))
    else:
        info = psycopg.conninfo.conninfo_to_dict(target_dsn)
        pairs = {k: str(info[k]) for k in ("host", "port", "dbname") if info.get(k)}
    return {k: pairs[k] for k in ("host", "port", "dbname") if k in pairs}
