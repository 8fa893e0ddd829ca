"""The target ends bit-for-bit equal to the source: prepare, copy and sync under awkward values, schemas and orders.

Every test runs the phases the way an operator would (prepare, changes, copy, more changes, some from transactions
interleaved on separate connections, sync) and then compares every row of every table, as the rows' text forms
under the pinned output settings, and the binary form of values whose text could hide a difference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from migrator import copy, cutover, db, prepare, sync
from migrator.config import CAPTURE_SCHEMA, CONTROL_SCHEMA, Config
from tests.helpers import fetch, run_sql

# Settings a clinical application's session might run with; the captured images must not depend on them.
ODD_SETTINGS = (
    "SET DateStyle = 'SQL, DMY'",
    "SET extra_float_digits = 0",
    "SET IntervalStyle = 'sql_standard'",
    "SET TimeZone = 'Pacific/Chatham'",
    "SET bytea_output = 'escape'",
)


# --- helpers ------------------------------------------------------------------------------------------------------

def writer(dsn: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """An application session (not one of migrator's pinned ones) with odd output settings."""
    conn = psycopg.connect(dsn, autocommit=True)
    for s in ODD_SETTINGS:
        conn.execute(s)  # type: ignore[arg-type]
    conn.autocommit = autocommit
    return conn


def write(dsn: str, *statements: str) -> None:
    """Run statements in autocommit from an application session with odd settings."""
    with writer(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


@contextmanager
def transaction(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An application transaction, committed when the block ends without an error."""
    conn = writer(dsn)
    try:
        yield conn
        conn.commit()
    finally:
        conn.close()


def user_tables(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY 1, 2",
        (["pg_catalog", "information_schema", CAPTURE_SCHEMA, CONTROL_SCHEMA],),
    ).fetchall()]


def table_rows(conn: psycopg.Connection[Any], schema: str, name: str) -> tuple[int, list[str]]:
    ident = db.qualified(schema, name)
    (count,) = conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(ident)).fetchone() or (None,)
    rows = conn.execute(sql.SQL('SELECT t::text FROM ONLY {} AS t ORDER BY t::text COLLATE "C"').format(ident))
    return int(count), [r[0] for r in rows.fetchall()]


def assert_identical(source_dsn: str, target_dsn: str) -> dict[str, int]:
    """Every table of the source has the same rows on the target (a multiset of row texts); returns row counts."""
    counts = {}
    with db.session(source_dsn, role="source", autocommit=True) as s, \
            db.session(target_dsn, role="target", autocommit=True) as t:
        tables = user_tables(s)
        assert user_tables(t) == tables, "the target's tables differ from the source's"
        for schema, name in tables:
            src_count, src_rows = table_rows(s, schema, name)
            tgt_count, tgt_rows = table_rows(t, schema, name)
            assert tgt_count == src_count, f"{schema}.{name}: {tgt_count} rows on the target, {src_count} on source"
            assert tgt_rows == src_rows, f"{schema}.{name}: rows differ"
            counts[f"{schema}.{name}"] = src_count
    return counts


def assert_same_result(source_dsn: str, target_dsn: str, query: str, what: str) -> list[tuple[Any, ...]]:
    with db.session(source_dsn, role="source", autocommit=True) as s, \
            db.session(target_dsn, role="target", autocommit=True) as t:
        src = s.execute(query).fetchall()  # type: ignore[arg-type]
        tgt = t.execute(query).fetchall()  # type: ignore[arg-type]
    assert tgt == src, f"{what}: differs between source and target"
    return src


def run_in_thread(fn: Callable[[], object]) -> threading.Thread:
    """Start fn (a statement expected to wait for a row lock) in a thread, and give it time to start waiting."""
    thread = threading.Thread(target=fn)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), "the statement was expected to wait for a row lock"
    return thread


# --- 1. awkward values --------------------------------------------------------------------------------------------

VALUE_TYPES = """
CREATE TYPE public.dose AS (amount numeric, unit text, given timestamptz, scale float8);
CREATE DOMAIN public.mrn AS text CHECK (VALUE ~ '^[A-Z0-9-]*$');
CREATE TABLE public.val (
    id int PRIMARY KEY,
    f8 float8, f4 float4, num numeric, ts timestamptz, tsl timestamp, iv interval, d date, tz timetz,
    r4 int4range, rtz tstzrange, b8 bit(8), vb varbit, t text, j jsonb, ta text[], ia int[], blob bytea,
    dose public.dose, m public.mrn, cash money
);
"""

# Column values of one row each, written as literals that mean the same under any DateStyle and IntervalStyle.
AWKWARD_ROWS = [
    r"""'-0', '-0', 'NaN', 'infinity', 'infinity', '1 year -2 mons +3 days -04:05:06.000007', '0044-03-15 BC',
        '23:59:59.999999+14', 'empty', '[2024-04-07 02:30:00+13:45, infinity)', B'10100101', B'1',
        E'back\\slash\ttab\nnew line \"dq\" ''sq'' , comma (paren) {brace} \\N \r',
        '{"a": {"b": [1, 2.50, null, "x\"y", {"c": []}]}, "e": {}, "": "\\u00e9"}',
        ARRAY['a', NULL, 'q"uote', 'NULL', '', E'back\\slash', 'com,ma', '{brace}', ' lead'],
        '{{1,2},{3,NULL}}', '\x00ff5c27220a', ROW(1.50, 'mg', '2024-01-01 00:00+00', '-0'), 'A-1', '-12.34'""",
    r"""'NaN', 'NaN', '123456789012345678901234567890.000000000000000000000000000000000000000001', '-infinity',
        '-infinity', '-1 mons +1 day -00:00:00.000001', '4713-11-24 BC', '00:00:00-15:59', '(,)', '(,)',
        B'00000000', B'', '', '[]', '{}', '[0:1]={7,8}', '\x', ROW(NULL, '', NULL, 'NaN'), '', '0'""",
    r"""'Infinity', 'Infinity', '-0.000000000000000000000000000000000000000000000000000000000000000000001',
        '1999-12-31 23:59:59.999999+00', '0001-01-01 00:00:00 BC', '178000000 years', '5874897-12-31',
        '12:00+05:30', '[-2147483648,2147483647)', 'empty', B'11111111', B'0101010101010101010101',
        'مرحبا بالعالم — 病人 患者 カルテ — 🩺💉👩‍⚕️ — Ünïcödé', '{"k": [{"deep": {"deeper": [true, false, null]}}]}',
        ARRAY['مرحبا', '病人', '🩺', E'\t', E'\n'], '{{-1,0},{1,2}}', '\x5c5c',
        ROW(-1e-20, E'a"b\\c,d(e)', NULL, 'Infinity'),
        'Z', '92233720368547758.07'""",
    r"""'-Infinity', '-Infinity', 'NaN', 'epoch', 'epoch', '-178000000 years -11 mons', '0001-01-01',
        '00:00+00', '[,5)', '[2000-01-01 00:00+00,)', B'10000000', B'0', ' ', 'null', ARRAY[NULL]::text[],
        '{}', NULL, NULL, NULL, NULL""",
    r"""'1.7976931348623157e308', '1.4e-45', '1e-130', '2024-03-31 13:00:00+00', '2024-02-29 24:00:00',
        '1 day -24:00:00', '2000-02-29', '24:00:00+00', '[1,2)', '(2024-01-01 00:00+00,2024-01-02 00:00+00]',
        B'01010101', NULL, NULL, '"just a string with \"quotes\""', ARRAY['', '', NULL, NULL], NULL,
        decode(repeat('ff00', 300), 'hex'), ROW(0, 'NULL', 'infinity', '5e-324'), NULL, '-0.01'""",
    r"""'5e-324', '-3.4028235e38', '-1e+130', NULL, NULL, '-3 days -04:05:06.5', NULL, NULL, NULL, NULL,
        NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL""",
]

# The binary forms, where text might hide a difference (float signs and payloads, numeric and interval fields).
BINARY_QUERY = """
SELECT id, float8send(f8), float4send(f4), numeric_send(num), timestamptz_send(ts), timestamp_send(tsl),
       interval_send(iv), date_send(d), timetz_send(tz), bit_send(b8), varbit_send(vb), md5(t), md5(blob),
       length(blob), jsonb_send(j), float8send((dose).scale), numeric_send((dose).amount), md5(ta::text)
  FROM public.val ORDER BY id
"""

COLUMNS = "f8, f4, num, ts, tsl, iv, d, tz, r4, rtz, b8, vb, t, j, ta, ia, blob, dose, m, cash"
BIG = "(SELECT string_agg(sha256(int4send(g)), ''::bytea) FROM generate_series(1, 65536) g)"  # 2 MiB


def insert_awkward(dsn: str, first_id: int, *, odd: bool) -> None:
    rows = ", ".join(f"({first_id + i}, {values})" for i, values in enumerate(AWKWARD_ROWS))
    (write if odd else run_sql)(dsn, f"INSERT INTO public.val VALUES {rows}")


def test_awkward_values_written_under_odd_session_settings_arrive_exactly(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    run_sql(source_dsn, VALUE_TYPES)
    insert_awkward(source_dsn, 1, odd=False)
    run_sql(source_dsn, f"INSERT INTO public.val (id, t, blob) VALUES (100, 'big before copy', {BIG})")
    prepare.prepare(cfg)
    insert_awkward(source_dsn, 11, odd=True)
    write(source_dsn, "UPDATE public.val SET f8 = -f8, iv = -iv, t = t || E'\\\\' WHERE id IN (11, 12, 13)")
    copy.run(cfg)

    insert_awkward(source_dsn, 21, odd=True)
    write(
        source_dsn,
        # Values parsed under the writer's own DateStyle (DMY) and TimeZone: whatever they mean, it arrives.
        "INSERT INTO public.val (id, ts, tsl, d, iv, t) VALUES (40, '05/03/2024 02:45', '05/03/2024 02:45', "
        "'05/03/2024', 'P1Y2M3DT4H5M6.5S', 'dmy')",
        "INSERT INTO public.val (id, ts, t) VALUES (41, '2024-04-07 03:30', 'ambiguous local time in Chatham')",
        # Every awkward value of one row moves to another row, and back to NULL, across the copy boundary.
        f"UPDATE public.val AS v SET ({COLUMNS}) = (SELECT {COLUMNS} FROM public.val AS w"
        "  WHERE w.id = CASE WHEN v.id = 6 THEN 1 ELSE v.id + 1 END) WHERE v.id BETWEEN 1 AND 6",
        "UPDATE public.val SET t = NULL WHERE id = 22",
        "UPDATE public.val SET t = '' WHERE id = 26",
        "DELETE FROM public.val WHERE id = 13",
        # TOASTed values: a 2 MiB value changed, one left alone while its row changes, and a new one.
        "UPDATE public.val SET blob = blob || '\\x01'::bytea, t = 'big changed' WHERE id = 100",
        f"INSERT INTO public.val (id, t, blob) VALUES (101, 'big after copy', {BIG})",
        f"INSERT INTO public.val (id, t, blob) VALUES (102, 'big updated', {BIG})",
        "UPDATE public.val SET f8 = 1.5 WHERE id = 102",
    )

    sync.sync(cfg)

    counts = assert_identical(source_dsn, target_dsn)
    assert counts["public.val"] == 6 * 3 - 1 + 5
    binary = assert_same_result(source_dsn, target_dsn, BINARY_QUERY, "binary forms of public.val")
    assert {r[0]: r[13] for r in binary}[102] == 2 * 1024 * 1024
    ((minus_zero,),) = fetch(target_dsn, "SELECT float8send(f8) FROM public.val WHERE id = 21")
    assert minus_zero == b"\x80" + b"\x00" * 7  # written by a session with extra_float_digits = 0


# --- 2. awkward schemas -------------------------------------------------------------------------------------------

def test_generated_and_identity_columns_keep_the_sources_values(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.dosage (id int PRIMARY KEY, mg numeric, ml numeric,"
        " per_ml numeric GENERATED ALWAYS AS (mg / nullif(ml, 0)) STORED)",
        "CREATE TABLE public.scan (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, modality text)",
        "CREATE TABLE public.series (id int GENERATED BY DEFAULT AS IDENTITY (START 50 INCREMENT 5) PRIMARY KEY,"
        " uid text)",
        "INSERT INTO public.dosage (id, mg, ml) VALUES (1, 10, 4), (2, 5, 0)",
        "INSERT INTO public.scan (modality) VALUES ('CT'), ('MR'), ('US')",
        "INSERT INTO public.series (uid) VALUES ('1.2.3'), ('1.2.4')",
        "INSERT INTO public.series (id, uid) VALUES (7, 'explicit')",
    )
    prepare.prepare(cfg)
    write(source_dsn, "INSERT INTO public.scan (modality) VALUES ('PT')", "DELETE FROM public.scan WHERE id = 1")
    copy.run(cfg)
    with transaction(source_dsn) as a, transaction(source_dsn) as b:
        a.execute("INSERT INTO public.scan (modality) VALUES ('XA')")
        b.execute("INSERT INTO public.scan (modality) VALUES ('NM')")
        a.execute("INSERT INTO public.scan OVERRIDING SYSTEM VALUE VALUES (1000, 'overridden')")
        b.execute("INSERT INTO public.series (uid) VALUES ('1.2.5')")
        a.execute("INSERT INTO public.series (id, uid) VALUES (8, 'explicit after copy')")
        b.execute("UPDATE public.dosage SET ml = 8 WHERE id = 1")
        a.execute("UPDATE public.dosage SET ml = 2, mg = 3 WHERE id = 2")
        b.execute("INSERT INTO public.dosage (id, mg, ml) VALUES (3, 1, 3)")
        a.execute("UPDATE public.scan SET modality = 'MR2' WHERE id = 2")

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT id, per_ml = mg / ml FROM public.dosage ORDER BY id") == [
        (1, True), (2, True), (3, True)]
    assert [r[0] for r in fetch(target_dsn, "SELECT id FROM public.scan ORDER BY id")] == [2, 3, 4, 5, 6, 1000]


def test_partitioned_table_with_rows_moving_between_partitions(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.visit (site text NOT NULL, id int NOT NULL, note text, PRIMARY KEY (site, id))"
        " PARTITION BY LIST (site)",
        "CREATE TABLE public.visit_a PARTITION OF public.visit FOR VALUES IN ('A')",
        "CREATE TABLE public.visit_b PARTITION OF public.visit FOR VALUES IN ('B')",
        # A partition whose columns are in another order than its parent's, one of them dropped.
        "CREATE TABLE public.visit_c (note text, gone int, id int NOT NULL, site text NOT NULL)",
        "ALTER TABLE public.visit_c DROP COLUMN gone",
        "ALTER TABLE public.visit ATTACH PARTITION public.visit_c FOR VALUES IN ('C')",
        "CREATE TABLE public.visit_other PARTITION OF public.visit DEFAULT",
        "CREATE TABLE public.exam (at date NOT NULL, id int NOT NULL, v text, PRIMARY KEY (at, id))"
        " PARTITION BY RANGE (at)",
        "CREATE TABLE public.exam_2023 PARTITION OF public.exam FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')",
        "CREATE TABLE public.exam_2024 PARTITION OF public.exam FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
        "INSERT INTO public.visit SELECT (ARRAY['A', 'B', 'C'])[g % 3 + 1], g, 'v' || g"
        " FROM generate_series(1, 30) g",
        "INSERT INTO public.exam SELECT '2023-06-01'::date + g * 10, g, 'e' || g FROM generate_series(1, 40) g",
    )
    prepare.prepare(cfg)
    write(source_dsn, "UPDATE public.visit SET site = 'B' WHERE id IN (3, 6)")  # A -> B before the copy
    copy.run(cfg)
    write(
        source_dsn,
        "UPDATE public.visit SET site = 'B', note = 'moved A->B' WHERE id IN (9, 12)",
        "UPDATE public.visit SET site = 'Z', note = 'moved to default' WHERE id = 1",
        "UPDATE public.visit SET site = 'A' WHERE id = 3",  # back to where it started
        "INSERT INTO public.visit_a VALUES ('A', 100, 'direct into a partition')",
        "UPDATE public.visit_b SET note = 'direct update' WHERE id = 6",
        "DELETE FROM public.visit_c WHERE id = 2",
        "UPDATE public.visit SET site = 'D' WHERE id = 5",
        "UPDATE public.exam SET at = at + 365 WHERE id BETWEEN 10 AND 20",
        "UPDATE public.exam SET at = '2024-12-31', id = id + 1000 WHERE id = 3",
    )
    write(source_dsn, "TRUNCATE public.exam", "INSERT INTO public.exam VALUES ('2024-05-05', 1, 'after truncate')")
    with transaction(source_dsn) as a:  # moves there and back inside one transaction
        a.execute("UPDATE public.visit SET site = 'C' WHERE id = 9")
        a.execute("UPDATE public.visit SET site = 'B', note = 'back' WHERE id = 9")

    sync.sync(cfg)

    counts = assert_identical(source_dsn, target_dsn)
    assert [counts[f"public.visit_{p}"] for p in ("a", "b", "c", "other")] == [8, 12, 8, 2]
    assert (counts["public.exam_2023"], counts["public.exam_2024"]) == (0, 1)
    assert_same_result(source_dsn, target_dsn, "SELECT tableoid::regclass::text, * FROM public.visit ORDER BY id",
                       "partition of each visit")


def test_awkward_names_and_keys(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(
        source_dsn,
        'CREATE SCHEMA "Clinic Data"',
        'CREATE TABLE "Clinic Data"."Order" ("select" int PRIMARY KEY, gone text, "User Name" text, "from" date)',
        'ALTER TABLE "Clinic Data"."Order" DROP COLUMN gone',
        "CREATE TABLE public.base (id int PRIMARY KEY, v text)",
        "CREATE TABLE public.kid (extra text) INHERITS (public.base)",  # no key of its own
        "INSERT INTO public.base VALUES (1, 'base')",
        "INSERT INTO public.kid VALUES (1, 'kid', 'x'), (2, 'kid', 'y')",
        'CREATE TABLE "Clinic Data".code (code text PRIMARY KEY, label text)',
        "CREATE TABLE public.slot (room text, n int, who text, PRIMARY KEY (room, n))",
        "CREATE TABLE public.device (serial text NOT NULL, port int NOT NULL, label text, UNIQUE (serial, port))",
        'INSERT INTO "Clinic Data"."Order" SELECT g, \'user \' || g, \'2024-01-01\'::date + g'
        " FROM generate_series(1, 20) g",
        "INSERT INTO \"Clinic Data\".code VALUES ('a', 'lower'), ('A', 'upper'), ('a ', 'trailing space'),"
        " ('', 'empty'), ('é', 'accent'), ('e\u0301', 'combining')",
        "INSERT INTO public.slot SELECT r, n, r || n FROM unnest(ARRAY['MR 1', 'CT,2', '\"X\"']) r,"
        " generate_series(1, 3) n",
        "INSERT INTO public.device SELECT 'SN' || g, g % 2, 'dev' || g FROM generate_series(1, 10) g",
    )
    prepare.prepare(cfg)
    write(source_dsn, "UPDATE \"Clinic Data\".code SET code = 'a2' WHERE code = 'a'")
    copy.run(cfg)
    write(
        source_dsn,
        'UPDATE "Clinic Data"."Order" SET "User Name" = NULL WHERE "select" = 2',
        'UPDATE "Clinic Data"."Order" SET "select" = "select" + 1000 WHERE "select" > 15',
        "UPDATE \"Clinic Data\".code SET code = 'A ' WHERE code = 'a '",
        "UPDATE \"Clinic Data\".code SET label = 'changed' WHERE code = 'e\u0301'",
        "INSERT INTO \"Clinic Data\".code VALUES ('a', 'again'), ('日本', 'cjk')",
        "DELETE FROM \"Clinic Data\".code WHERE code = ''",
        "UPDATE public.slot SET n = n + 10 WHERE room = 'CT,2'",
        "UPDATE public.slot SET room = 'MR 1', n = 9 WHERE room = '\"X\"' AND n = 1",
        "DELETE FROM public.slot WHERE room = 'MR 1' AND n = 2",
        "UPDATE public.device SET port = port + 10 WHERE serial IN ('SN1', 'SN2')",
        "UPDATE public.device SET label = 'relabelled' WHERE serial = 'SN3'",
        "DELETE FROM public.device WHERE serial = 'SN4'",
        "INSERT INTO public.device VALUES ('SN4', 0, 'replaced')",
        "UPDATE public.base SET v = v || '!' WHERE id = 2",  # reaches the child's row through the parent
        "DELETE FROM ONLY public.base WHERE id = 1",  # not the child's row with the same id
        "INSERT INTO public.kid VALUES (3, 'kid', NULL)",
    )

    sync.sync(cfg)

    counts = assert_identical(source_dsn, target_dsn)
    assert counts == {"Clinic Data.Order": 20, "Clinic Data.code": 7, "public.base": 0, "public.device": 10,
                      "public.kid": 3, "public.slot": 8}


# --- 3. order -----------------------------------------------------------------------------------------------------

ORDER_SCHEMA = """
CREATE TABLE public.chart (id int PRIMARY KEY, n bigint NOT NULL, v text NOT NULL);
INSERT INTO public.chart SELECT g, g, 'v' || g FROM generate_series(1, 20) g;
"""


def test_successive_updates_of_one_row_by_interleaved_transactions_apply_in_commit_order(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    run_sql(source_dsn, ORDER_SCHEMA)
    prepare.prepare(cfg)
    early = writer(source_dsn)  # begins before the copy, commits after it
    early.execute("UPDATE public.chart SET v = v || ' early', n = n + 1 WHERE id = 2")
    copy.run(cfg)
    late = writer(source_dsn)
    late_update = run_in_thread(
        lambda: late.execute("UPDATE public.chart SET v = v || ' late', n = n * 10 WHERE id = 2"))
    early.commit()
    late_update.join()
    late.commit()

    a, b, c = writer(source_dsn), writer(source_dsn), writer(source_dsn)
    a.execute("UPDATE public.chart SET v = v || ' a', n = n + 1 WHERE id = 1")
    b.execute("UPDATE public.chart SET v = v || ' b' WHERE id = 3")
    blocked_b = run_in_thread(lambda: b.execute("UPDATE public.chart SET v = v || ' b', n = n * 2 WHERE id = 1"))
    c.execute("UPDATE public.chart SET v = v || ' c' WHERE id = 4")
    a.commit()
    blocked_b.join()
    blocked_c = run_in_thread(lambda: c.execute("UPDATE public.chart SET v = v || ' c', n = n - 7 WHERE id = 1"))
    b.commit()
    blocked_c.join()
    c.commit()
    for conn in (early, late, a, b, c):
        conn.close()

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT id, n, v FROM public.chart WHERE id <= 4 ORDER BY id") == [
        (1, (1 + 1) * 2 - 7, "v1 a b c"), (2, 30, "v2 early late"), (3, 3, "v3 b"), (4, 4, "v4 c")]


def test_delete_and_reinsert_of_one_key_in_one_and_in_two_transactions(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    run_sql(source_dsn, ORDER_SCHEMA, "CREATE TABLE public.note (mrn text PRIMARY KEY, body text)",
            "INSERT INTO public.note VALUES ('M1', 'one'), ('M2', 'two')")
    prepare.prepare(cfg)
    copy.run(cfg)
    with transaction(source_dsn) as t:
        t.execute("DELETE FROM public.chart WHERE id = 1")
        t.execute("INSERT INTO public.chart VALUES (1, 100, 'reinserted in one transaction')")
        t.execute("DELETE FROM public.note WHERE mrn = 'M1'")
        t.execute("INSERT INTO public.note VALUES ('M1', 'one, again')")
        t.execute("DELETE FROM public.chart WHERE id = 5")  # deleted, reinserted, deleted again
        t.execute("INSERT INTO public.chart VALUES (5, 5, 'short-lived')")
        t.execute("DELETE FROM public.chart WHERE id = 5")
    write(source_dsn, "DELETE FROM public.chart WHERE id = 2")
    write(source_dsn, "INSERT INTO public.chart VALUES (2, 200, 'reinserted in a second transaction')")
    write(source_dsn, "DELETE FROM public.note WHERE mrn = 'M2'")
    write(source_dsn, "INSERT INTO public.note VALUES ('M2', 'two')")  # identical to the deleted row
    write(source_dsn, "INSERT INTO public.chart VALUES (50, 0, 'new'), (51, 0, 'new')")
    write(source_dsn, "DELETE FROM public.chart WHERE id = 51")

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT v FROM public.chart WHERE id IN (1, 2, 5, 50, 51) ORDER BY id") == [
        ("reinserted in one transaction",), ("reinserted in a second transaction",), ("new",)]


def test_key_updates_and_a_swap_through_a_temporary_value(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, ORDER_SCHEMA)
    prepare.prepare(cfg)
    copy.run(cfg)
    write(source_dsn, "UPDATE public.chart SET id = id + 1000 WHERE id BETWEEN 11 AND 15")
    with transaction(source_dsn) as t:
        t.execute("UPDATE public.chart SET id = -1 WHERE id = 1")
        t.execute("UPDATE public.chart SET id = 1 WHERE id = 2")
        t.execute("UPDATE public.chart SET id = 2 WHERE id = -1")
    with transaction(source_dsn) as t:  # a chain of moves: 3 -> 4's old place after 4 moved on
        t.execute("UPDATE public.chart SET id = 104 WHERE id = 4")
        t.execute("UPDATE public.chart SET id = 4 WHERE id = 3")
        t.execute("UPDATE public.chart SET id = 3, v = 'was 104' WHERE id = 104")
    write(source_dsn, "UPDATE public.chart SET id = id + 1000 WHERE id = 1011")  # a moved key moves again

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT id, v FROM public.chart WHERE id <= 4 ORDER BY id") == [
        (1, "v2"), (2, "v1"), (3, "was 104"), (4, "v3")]


def test_key_swap_in_one_statement_under_a_deferrable_primary_key(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    # With a deferrable key two rows may hold one key for a moment, so "the last event that mentions a key" is not
    # the key's final state: the row that left a key is not necessarily the row that is there at commit.
    run_sql(
        source_dsn,
        "CREATE TABLE public.bed (bed int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, patient text)",
        "INSERT INTO public.bed SELECT g, 'patient ' || g FROM generate_series(1, 10) g",
    )
    prepare.prepare(cfg)
    copy.run(cfg)
    write(source_dsn, "UPDATE public.bed SET bed = 3 - bed WHERE bed IN (1, 2)")
    with transaction(source_dsn) as t:
        t.execute("SET CONSTRAINTS ALL DEFERRED")
        t.execute("UPDATE public.bed SET bed = 4 WHERE bed = 3")
        t.execute("UPDATE public.bed SET bed = 3 WHERE bed = 4 AND patient = 'patient 4'")
        t.execute("UPDATE public.bed SET bed = bed + 1 WHERE bed BETWEEN 5 AND 9")
        t.execute("UPDATE public.bed SET bed = 5 WHERE bed = 10 AND patient = 'patient 9'")
        t.execute("UPDATE public.bed SET bed = 0 WHERE patient = 'patient 10'")

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT bed, patient FROM public.bed WHERE bed <= 5 ORDER BY bed") == [
        (0, "patient 10"), (1, "patient 2"), (2, "patient 1"), (3, "patient 4"), (4, "patient 3"), (5, "patient 9")]


def test_cascaded_deletes_and_rolled_back_work_leave_the_source_state(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    run_sql(
        source_dsn,
        ORDER_SCHEMA,
        "CREATE TABLE public.study (id int PRIMARY KEY,"
        " patient int NOT NULL REFERENCES public.chart ON DELETE CASCADE)",
        "CREATE TABLE public.image (id int PRIMARY KEY,"
        " study int REFERENCES public.study ON DELETE CASCADE, sop text)",
        "INSERT INTO public.study SELECT g, (g % 20) + 1 FROM generate_series(1, 60) g",
        "INSERT INTO public.image SELECT g, (g % 60) + 1, 'sop' || g FROM generate_series(1, 240) g",
    )
    prepare.prepare(cfg)
    copy.run(cfg)
    write(source_dsn, "DELETE FROM public.chart WHERE id IN (1, 2)")
    with transaction(source_dsn) as t:
        t.execute("INSERT INTO public.chart VALUES (100, 0, 'kept')")
        t.execute("SAVEPOINT s")
        t.execute("INSERT INTO public.chart VALUES (101, 0, 'rolled back to savepoint')")
        t.execute("UPDATE public.chart SET v = 'rolled back' WHERE id = 3")
        t.execute("DELETE FROM public.chart WHERE id = 4")  # cascades, and is rolled back with the savepoint
        t.execute("ROLLBACK TO SAVEPOINT s")
        t.execute("UPDATE public.chart SET v = 'after the savepoint' WHERE id = 5")
        t.execute("SAVEPOINT s2")
        t.execute("DELETE FROM public.image WHERE id < 100")
        t.execute("RELEASE SAVEPOINT s2")
    aborted = writer(source_dsn)
    aborted.execute("INSERT INTO public.chart VALUES (200, 0, 'never committed')")
    aborted.execute("DELETE FROM public.chart WHERE id = 6")
    aborted.execute("UPDATE public.image SET sop = 'never' WHERE id > 200")
    aborted.rollback()
    aborted.close()

    sync.sync(cfg)

    counts = assert_identical(source_dsn, target_dsn)
    assert (counts["public.chart"], counts["public.study"]) == (19, 54)
    assert fetch(target_dsn, "SELECT id FROM public.chart WHERE id IN (4, 6, 100, 101, 200) ORDER BY id") == [
        (4,), (6,), (100,)]


def test_truncate_is_replayed_where_it_happened(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(
        source_dsn,
        ORDER_SCHEMA,
        "CREATE TABLE public.worklist (id int PRIMARY KEY, item text)",
        "CREATE TABLE public.scratch (item text)",
        "CREATE TABLE public.ward (id int PRIMARY KEY, name text)",
        "CREATE TABLE public.bed (id int PRIMARY KEY, ward int REFERENCES public.ward, label text)",
        "CREATE TABLE public.order_ (id int PRIMARY KEY, chart int REFERENCES public.chart)",
        "INSERT INTO public.worklist SELECT g, 'w' || g FROM generate_series(1, 10) g",
        "INSERT INTO public.scratch SELECT 'dup' FROM generate_series(1, 5)",
        "INSERT INTO public.ward SELECT g, 'ward ' || g FROM generate_series(1, 3) g",
        "INSERT INTO public.bed SELECT g, g % 3 + 1, 'bed ' || g FROM generate_series(1, 12) g",
        "INSERT INTO public.order_ SELECT g, g FROM generate_series(1, 20) g",
    )
    prepare.prepare(cfg)
    copy.run(cfg)
    with transaction(source_dsn) as t:
        t.execute("INSERT INTO public.worklist VALUES (11, 'before the truncate')")
        t.execute("TRUNCATE public.worklist")
        t.execute("INSERT INTO public.worklist VALUES (1, 'after the truncate, same transaction')")
        t.execute("INSERT INTO public.scratch VALUES ('dup'), ('gone')")
        t.execute("TRUNCATE public.scratch")
        t.execute("INSERT INTO public.scratch VALUES ('dup'), ('dup')")
    write(source_dsn, "INSERT INTO public.worklist VALUES (2, 'later transaction')",
          "UPDATE public.worklist SET item = 'updated later' WHERE id = 1")
    with transaction(source_dsn) as t:  # a parent and its child, emptied together
        t.execute("INSERT INTO public.bed VALUES (13, 1, 'short-lived')")
        t.execute("TRUNCATE public.ward, public.bed")
        t.execute("INSERT INTO public.ward VALUES (1, 'new ward')")
        t.execute("INSERT INTO public.bed VALUES (1, 1, 'new bed')")
    write(source_dsn, "TRUNCATE public.chart CASCADE",  # reaches order_ through the foreign key
          "INSERT INTO public.chart VALUES (1, 1, 'after cascade')", "INSERT INTO public.order_ VALUES (7, 1)")

    sync.sync(cfg)

    counts = assert_identical(source_dsn, target_dsn)
    assert counts == {"public.bed": 1, "public.chart": 1, "public.order_": 1, "public.scratch": 2,
                      "public.ward": 1, "public.worklist": 2}
    run_sql(source_dsn, "TRUNCATE public.worklist", "INSERT INTO public.worklist VALUES (3, 'next sync')")
    sync.sync(cfg)
    assert assert_identical(source_dsn, target_dsn)["public.worklist"] == 1


def test_changes_spread_over_several_syncs(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, ORDER_SCHEMA, "CREATE TABLE public.tally (k text, n int)",
            "INSERT INTO public.tally SELECT 'k', 1 FROM generate_series(1, 3)")
    prepare.prepare(cfg)
    copy.run(cfg)
    spanning = writer(source_dsn)  # open across the first two syncs
    spanning.execute("UPDATE public.chart SET v = 'spanning' WHERE id = 10")
    spanning.execute("INSERT INTO public.tally VALUES ('spanning', 1)")
    write(source_dsn, "UPDATE public.chart SET n = n + 1 WHERE id <= 5", "INSERT INTO public.tally VALUES ('k', 1)")
    sync.sync(cfg)
    assert_identical(source_dsn, target_dsn)

    batches: list[int] = []
    stop = threading.Event()

    def between_batches(info: sync.BatchInfo, lag: sync.Lag) -> None:
        # A change committed between two batches of one sync: the second batch applies it, and the next sync,
        # which finds it still in the delta log, must not apply it again.
        batches.append(info.events)
        if len(batches) == 1:
            write(source_dsn, "INSERT INTO public.tally VALUES ('between batches', 1)",
                  "UPDATE public.chart SET v = 'between batches' WHERE id = 11")
        else:
            stop.set()

    write(source_dsn, "UPDATE public.chart SET n = n + 1 WHERE id <= 3", "DELETE FROM public.chart WHERE id = 20",
          "DELETE FROM public.tally WHERE ctid = (SELECT ctid FROM public.tally WHERE k = 'k' LIMIT 1)")
    sync.sync(cfg, follow=True, stop=stop, on_batch=between_batches)
    assert batches == [5, 2]
    assert_identical(source_dsn, target_dsn)

    spanning.commit()
    spanning.close()
    write(source_dsn, "UPDATE public.chart SET v = v || ' then' WHERE id = 10",
          "INSERT INTO public.chart VALUES (20, 0, 'back')",
          "UPDATE public.tally SET n = 2 WHERE k = 'between batches'")
    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT v FROM public.chart WHERE id = 10") == [("spanning then",)]
    assert fetch(target_dsn, "SELECT n FROM public.chart WHERE id IN (1, 4) ORDER BY id") == [(3,), (5,)]


# --- 4. tables without a key --------------------------------------------------------------------------------------

def multiset(dsn: str, table: str) -> list[tuple[str, int]]:
    with db.session(dsn, role="check", autocommit=True) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            sql.SQL('SELECT t::text, count(*)::int FROM ONLY {} AS t GROUP BY 1 ORDER BY t::text COLLATE "C"')
            .format(sql.Identifier("public", table))).fetchall()]


def test_tables_without_a_key_keep_their_duplicates(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.reading (device text, value float8, at timestamptz, raw bytea)",
        "CREATE TABLE public.event_log (n int GENERATED ALWAYS AS IDENTITY, msg text, twice text"
        " GENERATED ALWAYS AS (msg || msg) STORED)",
        "INSERT INTO public.reading SELECT 'ecg', 1.5, '2024-01-01 00:00+00', '\\x00' FROM generate_series(1, 3)",
        "INSERT INTO public.reading VALUES ('spo2', '-0', NULL, NULL), ('spo2', 0, NULL, NULL),"
        " ('spo2', 'NaN', NULL, NULL),"
        " ('bp', NULL, NULL, NULL), ('bp', NULL, NULL, NULL), (NULL, NULL, NULL, NULL)",
        "INSERT INTO public.event_log (msg) VALUES ('start'), ('start')",
        "INSERT INTO public.event_log OVERRIDING SYSTEM VALUE VALUES (1, 'start')",
    )
    prepare.prepare(cfg)
    write(source_dsn, "INSERT INTO public.reading SELECT 'ecg', 1.5, '2024-01-01 00:00+00', '\\x00'")
    copy.run(cfg)
    write(
        source_dsn,
        "INSERT INTO public.reading SELECT 'ecg', 1.5, '2024-01-01 00:00+00', '\\x00' FROM generate_series(1, 2)",
        "DELETE FROM public.reading WHERE ctid = (SELECT ctid FROM public.reading WHERE device = 'ecg' LIMIT 1)",
        "UPDATE public.reading SET at = '2024-02-02 12:00+13:45' WHERE ctid = "
        "(SELECT ctid FROM public.reading WHERE device = 'bp' LIMIT 1)",
        "DELETE FROM public.reading WHERE device = 'spo2' AND value = 0 AND float8send(value) = float8send('-0')",
        "UPDATE public.reading SET value = 'Infinity' WHERE device = 'spo2' AND value = 'NaN'",
        "DELETE FROM public.reading WHERE device IS NULL",
        "INSERT INTO public.reading VALUES (NULL, NULL, NULL, NULL), (NULL, NULL, NULL, NULL)",
        "INSERT INTO public.event_log (msg) VALUES ('start'), (NULL)",
        "UPDATE public.event_log SET msg = 'restarted' WHERE ctid = (SELECT ctid FROM public.event_log WHERE n = 1"
        " LIMIT 1)",
    )
    # Copied again under a later snapshot: the changes that copy holds must not be applied on top of it.
    spanning = writer(source_dsn)
    spanning.execute("INSERT INTO public.reading VALUES ('spanning the re-copy', 1, NULL, NULL)")
    copy.run(cfg, only=["public.reading"])
    spanning.commit()
    spanning.close()
    with transaction(source_dsn) as t:  # two identical rows, one removed and one added back: a net of nothing
        t.execute("DELETE FROM public.reading WHERE ctid ="
                  " (SELECT ctid FROM public.reading WHERE device = 'ecg' LIMIT 1)")
        t.execute("INSERT INTO public.reading VALUES ('ecg', 1.5, '2024-01-01 00:00+00', '\\x00')")

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    for table in ("reading", "event_log"):
        assert multiset(target_dsn, table) == multiset(source_dsn, table), f"public.{table}: multisets differ"
    assert ("(ecg,1.5,\"2024-01-01 00:00:00+00\",\"\\\\x00\")", 5) in multiset(target_dsn, "reading")
    assert_same_result(source_dsn, target_dsn,
                       "SELECT float8send(value), count(*) FROM public.reading GROUP BY 1 ORDER BY 1",
                       "binary float values of public.reading")


# --- 5. the application's triggers and foreign keys ---------------------------------------------------------------

APP_SCHEMA = """
CREATE TABLE public.patient (id int PRIMARY KEY, name text, stamped text NOT NULL DEFAULT '', version int DEFAULT 0);
CREATE TABLE public.audit (id bigserial PRIMARY KEY, patient int, op text);
CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.stamped := NEW.stamped || '+'; RETURN NEW; END $$;
CREATE FUNCTION public.audit_patient() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.audit (patient, op) VALUES (coalesce(NEW.id, OLD.id), TG_OP); RETURN NULL; END $$;
CREATE TRIGGER patient_stamp BEFORE INSERT OR UPDATE ON public.patient FOR EACH ROW EXECUTE FUNCTION public.stamp();
CREATE TRIGGER patient_audit AFTER INSERT OR UPDATE OR DELETE ON public.patient
    FOR EACH ROW EXECUTE FUNCTION public.audit_patient();
-- Enabled ALWAYS, or only for replicas: the replica role the replay runs with does not silence these.
CREATE FUNCTION public.bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.version := CASE WHEN TG_OP = 'UPDATE' THEN OLD.version ELSE NEW.version END + 1; RETURN NEW; END $$;
CREATE TRIGGER patient_version BEFORE INSERT OR UPDATE ON public.patient FOR EACH ROW EXECUTE FUNCTION public.bump();
ALTER TABLE public.patient ENABLE ALWAYS TRIGGER patient_version;
CREATE FUNCTION public.audit_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.audit (op) VALUES ('statement ' || TG_OP); RETURN NULL; END $$;
CREATE TRIGGER patient_replica AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.patient
    FOR EACH STATEMENT EXECUTE FUNCTION public.audit_statement();
ALTER TABLE public.patient ENABLE REPLICA TRIGGER patient_replica;
CREATE TABLE public.ward (id int PRIMARY KEY, name text);
CREATE TABLE public.bed (id int PRIMARY KEY, ward int NOT NULL REFERENCES public.ward, label text);
INSERT INTO public.patient (id, name) SELECT g, 'p' || g FROM generate_series(1, 5) g;
INSERT INTO public.ward SELECT g, 'ward ' || g FROM generate_series(1, 3) g;
INSERT INTO public.bed SELECT g, g % 3 + 1, 'bed ' || g FROM generate_series(1, 9) g;
"""


def test_application_triggers_and_foreign_keys_do_not_fire_on_the_target_and_stay_enabled(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    run_sql(source_dsn, APP_SCHEMA)
    prepare.prepare(cfg)
    write(source_dsn, "INSERT INTO public.patient (id, name) VALUES (6, 'before copy')")
    copy.run(cfg)
    write(
        source_dsn,
        "INSERT INTO public.patient (id, name) VALUES (7, 'after copy'), (8, 'after copy')",
        "UPDATE public.patient SET name = 'renamed' WHERE id IN (1, 7)",
        "DELETE FROM public.patient WHERE id = 2",
    )
    # Copied again once the target has the triggers (after post-data): the copy must not fire them either.
    copy.run(cfg, only=["public.patient"])
    write(source_dsn, "INSERT INTO public.patient (id, name) VALUES (9, 'after the second copy')",
          "UPDATE public.patient SET name = 'renamed after the second copy' WHERE id = 8")
    with transaction(source_dsn) as t:
        # Applied in any table order, one of these pairs breaks a foreign key checked on the target: parent first
        # for the insert, child first for the delete.
        t.execute("INSERT INTO public.ward VALUES (10, 'new ward')")
        t.execute("INSERT INTO public.bed VALUES (100, 10, 'new bed')")
        t.execute("DELETE FROM public.bed WHERE ward = 1")
        t.execute("DELETE FROM public.ward WHERE id = 1")

    sync.sync(cfg)

    assert_identical(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT op, count(*) FROM public.audit GROUP BY op ORDER BY op") == [
        ("DELETE", 1), ("INSERT", 9), ("UPDATE", 3)]
    assert fetch(target_dsn, "SELECT id, stamped, version FROM public.patient WHERE id > 5 OR id = 1 ORDER BY id") \
        == [(1, "++", 2), (6, "+", 1), (7, "++", 2), (8, "++", 2), (9, "+", 1)]
    triggers = fetch(
        target_dsn,
        "SELECT c.relname, t.tgname, t.tgenabled::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE NOT t.tgisinternal AND c.relnamespace::regnamespace::text <> 'migrator_control' ORDER BY 1, 2",
    )  # the control schema's own (its audit trail is append-only by a trigger) are not the application's
    assert triggers == [("patient", "patient_audit", "O"), ("patient", "patient_replica", "R"),
                        ("patient", "patient_stamp", "O"), ("patient", "patient_version", "A")]
    assert fetch(target_dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_migrator%'") == [(0,)]
    assert fetch(target_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (CAPTURE_SCHEMA,)) == [(0,)]
    foreign_keys = ("SELECT conname, convalidated FROM pg_constraint"
                    " WHERE contype = 'f' AND connamespace = 'public'::regnamespace")
    assert fetch(target_dsn, foreign_keys) == [("bed_ward_fkey", True)]
    # The triggers and the foreign key work for the clinical application on the target (once cutover has moved
    # the sequences, as done here by hand).
    run_sql(target_dsn, "SELECT setval('public.audit_id_seq', (SELECT max(id) FROM public.audit))",
            "INSERT INTO public.patient (id, name) VALUES (50, 'on the target')")
    assert fetch(target_dsn, "SELECT stamped FROM public.patient WHERE id = 50") == [("+",)]
    assert fetch(target_dsn, "SELECT count(*) FROM public.audit WHERE patient = 50") == [(1,)]
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        run_sql(target_dsn, "INSERT INTO public.bed VALUES (500, 999, 'no such ward')")


# --- 6. sequences -------------------------------------------------------------------------------------------------

SEQUENCE_SCHEMA = """
CREATE SCHEMA "Clinic Data";
CREATE TABLE public.s_serial (id serial PRIMARY KEY, v text);
CREATE TABLE public.s_always (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
CREATE TABLE public.s_default (id int GENERATED BY DEFAULT AS IDENTITY (START 1000 INCREMENT 7) PRIMARY KEY, v text);
CREATE SEQUENCE "Clinic Data"."Accession No" START 500;
CREATE TABLE "Clinic Data".accession (no bigint PRIMARY KEY DEFAULT nextval('"Clinic Data"."Accession No"'), v text);
"""

SEQ_TABLES = ("public.s_serial", "public.s_always", "public.s_default", '"Clinic Data".accession')


def test_sequences_after_cutover_are_ahead_of_every_source_value(
    make_config: Callable[..., Config], source_dsn: str, target_dsn: str
) -> None:
    cfg = make_config(cutover={"verify": "counts", "switch_command": "true"}, copy={"workers": 2})
    run_sql(source_dsn, SEQUENCE_SCHEMA,
            *(f"INSERT INTO {t} (v) SELECT 'x' FROM generate_series(1, 5)" for t in SEQ_TABLES))
    prepare.prepare(cfg)
    copy.run(cfg)
    write(source_dsn, *(f"INSERT INTO {t} (v) SELECT 'after copy' FROM generate_series(1, 3)" for t in SEQ_TABLES))
    aborted = writer(source_dsn)  # values drawn and never used still count
    for t in SEQ_TABLES:
        aborted.execute(f"INSERT INTO {t} (v) SELECT 'rolled back' FROM generate_series(1, 4)")  # type: ignore
    aborted.rollback()
    aborted.close()
    sync.sync(cfg)

    report = cutover.run(cfg)

    assert report.ok
    assert_identical(source_dsn, target_dsn)
    query = ("SELECT schemaname, sequencename, coalesce(last_value, 0) FROM pg_sequences "
             f"WHERE schemaname NOT IN ('{CAPTURE_SCHEMA}', '{CONTROL_SCHEMA}') ORDER BY 1, 2")
    source_seqs = fetch(source_dsn, query)
    target_seqs = dict(((s, n), v) for s, n, v in fetch(target_dsn, query))
    assert len(source_seqs) == 4
    for schema, name, value in source_seqs:
        have = target_seqs[(schema, name)]
        assert have >= value, f"{schema}.{name}: the target's sequence is at {have}, the source's at {value}"
    for t in SEQ_TABLES:
        key = "no" if "accession" in t else "id"
        (max_source,) = fetch(source_dsn, f"SELECT max({key}) FROM {t}")[0]
        ((new,),) = fetch(target_dsn, f"INSERT INTO {t} (v) VALUES ('first on the target') RETURNING {key}")
        assert new > max_source, f"{t}: the target's default gave {new}, the source reached {max_source}"
