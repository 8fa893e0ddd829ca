#!/usr/bin/env bash
# Quick start, command 1: a whole rehearsal (inspect → prepare → copy → sync → cutover → verify) on throwaway
# databases under a concurrent PACS write workload. Extra arguments go to `migrator rehearse` (e.g. --scale 0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/migrator rehearse "$@"
