"""The health gate: after the switch, the cutover watches the clients on the target before it says the night went well.

A switch can succeed while the hospital's application cannot work on the new server: the classic case is a client
that prepared its statements once, by name, on its server connection (Orthanc always does; JDBC after a few
executions), behind a PgBouncer that carries no prepared statement across server connections (before 1.21, or
`max_prepared_statements = 0`). Its server connection changes at the switch, and every statement fails from then
on with `prepared statement "..." does not exist`. So the cutover's `health` step (after RESUME, past the point of
no return) watches for `[cutover] health_seconds`:

- a **probe**: a client of its own connects as the clients do (through the pooler to each pooled database, or
  without a pooler to `health_probe_dsn` or the target) and runs a transaction that takes a transaction id; it must
  land on the target and commit, at the start of the window and at its end;
- a **canary** (with a pooler): a client of its own that prepared a statement by name through the pooler before the
  pause, in a transaction, as Orthanc does, and executes it again after RESUME: "carried" when the pooler gave it
  its statement on the new server, "lost" when the target says it does not exist;
- the pooler's **waiting clients** (`SHOW POOLS`: clients still queued at the end of the window, the longest for a
  second or more) and the **client transactions** it carried in the window (`SHOW STATS`, the gate's own excluded);
- the target's **rollbacks and commits** (`pg_stat_database`, the gate's own sessions excluded: they read in
  autocommit and roll nothing back, so every rollback counted is another session's). A server process publishes
  these counters only along with other statistics it has to flush (table accesses, WAL), at most once a second, or
  when it exits: a transaction that fails before it touches a table (a missing prepared statement, above all) may not
  be counted until its server connection does something else or closes, so a short window can miss exactly the
  failure that matters most.
  That is why the canary exists; the counters still catch the errors of transactions that touched tables (a
  permission, a constraint, a missing column), and the commits tell when clients commit on the target again.

The clients are unhealthy when the probe fails, when the canary lost its statement (unless the site declares that no
client prepares statements: `[cutover] prepared_statements = "unused"`), or when rollbacks and waiting clients
together exceed `health_max_errors`. No client traffic in the window is not a failure: the probe (and the canary)
decide then. The verdict and its figures are recorded with the attempt (`state.record_health`). What follows an
unhealthy verdict is `cutover --on-unhealthy`: `rollback` (the default: `settle` runs the armed rollback, and, when
the canary lost its statement, has the pooler drop the clients' connections before RESUME so that they reconnect
and prepare their statements again on the legacy database), `stop` (PAUSE again: clients wait on the target for the
operator), `ignore` (named, recorded; the cutover stands).
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import pq

from migrator import db, pooler
from migrator.config import Config, redact
from migrator.errors import ClientsUnhealthy, MigratorError
from migrator.log import get

SAMPLE_SECONDS = 0.25
"""How often the gate reads the target's counters during its window."""
STUCK_SECONDS = 1.0
"""A client still queued in the pooler at the end of the window, the longest for this long or more, is waiting."""
APPLICATION = "migrator-health"
CANARY_STATEMENT = b"SELECT 1"
POLICIES = ("rollback", "stop", "ignore")


@dataclass
class Verdict:
    """What the gate saw, as recorded with the attempt and reported."""

    mode: str
    verdict: str = "pass"
    """"pass", "fail", or "skipped" (no client was moved)."""
    seconds: float = 0.0
    """How long it watched."""
    decided_after: float = 0.0
    """Seconds from the switch (RESUME, or the end of switch_command) to the verdict."""
    probe: str = ""
    """"ok", or what failed."""
    canary: str = "none"
    """"carried", "lost", "none" (no pooler), or what kept it from telling."""
    client_transactions: int | None = None
    """Transactions the pooler carried for clients in the window (without a pooler: commits and rollbacks)."""
    commits: int = 0
    rollbacks: int = 0
    waiting: int = 0
    first_commit_seconds: float | None = None
    """Seconds from the switch until the target had published a client's commit (None: not within the window)."""
    reasons: list[str] = field(default_factory=list)
    on_unhealthy: str = "rollback"
    pooler: str = ""
    """The pooler's version ("1.18.0"), as go/no-go compares it with a recorded pass."""

    @property
    def healthy(self) -> bool:
        return self.verdict != "fail"

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def figures(self) -> str:
        traffic = ("no client traffic" if self.client_transactions == 0 else
                   f"{self.client_transactions} client transactions" if self.client_transactions is not None else "")
        parts = [f"probe {self.probe}", *([f"canary {self.canary}"] if self.canary != "none" else []), traffic,
                 f"{self.rollbacks} rolled back", f"{self.waiting} waiting",
                 f"first client commit seen after {self.first_commit_seconds:.1f}s"
                 if self.first_commit_seconds is not None else "no client commit seen"]
        return f"{', '.join(p for p in parts if p)} (watched {self.seconds:.1f}s)"

    def line(self) -> str:
        if self.verdict == "skipped":
            return "health gate skipped: no client was moved"
        if self.healthy:
            return f"clients healthy on the target: {self.figures()}"
        return f"clients unhealthy on the target: {'; '.join(self.reasons)} [{self.figures()}]"


