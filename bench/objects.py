"""A follow pass of `objects sync` against a full pass, with 1 % of the rows changed.

    .venv/bin/python -m bench.objects [--rows 20000] [--rounds 3] [--kb 4] [--prefix bench] [--keep]

Builds, on the local server, a legacy database with one table of `--rows` images (uid, path, size) and their files
(`--kb` kB each) in a source store, prepares it (the capture triggers and the delta log) and copies every file once
with `objects sync`. Then, `--rounds` times: 1 % of the rows change as a PACS changes them (0.4 % new images, 0.3 %
re-sent under a new file, 0.3 % deleted with their file), and a **full pass** (`objects sync`: every row listed, every
file stat'ed) brings the target store up to date; the same again, and a **follow pass** (`objects sync --follow`'s
pass after the first: the changed keys read from the delta log, only those rows listed) does it. Both leave the same
state: every listed file in the target store, the deleted rows' and the replaced files in the quarantine
(`verify --objects` exits 0 at the end, checked). Printed: each pass's seconds, rows listed and keys read, the
medians, and the follow pass's time as a fraction of the full pass's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from bench._common import ADMIN_DSN, create_db, drop_db, median
from migrator import objects, prepare
from migrator.config import Config, from_dict

QUERY = "SELECT uid AS key, path AS location, size FROM public.image"


class Images:
    def __init__(self, dsn: str, root: Path, kb: int) -> None:
        self.dsn, self.root, self.kb, self.version, self.next = dsn, root, kb, 0, 0

    def _file(self, uid: str) -> tuple[str, int]:
        self.version += 1
        location = f"{uid[-2:]}/{uid}.{self.version}.dcm"
        data = (uid.encode() + b"-" + str(self.version).encode() + b"\n") * (self.kb * 1024 // (len(uid) + 8))
        (self.root / location).parent.mkdir(parents=True, exist_ok=True)
        (self.root / location).write_bytes(data)
        return location, len(data)

    def fill(self, rows: int) -> None:
        with psycopg.connect(self.dsn) as conn:
            conn.execute("CREATE TABLE public.image (uid text PRIMARY KEY, path text NOT NULL, size bigint)")
            with conn.cursor().copy("COPY public.image FROM STDIN") as cp:
                for _ in range(rows):
                    cp.write_row((self._uid(), *self._file(self.uid)))

    def _uid(self) -> str:
        self.next += 1
        self.uid = f"1.2.840.{self.next:08d}"
        return self.uid

    def change(self, rows: int) -> int:
        """Change 1 % of `rows`: new images, re-sent ones (a new file, the old one removed), deleted ones."""
        n = max(rows // 100, 10)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            victims = [r[0] for r in conn.execute(
                "SELECT uid, path FROM public.image TABLESAMPLE SYSTEM (5) LIMIT %s", (n * 6 // 10,)).fetchall()]
            old = dict(conn.execute("SELECT uid, path FROM public.image WHERE uid = ANY(%s)", (victims,)).fetchall())
            for uid in victims[: n * 3 // 10]:
                conn.execute("DELETE FROM public.image WHERE uid = %s", (uid,))
                (self.root / old[uid]).unlink()
            for uid in victims[n * 3 // 10:]:
                location, size = self._file(uid)
                conn.execute("UPDATE public.image SET path = %s, size = %s WHERE uid = %s", (location, size, uid))
                (self.root / old[uid]).unlink()
            for _ in range(n - len(victims)):
                uid = self._uid()
                conn.execute("INSERT INTO public.image VALUES (%s, %s, %s)", (uid, *self._file(uid)))
        return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kb", type=int, default=4)
    ap.add_argument("--prefix", default="bench", help="Names of the databases made: PREFIX_objects_src_<tag>, ...")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:6]
    names = {side: f"{args.prefix}_objects_{side}_{tag}" for side in ("src", "tgt")}
    work = Path(tempfile.mkdtemp(prefix="bench_objects_"))
    try:
        src, tgt = create_db(names["src"]), create_db(names["tgt"])
        images = Images(src, work / "source", args.kb)
        images.fill(args.rows)
        (work / "target").mkdir()
        cfg: Config = from_dict({"source": {"dsn": src}, "target": {"dsn": tgt}, "objects": {
            "query": QUERY, "source_root": str(work / "source"), "target_root": str(work / "target"),
            "workers": 4}}, env={})
        prepare.prepare(cfg)
        t0 = time.perf_counter()
        first = objects.sync(cfg)
        print(f"{args.rows:,} rows, {args.kb} kB files ({ADMIN_DSN.split('@')[-1]}); first copy: {first.copied:,} "
              f"files in {time.perf_counter() - t0:.1f}s")
        full: list[float] = []
        follow: list[float] = []
        for r in range(args.rounds):
            for kind in ("full", "follow"):
                changed = images.change(args.rows)
                result = (objects.sync(cfg) if kind == "full"
                          else objects.sync(cfg, follow=True, passes=1, first_full=False))
                assert result.ok and result.last_pass.startswith(kind), result.render_text()
                (full if kind == "full" else follow).append(result.pass_seconds)
                print(f"round {r + 1} {kind:<6} pass: {result.pass_seconds:6.3f}s  {changed} rows changed, "
                      f"{result.listed:,} listed, {result.changed_keys:,} keys read from the delta log, "
                      f"{result.copied} copied, {result.quarantined} quarantined")
        report = objects.verify(cfg)
        assert report.exit_code == 0, report.render_text()
        print(f"median full pass {median(full):.3f}s, follow pass {median(follow):.3f}s: the follow pass takes "
              f"{median(follow) / median(full):.1%} of the full pass's time ({median(full) / median(follow):.0f}x "
              f"faster); verify --objects: exit 0, {report.quarantined:,} in the quarantine")
    finally:
        if not args.keep:
            for name in names.values():
                drop_db(name)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
