"""Image files follow their rows (issue 17): a file whose row left the source is moved to the quarantine, recorded,
never deleted; `objects sync --follow` lists only the rows the delta log says changed; a store never reads or writes
outside its root."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from migrator import copy, cutover, objects, prepare, state, sync
from migrator.cli import main
from migrator.config import Config
from migrator.deltalog import rotation
from migrator.store import QUARANTINE_DIR
from tests.helpers import fetch, run_sql

QUERY = "SELECT uid AS key, path AS location, size FROM public.image"


class Store:
    """Rows of public.image on the legacy database and their files in the source store, written as a PACS does:
    the file before its row, the row's deletion before its file's."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.source, self.target = tmp_path / "source-store", tmp_path / "target-store"
        self.source.mkdir()
        self.target.mkdir()
        self.dsn = dsn
        self.n = 0

    def _file(self, uid: str) -> tuple[str, int]:
        self.n += 1
        location = f"{uid[-1]}/{uid}-{self.n}.dcm"
        data = f"{uid} version {self.n}\n".encode() * 8
        (self.source / location).parent.mkdir(parents=True, exist_ok=True)
        (self.source / location).write_bytes(data)
        return location, len(data)

    def insert(self, conn: psycopg.Connection, uid: str) -> None:
        location, size = self._file(uid)
        conn.execute("INSERT INTO public.image VALUES (%s, %s, %s)", (uid, location, size))

    def replace(self, conn: psycopg.Connection, uid: str) -> str:
        """A new file for the row (a re-sent image): the old one is removed from the source store."""
        location, size = self._file(uid)
        row = conn.execute("UPDATE public.image AS i SET path = %s, size = %s FROM public.image AS o "
                           "WHERE i.uid = %s AND o.uid = i.uid RETURNING o.path", (location, size, uid)).fetchone()
        assert row is not None
        (self.source / row[0]).unlink()
        return str(row[0])

    def delete(self, conn: psycopg.Connection, uid: str) -> str:
        row = conn.execute("DELETE FROM public.image WHERE uid = %s RETURNING path", (uid,)).fetchone()
        assert row is not None
        (self.source / row[0]).unlink()
        return str(row[0])


TABLE = "CREATE TABLE public.image (uid text PRIMARY KEY, path text NOT NULL, size bigint)"


def images(tmp_path: Path, source_dsn: str, rows: int, target_dsn: str | None = None) -> Store:
    """The table on the legacy database (and on the target, for a test that does not prepare) with `rows` rows."""
    for dsn in (source_dsn, target_dsn):
        if dsn is not None:
            run_sql(dsn, TABLE)
    store = Store(tmp_path, source_dsn)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        with conn.transaction():
            for i in range(rows):
                store.insert(conn, f"1.2.{i:05d}")
    return store


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and QUARANTINE_DIR not in p.parts}


def quarantined(target_dsn: str) -> dict[str, tuple[str, str, str]]:
    """Quarantine entries by location: (key, name, outcome)."""
    return {r[1]: (r[0], r[2], r[3]) for r in fetch(
        target_dsn, "SELECT key, location, name, outcome FROM migrator_control.object_quarantine")}


@pytest.fixture
def ocfg_for(make_config: Callable[..., Config]) -> Callable[..., Config]:
    def make(store: Store, **objects_settings: Any) -> Config:
        return make_config(copy={"workers": 1}, cutover={"switch_command": "true", "verify": "none"},
                           objects={"query": QUERY, "source_root": str(store.source),
                                    "target_root": str(store.target), "workers": 2, "poll_interval": 0.1,
                                    **objects_settings})
    return make


