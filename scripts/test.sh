#!/usr/bin/env bash
# Quick start, command 2: lint, type-check and the test suite against a real PostgreSQL. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check migrator tests bench
.venv/bin/mypy
# Under CI the database server is the run's own: its commits need not survive a power cut, so the run turns fsync
# off (ALTER SYSTEM, reset when the run ends; every DROP DATABASE of a test's fixtures forces a checkpoint). The tests'
# crashes are of processes (kill -9 of migrator, terminated backends, private clusters with their own settings), never
# of the operating system, so nothing they prove depends on it.
admin="${MIGRATOR_TEST_DSN:-postgresql://postgres@127.0.0.1:5432/postgres}"
if [ -n "${CI:-}" ] && psql "$admin" -qAtc "ALTER SYSTEM SET fsync = off" -c "SELECT pg_reload_conf()" >/dev/null; then
  trap 'psql "$admin" -qAtc "ALTER SYSTEM RESET fsync" -c "SELECT pg_reload_conf()" >/dev/null || true' EXIT
fi
# Two test files at a time (pytest-xdist; a file's tests stay together and in order, so its module fixtures and its
# scenarios' sequence hold): most tests wait on servers, sleeps and subprocesses, not on a core.
.venv/bin/pytest -q -n "${MIGRATOR_TEST_PROCESSES:-2}" --dist loadfile "$@"
