"""The bulk copy in key-range chunks: split text keys exactly, share chunks among worker processes, obey pause, and
resume after kill -9 mid-table while the application keeps writing (primary keys moving across chunk bounds)."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql

from migrator import copy, copyplan, prepare, state, sync
from migrator.config import CONTROL_SCHEMA, Config
from migrator.deltalog.snapshot import Snapshot
from tests.helpers import fetch, run_sql
from tests.test_crash_and_concurrency import Processes, assert_same_rows, wait_for

pytestmark = pytest.mark.slow

# DICOM-like UIDs: text keys whose first digit spreads them over the whole key space.
STUDY = """
CREATE TABLE public.study (uid text PRIMARY KEY, n int NOT NULL, meta jsonb, blob bytea, note text);
INSERT INTO public.study SELECT (g % 10) || '.2.840.' || g, g, jsonb_build_object('g', g), sha256(g::text::bytea),
       repeat('x', g % 200) FROM generate_series(1, {rows}) g;
CREATE TABLE public.series (study_uid text, series_no int, modality text, PRIMARY KEY (study_uid, series_no));
INSERT INTO public.series SELECT (g % 10) || '.2.840.' || (g / 3), g % 3, 'CT' FROM generate_series(3, {rows}) g;
CREATE TABLE public.audit (at timestamptz, what text);
INSERT INTO public.audit SELECT timestamptz '2020-01-01' + g * interval '1 s', 'view' FROM generate_series(1, 3000) g;
"""


def chunked(make_config: Any, **copy: Any) -> Config:
    cfg: Config = make_config(copy={"workers": 2, "chunk_mb": 0.5, **copy})
    return cfg


def chunk_rows(target_dsn: str) -> list[tuple[Any, ...]]:
    return fetch(target_dsn, sql.SQL("SELECT table_name, chunk_no, lower_bound, upper_bound, status, snapshot, worker, "
                                     "copy_finished_at FROM {}.copy_chunk ORDER BY 1, 2")
                 .format(sql.Identifier(CONTROL_SCHEMA)).as_string(None))


def config_file(tmp_path: Path, source_dsn: str, target_dsn: str, chunk_mb: float = 0.5) -> Path:
    path = tmp_path / "migration.toml"
    path.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n\n[target]\ndsn = {json.dumps(target_dsn)}\n\n"
                    f"[copy]\nworkers = 1\nchunk_mb = {chunk_mb}\n\n[sync]\npoll_interval = 0.1\n")
    return path


@pytest.mark.parametrize("split", ["blocks", "keys"])
def test_text_keyed_table_is_split_into_chunks_and_copied_exactly(
    make_config: Any, source_dsn: str, target_dsn: str, split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if split == "keys":  # as on a source before PostgreSQL 14, which scans a block range as a whole table
        monkeypatch.setattr(copyplan, "BLOCK_RANGES_FROM", 10**9)
    run_sql(source_dsn, STUDY.format(rows=30_000), "VACUUM ANALYZE")
    cfg = chunked(make_config)
    prepare.prepare(cfg)

    result = copy.run(cfg)

    assert fetch(target_dsn, sql.SQL("SELECT DISTINCT table_name, blocks FROM {}.copy_chunk ORDER BY 1").format(
        sql.Identifier(CONTROL_SCHEMA)).as_string(None)) == [
        ("audit", False), ("series", split == "blocks"), ("study", split == "blocks")]
    chunks = [r for r in chunk_rows(target_dsn) if r[0] == "study"]
    assert len(chunks) >= 4, chunks
    assert chunks[0][2] is None and chunks[-1][3] is None
    assert all(a[3] == b[2] for a, b in zip(chunks, chunks[1:], strict=False)), "the ranges must tile the key space"
    assert {r[4] for r in chunk_rows(target_dsn)} == {"copied"}
    assert len([r for r in chunk_rows(target_dsn) if r[0] == "series"]) >= 2, "a composite text key is split too"
    assert [r for r in chunk_rows(target_dsn) if r[0] == "audit"][0][2:4] == (None, None), "no key: one chunk"
    by_table = {t.table: t for t in result.copied}
    assert by_table["public.study"].rows == 30_000 and by_table["public.study"].chunks == len(chunks)
    assert_same_rows(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT count(*) FROM pg_indexes WHERE tablename IN ('study', 'series')") == [(2,)]


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_local_workers_are_forked_unless_another_thread_runs(make_config: Any, source_dsn: str, target_dsn: str,
                                                             tmp_path: Path, start: str) -> None:
    run_sql(source_dsn, STUDY.format(rows=30_000), "VACUUM ANALYZE")
    cfg = chunked(make_config)
    prepare.prepare(cfg)
    if start == "fork":  # the command line: one thread when the workers start
        done = Processes(config_file(tmp_path, source_dsn, target_dsn)).run("copy", "--workers", "2", "--json")
        events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        coordinator = {e["worker"].rsplit("/", 1)[0] for e in events if e["event"] == "copy.chunk_done"}
    else:  # in a program running another thread, which may hold a lock a forked child would need (a log stream's)
        idle = threading.Event()
        threading.Thread(target=idle.wait, name="another", daemon=True).start()
        try:
            with structlog.testing.capture_logs() as events:
                copy.run(cfg)
        finally:
            idle.set()
        coordinator = {f"{socket.gethostname()}:{os.getpid()}"}

    assert [e["start"] for e in events if e["event"] == "copy.workers_started"] == [start]
    assert {r[4] for r in chunk_rows(target_dsn)} == {"copied"}
    assert len(coordinator) == 1 and {r[6].rsplit("/", 1)[0] for r in chunk_rows(target_dsn)} == coordinator, \
        "the chunks are copied by this coordinator's workers"
    assert_same_rows(source_dsn, target_dsn)


def test_workers_claim_the_largest_tables_chunks_first_in_order(make_config: Any, source_dsn: str,
                                                                target_dsn: str) -> None:
    run_sql(source_dsn, STUDY.format(rows=30_000), "VACUUM ANALYZE")
    prepare.prepare(chunked(make_config))
    with psycopg.connect(target_dsn) as conn:
        conn.execute(sql.SQL("INSERT INTO {}.copy_chunk (schema_name, table_name, chunk_no, est_bytes) VALUES "
                             "('public', 'study', 0, 100), ('public', 'study', 1, 900), ('public', 'study', 2, 100), "
                             "('public', 'series', 0, 1000), ('public', 'audit', 0, 10)")
                     .format(sql.Identifier(CONTROL_SCHEMA)))
        conn.commit()
        claimed = []
        with psycopg.connect(target_dsn) as other:  # a second worker skips the chunk the first holds
            first = state.claim_chunk(conn)
            second = state.claim_chunk(other)
            assert first is not None and second is not None
            claimed += [(first.table_name, first.chunk_no), (second.table_name, second.chunk_no)]
            other.rollback()
        conn.rollback()
        for _ in range(5):
            chunk = state.claim_chunk(conn)
            assert chunk is not None
            conn.execute(sql.SQL("UPDATE {}.copy_chunk SET status = 'copied' WHERE table_name = %s AND chunk_no = %s")
                         .format(sql.Identifier(CONTROL_SCHEMA)), (chunk.table_name, chunk.chunk_no))
            conn.commit()
            claimed.append((chunk.table_name, chunk.chunk_no))
        assert state.claim_chunk(conn) is None

    # study (1,100 bytes in all) before series (1,000 in one chunk), its chunks in order; then series, then audit.
    assert claimed == [("study", 0), ("study", 1), ("study", 0), ("study", 1), ("study", 2), ("series", 0),
                       ("audit", 0)]


def test_several_worker_processes_share_the_chunks(source_dsn: str, target_dsn: str, tmp_path: Path,
                                                   make_config: Any) -> None:
    run_sql(source_dsn, STUDY.format(rows=40_000), "VACUUM ANALYZE")
    prepare.prepare(chunked(make_config))
    procs = Processes(config_file(tmp_path, source_dsn, target_dsn, chunk_mb=0.3))
    try:
        # Workers started first wait for the coordinator's snapshot, then claim chunks beside its own worker.
        joined = [procs.start("copy", "--worker", "--wait", "60", "--json") for _ in range(2)]
        time.sleep(1.0)
        # Throttled, so that the coordinator's own worker cannot take every chunk before the joined ones poll
        # (on a loaded machine it once did): every process gets chunks whatever the scheduling.
        coordinator = procs.run("copy", "--workers", "1", "--max-rate", "1", "--json", timeout=120)
        for proc in joined:
            assert proc.wait(timeout=60) == 0, procs.output(proc)
    finally:
        procs.kill_all()

    workers = {r[6].rsplit("/", 1)[0] for r in chunk_rows(target_dsn)}
    print(f"chunks per worker process: { {w: sum(1 for r in chunk_rows(target_dsn) if r[6].startswith(w)) for w in workers} }")
    # Which processes get chunks is the scheduler's business (on a loaded machine one joined worker may find none
    # left): that more than one process copied, all under one snapshot, is the point.
    assert len(workers) >= 2, f"chunks are shared between processes: {workers}"
    assert len({r[5] for r in chunk_rows(target_dsn)}) == 1, "every chunk is read under the coordinator's snapshot"
    assert json.loads(coordinator.stdout)["rows"] > 0
    assert_same_rows(source_dsn, target_dsn)


def _progress(target_dsn: str) -> int:
    ((copied, flying),) = fetch(target_dsn, sql.SQL(
        "SELECT (SELECT coalesce(sum(bytes_copied), 0) FROM {s}.copy_chunk), "
        "(SELECT coalesce(sum(bytes_done), 0) FROM {s}.copy_worker)").format(s=sql.Identifier(CONTROL_SCHEMA))
        .as_string(None))
    return int(copied) + int(flying)


def test_pause_is_honoured_within_seconds(make_config: Any, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, STUDY.format(rows=80_000), "VACUUM ANALYZE")
    cfg = chunked(make_config)
    prepare.prepare(cfg)
    procs = Processes(config_file(tmp_path, source_dsn, target_dsn))
    try:
        proc = procs.start("copy", "--max-rate", "1", "--json")
        wait_for(lambda: _progress(target_dsn) > 500_000, 60, "the copy to make progress")
        procs.run("copy", "--pause")
        time.sleep(2.5)  # obeyed within a second or two: the next progress check
        held = _progress(target_dsn)
        time.sleep(3.0)
        assert _progress(target_dsn) == held, "a paused copy must not read on"
        assert proc.poll() is None
        assert "copy.paused" in procs.output(proc, tail=10**6)
        status = json.loads(procs.run("status", "--json").stdout)
        assert status["copy"]["paused"] and status["copy"]["chunks_copied"] < status["copy"]["chunks"]
        procs.run("copy", "--resume")
        assert proc.wait(timeout=120) == 0, procs.output(proc)
    finally:
        procs.kill_all()
    assert_same_rows(source_dsn, target_dsn)


class UidWriter(threading.Thread):
    """Inserts, updates, deletes and primary-key changes on study, anywhere in the key space; some rolled back."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stopping = threading.Event()
        self.rng = random.Random()
        self.commits = 0
        self.moves = 0
        self.error: BaseException | None = None

    def uid(self) -> str:
        return f"{self.rng.randint(0, 9)}.9.{self.rng.getrandbits(40)}"

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn) as conn:
                while not self.stopping.is_set():
                    probe = "(SELECT uid FROM study WHERE uid >= %s ORDER BY uid LIMIT 1)"
                    r = self.rng.random()
                    if r < 0.25:
                        conn.execute("INSERT INTO study VALUES (%s, -1, '{}', NULL, 'new')", (self.uid(),))
                    elif r < 0.5:
                        conn.execute(f"UPDATE study SET n = n + 1, note = 'upd' WHERE uid = {probe}", (self.uid(),))
                    elif r < 0.65:
                        conn.execute(f"DELETE FROM study WHERE uid = {probe}", (self.uid(),))
                    else:
                        # The key moves, most often into another chunk's range.
                        conn.execute(f"UPDATE study SET uid = %s WHERE uid = {probe}", (self.uid(), self.uid()))
                        self.moves += 1
                    if self.rng.random() < 0.1:
                        conn.rollback()
                    else:
                        conn.commit()
                        self.commits += 1
                    time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stopping.set()
        self.join(30)
        if self.error is not None:
            raise self.error


