#!/usr/bin/env bash
# Make this machine ready to run migrator: a PostgreSQL server on 127.0.0.1:5432 and a virtualenv in .venv.
# Idempotent. Installs PostgreSQL from the distribution when it is missing and we are root on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "bootstrap: $*" >&2; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1 || ! pg_up; then
  if ls /etc/postgresql/*/main >/dev/null 2>&1; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing PostgreSQL (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql postgresql-client >/dev/null
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    # A fresh throwaway server: let local TCP connections in without a password, as on the project's machines.
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    grep -q "migrator bootstrap" "$hba" || sed -i '1i # migrator bootstrap: trust on loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  else
    say "PostgreSQL is not running on 127.0.0.1:5432 and cannot be installed here (not root on Debian/Ubuntu)."
    say "Start a server, or set MIGRATOR_TEST_DSN / MIGRATOR_REHEARSAL_DSN to one."
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi

for tool in pg_dump pg_restore; do
  command -v "$tool" >/dev/null 2>&1 || say "warning: $tool not on PATH (install postgresql-client)"
done

# apt-get update at most once per run, and only when something is to be installed.
apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# PgBouncer: the cutover tests and bench/cutover.py start one of their own (tests skip without it).
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  if can_apt; then
    say "installing pgbouncer (apt-get)"
    apt_install pgbouncer
    # Only the binary is wanted: the package's own service is not needed on a test machine.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now pgbouncer >/dev/null 2>&1 || true; fi
  else
    say "warning: pgbouncer not installed; the PgBouncer cutover tests will be skipped (apt-get install pgbouncer)"
  fi
fi

# Orthanc with its PostgreSQL index plugin: tests/test_orthanc.py runs a private one behind the pooler.
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ]; then
  if can_apt; then
    say "installing orthanc and orthanc-postgresql (apt-get)"
    apt_install orthanc orthanc-postgresql
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
  else
    say "warning: orthanc not installed; the Orthanc test will be skipped (apt-get install orthanc orthanc-postgresql)"
  fi
fi

# Chromium and its driver: the console's browser tests (tests/test_console_browser.py) drive a real headless one.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if can_apt; then
    say "installing chromium and chromium-driver (apt-get)"
    apt_install chromium chromium-driver
  else
    say "warning: chromium or chromedriver missing; the console's browser test is skipped (apt-get install chromium chromium-driver)"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv 2>/dev/null || {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv .venv
    else
      say "python3 -m venv failed: install python3-venv"; exit 2
    fi
  }
fi
stamp=.venv/.migrator-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing migrator and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
# migrator's own bytecode, as a wheel's install would leave it: an editable install has none, and where
# PYTHONDONTWRITEBYTECODE is set every command would compile its modules again at start (0.15 s of a core each).
# Checked by the source's hash: a module edited since is compiled again in memory; run this again to write it.
.venv/bin/python -m compileall -q --invalidation-mode checked-hash migrator triggers