# --- the clients of its own ---------------------------------------------------------------------------------------

def _connect(dsn: str, timeout: float) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=max(1, int(timeout)),
                           application_name=APPLICATION)


def _results(pgconn: pq.abc.PGconn, deadline: float) -> list[pq.abc.PGresult] | None:
    """Every result of the command sent on `pgconn`, or None when it did not answer by `deadline` (the pooler may
    hold it in its queue, with no timeout of its own)."""
    while pgconn.is_busy():
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        select.select([pgconn.socket], [], [], min(left, 0.2))
        pgconn.consume_input()
    out = []
    while (res := pgconn.get_result()) is not None:
        out.append(res)
    return out


def _error(results: list[pq.abc.PGresult]) -> tuple[str, str] | None:
    """(SQLSTATE, first line of the message) of the first error among `results`."""
    for res in results:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            state = res.error_field(pq.DiagnosticField.SQLSTATE)
            text = (res.error_message or b"").decode(errors="replace").strip().splitlines()
            return (state.decode() if state else ""), redact(text[0] if text else "error")
    return None


class Canary:
    """A client of the pooler that prepared a statement by name before the pause and executes it after RESUME."""

    def __init__(self, conn: psycopg.Connection[Any] | None, name: bytes, setup: str = "") -> None:
        self.conn = conn
        self.name = name
        self.setup = setup

    @classmethod
    def open(cls, dsn: str, name: str, timeout: float) -> Canary:
        """Prepare (in a transaction, so that the statement and its first execution share a server connection) and
        execute once. Never raises: a canary that could not be set up says why, and tells nothing."""
        deadline = time.monotonic() + timeout
        try:
            conn = _connect(dsn, timeout)
        except psycopg.Error as exc:
            return cls(None, name.encode(), f"not set up: {redact(str(exc)).strip()[:200]}")
        pg = conn.pgconn
        steps: list[Callable[[], None]] = [
            lambda: pg.send_query(b"BEGIN"),
            lambda: pg.send_prepare(name.encode(), CANARY_STATEMENT),
            lambda: pg.send_query_prepared(name.encode(), []),
            lambda: pg.send_query(b"COMMIT"),
        ]
        for send in steps:
            send()
            results = _results(pg, deadline)
            failed = "no answer within the bound" if results is None else _error(results)
            if failed:
                conn.close()
                return cls(None, name.encode(), f"not set up: {failed if isinstance(failed, str) else failed[1]}")
        return cls(conn, name.encode())

    def check(self, timeout: float) -> str:
        """"carried", "lost" (the server does not know the statement), or what else happened."""
        if self.conn is None:
            return self.setup
        pg = self.conn.pgconn
        try:
            pg.send_query_prepared(self.name, [])
        except psycopg.Error as exc:
            return f"failed ({redact(str(exc)).strip()[:200]})"
        results = _results(pg, time.monotonic() + timeout)
        if results is None:
            return f"no answer within {timeout:.1f}s"
        failed = _error(results)
        if failed is None:
            return "carried"
        return "lost" if failed[0] == "26000" else f"failed ({failed[0]} {failed[1][:200]})"

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            self.conn = None


def probe(dsn: str, expect_db: str | None, timeout: float) -> str:
    """A transaction of a new client where the clients connect: "ok", or what failed."""
    deadline = time.monotonic() + timeout
    try:
        conn = _connect(dsn, timeout)
    except psycopg.Error as exc:
        return f"cannot connect ({redact(str(exc)).strip()[:200]})"
    try:
        pg = conn.pgconn
        pg.send_query(b"BEGIN; SELECT current_database(), current_setting('transaction_read_only'), "
                      b"pg_current_xact_id()::text; COMMIT")
        results = _results(pg, deadline)
        if results is None:
            return f"no answer within {timeout:.1f}s"
        failed = _error(results)
        if failed:
            return f"failed ({failed[0]} {failed[1][:200]})"
        row = next((r for r in results if r.status == pq.ExecStatus.TUPLES_OK and r.ntuples), None)
        got = [(row.get_value(0, i) or b"").decode() for i in range(2)] if row is not None else ["", ""]
        if expect_db and got[0] != expect_db:
            return f"served by database {got[0]!r}, not the target's {expect_db!r}"
        if got[1] == "on":
            return "the target's transactions are read-only"
        return "ok"
    finally:
        conn.close()


