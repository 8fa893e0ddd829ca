"""No patient data and no password on the console (issue 15): with patients seeded on the legacy database, a DSN
password in the configuration, a verify that finds a differing patient, refused and failed actions and a cutover,
no page, API answer, event or metric carries a seeded name, a medical record number or the password."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from migrator import sync
from migrator.console import security
from tests.console_helpers import act, call, configured, migrated, serving, trail, until
from tests.helpers import run_sql

NAMES = ("Zebulon Quagmire-Oyelaran", "Philippa Vantongeren", "Ignatius Szczepanski")
MRNS = ("MRN-7731-XQ", "MRN-0042-ZZ", "MRN-9913-KP")
PASSWORD = "Pw-c0ns0le-n0t-sh0wn"
SCHEMA = (
    "CREATE TABLE public.patient (mrn text PRIMARY KEY, name text NOT NULL, born date)",
    "CREATE TABLE public.study (id serial PRIMARY KEY, mrn text NOT NULL REFERENCES public.patient (mrn), uid text)",
    *(f"INSERT INTO public.patient VALUES ('{m}', '{n}', '1950-01-0{i + 1}')"
      for i, (m, n) in enumerate(zip(MRNS, NAMES, strict=True))),
    "INSERT INTO public.study (mrn, uid) SELECT 'MRN-7731-XQ', '1.2.' || g FROM generate_series(1, 20) g",
)


def _with_password(dsn: str) -> str:
    return f"{dsn} password={PASSWORD}"  # the test server trusts loopback: the password is never checked


def test_no_patient_name_record_number_or_password_on_any_page_answer_or_metric(
        source_dsn: str, target_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "FIRST_DELAY", 0.01)
    cfg = configured(tmp_path, _with_password(source_dsn), _with_password(target_dsn))
    migrated(cfg, source_dsn, *SCHEMA)
    # A change synced, a patient who differs on the target, and a change left pending on the legacy database.
    run_sql(source_dsn, f"UPDATE public.patient SET name = name || ' Jr' WHERE mrn = '{MRNS[1]}'")
    sync.sync(cfg)
    run_sql(target_dsn, "SET session_replication_role = replica",
            f"UPDATE public.patient SET born = '1999-09-09' WHERE mrn = '{MRNS[2]}'")
    seen: list[str] = []
    with serving(cfg) as console:
        assert act(console, "verify")[0] == 202
        until(lambda: all(a.outcome != "started" for a in trail(target_dsn)))
        assert act(console, "cutover", confirm=f"cutover {NAMES[0]}")[0] == 400
        assert call(console, "/api/actions/hold", {"confirm": MRNS[0]}, token=PASSWORD)[0] == 401
        assert act(console, "release")[0] == 409
        assert act(console, "cutover", overrides=["no-switch"])[0] == 202  # refused by the go/no-go: verify failed
        until(lambda: all(a.outcome != "started" for a in trail(target_dsn)))
        run_sql(source_dsn, f"UPDATE public.patient SET name = name || ' Sr' WHERE mrn = '{MRNS[0]}'")
        view = until(lambda: (lambda v: v if v["verify"] and v["checklist"] and v["lag"]["pending"] else None)(
            call(console, "/api/view")[1]))
        assert view["verify"]["identical"] is False
        for path in ("/", "/static/console.js", "/static/console.css", "/api/view", "/api/status", "/api/audit",
                     "/metrics"):
            code, body = call(console, path)
            assert code == 200, path
            seen.append(body if isinstance(body, str) else repr(body))
        with urllib.request.urlopen(console.url + "api/events", timeout=30) as stream:
            seen.append(b"".join(stream.readline() for _ in range(6)).decode())  # a clock event, then the view
        assert "event: view" in seen[-1]
    text = "\n".join(seen)
    outcomes = [(a.action, a.outcome) for a in trail(target_dsn)]
    assert ("verify", "done") in outcomes and ("cutover", "refused") in outcomes  # the paths above were taken
    assert "public.patient" in text and "differences found" in text
    assert '"pending": 1' in text  # the change left pending is counted, and only counted
    for secret in (*NAMES, *MRNS, PASSWORD, "Jr", "Sr"):
        assert secret not in text, secret
