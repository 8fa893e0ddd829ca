"""Row parity (`migrator verify`) against a real server: source and target databases built side by side."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from migrator import verify
from migrator.config import Config, SyncSettings, from_dict
from migrator.errors import ConnectionFailed, MigratorError
from migrator.verify import ParityReport, planning
from migrator.verify.rows import Stream, merge
from tests.helpers import fetch, run_sql


def both(source_dsn: str, target_dsn: str, *statements: str) -> None:
    run_sql(source_dsn, *statements)
    run_sql(target_dsn, *statements)


def table(report: ParityReport, name: str) -> verify.TableParity:
    (found,) = [t for t in report.tables if t.name == name]
    return found


def as_text(report: ParityReport) -> str:
    return report.render_text() + "\n" + json.dumps(report.to_dict(), ensure_ascii=False)


PATIENTS = """
CREATE TABLE public.patient (id bigint PRIMARY KEY, mrn text NOT NULL, note text, weight numeric(6, 2));
INSERT INTO public.patient SELECT g, 'MRN' || g, 'note ' || g, g % 300 FROM generate_series(1, {n}) g;
"""


def test_identical_databases_verify_with_exit_code_zero(source_dsn: str, target_dsn: str, cfg: Config) -> None:
    both(
        source_dsn, target_dsn,
        PATIENTS.format(n=1000),
        "CREATE TABLE public.study (uid uuid PRIMARY KEY, patient bigint NOT NULL)",
        "INSERT INTO public.study SELECT md5(g::text)::uuid, g FROM generate_series(1, 500) g",
        "CREATE TABLE public.audit (at timestamptz, what text)",
        "INSERT INTO public.audit SELECT '2024-01-01'::timestamptz + g * interval '1 min', 'x' FROM generate_series(1, 300) g",
    )
    seen: list[tuple[str, int]] = []

    report = verify.verify(cfg, progress=lambda name, rows: seen.append((name, rows)))

    assert report.identical and report.exit_code == 0
    assert [(t.name, t.status, t.source_rows, t.target_rows) for t in report.tables] == [
        ("public.audit", "identical", 300, 300),
        ("public.patient", "identical", 1000, 1000),
        ("public.study", "identical", 500, 500),
    ]
    assert table(report, "public.audit").key_columns == ()
    assert ("public.patient", 1000) in seen
    json.dumps(report.to_dict())
    assert "3 table(s): 3 identical, 0 different, 0 not verified" in report.render_text()


def test_one_changed_value_in_a_50k_row_table_is_found_by_its_key(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=50_000))
    run_sql(target_dsn, "UPDATE public.patient SET note = 'CONFIDENTIAL-diagnosis' WHERE id = 31337")

    report = verify.verify(cfg)

    result = table(report, "public.patient")
    assert (result.status, result.source_rows, result.target_rows) == ("different", 50_000, 50_000)
    assert result.difference_count == 1
    assert result.differences == (verify.RowDifference("different", ("31337",)),)
    assert report.exit_code == 1
    assert "id=31337" in report.render_text()
    assert "CONFIDENTIAL" not in as_text(report)
    assert "note 31337" not in as_text(report)


def test_show_values_adds_the_row_text_of_each_side(source_dsn: str, target_dsn: str, cfg: Config) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=100))
    run_sql(target_dsn, "UPDATE public.patient SET note = 'CONFIDENTIAL-diagnosis' WHERE id = 42")

    (diff,) = table(verify.verify(cfg, show_values=True), "public.patient").differences

    assert diff.source_row == "(42,MRN42,\"note 42\",42.00)"
    assert diff.target_row == "(42,MRN42,CONFIDENTIAL-diagnosis,42.00)"


def test_a_missing_row_and_an_extra_row_are_reported(source_dsn: str, target_dsn: str, cfg: Config) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=2000))
    run_sql(
        target_dsn,
        "DELETE FROM public.patient WHERE id IN (1, 1000)",
        "INSERT INTO public.patient VALUES (5000, 'MRN5000', NULL, 1)",
    )

    result = table(verify.verify(cfg), "public.patient")

    assert (result.source_rows, result.target_rows, result.difference_count) == (2000, 1999, 3)
    assert [(d.kind, d.key, d.source_count, d.target_count) for d in result.differences] == [
        ("missing", ("1",), 1, 0),
        ("missing", ("1000",), 1, 0),
        ("extra", ("5000",), 0, 1),
    ]


def test_composite_text_key_in_awkward_names_merges_whatever_each_sides_collation(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    # The source sorts its text with ICU's linguistic order, the target byte-wise: the two servers' natural orders of
    # these keys disagree, so the comparison must not rely on either.
    ddl = """
        CREATE SCHEMA "Radiology Dept";
        CREATE TABLE "Radiology Dept"."Order" (
            "Patient ID" text COLLATE {coll} NOT NULL,
            "Séq" varchar(20) COLLATE {coll} NOT NULL,
            "select" int,
            "Value" text,
            PRIMARY KEY ("Patient ID", "Séq")
        )
    """
    run_sql(source_dsn, ddl.format(coll='"und-x-icu"'))
    run_sql(target_dsn, ddl.format(coll='"C"'))
    names = ["a", "B", "b", "A", "Zoë", "zoe", "Ωmega", "ωmega", "Łódź", "lodz", "日本", "中文", "😀", "", "a b",
             "É", "e", "İstanbul", "straße", "STRASSE"]
    both(
        source_dsn, target_dsn,
        psycopg.sql.SQL(
            'INSERT INTO "Radiology Dept"."Order" SELECT p, s, 1, p || s FROM unnest({names}::text[]) p,'
            " unnest({names}::text[]) s"
        ).format(names=psycopg.sql.Literal(names)).as_string(None),
    )
    order = 'SELECT "Patient ID" FROM "Radiology Dept"."Order" WHERE "Séq" = \'a\' ORDER BY 1'
    assert fetch(source_dsn, order) != fetch(target_dsn, order)
    run_sql(
        target_dsn,
        """UPDATE "Radiology Dept"."Order" SET "Value" = 'changed' WHERE "Patient ID" = 'Ωmega' AND "Séq" = '日本'""",
        """DELETE FROM "Radiology Dept"."Order" WHERE "Patient ID" = 'b' AND "Séq" = 'A'""",
    )

    report = verify.verify(cfg)

    result = table(report, "Radiology Dept.Order")
    assert result.key_columns == ("Patient ID", "Séq")
    assert (result.source_rows, result.target_rows) == (400, 399)
    assert sorted((d.kind, d.key) for d in result.differences) == [
        ("different", ("Ωmega", "日本")),
        ("missing", ("b", "A")),
    ]
    assert result.difference_count == 2
    # Text keys are printed as keyed hashes unless the operator asks for values (tests/test_safety_redaction.py).
    assert "Ωmega" not in report.render_text() and "Patient ID=hmac:" in report.render_text()
    shown = dataclasses.replace(report, show_values=True)
    assert 'Patient ID="Ωmega", Séq="日本"' in shown.render_text()
    assert shown.to_dict()["tables"][0]["differences"][0]["key"] in (
        {"Patient ID": "Ωmega", "Séq": "日本"}, {"Patient ID": "b", "Séq": "A"},
    )


def test_composite_key_of_mixed_types_finds_exactly_the_rows_that_differ(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    # Integers and uuids are ordered as typed values, the timestamp and numeric by their text; one merge handles both.
    both(
        source_dsn, target_dsn,
        """CREATE TABLE public.image (
               site int, taken timestamptz, series numeric, uid uuid, body text,
               PRIMARY KEY (site, taken, series, uid))""",
        """INSERT INTO public.image
           SELECT s, t, n, md5(s || '/' || t || '/' || n)::uuid, 'pixels'
             FROM unnest(array[-12, -2, -1, 0, 1, 2, 9, 10, 100]) s,
                  unnest(array['-infinity', '0044-03-15 BC', '1999-12-31 23:59:59.5+00', '2000-01-01 00:00+00',
                               'infinity']::timestamptz[]) t,
                  unnest(array[-1.5, 0, 0.25, 2, 10, 'NaN']::numeric[]) n""",
    )
    run_sql(
        target_dsn,
        "UPDATE public.image SET body = 'edited' WHERE site = -2 AND taken = '-infinity' AND series = 10",
        "DELETE FROM public.image WHERE site = 10 AND taken = '0044-03-15 BC' AND series = 'NaN'",
        "INSERT INTO public.image VALUES (9, '2000-01-01 00:00+00', 3, gen_random_uuid(), 'new')",
    )

    result = table(verify.verify(cfg), "public.image")

    assert (result.source_rows, result.target_rows) == (270, 270)
    assert sorted((d.kind, d.key[:3]) for d in result.differences) == [
        ("different", ("-2", "-infinity", "10")),
        ("extra", ("9", "2000-01-01 00:00:00+00", "3")),
        ("missing", ("10", "0044-03-15 00:00:00+00 BC", "NaN")),
    ]


def test_table_without_key_is_compared_as_a_multiset_and_reports_a_missing_duplicate(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    both(
        source_dsn, target_dsn,
        "CREATE TABLE public.log (at date, message text)",
        "INSERT INTO public.log SELECT '2024-01-01'::date + g, 'event ' || g FROM generate_series(1, 1000) g",
        "INSERT INTO public.log VALUES ('2024-06-01', 'DUPLICATE-PAYLOAD'), ('2024-06-01', 'DUPLICATE-PAYLOAD')",
    )
    run_sql(source_dsn, "INSERT INTO public.log VALUES ('2024-06-01', 'DUPLICATE-PAYLOAD')")

    report = verify.verify(cfg)

    result = table(report, "public.log")
    assert (result.status, result.source_rows, result.target_rows) == ("different", 1003, 1002)
    ((row_md5,),) = fetch(source_dsn, "SELECT md5(record_send(ROW('2024-06-01'::date, 'DUPLICATE-PAYLOAD'::text)))")
    assert result.differences == (
        verify.RowDifference("missing", (), row_md5=row_md5, source_count=3, target_count=2),
    )
    assert "DUPLICATE-PAYLOAD" not in as_text(report)
    assert f"row md5 {row_md5}: 3 on source, 2 on target" in report.render_text()

    (shown,) = table(verify.verify(cfg, show_values=True), "public.log").differences
    assert shown.source_row == shown.target_row == "(2024-06-01,DUPLICATE-PAYLOAD)"


def test_special_values_equal_on_both_sides_are_identical_whatever_the_databases_settings(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    # The sessions pin their output settings, so databases that default to other ones still print rows alike.
    dbname = psycopg.conninfo.conninfo_to_dict(target_dsn)["dbname"]
    run_sql(
        target_dsn,
        f"ALTER DATABASE \"{dbname}\" SET TimeZone = 'Asia/Kolkata'",
        f"ALTER DATABASE \"{dbname}\" SET DateStyle = 'SQL, DMY'",
        f"ALTER DATABASE \"{dbname}\" SET extra_float_digits = -3",
        f"ALTER DATABASE \"{dbname}\" SET bytea_output = 'escape'",
        f"ALTER DATABASE \"{dbname}\" SET IntervalStyle = 'iso_8601'",
    )
    both(
        source_dsn, target_dsn,
        """CREATE TABLE public.measure (
               id int PRIMARY KEY, f float8, r real, n numeric, at timestamptz, d date, i interval,
               b bytea, j jsonb, a float8[])""",
        """INSERT INTO public.measure VALUES
               (1, '-0', '-0', 'NaN', 'infinity', 'infinity', '1 mon 2 days 00:00:01.5', '\\x00ff', '{"b": 1, "a": [1.50]}', '{-0,NaN}'),
               (2, 'NaN', 'NaN', '0.1', '-infinity', '-infinity', '-3 days', '', 'null', '{Infinity}'),
               (3, 'Infinity', '3.4e38', '1e-20', '2024-02-29 23:59:59.999999+05', '2024-02-29', '0', '\\x5c', '"é"', NULL),
               (4, '-Infinity', '1.17549435e-38', '-0.000', '1999-12-31 12:00:00-08', '0001-01-01 BC', '1 year', NULL, '{}', '{}'),
               (5, 0.1, 0.1, 1.10, '2000-01-01 00:00+00', '2000-01-01', '-1 mon +1 day', '\\xdeadbeef', '[]', '{0.1,1e308}')""",
        "CREATE TABLE public.by_float (k float8 PRIMARY KEY, v text)",
        "INSERT INTO public.by_float VALUES ('NaN', 'a'), ('Infinity', 'b'), ('-Infinity', 'c'), ('-0', 'd'), (1e-300, 'e'), (2.5, 'f'), (-7, 'g'), (10, 'h')",
        "CREATE TABLE public.by_time (k timestamptz PRIMARY KEY, n numeric UNIQUE NOT NULL)",
        "INSERT INTO public.by_time VALUES ('infinity', 'NaN'), ('-infinity', -1), ('2024-01-01 00:00+14', 2), ('2023-12-31 23:00-12', 10)",
    )

    report = verify.verify(cfg)

    assert [(t.name, t.status) for t in report.tables] == [
        ("public.by_float", "identical"), ("public.by_time", "identical"), ("public.measure", "identical"),
    ], report.render_text()
    assert report.exit_code == 0


def test_a_table_missing_on_the_target_cannot_be_verified(source_dsn: str, target_dsn: str, cfg: Config) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=10))
    run_sql(source_dsn, "CREATE TABLE public.series (id int PRIMARY KEY)")

    report = verify.verify(cfg)

    assert table(report, "public.patient").status == "identical"
    missing = table(report, "public.series")
    assert missing.status == "error" and missing.error == "public.series does not exist on the target"
    assert report.exit_code == 2 and not report.identical
    assert "ERROR      public.series" in report.render_text()


def test_tables_narrows_the_comparison_to_the_named_tables(source_dsn: str, target_dsn: str, cfg: Config) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=10), "CREATE TABLE public.other (id int PRIMARY KEY)")
    run_sql(target_dsn, "INSERT INTO public.other VALUES (1)")

    assert verify.verify(cfg).exit_code == 1
    narrowed = verify.verify(cfg, tables=["public.patient"])
    assert [(t.name, t.status) for t in narrowed.tables] == [("public.patient", "identical")]
    assert narrowed.exit_code == 0
    unknown = verify.verify(cfg, tables=["public.patient", "public.nope"])
    assert table(unknown, "public.nope").status == "error" and unknown.exit_code == 2


def test_permission_denied_on_one_table_is_reported_for_that_table(
    admin_dsn: str, source_dsn: str, target_dsn: str
) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=10), "CREATE TABLE public.restricted (id int PRIMARY KEY)")
    role = f"mt_verify_{uuid.uuid4().hex[:8]}"
    run_sql(admin_dsn, f'CREATE ROLE "{role}" LOGIN')
    try:
        run_sql(target_dsn, f'GRANT SELECT ON public.patient TO "{role}"')
        limited = psycopg.conninfo.make_conninfo(target_dsn, user=role)
        cfg = from_dict({"source": {"dsn": source_dsn}, "target": {"dsn": limited}, "copy": {"workers": 1}}, env={})

        report = verify.verify(cfg)

        assert table(report, "public.patient").status == "identical"
        denied = table(report, "public.restricted")
        assert denied.status == "error" and "permission denied" in (denied.error or "")
        assert report.exit_code == 2
    finally:
        run_sql(target_dsn, f'DROP OWNED BY "{role}"')
        run_sql(admin_dsn, f'DROP ROLE "{role}"')


def test_a_dsn_password_never_appears_in_the_report_or_errors(source_dsn: str, target_dsn: str) -> None:
    secret = "pw-hunter2-secret"
    with_password = [psycopg.conninfo.make_conninfo(d, password=secret) for d in (source_dsn, target_dsn)]
    both(source_dsn, target_dsn, PATIENTS.format(n=10))
    run_sql(source_dsn, "CREATE TABLE public.series (id int PRIMARY KEY)")
    cfg = from_dict({"source": {"dsn": with_password[0]}, "target": {"dsn": with_password[1]}}, env={})

    report = verify.verify(cfg)

    assert report.exit_code == 2
    assert secret not in as_text(report)
    unreachable = psycopg.conninfo.make_conninfo(with_password[1], dbname="mt_no_such_database")
    with pytest.raises(ConnectionFailed) as raised:
        verify.verify(from_dict({"source": {"dsn": with_password[0]}, "target": {"dsn": unreachable}}, env={}))
    assert secret not in str(raised.value)


def test_only_the_first_differences_are_listed_but_all_are_counted(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=1000))
    run_sql(target_dsn, "UPDATE public.patient SET weight = weight + 1 WHERE id % 4 = 0")

    result = table(verify.verify(cfg), "public.patient")

    assert result.difference_count == 250
    assert len(result.differences) == verify.MAX_LISTED
    assert result.differences[0].key == ("4",)


def stream(*keys: Any) -> list[tuple[tuple[Any, ...], Any]]:
    return [((k,), v) for k, v in keys]


def test_merge_yields_only_keys_that_differ_or_are_on_one_side() -> None:
    source = stream((1, "a"), (2, "b"), (4, "d"), (6, "f"))
    target = stream((0, "z"), (2, "b"), (4, "D"), (5, "e"))

    assert list(merge(source, target)) == [
        ((0,), None, "z"), ((1,), "a", None), ((4,), "d", "D"), ((5,), None, "e"), ((6,), "f", None),
    ]
    assert list(merge([], [])) == []
    assert list(merge(source, source)) == []


def test_a_stream_out_of_key_order_stops_the_comparison(source_dsn: str) -> None:
    query = psycopg.sql.SQL("SELECT k, 'x'::bytea FROM (VALUES (1::int8), (3), (2)) AS v(k)")
    with psycopg.connect(source_dsn) as conn:
        rows = Stream(conn, query, 1, False, "source")
        with pytest.raises(MigratorError, match="out of key order"):
            list(rows)


# --- narrowing by key ranges --------------------------------------------------------------------------------------

@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges of a few hundred rows and leaves of 50, so that bisection runs on tables a test can build quickly."""
    monkeypatch.setattr("migrator.verify.buckets.RANGE_ROWS", 4000)
    monkeypatch.setattr("migrator.verify.buckets.LEAF_ROWS", 50)