def test_copy_killed_mid_table_resumes_chunks_and_meets_the_delta_log(
    make_config: Any, source_dsn: str, target_dsn: str, tmp_path: Path
) -> None:
    run_sql(source_dsn, STUDY.format(rows=40_000), "VACUUM ANALYZE")
    cfg = chunked(make_config)
    prepare.prepare(cfg)
    writer = UidWriter(source_dsn)
    writer.start()
    procs = Processes(config_file(tmp_path, source_dsn, target_dsn, chunk_mb=0.3))
    try:
        proc = procs.start("copy", "--workers", "1", "--max-rate", "1.5")

        def some_study_chunks() -> bool:
            assert proc.poll() is None, f"copy ended before it could be killed:\n{procs.output(proc)}"
            done = [r for r in chunk_rows(target_dsn) if r[0] == "study" and r[4] == "copied"]
            return len(done) >= 2

        wait_for(some_study_chunks, 90, "two chunks of study to be copied")
        proc.kill()
        proc.wait(timeout=10)
        first = {(r[0], r[1]): r for r in chunk_rows(target_dsn)}
        kept = {k for k, r in first.items() if r[4] == "copied"}
        assert any(k[0] == "study" for k in kept) and any(k[0] == "study" and k not in kept for k in first), \
            "kill -9 must land between chunks of study"
        time.sleep(1.0)  # the application keeps writing into copied and not yet copied ranges

        resumed = json.loads(procs.run("copy", "--json", timeout=120).stdout)

        time.sleep(0.5)
        sync.sync(cfg)
        time.sleep(0.5)
    finally:
        writer.finish()
        procs.kill_all()
    final = sync.sync(cfg)

    second = {(r[0], r[1]): r for r in chunk_rows(target_dsn)}
    first_snapshot = Snapshot.parse(next(first[k][5] for k in kept))
    for k, r in second.items():
        assert r[4] == "copied", k
        if k in kept:
            assert r[5:] == first[k][5:], f"chunk {k} was copied again"
        else:
            assert Snapshot.parse(r[5]).xmax > first_snapshot.xmax, f"chunk {k} kept an old boundary"
    with psycopg.connect(target_dsn) as conn:
        study = next(s for s in state.tables(conn) if s.table_name == "study")
    assert study.copy_snapshot is None, "study's chunks carry two boundaries"
    print(f"{writer.commits} commits ({writer.moves} key moves); kept {sorted(kept)}; resumed "
          f"{[(t['table'], t['chunks']) for t in resumed['tables']]}; final sync {final.events} events")
    assert writer.moves > 20 and final.caught_up
    assert_same_rows(source_dsn, target_dsn)


