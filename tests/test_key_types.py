"""Keys whose text form depends on session settings are logged and read back exactly, whatever the writer's settings."""

from __future__ import annotations

import psycopg

from migrator import copy, db, prepare, sync
from migrator.config import Config
from tests.helpers import run_sql

ODD = ("SET DateStyle = 'SQL, DMY'", "SET TimeZone = 'Pacific/Chatham'", "SET extra_float_digits = 0",
       "SET IntervalStyle = 'sql_standard'", "SET bytea_output = 'escape'")


def _rows(dsn: str, table: str) -> list[tuple[str]]:
    with db.session(dsn, role="source", autocommit=True) as conn:
        return conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1").fetchall()  # type: ignore[arg-type]


def test_date_time_float_and_bytea_keys_written_under_odd_settings_replay_exactly(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn,
            "CREATE TABLE public.reading (taken timestamptz, site date, v float8, tag bytea, span interval, "
            "note text, PRIMARY KEY (taken, site, v, tag, span))",
            "INSERT INTO public.reading SELECT timestamptz '2020-01-01 00:00:00.123456+00' + g * interval '1 min', "
            "date '1999-12-31' + g, g / 3.0, decode(lpad(to_hex(g), 4, '0'), 'hex'), g * interval '1 day 1 us', 'x' "
            "FROM generate_series(1, 50) g")
    prepare.prepare(cfg)
    copy.run(cfg)
    with psycopg.connect(source_dsn, autocommit=True) as w:
        for s in ODD:
            w.execute(s)  # type: ignore[arg-type]
        w.execute("UPDATE public.reading SET note = 'changed' WHERE v > 10")
        w.execute("UPDATE public.reading SET v = v + 0.1 WHERE v < 2")  # a key update with a float key
        w.execute("DELETE FROM public.reading WHERE site = date '2000-01-05'")
        w.execute("INSERT INTO public.reading VALUES ('2021-06-01 12:00:00.000001+05:45', '0044-03-15 BC', "
                  "-0.0, '\\x00ff', '-1 mon +2 days -00:00:01', 'new')")
        w.execute("INSERT INTO public.reading VALUES ('2021-06-01 12:00:00.000001+05:45', '0044-03-15 BC', "
                  "1e-310, '\\x', '1 day', 'denormal')")
    sync.sync(cfg)
    assert _rows(target_dsn, "public.reading") == _rows(source_dsn, "public.reading")