@pytest.mark.parametrize("buckets", ["ranges", "hashes"])
@pytest.mark.parametrize("key", ["bigint", "text", "uuid"])
def test_one_changed_row_is_narrowed_by_bisection_to_its_key(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None, key: str, buckets: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if buckets == "hashes":  # what a large table whose heap does not follow its key gets
        monkeypatch.setattr(planning, "index_friendly", lambda *args: False)
    value = {"bigint": "g", "text": "'1.2.840.' || g", "uuid": "md5(g::text)::uuid"}[key]
    both(source_dsn, target_dsn,
         f"CREATE TABLE public.instance (uid {key} PRIMARY KEY, path text, size bigint)",
         f"INSERT INTO public.instance SELECT {value}, '/store/' || g, g * 7 FROM generate_series(1, 60000) g",
         "ANALYZE public.instance")
    run_sql(target_dsn, f"UPDATE public.instance SET size = -1 WHERE uid = (SELECT {value} FROM (SELECT 4242 g) s)")
    ((uid,),) = fetch(source_dsn, f"SELECT ({value})::text FROM (SELECT 4242 g) s")

    result = table(verify.verify(cfg), "public.instance")

    assert result.differences == (verify.RowDifference("different", (uid,)),)
    assert (result.source_rows, result.target_rows, result.difference_count) == (60000, 60000, 1)
    assert result.ranges >= 10 and result.ranges_different == 1
    assert result.passes >= 2, "the differing range was split again"


def test_scattered_differences_in_many_ranges_are_all_found(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None
) -> None:
    both(source_dsn, target_dsn, PATIENTS.format(n=60000), "ANALYZE public.patient")
    run_sql(target_dsn, "UPDATE public.patient SET note = 'x' WHERE id IN (1, 17000, 59999)",
            "DELETE FROM public.patient WHERE id = 30000", "INSERT INTO public.patient VALUES (70000, 'M', NULL, 1)")

    result = table(verify.verify(cfg), "public.patient")

    assert [(d.kind, d.key) for d in result.differences] == [
        ("different", ("1",)), ("different", ("17000",)), ("missing", ("30000",)), ("different", ("59999",)),
        ("extra", ("70000",)),
    ]


def test_a_key_less_table_with_duplicates_is_narrowed_as_a_multiset(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None
) -> None:
    both(source_dsn, target_dsn, "CREATE TABLE public.audit (at int, what text)",
         "INSERT INTO public.audit SELECT g / 2, 'event' FROM generate_series(1, 60000) g", "ANALYZE public.audit")
    run_sql(target_dsn, "DELETE FROM public.audit WHERE ctid = (SELECT ctid FROM public.audit WHERE at = 777 LIMIT 1)")
    ((row_md5,),) = fetch(source_dsn, "SELECT md5(record_send(ROW(777, 'event'::text)))")

    result = table(verify.verify(cfg), "public.audit")

    assert result.differences == (
        verify.RowDifference("missing", (), row_md5=row_md5, source_count=2, target_count=1),
    )
    assert result.ranges > 1 and result.passes >= 2


def test_columns_of_user_defined_types_compare_by_value_whatever_their_oids(
    source_dsn: str, target_dsn: str, cfg: Config
) -> None:
    # The target creates a type first, so every type below gets another OID there than on the source: a digest that
    # carried type OIDs (binary forms do) would call every row different.
    run_sql(target_dsn, "CREATE TYPE public.shift_oids AS ENUM ('x')")
    both(
        source_dsn, target_dsn,
        "CREATE TYPE public.mood AS ENUM ('calm', 'tense')",
        "CREATE DOMAIN public.dose AS numeric(6, 2) CHECK (VALUE >= 0)",
        "CREATE TYPE public.pair AS (a int, b text)",
        "CREATE TABLE public.odd (id int PRIMARY KEY, m public.mood, d public.dose, p public.pair, ms public.mood[],"
        " ps public.pair[], widened int, t regtype)",
        "INSERT INTO public.odd SELECT g, 'calm', g / 4.0, ROW(g, 'x' || g)::public.pair, '{calm,tense}', ARRAY[ROW(g, 'y')::public.pair],"
        " g, 'int4'::regtype FROM generate_series(1, 3000) g",
    )
    run_sql(target_dsn, "ALTER TABLE public.odd ALTER COLUMN widened TYPE bigint")
    assert fetch(source_dsn, "SELECT 'public.mood'::regtype::oid") != fetch(target_dsn, "SELECT 'public.mood'::regtype::oid")

    assert table(verify.verify(cfg), "public.odd").status == "identical"

    run_sql(target_dsn, "UPDATE public.odd SET ms = '{calm,calm}' WHERE id = 1234")
    result = table(verify.verify(cfg), "public.odd")
    assert [(d.kind, d.key) for d in result.differences] == [("different", ("1234",))]


def _binary_copy(source_dsn: str, target_dsn: str, name: str) -> None:
    with psycopg.connect(source_dsn) as s, psycopg.connect(target_dsn) as t:
        with s.cursor().copy(f"COPY {name} TO STDOUT (FORMAT binary)") as out, \
                t.cursor().copy(f"COPY {name} FROM STDIN (FORMAT binary)") as into:
            for data in out:
                into.write(data)


@pytest.mark.parametrize("buckets", ["ranges", "hashes"])
def test_an_array_that_lost_its_nulls_compares_equal_to_its_copy(
    source_dsn: str, target_dsn: str, cfg: Config, buckets: verify.Buckets
) -> None:
    # arr[2] = 2 leaves a null bitmap without a NULL in it on the source; binary COPY rebuilds the array without one,
    # and array_send tells the two apart: arrays must enter the digest by value (text), not by their send form.
    both(source_dsn, target_dsn, "CREATE TABLE public.a (id int PRIMARY KEY, arr int[])")
    run_sql(source_dsn, "INSERT INTO public.a VALUES (1, '{1,NULL,3}'), (2, '{4,5}')",
            "UPDATE public.a SET arr[2] = 2 WHERE id = 1")
    _binary_copy(source_dsn, target_dsn, "public.a")
    assert fetch(source_dsn, "SELECT array_send(arr) FROM public.a WHERE id = 1") != \
        fetch(target_dsn, "SELECT array_send(arr) FROM public.a WHERE id = 1")

    assert table(verify.verify(cfg, buckets=buckets), "public.a").status == "identical"


@pytest.mark.parametrize("buckets", ["auto", "ranges", "hashes"])
def test_a_key_column_typed_otherwise_on_the_target_compares_by_value(
    source_dsn: str, target_dsn: str, cfg: Config, buckets: verify.Buckets
) -> None:
    run_sql(source_dsn, "CREATE TABLE public.c (a int, b text, v int, PRIMARY KEY (a, b))",
            "INSERT INTO public.c SELECT g % 3, md5(g::text)::uuid::text, g FROM generate_series(1, 9000) g")
    run_sql(target_dsn, "CREATE TABLE public.c (a int, b uuid, v int, PRIMARY KEY (a, b))",
            "INSERT INTO public.c SELECT g % 3, md5(g::text)::uuid, g FROM generate_series(1, 9000) g",
            "UPDATE public.c SET v = -1 WHERE v = 4242")

    result = table(verify.verify(cfg, buckets=buckets), "public.c")

    assert [(d.kind, d.key) for d in result.differences] == [
        ("different", ("0", str(uuid.UUID(fetch(source_dsn, "SELECT md5('4242')")[0][0]))))]


def test_a_target_sorting_text_otherwise_under_the_same_collation_name_is_compared_by_hash(
    source_dsn: str, admin_dsn: str, make_config: Any
) -> None:
    # The target's default collation is ICU Swedish while its datcollate reads like the source's: key ranges cut on
    # the source would overlap there. Rows must still be counted once and compared exactly.
    name = f"mt_icu_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'sv' LOCALE 'C.UTF-8'")
    try:
        target_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
        cfg = dataclasses.replace(make_config(), target_dsn=target_dsn)
        both(source_dsn, target_dsn,
             "CREATE TABLE public.k (code text PRIMARY KEY, v int)",
             "INSERT INTO public.k SELECT chr(65 + g % 26) || chr(97 + (g / 26) % 26) || g, g "
             "FROM generate_series(1, 20000) g UNION ALL SELECT chr(97 + g % 26) || chr(65 + (g / 26) % 26) || g, g "
             "FROM generate_series(1, 20000) g",
             "ANALYZE public.k")
        run_sql(target_dsn, "UPDATE public.k SET v = -v WHERE code = 'Ab26'")

        result = table(verify.verify(cfg, buckets="ranges"), "public.k")

        assert (result.source_rows, result.target_rows) == (40000, 40000)
        assert [(d.kind, d.key) for d in result.differences] == [("different", ("Ab26",))]
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_partition_whose_key_starts_with_its_list_value_is_still_split_finely(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None
) -> None:
    # Every row of the partition has the same first key column: key ranges would hold the whole table in one digest.
    both(source_dsn, target_dsn,
         "CREATE TABLE public.ev (region text, id bigint, body text, PRIMARY KEY (region, id)) PARTITION BY LIST (region)",
         "CREATE TABLE public.ev_eu PARTITION OF public.ev FOR VALUES IN ('eu')",
         "INSERT INTO public.ev SELECT 'eu', g, repeat('x', 50) FROM generate_series(1, 60000) g",
         "ANALYZE public.ev_eu")
    run_sql(target_dsn, "UPDATE public.ev SET body = 'y' WHERE id = 31337")

    result = table(verify.verify(cfg), "public.ev_eu")

    assert result.ranges >= 8 and result.ranges_different == 1
    assert [(d.kind, d.key) for d in result.differences] == [("different", ("eu", "31337"))]