# --- the gate -------------------------------------------------------------------------------------------------------

def probe_dsns(cfg: Config) -> list[str]:
    """Where the probe connects: each pooled database through the pooler, or the target (health_probe_dsn first)."""
    c = cfg.cutover
    if c.uses_pooler:
        base = c.health_probe_dsn or c.pgbouncer_admin_dsn
        assert base is not None
        return [psycopg.conninfo.make_conninfo(base, dbname=name) for name in c.pooler_databases]
    return [c.health_probe_dsn or cfg.target_dsn]


def _counters(target: psycopg.Connection[Any]) -> tuple[int, int]:
    row = target.execute("SELECT xact_commit, xact_rollback FROM pg_stat_database "
                         "WHERE datname = current_database()").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _pooled(admin: pooler.Admin | None, names: tuple[str, ...]) -> tuple[int, int]:
    """(transactions the pooler carried for `names` since it started, clients waiting STUCK_SECONDS or more)."""
    if admin is None:
        return 0, 0
    stats = admin.stats()
    xacts = sum(int(stats[n]["total_xact_count"]) for n in names if n in stats)
    waiting = 0
    for p in admin.pools():
        if p["database"] in names and float(p["maxwait"]) + float(p.get("maxwait_us") or 0) / 1e6 >= STUCK_SECONDS:
            waiting += int(p["cl_waiting"])
    return xacts, waiting


class _Watch:
    """One window of the gate: its sessions, and what it counts of its own."""

    def __init__(self, cfg: Config, verdict: Verdict, switched_at: float) -> None:
        self.cfg = cfg
        self.v = verdict
        self.switched_at = switched_at
        self.own_commits = 0
        self.own_xacts = 0
        self.expect_db = str(pooler.target_location(cfg.target_dsn, cfg.cutover.pooler_target).get("dbname") or "")
        self.names = tuple(cfg.cutover.pooler_databases) if cfg.cutover.uses_pooler else ()

    def read(self, target: psycopg.Connection[Any]) -> tuple[int, int]:
        self.own_commits += 1  # this very read, an autocommit transaction of its own
        return _counters(target)

    def probe_all(self, timeout: float) -> str:
        said = []
        for dsn in probe_dsns(self.cfg):
            self.own_commits += 1
            self.own_xacts += 1 if self.names else 0
            said.append(probe(dsn, self.expect_db, timeout))
        return next((s for s in said if s != "ok"), "ok")

    def run(self, canary: Canary | None, admin: pooler.Admin | None, target: psycopg.Connection[Any]) -> None:
        c, v = self.cfg.cutover, self.v
        t0 = time.monotonic()
        bound = max(c.health_seconds, 1.0)
        v.pooler = ".".join(map(str, admin.version())) if admin is not None else ""
        base, (base_xacts, _) = self.read(target), _pooled(admin, self.names)
        if canary is not None:
            self.own_xacts += 1
            v.canary = canary.check(bound)
        first = self.probe_all(bound)
        while time.monotonic() < t0 + c.health_seconds:
            time.sleep(SAMPLE_SECONDS)
            commits = self.read(target)[0] - base[0] - self.own_commits
            if v.first_commit_seconds is None and commits > 0:
                v.first_commit_seconds = time.monotonic() - self.switched_at
        last = self.probe_all(bound)
        end, (end_xacts, v.waiting) = self.read(target), _pooled(admin, self.names)
        v.seconds = time.monotonic() - t0
        v.probe = first if first != "ok" else last
        v.commits = max(0, end[0] - base[0] - self.own_commits)
        v.rollbacks = max(0, end[1] - base[1])
        v.client_transactions = (max(0, end_xacts - base_xacts - self.own_xacts) if admin is not None
                                 else v.commits + v.rollbacks)


def watch(cfg: Config, *, canary: Canary | None, switched_at: float, moved: bool,
          on_unhealthy: str = "rollback") -> Verdict:
    """Watch the clients on the target for `[cutover] health_seconds` and decide. Never raises for what it sees (a
    failure to observe is a reason of the verdict); the verdict is "skipped" when no client was moved."""
    c = cfg.cutover
    v = Verdict(mode="pgbouncer" if c.uses_pooler else "switch_command", on_unhealthy=on_unhealthy)
    if not moved:
        v.verdict = "skipped"
        return v
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True, application_name=APPLICATION,
                        connect_timeout=5) as target:
            admin = pooler.Admin(c.pgbouncer_admin_dsn, connect_timeout=3) if c.pgbouncer_admin_dsn else None
            try:
                _Watch(cfg, v, switched_at).run(canary, admin, target)
            finally:
                if admin is not None:
                    admin.close()
    except (MigratorError, psycopg.Error) as exc:
        v.reasons.append(f"the gate could not watch: {redact(str(exc)).strip().splitlines()[0][:200]}")
    _decide(cfg, v)
    v.decided_after = time.monotonic() - switched_at
    log = get(phase="cutover")
    if v.healthy:
        log.info("cutover.health", **v.to_dict())
    else:
        log.error("cutover.health", **v.to_dict())
    return v


