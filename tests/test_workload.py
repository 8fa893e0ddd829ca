"""The synthetic legacy database and the clinical write workload that rehearsals and scenario tests run against."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from migrator.errors import MigratorError
from migrator.rehearse import pacs
from migrator.rehearse.workload import KINDS, ROLLED_BACK_MARKER, Workload, WorkloadSpec, verify
from tests.helpers import fetch, run_sql

SCALE = 0.005


@pytest.fixture
def legacy_dsn(make_db: Callable[[str], str]) -> str:
    dsn = make_db("pacs")
    pacs.build(dsn, scale=SCALE)
    return dsn


def test_build_fills_every_table_with_the_expected_number_of_rows(make_db: Callable[[str], str]) -> None:
    dsn = make_db("pacs")
    result = pacs.build(dsn, scale=SCALE)

    expected = pacs.expected_rows(SCALE)
    assert expected[("public", "instance")] == 5250 and expected[("public", "study")] == 500
    assert result.rows == expected
    for (schema, name), n in expected.items():
        assert fetch(dsn, f'SELECT count(*) FROM "{schema}"."{name}"') == [(n,)]
    assert result.total_rows == 7500
    assert result.bytes > 1_000_000


def test_build_carries_the_awkwardness_of_a_legacy_schema(legacy_dsn: str) -> None:
    # A table without a key, holding exact duplicates.
    assert fetch(legacy_dsn, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.audit_event'::regclass") \
        == [(0,)]
    dupes = fetch(legacy_dsn, "SELECT count(*) - count(DISTINCT (event_time, actor, action, object_uid))"
                              " FROM audit_event")
    assert dupes[0][0] > 0
    # Mixed-case table, reserved-word column, identity ALWAYS, stored generated column.
    columns = dict(fetch(legacy_dsn, """
        SELECT attname, attidentity::text || attgenerated::text FROM pg_attribute
         WHERE attrelid = 'oncology."Treatment Course"'::regclass AND attnum > 0"""))
    assert columns["course_id"] == "a" and columns["dose_per_fraction"] == "s" and "order" in columns
    # Values that are hard to carry as text.
    descriptions = {r[0] for r in fetch(legacy_dsn, "SELECT DISTINCT description FROM study")}
    assert {"Röntgen Thorax", "جمجمة", "胸部", "line one\nline two", "tab\tseparated", None} <= descriptions
    # A study's UID can change, and its series follow.
    run_sql(legacy_dsn, "UPDATE study SET study_uid = 'renamed' WHERE study_uid = '1.2.840.113619.2.55.3.7'")
    assert fetch(legacy_dsn, "SELECT count(*) FROM series WHERE study_uid = 'renamed'")[0][0] > 0
    # The application trigger counts revisions and fills a missing status.
    run_sql(legacy_dsn, "UPDATE study SET status = NULL WHERE study_uid = '1.2.840.113619.2.55.3.1'")
    assert fetch(legacy_dsn, "SELECT status, meta->>'rev' FROM study WHERE study_uid = '1.2.840.113619.2.55.3.1'") \
        == [("ARRIVED", "1")]


def test_build_refuses_a_database_that_already_has_the_schema(legacy_dsn: str) -> None:
    with pytest.raises(MigratorError, match="42P06"):
        pacs.build(legacy_dsn, scale=SCALE)


def test_workload_commits_keeps_its_ledger_and_leaves_no_rolled_back_write(legacy_dsn: str) -> None:
    # Every kind equally often, so that a few seconds on a busy machine still exercise them all.
    every_kind = tuple((kind, 1) for kind in sorted(KINDS))
    spec = WorkloadSpec(processes=2, tps=100, long_transaction_seconds=1, mix=every_kind)
    with Workload(legacy_dsn, spec) as workload:
        time.sleep(3)
        stats = workload.stop()

    assert stats.workers_lost == 0
    assert stats.committed > 20 and stats.rolled_back > 0
    assert not [state for state in stats.failed if state.startswith("python:")], stats.failed
    assert set(stats.kinds) == KINDS | {"long"}
    assert stats.studies_present and stats.studies_gone and not stats.studies_unknown
    check = verify(legacy_dsn, stats)
    assert check.missing == () and check.resurrected == ()
    assert check.rolled_back_rows == 0
    assert fetch(legacy_dsn, "SELECT count(*) FROM study WHERE description = %s", (ROLLED_BACK_MARKER,)) == [(0,)]
    assert fetch(legacy_dsn, "SELECT count(*) FROM study WHERE study_uid = ANY(%s)",
                 (list(stats.studies_present),)) == [(len(stats.studies_present),)]
    assert json.loads(json.dumps(stats.to_dict()))["committed"] == stats.committed


def test_workload_counts_the_writes_a_frozen_database_rejects_and_carries_on(legacy_dsn: str) -> None:
    with Workload(legacy_dsn, WorkloadSpec(processes=2, tps=100)) as workload:
        time.sleep(1)
        run_sql(
            legacy_dsn,
            """CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'frozen' USING ERRCODE = 'read_only_sql_transaction'; END $$""",
            *(f"CREATE TRIGGER frozen BEFORE INSERT OR UPDATE OR DELETE ON {table}"
              " FOR EACH STATEMENT EXECUTE FUNCTION frozen()"
              for table in ("patient", "study", "series", "instance", 'oncology."Treatment Course"', "audit_event")),
        )
        time.sleep(1)
        stats = workload.stop()

    assert stats.workers_lost == 0
    assert stats.committed > 0
    assert stats.frozen > 0
    assert verify(legacy_dsn, stats).ok


def test_workload_stops_by_itself_when_its_duration_is_over(legacy_dsn: str) -> None:
    workload = Workload(legacy_dsn, WorkloadSpec(processes=1, tps=20, duration=0.5))
    workload.start()
    assert workload.wait(timeout=20)
    stats = workload.stop()
    assert stats.workers_lost == 0 and 0 < stats.committed <= 20