def test_follow_under_live_writes_then_cutover_quarantines_every_deleted_rows_file_and_deletes_nothing(
        ocfg_for: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    store = images(tmp_path, source_dsn, 60)
    cfg = ocfg_for(store)
    prepare.prepare(cfg)
    copy.run(cfg)
    stop = threading.Event()
    outcome: list[objects.ObjectSyncResult] = []
    follower = threading.Thread(target=lambda: outcome.append(objects.sync(cfg, follow=True, stop=stop)))
    follower.start()
    deleted: dict[str, str] = {}
    replaced: dict[str, str] = {}
    rng = random.Random(17)
    live = {f"1.2.{i:05d}" for i in range(60)}
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + (1.5 if os.environ.get("CI") else 4)
        i = 100
        while time.monotonic() < deadline:
            i += 1
            uid = f"1.2.{i:05d}"
            store.insert(conn, uid)
            live.add(uid)
            victim = rng.choice(sorted(live))
            if i % 3 == 0:
                deleted[victim] = store.delete(conn, victim)
                live.discard(victim)
            elif i % 3 == 1:
                replaced[victim] = store.replace(conn, victim)
            time.sleep(0.02)
    # Two passes recorded since the last change: the second began after it.
    mark = fetch(target_dsn, "SELECT clock_timestamp()")[0][0]
    deadline = time.monotonic() + 30
    for _ in range(2):
        while (passed := fetch(target_dsn, "SELECT passed_at FROM migrator_control.object_follow")[0][0]) <= mark:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mark = passed
    stop.set()
    follower.join(timeout=60)
    (followed,) = outcome
    assert followed.passes >= 2 and followed.full_passes == 1, followed.to_dict()
    assert followed.ok, followed.render_text()
    sync.sync(cfg)
    assert cutover.run(cfg).ok

    report = objects.verify(cfg)

    assert report.exit_code == 0, report.render_text()
    assert report.orphan_count == 0 and report.quarantined == followed.quarantined > 0
    in_quarantine = quarantined(target_dsn)
    for uid, location in {**deleted, **replaced}.items():
        if location in in_quarantine:  # copied before its row left: moved, recorded with its key
            key, name, outcome_ = in_quarantine[location]
            assert (key, outcome_) == (uid, "quarantined")
            assert (store.target / QUARANTINE_DIR / name).is_file()
        assert location not in files(store.target)
    # Nothing was deleted: every file written into the target store is there or in the quarantine.
    assert followed.copied == len(files(store.target)) + len(in_quarantine)
    assert files(store.target) == files(store.source)


def test_a_follow_pass_lists_only_the_rows_the_delta_log_says_changed(
        ocfg_for: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    store = images(tmp_path, source_dsn, 200)
    cfg = ocfg_for(store)
    prepare.prepare(cfg)
    first = objects.sync(cfg)
    assert (first.listed, first.copied, first.last_pass) == (200, 200, "full (on demand)")
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for i in range(4):
            store.insert(conn, f"1.3.{i:05d}")
        gone = [store.delete(conn, f"1.2.{i:05d}") for i in range(0, 60, 20)]
        for i in range(1, 60, 30):
            store.replace(conn, f"1.2.{i:05d}")

    follow = objects.sync(cfg, follow=True, passes=1, first_full=False)

    assert follow.last_pass == "follow"
    assert (follow.changed_keys, follow.listed) == (9, 6)  # 4 new, 2 edited; 3 deleted: no row to list
    assert (follow.copied, follow.quarantined) == (6, 5)  # the deleted rows' files and the edited rows' old ones
    assert set(gone) <= set(quarantined(target_dsn))
    assert objects.verify(cfg).exit_code == 0

    # A file changed in place leaves no trace in the log: a follow pass does not see it, the periodic full pass does.
    (in_place,) = store.source.rglob("1.2.00005-*.dcm")
    time.sleep(0.01)
    in_place.write_bytes(in_place.read_bytes().upper())
    unseen = objects.sync(cfg, follow=True, passes=1, first_full=False)
    assert (unseen.last_pass, unseen.listed, unseen.copied) == ("follow", 0, 0)
    periodic = objects.sync(ocfg_for(store, full_pass_interval=0.001), follow=True, passes=1, first_full=False)
    assert (periodic.last_pass, periodic.copied) == ("full (periodic)", 1)

    # The log rotates and a drained child is truncated: its events are gone, so the next pass lists everything.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        store.insert(conn, "1.4.00001")
        before = rotation.children_files(conn)
        current = next(c.child for c in rotation.log_children(conn) if c.state == "current")
        assert rotation.switch_log(conn, current, lock_timeout=5, statement_timeout=5) is not None
        store.insert(conn, "1.4.00002")
        assert rotation.truncate_log_child(conn, current, 2**62, lock_timeout=5, statement_timeout=5) is not None
        assert rotation.children_files(conn) != before

    after = objects.sync(cfg, follow=True, passes=1, first_full=False)

    assert after.last_pass == "full (the delta log was truncated since the last pass)"
    assert (after.listed, after.copied) == (203, 2)


def test_locations_that_leave_their_store_are_refused_on_both_sides(
        ocfg_for: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    store = images(tmp_path, source_dsn, 1, target_dsn)
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "secret.dcm").write_bytes(b"not the store's")
    (store.source / "link.dcm").symlink_to(outside / "etc" / "secret.dcm")  # a link out of the source store
    (store.source / "linked" / "a.dcm").parent.mkdir()
    (store.source / "linked" / "a.dcm").write_bytes(b"inside the source store")
    (store.target / "linked").symlink_to(outside / "etc", target_is_directory=True)  # out of the target store
    run_sql(source_dsn, "INSERT INTO public.image VALUES ('up', '../outside/etc/secret.dcm', 1), "
                        f"('absolute', '{outside}/etc/secret.dcm', 1), ('src-link', 'link.dcm', 1), "
                        "('tgt-link', 'linked/a.dcm', 1)")
    cfg = ocfg_for(store)

    result = objects.sync(cfg)

    assert result.copied == 1
    failed = dict(result.failed)
    assert failed["up"] == "location '../outside/etc/secret.dcm' is not a relative path inside the store"
    assert failed["absolute"] == f"location '{outside}/etc/secret.dcm' is not a relative path inside the store"
    assert failed["src-link"] == "location 'link.dcm' resolves outside the source store (symbolic link)"
    assert failed["tgt-link"] == "location 'linked/a.dcm' resolves outside the target store (symbolic link)"
    assert sorted(p.name for p in (outside / "etc").iterdir()) == ["secret.dcm"]  # nothing written out there
    report = objects.verify(cfg)
    found = {f.key: f.reasons for f in report.findings}
    assert found["src-link"] == ("missing in the target store",
                                 "location 'link.dcm' resolves outside the source store (symbolic link)")
    assert found["tgt-link"][0] == "location 'linked/a.dcm' resolves outside the target store (symbolic link)"
    assert found["up"] == ("location '../outside/etc/secret.dcm' is not a relative path inside the store",)
    assert report.exit_code == 1


def test_a_move_recorded_before_a_crash_is_finished_then_listed_and_emptied_on_the_operators_word(
        ocfg_for: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    store = images(tmp_path, source_dsn, 3, target_dsn)
    cfg = ocfg_for(store)
    objects.sync(cfg)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        location = store.delete(conn, "1.2.00001")
    with psycopg.connect(target_dsn) as conn:  # a sync that died between its record and its rename
        (copy_,) = state.objects_copied(conn, [location]).values()
        entry = state.record_quarantine(conn, copy_, str(store.target / QUARANTINE_DIR), state.clock(conn))
        conn.commit()
    assert entry is not None and (store.target / location).is_file()
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n"
                      f"[objects]\nquery = {json.dumps(QUERY)}\nsource_root = {json.dumps(str(store.source))}\n"
                      f"target_root = {json.dumps(str(store.target))}\n")
    runner = CliRunner()

    listed = runner.invoke(main, ["--config", str(config), "objects", "quarantine", "--json"])

    assert listed.exit_code == 0, listed.output
    (shown,) = json.loads(listed.stdout)["entries"]
    assert (shown["key"], shown["location"], shown["outcome"]) == ("1.2.00001", location, "quarantined")
    assert not (store.target / location).exists()
    assert (store.target / QUARANTINE_DIR / shown["name"]).is_file()
    assert objects.sync(cfg).quarantined == 0  # its copy was forgotten with the record: not moved twice
    assert objects.verify(cfg).exit_code == 0

    emptied = runner.invoke(main, ["--config", str(config), "objects", "quarantine", "--empty", "--yes", "--json"])

    assert emptied.exit_code == 0, emptied.output
    assert json.loads(emptied.stdout)["emptied"] == 1
    assert not (store.target / QUARANTINE_DIR / shown["name"]).exists()
    ((by, audited),) = fetch(target_dsn, "SELECT emptied_by, (SELECT action FROM migrator_control.audit a WHERE "
                                         "a.id = q.emptied_by) FROM migrator_control.object_quarantine q")
    assert by is not None and audited == "objects quarantine --empty"
    assert fetch(target_dsn, "SELECT outcome FROM migrator_control.audit WHERE of_id = %s", (by,)) == [("done",)]
