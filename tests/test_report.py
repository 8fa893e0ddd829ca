"""`migrator report` (issue 16): its figures are what the control schema recorded, the page holds its charts as
inline SVG and no secret and no external address, a second report shows the first in its history, and the page
renders in headless Chromium (a screenshot kept under build/test-artifacts). One small synthetic rehearsal, kept,
gives the control schema every part of the report reads."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import rehearse, state
from migrator.config import from_dict
from migrator.errors import ConfigError
from tests.test_cli import migrator, write_config

SECRET = "sekrit-report-42"
ADMIN = f"host=127.0.0.1 port=5432 dbname=postgres user=postgres password={SECRET}"  # trust: the password is unused
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("report")
    cwd = Path.cwd()
    os.chdir(home)  # the kept rehearsal's configuration file goes to the working directory
    try:
        r = rehearse.run(scale=0.002, keep=True, admin_dsn=ADMIN, report_dir=home / "reports", sync_rounds=4)
    finally:
        os.chdir(cwd)
    assert r.ok and r.report and r.databases
    dsns = [psycopg.conninfo.make_conninfo(ADMIN, dbname=n) for n in r.databases]
    try:
        yield {"home": home, "html": Path(r.report), "source": dsns[0], "target": dsns[1]}
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            for name in r.databases:
                conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(psycopg.sql.Identifier(name)))


def test_the_reports_figures_are_what_the_control_schema_recorded(run: dict[str, Any]) -> None:
    data = json.loads(run["html"].with_suffix(".json").read_text())
    with psycopg.connect(run["target"]) as conn:
        m = state.migration(conn)
        tables = {t.display: t for t in state.tables(conn)}
        samples = state.samples(conn)
        attempts = state.attempts(conn)
        verify = state.last_verify(conn)
        chunks = state.chunks(conn)
    assert m is not None and verify is not None
    assert data["copy"]["seconds"] == (m.copy_finished_at - m.copy_started_at).total_seconds()  # type: ignore[operator]
    assert {t["table"]: (t["rows"], t["bytes"]) for t in data["copy"]["tables"]} == \
        {k: (t.rows_copied, t.bytes_copied) for k, t in tables.items()}
    assert data["copy"]["rows"] == sum(t.rows_copied or 0 for t in tables.values())
    assert [s["lag_seconds"] for s in data["sync"]["samples"]] == [s.lag_seconds for s in samples]
    assert [s["events_applied"] for s in data["sync"]["samples"]] == [s.events_applied for s in samples]
    assert len(data["attempts"]) == len(attempts) == 1
    assert data["last_attempt"]["freeze_seconds"] == attempts[-1]["freeze_seconds"]
    assert [s["step"] for s in data["attempts"][0]["steps"]] == [s["step"] for s in attempts[-1]["steps"]]
    assert data["last_attempt"]["checklist"] == attempts[-1]["checklist"]
    assert data["verify"]["identical"] is verify[0]["identical"] is True
    # The copy's parts, as the prediction models them, add up to the copy time recorded.
    parts = data["copy"]["parts"]
    assert sum(parts[k] for k in ("setup_seconds", "rows_seconds", "post_data_seconds", "analyze_seconds")) == \
        pytest.approx(data["copy"]["seconds"])
    assert sorted(c["bytes"] for c in parts["chunks"]) == sorted(c.bytes_copied for c in chunks)
    # The cutover kept its figures: the events drained, and each table's counts with their time.
    steps = {s["step"]: s for s in data["attempts"][0]["steps"]}
    assert steps["drain"]["figures"] == next(s["figures"] for s in attempts[-1]["steps"] if s["step"] == "drain")
    counted = steps["verify"]["figures"]["tables"]
    assert {t["table"] for t in counted} == set(tables) and all(t["rows"] == t["other_rows"] for t in counted)
    # No production figures in the rehearsal's configuration: the prediction says what to give, and at the
    # rehearsal's own size its freeze is the one measured.
    assert "production_dsn" in data["prediction"]["copy"]["text"]
    assert data["prediction"]["freeze"]["seconds"] == pytest.approx(data["last_attempt"]["freeze_seconds"], abs=0.01)


def test_the_page_has_its_charts_and_no_secret_and_no_external_address(run: dict[str, Any]) -> None:
    html = run["html"].read_text()
    for title in ("phases", "copy throughput per table", "sync lag", "pending events", "events applied per second",
                  "steps of attempt 1"):
        assert f"<title>{title}" in html
    assert html.count("<svg") >= 6
    for text in (html, run["html"].with_suffix(".json").read_text()):
        assert SECRET not in text
        assert "http://" not in text and "https://" not in text and "src=" not in text


def test_a_second_report_shows_the_first_in_its_history_and_predicts_from_production_figures(
        run: dict[str, Any], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "m.toml", run["source"], run["target"],
                       "[rehearsal]\nproduction_bytes = 1e9\nproduction_rows = 5e6\nproduction_write_rate = 2000.0\n")
    done = migrator("--config", str(cfg), "report", "--out", str(run["html"].parent), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [h["file"] for h in data["history"]][:-1] == [run["html"].with_suffix(".json").name]
    first = json.loads(run["html"].with_suffix(".json").read_text())
    assert data["history"][0]["freeze_seconds"] == first["last_attempt"]["freeze_seconds"]
    assert data["history"][0]["copy_seconds"] == data["history"][1]["copy_seconds"] == first["copy"]["seconds"]
    p = data["prediction"]
    sized = data["environment"]["source"]["tables_bytes"]
    assert sized > 0 and p["copy"]["size_ratio"] == pytest.approx(math.sqrt(1e9 / sized * 5e6 / data["copy"]["rows"]))
    for part in ("copy", "freeze"):
        assert p[part]["seconds"] == pytest.approx(sum(x["predicted"] for x in p[part]["parts"]), abs=0.01)
        assert p[part]["low_seconds"] <= p[part]["seconds"] <= p[part]["high_seconds"]
        assert all(any(x["part"] in a for a in p[part]["assumptions"]) for x in p[part]["parts"])
    setup = next(x for x in p["copy"]["parts"] if x["part"] == "setup")
    assert setup["predicted"] == setup["measured"] == pytest.approx(data["copy"]["parts"]["setup_seconds"], abs=1e-3)
    assert any("production_write_rate" in a for a in p["lag"]["assumptions"])
    # The drain at the expected events: those of the rehearsal's drain, scaled by the write rates.
    drained = next(s for s in first["attempts"][0]["steps"] if s["step"] == "drain")["figures"]["events"]
    assert p["freeze"]["expected_pending_events"] == pytest.approx(
        drained * 2000.0 / data["sync"]["applied_per_second_median"])
    assert SECRET not in done.stdout
    text = migrator("--config", str(cfg), "report", "--out", str(tmp_path / "r"))
    assert text.returncode == 0 and "predicted copy time for production" in text.stdout, text.stderr


def test_production_is_read_from_its_dsn_read_only_and_its_password_never_shown(
        run: dict[str, Any], tmp_path: Path) -> None:
    # "Production": a copy of the rehearsal's legacy database, so that its size is the rehearsal's to the byte.
    name = f"{psycopg.conninfo.conninfo_to_dict(run['source'])['dbname']}_prod"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name),
            psycopg.sql.Identifier(psycopg.conninfo.conninfo_to_dict(run["source"])["dbname"])))
    production = psycopg.conninfo.make_conninfo(ADMIN, dbname=name)
    try:
        with psycopg.connect(production) as conn:
            before = conn.execute("SELECT count(*) FROM pg_class").fetchone()
        cfg = write_config(tmp_path / "m.toml", run["source"], run["target"],
                           f"[rehearsal]\nproduction_dsn = {json.dumps(production)}\n")
        done = migrator("--config", str(cfg), "report", "--out", str(tmp_path / "r"), "--json")
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        with psycopg.connect(production) as conn:
            assert conn.execute("SELECT count(*) FROM pg_class").fetchone() == before
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
    prod = data["prediction"]["production"]
    assert prod["source"].endswith(f"/{name})") and prod["server_version"] and prod["tables"] == len(data["copy"]["tables"])
    assert prod["tables_bytes"] == data["environment"]["source"]["tables_bytes"]
    assert data["prediction"]["copy"]["size_ratio"] == pytest.approx(
        math.sqrt(prod["rows"] / data["copy"]["rows"])) if prod["rows"] else True
    assert "predicted copy time for production" in data["prediction"]["copy"]["text"]
    for text in [done.stdout, done.stderr] + [p.read_text() for p in (tmp_path / "r").iterdir()]:
        assert SECRET not in text


def test_a_production_dsn_naming_the_rehearsals_own_database_is_refused(run: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as refused:
        from_dict({"source": {"dsn": run["source"]}, "target": {"dsn": run["target"]},
                   "rehearsal": {"production_dsn": run["target"] + " application_name=x"}}, env={})
    assert "[rehearsal] production_dsn names the same database as [target] dsn" in str(refused.value)
    assert SECRET not in str(refused.value)


def test_the_page_renders_in_headless_chromium(run: dict[str, Any]) -> None:
    chromium, driver_path = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (shutil.which(chromium) and shutil.which(driver_path)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: scripts/bootstrap.sh installs them")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,3000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(run["html"].as_uri())
        charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert len(charts) >= 6 and all(c.size["width"] > 100 and c.size["height"] > 50 for c in charts)
        assert "The prediction for cutover night" in driver.find_element(By.TAG_NAME, "body").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        driver.quit()


def test_a_control_schema_older_than_the_step_figures_keeps_cutover_steps_without_them(target_dsn: str) -> None:
    # A migration prepared before revision 0015 is cut over by a newer migrator: its steps must not fail for the
    # missing column; the report then models the freeze from what there is.
    with psycopg.connect(target_dsn) as conn:
        state.upgrade(conn)
        conn.execute("ALTER TABLE migrator_control.cutover_step DROP COLUMN figures")
        attempt = state.start_attempt(conn)
        state.step_started(conn, attempt, "drain")
        assert state.step_figures(conn, attempt, "drain", {"events": 3}) is False
        state.step_finished(conn, attempt, "drain", detail="3 events applied")
        assert [(s["step"], s["figures"]) for s in state.attempts(conn)[0]["steps"]] == [("drain", None)]