@pytest.mark.parametrize("buckets", ["auto", "ranges", "hashes"])
def test_a_target_that_lost_its_primary_key_and_holds_a_null_key_cannot_pass(
    source_dsn: str, target_dsn: str, cfg: Config, buckets: verify.Buckets
) -> None:
    run_sql(source_dsn, "CREATE TABLE public.p (id int PRIMARY KEY, v text)",
            "INSERT INTO public.p SELECT g, 'v' FROM generate_series(1, 30000) g", "ANALYZE public.p")
    run_sql(target_dsn, "CREATE TABLE public.p (id int, v text)", "CREATE INDEX ON public.p (id)",
            "INSERT INTO public.p SELECT g, 'v' FROM generate_series(1, 30000) g", "INSERT INTO public.p VALUES (NULL, 'x')",
            "ANALYZE public.p")

    report = verify.verify(cfg, buckets=buckets)

    result = table(report, "public.p")
    assert result.status == "error" and report.exit_code == 2, result
    assert "key is NULL" in (result.error or "")


def test_key_ranges_only_through_an_index_a_range_scan_can_use(source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, "CREATE TABLE public.u (uid text PRIMARY KEY)")
    run_sql(target_dsn, "CREATE TABLE public.u (uid text NOT NULL)", "CREATE INDEX ON public.u (uid text_pattern_ops)")
    with psycopg.connect(source_dsn) as s, psycopg.connect(target_dsn) as t:
        from migrator import catalog
        from migrator.config import TableFilter

        (source,) = catalog.list_tables(s, TableFilter())
        (target,) = catalog.list_tables(t, TableFilter())
        assert not planning.index_friendly(s, t, source, target), "a text_pattern_ops index does not serve ranges"
        t.execute("CREATE UNIQUE INDEX ON public.u (uid)")
        assert planning.index_friendly(s, t, source, target)