def test_copy_tables_while_sync_follows_stops_sync_until_the_table_is_copied_again(
    make_config: Any, source_dsn: str, target_dsn: str, tmp_path: Path
) -> None:
    run_sql(source_dsn, STUDY.format(rows=20_000), "VACUUM ANALYZE")
    cfg = chunked(make_config)
    prepare.prepare(cfg)
    copy.run(cfg)
    sync.sync(cfg)
    procs = Processes(config_file(tmp_path, source_dsn, target_dsn))
    try:
        follower = procs.start("sync", "--follow")
        run_sql(source_dsn, "UPDATE public.study SET n = -n WHERE n % 97 = 0")
        wait_for(lambda: fetch(target_dsn, "SELECT count(*) FROM public.study WHERE n < 0")[0][0] > 0, 30,
                 "sync --follow to apply a change")
        # The re-copy resets the table and then waits, paused, before copying a chunk of it.
        procs.run("copy", "--pause")
        recopy = procs.start("copy", "--tables", "public.study")
        wait_for(lambda: fetch(target_dsn, sql.SQL("SELECT status FROM {}.table_state WHERE table_name = 'study'")
                               .format(sql.Identifier(CONTROL_SCHEMA)).as_string(None))[0][0] != "copied", 30,
                 "the re-copy to send the table back")
        run_sql(source_dsn, "UPDATE public.study SET note = 'after' WHERE n % 89 = 0",
                "DELETE FROM public.study WHERE n % 83 = 0")
        assert follower.wait(timeout=30) != 0, "sync must not apply changes to a table being copied again"
        assert "to be copied again" in procs.output(follower)
        procs.run("copy", "--resume")
        assert recopy.wait(timeout=120) == 0, procs.output(recopy)
        procs.run("sync")
    finally:
        procs.kill_all()
    assert_same_rows(source_dsn, target_dsn)


