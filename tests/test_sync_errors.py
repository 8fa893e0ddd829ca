"""A change the target refuses stops sync with the table and key named (never the values) and stays pending."""

from __future__ import annotations

import psycopg
import pytest

from migrator import copy, prepare, state, sync
from migrator.config import Config
from migrator.errors import ReplayError
from tests.helpers import fetch, run_sql


def _position(target_dsn: str) -> str:
    with psycopg.connect(target_dsn) as conn:
        pos = state.position(conn)
        assert pos is not None
        return pos.applied_snapshot


def test_refused_change_names_table_and_key_not_values_and_resumes_once_fixed(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, "CREATE TABLE public.study (id int PRIMARY KEY, n int, note text)",
            "INSERT INTO public.study SELECT g, g, 'ok' FROM generate_series(1, 20) g")
    prepare.prepare(cfg)
    copy.run(cfg)
    # The new server is stricter than the legacy one: a value the legacy system accepted is refused there.
    run_sql(target_dsn, "ALTER TABLE public.study ADD CONSTRAINT n_small CHECK (n < 100)")
    run_sql(source_dsn, "UPDATE public.study SET note = 'fine' WHERE id = 3",
            "INSERT INTO public.study VALUES (77, 4242, 'PATIENT-SECRET-NOTE')")
    before = _position(target_dsn)

    with pytest.raises(ReplayError) as err:
        sync.sync(cfg)

    message = str(err.value)
    assert "public.study" in message and "n_small" in message and "id=77" in message
    assert "4242" not in message and "PATIENT-SECRET" not in message
    assert _position(target_dsn) == before, "the refused batch must leave the applied position where it was"
    assert fetch(target_dsn, "SELECT note FROM public.study WHERE id = 3") == [("ok",)]

    run_sql(target_dsn, "ALTER TABLE public.study DROP CONSTRAINT n_small")
    sync.sync(cfg)
    assert fetch(target_dsn, "SELECT n, note FROM public.study WHERE id IN (3, 77) ORDER BY id") == \
        [(3, "fine"), (4242, "PATIENT-SECRET-NOTE")]