def test_a_key_whose_first_column_is_one_tenant_for_most_rows_is_still_narrowed(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None
) -> None:
    both(source_dsn, target_dsn,
         "CREATE TABLE public.t (tenant int, id int, v text, PRIMARY KEY (tenant, id))",
         "INSERT INTO public.t SELECT CASE WHEN g % 10 < 6 THEN 0 ELSE g % 10 END, g, 'v' "
         "FROM generate_series(1, 60000) g",
         "ANALYZE public.t")
    run_sql(target_dsn, "UPDATE public.t SET v = 'w' WHERE id = 40000")

    result = table(verify.verify(cfg), "public.t")

    assert [(d.kind, d.key) for d in result.differences] == [("different", ("0", "40000"))]
    assert result.passes >= 2, "the heavy tenant was split by key hash, not listed whole"


def test_an_array_key_is_compared_by_hash_buckets(source_dsn: str, target_dsn: str, cfg: Config,
                                                  small_ranges: None) -> None:
    both(source_dsn, target_dsn, "CREATE TABLE public.grid (cell int[] PRIMARY KEY, v int)",
         "INSERT INTO public.grid SELECT ARRAY[g / 100, g % 100], g FROM generate_series(1, 20000) g",
         "ANALYZE public.grid")
    run_sql(target_dsn, "UPDATE public.grid SET v = -1 WHERE cell = '{42,42}'")

    result = table(verify.verify(cfg), "public.grid")

    assert [(d.kind, d.key) for d in result.differences] == [("different", ("{42,42}",))]