def _decide(cfg: Config, v: Verdict) -> None:
    c = cfg.cutover
    if v.probe and v.probe != "ok":
        v.reasons.append(f"the probe failed: {v.probe}")
    if v.canary == "lost" and c.prepared_statements != "unused":
        v.reasons.append("a statement the canary prepared before the switch does not exist on the target: the pooler "
                         "does not carry prepared statements across server connections, so clients that prepare "
                         "statements by name fail there")
    errors = v.rollbacks + v.waiting
    if errors > c.health_max_errors:
        v.reasons.append(f"{v.rollbacks} transactions rolled back on the target and {v.waiting} clients left waiting "
                         f"in the pooler (bound [cutover] health_max_errors = {c.health_max_errors})")
    v.verdict = "fail" if v.reasons else "pass"


# --- what follows an unhealthy verdict ------------------------------------------------------------------------------

ADVICE_PREPARED = ("the pooler does not carry prepared statements: use PgBouncer 1.21 or newer with "
                   "max_prepared_statements > 0, or make the clients stop preparing statements by name (JDBC "
                   "prepareThreshold=0), or switch with switch_command restarting the application (runbook 02); if "
                   "no client prepares statements, declare [cutover] prepared_statements = \"unused\"")


def pause_again(cfg: Config) -> str:
    """--on-unhealthy=stop: PAUSE the pooled databases again (clients wait on the target). Never raises."""
    c = cfg.cutover
    if c.pgbouncer_admin_dsn is None:
        return "without a pooler nothing holds the clients: they go on on the target"
    try:
        with pooler.Admin(c.pgbouncer_admin_dsn) as admin:
            for name in c.pooler_databases:
                admin.pause(name, c.pause_timeout)
    except MigratorError as exc:
        return f"PAUSING AGAIN FAILED ({exc}): clients go on failing on the target"
    return f"the pooler is paused again: clients wait on the target ({', '.join(c.pooler_databases)})"


def settle(cfg: Config, target: psycopg.Connection[Any], verdict: Verdict, paused: str,
           on_step: Callable[[str, str], None] | None) -> ClientsUnhealthy:
    """The error an unhealthy cutover ends with, after the rollback when the policy is "rollback" (run under the
    cutover's action lock, with a guardian of its own)."""
    from migrator import rollback  # the rollback imports what the cutover does

    advice = ADVICE_PREPARED if verdict.canary == "lost" else "fix what the gate saw on the target"
    if verdict.on_unhealthy == "stop":
        return ClientsUnhealthy(f"{verdict.line()}; --on-unhealthy=stop: {paused}", rolled_back=False,
                                hint=f"{_decide_now(cfg)} Before the next cutover: {advice}.")
    log = get(phase="cutover")
    log.error("cutover.unhealthy_rollback", reconnect=verdict.canary == "lost")
    try:
        report = rollback.run_held(cfg, target, on_step=on_step, reconnect_clients=verdict.canary == "lost")
    except MigratorError as exc:
        return ClientsUnhealthy(f"{verdict.line()}; THE AUTOMATIC ROLLBACK FAILED: {exc}", rolled_back=False,
                                hint=exc.hint or "Run `migrator rollback --yes` now.")
    pause = f" (clients paused {report.pause_seconds:.2f}s)" if report.pause_seconds is not None else ""
    again = "; their connections were dropped so that they reconnect" if verdict.canary == "lost" else ""
    return ClientsUnhealthy(
        f"rolled back: {verdict.line()}; the automatic rollback moved them back to the legacy database{pause}, "
        f"{report.events_replayed} events written on the target replayed, nothing lost{again}", rolled_back=True,
        hint=f"Before the next cutover: {advice}. `migrator status` shows the recorded verdict.")


def _decide_now(cfg: Config) -> str:
    if not cfg.cutover.uses_pooler:
        return ("Decide now: `migrator rollback --yes` moves the clients back to the legacy database (rollback_command), "
                "losing nothing.")
    first = cfg.cutover.pooler_databases[0]
    return ("Decide now: `migrator rollback --yes --reconnect-clients` moves the clients back to the legacy database, "
            "losing nothing (--reconnect-clients: the pooler drops their connections, so that clients whose prepared "
            f"statements were lost prepare them again), or `RESUME {first}` on the PgBouncer admin console leaves "
            "them on the target.")
