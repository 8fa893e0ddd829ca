"""Names declared once (issue 12): the control state's flags and values passed between phases are typed functions of
`migrator.state`; its errors belong to the error tree; log events are dotted facts; result types render themselves;
no module of migrator is over the bound (600 lines)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import psycopg
import pytest

from migrator import copy, db, state, status
from migrator.catalog import Table
from migrator.config import Config
from migrator.errors import ConcurrentRun, ExitCode, MigratorError
from tests.test_cli import migrator

PACKAGE = Path(__file__).resolve().parent.parent / "migrator"


def _control(cfg: Config) -> psycopg.Connection:
    conn = db.connect(cfg.target_dsn, role="target")
    state.upgrade(conn)
    state.start_migration(conn, "legacy")
    state.mark(conn, "prepared_at")
    conn.commit()
    return conn


# --- state: typed flags ---------------------------------------------------------------------------------------------

def test_post_data_pending_is_a_typed_list_kept_sorted_and_once(cfg: Config) -> None:
    with _control(cfg) as conn:
        assert state.post_data_pending(conn) == []
        state.add_post_data_pending(conn, [("public", "series"), ("app", "note")])
        state.add_post_data_pending(conn, [("public", "series"), ("app", "audit")])
        conn.commit()
        assert state.post_data_pending(conn) == [("app", "audit"), ("app", "note"), ("public", "series")]
        # The stored form is the one prepare has always written: a JSON list of [schema, table].
        assert state.flag(conn, state.POST_DATA_PENDING_FLAG) == \
            '[["app", "audit"], ["app", "note"], ["public", "series"]]'
        state.clear_post_data_pending(conn)
        conn.commit()
        assert state.post_data_pending(conn) == []


def test_copy_pause_is_what_status_reports(cfg: Config) -> None:
    with _control(cfg) as conn:
        state.register_tables(conn, [Table(1, "public", "series", (), ("id",), "primary key", None, 0, 0)])
        state.plan_chunks(conn, "public", "series", [(None, None, 8192)])  # status shows a copy's chunks
        conn.commit()
        copy.pause(cfg)
        assert state.copy_paused(conn)
        assert state.flag(conn, state.COPY_PAUSED_FLAG) is not None
        assert status.read(cfg).to_dict()["copy"]["paused"] is True
        copy.resume(cfg)
        assert not state.copy_paused(conn)
        assert status.read(cfg).to_dict()["copy"]["paused"] is False


def test_a_flag_name_is_spelled_only_in_the_state_package() -> None:
    declared = {state.COPY_PAUSED_FLAG, state.HOLD_FLAG, state.CLEANUP_FLAG, state.VERIFY_FLAG,
                state.POST_DATA_PENDING_FLAG}
    spelled = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "state" and path.parent.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in declared:
                spelled.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value}")
    assert spelled == []


def test_a_moved_sync_position_is_an_error_of_the_tree_with_a_hint(cfg: Config) -> None:
    with _control(cfg) as conn:
        state.init_position(conn, "100:100:")
        conn.commit()
        with pytest.raises(ConcurrentRun) as caught:
            state.advance_position(conn, "90:90:", "110:110:", 1)
        conn.rollback()
    assert isinstance(caught.value, MigratorError)
    assert caught.value.exit_code == ExitCode.ERROR
    assert "migrator sync" in caught.value.hint


# --- log events -----------------------------------------------------------------------------------------------------

_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
_DOTTED = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
def _events(path: Path) -> list[tuple[int, str]]:
    """Every event name a module logs: the first argument of a logger call, placeholders of an f-string as `x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_METHODS and node.args):
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.append((node.lineno, first.value))
        elif isinstance(first, ast.JoinedStr):
            found.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "x"
                                               for v in first.values)))
    return found


def test_log_events_are_dotted_facts() -> None:
    prose = []
    for root in (PACKAGE, PACKAGE.parent / "bench"):
        for path in sorted(root.rglob("*.py")):
            prose += [f"{path.relative_to(PACKAGE.parent)}:{line} {name!r}" for line, name in _events(path)
                      if not _DOTTED.fullmatch(name)]
    assert prose == []


def test_the_event_scan_finds_the_events() -> None:
    """The scan above is not vacuous: it sees the events of a module that logs."""
    names = {name for _, name in _events(PACKAGE / "rehearse" / "workload.py")}
    assert {"rehearse.workload_started", "rehearse.workload_stopped"} <= names


# --- the bound on a module's size -------------------------------------------------------------------------------------

def test_no_module_of_migrator_is_over_600_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 50 and {name: n for name, n in sizes.items() if n > 600} == {}


def test_the_workload_is_still_imported_from_its_old_home() -> None:
    from migrator.rehearse import workload

    for name in ("KINDS", "ROLLED_BACK_MARKER", "Workload", "WorkloadSpec", "WorkloadStats", "verify"):
        assert hasattr(workload, name)


# --- results render themselves ----------------------------------------------------------------------------------------

def test_copy_results_have_to_dict_and_render_text() -> None:
    result = copy.CopyResult("10:10:", [copy.TableCopy("public.series", 3, 2_500_000, 1.25, 2)], ["public.study"],
                             seconds=2.0, post_data_seconds=0.5)
    assert result.render_text() == ("copied 1 tables (3 rows, 2.5 MB) in 2.0s (post-data 0.5s); "
                                    "1 already copied")
    assert result.to_dict()["already_copied"] == ["public.study"]
    assert copy.CopyControl(paused=True).to_dict() == {"paused": True}
    assert copy.CopyControl(paused=False).render_text() == "copy resumed"
    assert copy.WorkerResult(4).to_dict() == {"chunks": 4}
    assert copy.WorkerResult(4).render_text() == "worker done: copied 4 chunks"


def test_the_cli_prints_what_copy_pause_and_status_render(cfg: Config, tmp_path: Path) -> None:
    _control(cfg).close()
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(cfg.source_dsn)}\n[target]\ndsn = {json.dumps(cfg.target_dsn)}\n")
    paused = migrator("--config", str(config), "copy", "--pause")
    assert (paused.returncode, paused.stdout) == (0, "copy paused: workers stop reading within seconds\n")
    resumed = migrator("--config", str(config), "copy", "--resume", "--json")
    assert (resumed.returncode, json.loads(resumed.stdout)) == (0, {"paused": False})
    shown = migrator("--config", str(config), "status")
    assert shown.returncode == 0
    assert shown.stdout == status.read(cfg).render_text() + "\n"


# --- the complexity bound ---------------------------------------------------------------------------------------------

def test_lint_bounds_complexity_at_15_and_the_code_meets_it() -> None:
    import subprocess
    import sys
    import tomllib

    lint = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "C901" in lint["select"] and lint["mccabe"]["max-complexity"] == 15
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "concise",
                           "migrator", "bench", "tests"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "All checks passed!\n")


def test_the_cutover_hold_is_the_flag_state_declares(cfg: Config) -> None:
    from migrator import cutover

    with _control(cfg) as conn:
        cutover.hold(cfg)
        assert state.cutover_held(conn)
        state.release_cutover_hold(conn)
        conn.commit()
        assert not cutover.release_hold(cfg)
        state.hold_cutover(conn, "change board at 14:00")
        conn.commit()
        assert cutover.release_hold(cfg)
        assert not state.cutover_held(conn)


# --- no module reaches another's private names ----------------------------------------------------------------------

def _private_reaches(path: Path) -> list[str]:
    """`from migrator.x import _name` and `module._name` on an imported migrator module, in one file."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("migrator"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path}:{node.lineno} from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("migrator"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_another_modules_private_names() -> None:
    root = PACKAGE.parent
    files = [p for d in ("migrator", "bench", "tests") for p in sorted((root / d).rglob("*.py"))]
    assert len(files) > 50
    assert [hit for p in files for hit in _private_reaches(p)] == []


# --- the engine's schema is the delta log's -------------------------------------------------------------------------

# Modules outside migrator/deltalog/ that may name the engine's schema, and why: none of them reads or writes it.
_SCHEMA_NAMED_ELSEWHERE = {
    "config.py": "declares CAPTURE_SCHEMA (and keeps table filters out of it)",
    "redaction.py": "recognises the schema's name in a server's error message, to hint that prepare has not run",
    "inspect.py": "reads the catalog about the schema (whether it exists, who owns it, its tables left out of the "
                  "rights prepare needs), before anything is installed",
    "schema.py": "pg_dump --exclude-schema: the schema copy leaves the engine's schema out",
    "state/versions/0005_owner.py": "a comment on the target's control table names the owner table in prose",
}


def _names_capture_schema(path: Path) -> list[str]:
    """Lines of one file that name CAPTURE_SCHEMA, or "_migrator" as a schema in a string (`_migrator` alone, or
    followed by a dot: `_migrator.delta_log`); docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        named = ((isinstance(node, ast.Name) and node.id == "CAPTURE_SCHEMA")
                 or (isinstance(node, ast.Attribute) and node.attr == "CAPTURE_SCHEMA")
                 or (isinstance(node, ast.alias) and node.name == "CAPTURE_SCHEMA"))
        in_sql = (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and (node.value.strip('"') == "_migrator" or re.search(r'\b_migrator"?\.', node.value) is not None))
        if named or in_sql:
            found.append(f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}")
    return found


def test_only_the_delta_log_names_the_engines_schema() -> None:
    """Issue 12: migrator/deltalog/ is the only code that reads or writes the engine's schema on the legacy database
    (and on the target during a rollback window); everything else asks it."""
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "deltalog" not in p.relative_to(PACKAGE).parts]
    hits = [hit for p in files for hit in _names_capture_schema(p)]
    assert {h.split(":")[0] for h in hits} <= set(_SCHEMA_NAMED_ELSEWHERE), hits
    assert _names_capture_schema(PACKAGE / "deltalog" / "read.py")  # the check sees a reader
