#!/usr/bin/env bash
# Quick start, command 2: lint, type-check and the test suite against a real PostgreSQL. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check migrator tests bench
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
