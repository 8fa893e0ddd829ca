"""The console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium): on a
synthetic PACS under its write workload with `sync --follow` running, the page shows the lag moving; Hold is clicked
and appears in the audit trail; a cutover without the token is refused; with it and the typed name it waits at the
hold, and once the hold is released its steps appear live and the freeze window is shown. A screenshot is kept
(the path is printed)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrator import copy, prepare, sync
from migrator.console.actions import database_name
from migrator.rehearse import pacs
from migrator.rehearse.workload import Workload, WorkloadSpec
from tests.console_helpers import TOKENS, configured, serving, trail, until

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: scripts/bootstrap.sh installs them")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: Any, css: str) -> str:
    """The text of every element `css` selects, read in one go (the page re-renders as views arrive)."""
    return str(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText).join('\\n')", css))


def _act(driver: Any, name: str, confirm: str, token: str, overrides: tuple[str, ...] = ()) -> str:
    """Click the action's button, tick the overrides, type the confirmation and send it: the answer shown."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    if token:
        field.send_keys(token)
    before = driver.find_element(By.ID, "result").text
    until(lambda: driver.find_element(By.CSS_SELECTOR, f'button[data-action="{name}"]').is_enabled(), 30)
    driver.find_element(By.CSS_SELECTOR, f'button[data-action="{name}"]').click()
    until(lambda: driver.find_element(By.ID, "confirm").is_displayed(), 10)
    for o in overrides:
        driver.find_element(By.CSS_SELECTOR, f'#confirm-overrides input[value="{o}"]').click()
    driver.find_element(By.ID, "confirm-input").send_keys(confirm)
    driver.find_element(By.ID, "confirm-go").click()
    return str(until(lambda: (lambda t: t if t and t != before and not t.endswith("…") else None)(
        driver.find_element(By.ID, "result").text), 30))


def test_the_page_live_under_a_workload_hold_refusal_cutover_steps_and_freeze(
        browser: Any, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    cfg = configured(tmp_path, source_dsn, target_dsn, "[sync]\nsample_interval = 1.0\n")
    database = database_name(cfg)
    pacs.build(source_dsn, scale=0.002)
    workload = Workload(source_dsn, WorkloadSpec(processes=1, tps=30))
    workload.start()
    stop = threading.Event()
    follower: threading.Thread | None = None
    try:
        prepare.prepare(cfg)
        copy.run(cfg)
        follower = threading.Thread(target=sync.sync, kwargs={"cfg": cfg, "follow": True, "stop": stop,
                                                               "samples": True}, daemon=True)
        follower.start()
        with serving(cfg) as console:
            browser.get(console.url)
            until(lambda: browser.find_element(By.ID, "live").text == "live", 30)
            assert _text(browser, "#phase") == "SYNCING"
            # The lag moves: new samples reach the chart while the workload writes.
            first = until(lambda: (lambda t: t if "samples" in t else None)(_text(browser, "#chart-legend")), 30)
            until(lambda: _text(browser, "#chart-legend") != first, 30)
            assert browser.find_elements(By.CSS_SELECTOR, "#chart polyline.lagline")

            said = _act(browser, "hold", f"hold {database}", TOKENS["alice"])
            assert said.startswith("held"), said
            until(lambda: "cutover --hold" in _text(browser, "#audit tbody tr") and "alice" in _text(browser, "#audit"))
            # The audit row and the phase reach the page in separate pushes: one may come before the other.
            until(lambda: _text(browser, "#phase") == "HELD", 30)

            refused = _act(browser, "cutover", f"cutover {database}", "", ("no-switch",))
            assert "refused: no operator token" in refused, refused
            until(lambda: "unknown (127.0.0.1)" in _text(browser, "#audit"))

            started = _act(browser, "cutover", f"cutover {database}", TOKENS["bob"], ("no-switch",))
            assert started.startswith("cutover started (pid"), started
            until(lambda: "waits at the go/no-go point" in _text(browser, "#intents"), 60)
            assert _act(browser, "release-hold", f"release hold {database}", TOKENS["alice"]) == "hold released"
            # The steps appear as they run, and the freeze window is shown.
            until(lambda: "switch" in _text(browser, ".attempt tbody"), 90)
            until(lambda: "write freeze" in _text(browser, ".attempt h3"), 60)
            head = _text(browser, ".attempt h3")
            assert "cutover attempt 1: done" in head, head
            steps = browser.execute_script(
                "return [...document.querySelectorAll('.attempt tbody tr')].map((e) => e.dataset.step)")
            assert steps[:2] == ["catch_up", "preflight"] and {"freeze", "drain", "switch"} <= set(steps)
            until(lambda: _text(browser, "#phase") == "CUT OVER", 30)  # the phase comes with the next poll of the target
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "console.png"
            browser.set_window_size(1400, int(browser.execute_script("return document.body.scrollHeight")) + 200)
            browser.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
            until(lambda: all(a.outcome != "started" for a in trail(target_dsn)), 60)
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=30)
        workload.stop()
    assert [(a.action, a.actor, a.outcome) for a in trail(target_dsn)] == [
        ("cutover --hold", "alice", "done"), ("cutover", "unknown (127.0.0.1)", "refused"),
        ("cutover", "bob", "done"), ("cutover --release-hold", "alice", "done")]