def test_a_composite_key_whose_first_column_cannot_split_is_listed_by_key(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None
) -> None:
    both(source_dsn, target_dsn, "CREATE TABLE public.slot (site int, n int, v text, PRIMARY KEY (site, n))",
         "INSERT INTO public.slot SELECT g % 3, g, 'v' FROM generate_series(1, 30000) g", "ANALYZE public.slot")
    run_sql(target_dsn, "UPDATE public.slot SET v = 'w' WHERE n = 12345")

    result = table(verify.verify(cfg), "public.slot")

    assert [d.key for d in result.differences] == [("0", "12345")]


# --- verifying while sync follows ---------------------------------------------------------------------------------

class _Writer(threading.Thread):
    """An application session: short transactions of updates, inserts, deletes and key changes, until stopped."""

    def __init__(self, dsn: str, rows: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rows, self.rng = dsn, rows, random.Random(seed)
        self.halt = threading.Event()
        self.commits = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.halt.is_set():
                    with conn.transaction():
                        for _ in range(self.rng.randint(1, 3)):
                            self._change(conn)
                    self.commits += 1
                    time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.errors.append(exc)

    def _change(self, conn: psycopg.Connection[Any]) -> None:
        r, i = self.rng.random(), self.rng.randint(1, self.rows)
        if r < 0.5:
            conn.execute("UPDATE public.item SET val = val + 1, note = md5(random()::text) WHERE id = %s", (i,))
        elif r < 0.65:
            conn.execute("INSERT INTO public.item (val, note) VALUES (0, 'new')")
        elif r < 0.75:
            conn.execute("DELETE FROM public.item WHERE id = %s", (i,))
        elif r < 0.8:
            conn.execute("UPDATE public.item SET id = -id WHERE id = %s AND id > 0", (i,))
        elif r < 0.9:
            conn.execute("INSERT INTO public.tally SELECT %s, 'dup' FROM generate_series(1, 2)", (i % 50,))
        else:
            conn.execute("DELETE FROM public.tally WHERE ctid = (SELECT ctid FROM public.tally WHERE a = %s LIMIT 1)",
                         (i % 50,))


@pytest.mark.slow
def test_verify_while_sync_follows_a_workload_reports_no_false_differences(
    source_dsn: str, target_dsn: str, cfg: Config, small_ranges: None
) -> None:
    from migrator import copy, prepare, sync

    run_sql(
        source_dsn,
        "CREATE TABLE public.item (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, val int, note text)",
        "INSERT INTO public.item (id, val, note) OVERRIDING SYSTEM VALUE "
        "SELECT g, g % 100, md5(g::text) FROM generate_series(1, 30000) g",
        "SELECT setval(pg_get_serial_sequence('public.item', 'id'), 30000)",
        "CREATE TABLE public.tally (a int, b text)",
        "INSERT INTO public.tally SELECT g % 50, 'dup' FROM generate_series(1, 20000) g",
        "CREATE TABLE public.still (id int PRIMARY KEY, v text)",
        "INSERT INTO public.still SELECT g, 'v' FROM generate_series(1, 20000) g",
        "ANALYZE",
    )
    live = dataclasses.replace(cfg, sync=SyncSettings(poll_interval=0.2))
    prepare.prepare(live)
    copy.run(live)
    run_sql(target_dsn, "UPDATE public.still SET v = 'damaged' WHERE id = 777")  # a real difference
    writers = [_Writer(source_dsn, 30000, seed) for seed in (1, 2)]
    stop = threading.Event()
    follower = threading.Thread(target=lambda: sync.sync(live, follow=True, stop=stop), daemon=True)
    reports = []
    try:
        for w in writers:
            w.start()
        follower.start()
        time.sleep(1.0)
        for _ in range(3):
            reports.append(verify.verify(live, live_wait=60))
    finally:
        stop.set()
        for w in writers:
            w.halt.set()
            w.join(timeout=30)
        follower.join(timeout=60)
    assert not [e for w in writers for e in w.errors]
    assert sum(w.commits for w in writers) > 200, "the workload must be busy while verify reads"

    for report in reports:
        statuses = {t.name: (t.status, t.difference_count) for t in report.tables}
        assert statuses["public.still"] == ("different", 1), report.render_text()
        assert table(report, "public.still").differences == (verify.RowDifference("different", ("777",)),)
        for name in ("public.item", "public.tally"):
            assert statuses[name][0] in ("identical", "in_flight"), report.render_text()
        assert report.exit_code == 1
    print([(t.name, t.in_flight, t.rechecked) for r in reports for t in r.tables])
    assert any(t.ranges_different for r in reports for t in r.tables if t.name != "public.still"), \
        "some ranges should have differed while changes were in flight"


def test_a_dsn_or_environment_client_encoding_cannot_unpin_utf8(
    source_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Binary row forms and binary COPY carry text in the client encoding: both sides must send UTF-8.
    from migrator import db

    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    with db.session(psycopg.conninfo.make_conninfo(source_dsn, client_encoding="LATIN1"), role="source") as conn:
        assert fetch_one(conn, "SHOW client_encoding") == "UTF8"
        assert fetch_one(conn, "SELECT textsend('é')") == "é".encode()


def fetch_one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]
