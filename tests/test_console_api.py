"""`migrator console`'s API (issue 15) against real databases and real processes: every action is refused without
a token and with a wrong confirmation (and audited), carried out and audited with both; a cutover started from the
page runs detached as the CLI's command, and a conflicting one (from the page or the CLI) is refused; the CLI's
actions show in the console's trail; /metrics and /api/status; where the console may listen; the package ships the
page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import psycopg
import pytest

from migrator import state
from migrator.config import from_dict
from migrator.console import Console, security
from migrator.console.actions import SPECS
from migrator.errors import ConfigError
from tests.console_helpers import TOKENS, act, attempts, call, configured, migrated, serving, trail, until
from tests.helpers import run_sql
from tests.test_cutover import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def quick_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed tokens are slowed down as configured, only less, so that the test does not wait for it."""
    monkeypatch.setattr(security, "FIRST_DELAY", 0.01)


def test_every_action_is_refused_without_a_token_or_with_a_wrong_confirmation_and_audited(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    with serving(cfg) as console:
        for name in SPECS:
            no_token = call(console, f"/api/actions/{name}", {"confirm": "x"})
            wrong_token = call(console, f"/api/actions/{name}", {"confirm": "x"}, token="not-a-token-at-all")
            wrong_confirm = act(console, name, who="bob", confirm=f"{SPECS[name].verb} some_other_db")
            assert no_token[0] == wrong_token[0] == 401, name
            assert "no operator token" in no_token[1]["error"] and "wrong operator token" in wrong_token[1]["error"]
            assert wrong_confirm[0] == 400 and "is not '" in wrong_confirm[1]["error"], name
        # A form another site posts (not JSON), or a request from another origin: refused before the token.
        assert call(console, "/api/actions/hold", "x", token=TOKENS["alice"],
                    headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        assert call(console, "/api/actions/hold", {"confirm": "x"}, token=TOKENS["alice"],
                    headers={"Origin": "http://evil.example"})[0] == 403
    found = trail(target_dsn)
    assert len(found) == 3 * len(SPECS)
    assert all(a.outcome == "refused" and a.via == "console" for a in found)
    assert {a.actor for a in found} == {"unknown (127.0.0.1)", "bob"}
    assert {a.action for a in found} == {s.audit_name for s in SPECS.values()}
    with psycopg.connect(target_dsn) as conn:
        assert not state.cutover_held(conn) and not state.copy_paused(conn)
    assert attempts(target_dsn) == []


def test_quick_actions_are_carried_out_and_audited_with_the_operator_and_pushed_to_every_viewer(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    with serving(cfg) as console:
        stream = urllib.request.urlopen(console.url + "api/events", timeout=30)
        first = _event(stream)
        assert first["phase"]["name"] == "syncing" and first["hold"] is None
        for name, who in (("copy-pause", "alice"), ("copy-resume", "bob"), ("hold", "alice")):
            code, body = act(console, name, who=who)
            assert code == 200, body
        with psycopg.connect(target_dsn) as conn:
            hold = state.cutover_hold(conn)
            assert hold is not None and hold[0] == "held by alice (console)" and not state.copy_paused(conn)
        # The stream pushes the hold and the trail to a viewer without its asking.
        pushed = until(lambda: (lambda v: v if v["hold"] and len(v["audit"]) == 3 else None)(_event(stream)))
        assert pushed["phase"]["name"] == "held" and pushed["intents"][0]["cancel"] == "release-hold"
        # A command-line action shows in the console's trail too.
        assert cli(cfg.path, "cutover", "--release-hold").returncode == 0
        pushed = until(lambda: (lambda v: v if len(v["audit"]) == 4 and v["hold"] is None else None)(_event(stream)))
        assert pushed["audit"][-1]["action"] == "cutover --release-hold"
        stream.close()
        assert call(console, "/api/audit")[1] == json.loads(cli(cfg.path, "audit", "--json").stdout)
    assert [(a.action, a.actor, a.via, a.outcome) for a in trail(target_dsn)] == [
        ("copy --pause", "alice", "console", "done"), ("copy --resume", "bob", "console", "done"),
        ("cutover --hold", "alice", "console", "done"),
        ("cutover --release-hold", state.operator(), "cli", "done")]


def test_a_cutover_from_the_console_runs_detached_a_conflicting_one_is_refused_and_each_is_audited(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    with serving(cfg) as console:
        assert act(console, "hold")[0] == 200
        code, started = act(console, "cutover", overrides=["no-switch", "verify"])
        assert code == 202, started
        pid = started["pid"]
        assert os.getsid(pid) == pid  # a session of its own: it outlives the console and its terminal
        until(lambda: attempts(target_dsn) and [s["step"] for s in attempts(target_dsn)[-1]["steps"]][-1:] ==
              ["preflight"])
        # It waits at the hold, holding the action lock: a second one is refused, from the page and from the CLI.
        assert act(console, "cutover", who="bob", overrides=["no-switch"])[0] == 409
        second = cli(cfg.path, "cutover", "--yes", "--override", "no-switch")
        assert second.returncode == 1 and "another cutover or rollback is running" in second.stderr
        assert act(console, "rollback", overrides=["no-switch"])[0] == 409
        view = until(lambda: (lambda v: v if v["phase"]["name"] == "held" else None)(call(console, "/api/view")[1]))
        assert view["intents"][0]["cancel"] == "cancel"
        # Cancelled from the page: the waiting cutover stops before anything is paused or frozen.
        code, cancelled = act(console, "cancel", who="bob")
        assert code == 200, cancelled
        until(lambda: attempts(target_dsn)[-1]["finished_at"] is not None and not console.runner.running())
        assert act(console, "release-hold")[0] == 200
        code, started = act(console, "cutover", who="bob", overrides=["no-switch", "verify"])
        assert code == 202, started
        done = until(lambda: (lambda v: v if v["phase"]["name"] == "cut over" and v["frozen"] else None)(
            call(console, "/api/view")[1]))
        steps = [s["step"] for s in done["attempts"][-1]["steps"]]
        assert steps[:2] == ["catch_up", "preflight"] and "switch" in steps and steps[-1] == "health"
        assert done["attempts"][-1]["freeze_seconds"] is not None
        # Rolled back from the page, as the CLI's command, once the cutover's process has ended.
        until(lambda: not console.runner.running())
        code, started = act(console, "rollback", overrides=["no-switch"])
        assert code == 202, started
        until(lambda: (lambda a: a["kind"] == "rollback" and a["finished_at"] is not None)(attempts(target_dsn)[-1]))
        until(lambda: all(a.outcome != "started" for a in trail(target_dsn)))
    found = [(a.action, a.actor, a.via, a.arguments, a.outcome) for a in trail(target_dsn)]
    assert found == [
        ("cutover --hold", "alice", "console", {}, "done"),
        ("cutover", "alice", "console", {"overrides": ["no-switch", "verify"]}, "interrupted"),
        ("cutover", "bob", "console", {"overrides": ["no-switch"]}, "refused"),
        ("cutover", state.operator(), "cli", {"overrides": ["no-switch"], "on_unhealthy": "rollback"}, "refused"),
        ("rollback", "alice", "console", {"overrides": ["no-switch"]}, "refused"),
        ("cancel", "bob", "console", {}, "done"),
        ("cutover --release-hold", "alice", "console", {}, "done"),
        ("cutover", "bob", "console", {"overrides": ["no-switch", "verify"]}, "done"),
        ("rollback", "alice", "console", {"overrides": ["no-switch"]}, "done")]
    assert [(a["kind"], a["status"]) for a in attempts(target_dsn)] == [
        ("cutover", "failed"), ("cutover", "done"), ("rollback", "done")]


def test_a_verify_from_the_console_is_recorded_and_its_outcome_audited(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    with serving(cfg) as console:
        code, started = act(console, "verify")
        assert code == 202, started
        assert act(console, "verify", who="bob")[0] == 409  # one at a time
        until(lambda: all(a.outcome != "started" for a in trail(target_dsn)))
        view = until(lambda: (lambda v: v if v["verify"] else None)(call(console, "/api/view")[1]))
    assert view["verify"]["identical"] is True
    assert [(a.action, a.outcome, a.detail) for a in trail(target_dsn) if a.actor == "alice"] == [
        ("verify", "done", "both sides identical")]


def test_release_from_the_console_makes_the_legacy_database_writable_and_is_audited(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    assert cli(cfg.path, "cutover", "--yes", "--override", "no-switch").returncode == 0
    with serving(cfg) as console:
        view = until(lambda: (lambda v: v if v["frozen"] else None)(call(console, "/api/view")[1]))
        assert {a["name"]: a["enabled"] for a in view["actions"]}["release"] is True
        code, body = act(console, "release", who="bob")
        assert code == 200, body
        assert act(console, "release")[0] == 409  # nothing left to release: refused, and audited as failed
    run_sql(source_dsn, "INSERT INTO public.audit (what) VALUES ('writable again')")
    assert [(a.action, a.actor, a.outcome) for a in trail(target_dsn)][-2:] == [
        ("release", "bob", "done"), ("release", "alice", "failed")]


def test_metrics_and_api_status_say_what_status_says(source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    with serving(cfg) as console:
        assert act(console, "hold")[0] == 200
        text = until(lambda: (lambda t: t if "migrator_cutover_held 1" in t else None)(call(console, "/metrics")[1]))
        code, shown = call(console, "/api/status")
    assert code == 200
    expected = json.loads(cli(cfg.path, "status", "--json").stdout)
    assert {k: v for k, v in shown.items() if k not in ("sync", "warnings")} == \
        {k: v for k, v in expected.items() if k not in ("sync", "warnings")}
    assert shown["sync"]["events_applied"] == expected["sync"]["events_applied"]
    sample = re.compile(r'^migrator_[a-z_]+(\{[a-z_]+="[^"]*"\})? (-?[0-9.e+]+|NaN)$')
    names = set()
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) migrator_[a-z_]+ ", line), line
        else:
            assert sample.match(line), line
            names.add(line.split("{")[0].split(" ")[0])
    assert {"migrator_lag_seconds", "migrator_pending_events", "migrator_delta_log_bytes", "migrator_copy_bytes",
            "migrator_copy_chunks_done", "migrator_last_verify_identical", "migrator_frozen",
            "migrator_cutover_held", "migrator_pending_events_by_table"} <= names
    assert 'migrator_pending_events_by_table{table="public.study"} 0' in text
    assert "migrator_frozen 0" in text


def test_where_the_console_may_listen_and_whose_tokens_it_takes(source_dsn: str, target_dsn: str,
                                                                tmp_path: Path) -> None:
    cfg = from_dict({"source": {"dsn": source_dsn}, "target": {"dsn": target_dsn}}, env={})
    with pytest.raises(ConfigError, match="without TLS"):
        security.check_listen(cfg, "0.0.0.0:8765", insecure=False)
    assert "WARNING" in (security.check_listen(cfg, "0.0.0.0:8765", insecure=True) or "")
    assert security.check_listen(cfg, "127.0.0.1:8765", insecure=False) is None
    assert security.check_listen(cfg, "[::1]:8765", insecure=False) is None
    tls = from_dict({"source": {"dsn": source_dsn}, "target": {"dsn": target_dsn},
                     "console": {"tls_certfile": "c.pem", "tls_keyfile": "k.pem"}}, env={})
    assert security.check_listen(tls, "0.0.0.0:8765", insecure=False) is None
    with pytest.raises(ConfigError, match="host:port"):
        from_dict({"source": {"dsn": source_dsn}, "target": {"dsn": target_dsn}, "console": {"listen": "8765"}},
                  env={})
    # The operators file: readable by its owner only, a token each, long enough and not shared.
    ops = tmp_path / "operators.toml"
    ops.write_text('alice = "alice-token-0123456789"\nbob = "bob-token-0123456789ab"\n')
    ops.chmod(0o600)
    filed = configured(tmp_path, source_dsn, target_dsn, 'operators_file = "operators.toml"\n')
    found = security.operators(filed, "me@here")
    assert found.who("alice-token-0123456789") == "alice" and found.who("bob-token-0123456789ab") == "bob"
    assert found.who("alice-token-012345678") is None and found.who(None) is None and found.generated is None
    ops.chmod(0o644)
    with pytest.raises(ConfigError, match="read by others"):
        security.operators(filed, "me@here")
    for text in ('alice = "short"\n', 'a = "same-token-0123456789"\nb = "same-token-0123456789"\n'):
        ops.write_text(text)
        ops.chmod(0o600)
        with pytest.raises(ConfigError):
            security.operators(filed, "me@here")
    made = security.operators(cfg, "me@here")
    assert made.generated is not None and made.who(made.generated[1]) == "me@here"


def test_with_a_certificate_and_key_it_serves_https(source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    import shutil
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True,
                   capture_output=True)
    cfg = configured(tmp_path, source_dsn, target_dsn, 'tls_certfile = "cert.pem"\ntls_keyfile = "key.pem"\n')
    with Console(cfg, listen="127.0.0.1:0", ops=security.Operators.of(TOKENS)) as console:
        assert console.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        context.check_hostname = False
        with urllib.request.urlopen(console.url + "api/view", context=context, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["phase"]["name"] == "not prepared"


def test_the_command_prints_its_address_and_a_token_once_and_serves_the_page(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = configured(tmp_path, source_dsn, target_dsn)
    migrated(cfg, source_dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("migrator")), "--config", str(cfg.path), "console",
                             "--listen", "127.0.0.1:0"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(2)] if proc.stderr else []
        url = re.search(r"console: (http://127\.0\.0\.1:\d+/)", lines[0])
        token = re.search(r"operator token for (\S+) \(shown once.*\): (\S+)$", lines[1].strip())
        assert url and token, lines
        assert token.group(1) == state.operator()
        with urllib.request.urlopen(url.group(1), timeout=30) as r:
            page = r.read().decode()
            assert "Content-Security-Policy" in r.headers and "default-src 'none'" in r.headers["Content-Security-Policy"]
        assert '<script src="/static/console.js"' in page and "http" not in page.split("<body>")[1]
        for asset in ("console.js", "console.css"):
            with urllib.request.urlopen(f"{url.group(1)}static/{asset}", timeout=30) as r:
                assert "//cdn" not in r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code in (0, 143)


def test_every_package_and_the_console_page_ship() -> None:
    """A non-editable install has every package of migrator/ and the console's page (nothing loads from a CDN)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    have = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "migrator").rglob("__init__.py")}
    assert have <= listed
    assert project["package-data"]["migrator.console"] == ["static/*"]
    assert {p.name for p in (ROOT / "migrator" / "console" / "static").iterdir()} == {
        "index.html", "console.js", "console.css"}


def _event(stream: object) -> dict[str, object]:
    """The next `view` event of a server-sent event stream (`clock` events skipped)."""
    kind, data = "", []
    while True:
        line = stream.readline().decode()  # type: ignore[attr-defined]
        if line.startswith("event: "):
            kind = line[7:].strip()
        elif line.startswith("data: "):
            data.append(line[6:].rstrip("\n"))
        elif line == "\n":
            if kind == "view" and data:
                return json.loads("".join(data))  # type: ignore[no-any-return]
            kind, data = "", []