def test_progress_estimates_share_done_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    def chunk(no: int, est: int, status: str) -> state.Chunk:
        return state.Chunk("public", "study", no, None, None, est, status, None, None, None, None, None, None)

    chunks = [chunk(0, 100, "copied"), chunk(1, 100, "copying"), chunk(2, 200, "pending")]
    active = [{"schema_name": "public", "table_name": "study", "chunk_no": 1, "bytes_done": 150},
              {"schema_name": None, "table_name": None, "chunk_no": None, "bytes_done": 0}]
    assert copy.estimated_done(chunks, active) == (200, 400), "a chunk in flight counts at most its estimate"

    events: list[tuple[str, dict[str, Any]]] = []

    class Logger:
        def info(self, event: str, **fields: Any) -> None:
            events.append((event, fields))

    clock = iter([1000.0, 1011.0])
    monkeypatch.setattr(copy.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(copy, "get", lambda **context: Logger())
    eta = copy.Eta()  # started at 1000 s
    eta.first = 100  # copied by an earlier run: not part of this run's rate
    eta.log(200, 400)  # 11 s later: 100 bytes in 11 s, 200 left
    assert [(e, f["done_pct"], f["eta_seconds"]) for e, f in events] == [("copy.progress", 50.0, 22)]


def test_a_first_copy_killed_during_its_post_data_is_finished_by_the_next_run(
    make_config: Any, source_dsn: str, target_dsn: str, tmp_path: Path
) -> None:
    # A first copy restores each table's post-data as it arrives. An expression index slow to build (a millisecond a
    # row) holds the copy in its post-data, after its last chunk, long enough to kill it there.
    run_sql(source_dsn, STUDY.format(rows=5_000),
            "CREATE FUNCTION public.slow_id(n int) RETURNS int LANGUAGE sql IMMUTABLE AS "
            "'SELECT n + (pg_sleep(0.001) IS NULL)::int'",
            "CREATE TABLE public.report (id int PRIMARY KEY, study_uid text REFERENCES public.study, n int)",
            "INSERT INTO public.report SELECT g, (g % 10) || '.2.840.' || g, g FROM generate_series(1, 2000) g",
            "CREATE INDEX report_slow ON public.report (public.slow_id(n))", "VACUUM ANALYZE")
    cfg = chunked(make_config)
    prepare.prepare(cfg)
    procs = Processes(config_file(tmp_path, source_dsn, target_dsn))
    try:
        proc = procs.start("copy", "--workers", "2")

        def in_post_data() -> bool:
            assert proc.poll() is None, f"copy ended before it could be killed:\n{procs.output(proc)}"
            return all(r[4] == "copied" for r in chunk_rows(target_dsn)) and bool(fetch(
                target_dsn, "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX report_slow%'"))

        wait_for(in_post_data, 60, "the copy to build the slow index, every chunk copied")
        proc.kill()
        proc.wait(timeout=10)
        assert not fetch(target_dsn, "SELECT 1 FROM pg_indexes WHERE indexname = 'report_slow'")

        again = json.loads(procs.run("copy", "--json", timeout=120).stdout)
    finally:
        procs.kill_all()
    assert again["tables"] == [], "no chunk is copied again"
    for query in ("SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2",
                  "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                  "WHERE connamespace = 'public'::regnamespace ORDER BY 1",
                  "SELECT DISTINCT tablename FROM pg_stats WHERE schemaname = 'public' ORDER BY 1"):
        assert fetch(target_dsn, query) == fetch(source_dsn, query), query
    with psycopg.connect(target_dsn) as conn:
        assert state.require_prepared(conn).post_data_at is not None and state.post_data_deferred(conn) is None
    sync.sync(cfg)
    assert_same_rows(source_dsn, target_dsn)
