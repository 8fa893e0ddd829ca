"""The command line: parses arguments, calls the phase function, renders its result as text or --json.

Only this module turns errors into messages and exit codes (declared once, `errors.ExitCode`): 0 done, 1 a finding
the operator must look at (differences, blockers, no-go, declined), 2 an error, 3 a cutover that stopped (legacy
database writable again), 4 a cutover rolled back because its clients were unhealthy on the target, 5 clients
unhealthy on the target and left there, 64 a usage error, 130 interrupted by SIGINT, 143 stopped by SIGTERM. Each command declares
its own meanings with `exits`, which ends its --help with them; the README's table is generated from the same.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
import psycopg

from migrator import audit as audit_mod
from migrator import config as config_mod
from migrator import log as log_mod
from migrator import state
from migrator.clibase import (
    Ctx,
    code_table,
    confirm,
    declared_codes,
    emit,
    exits,
    interrupted_code,
    json_option,
    keep_going_on_hangup,
    stop_on_signals,
    terminate,
    yes_option,
)
from migrator.errors import Blocked, ExitCode, Interrupted, MigratorError
from migrator.gonogo import NO_SWITCH, OVERRIDES
from migrator.inspect import OVERRIDABLE as OVERRIDABLE_BLOCKERS
from migrator.redaction import database_error, database_hint, scrub

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=click.Command)


# --- exit codes ---------------------------------------------------------------------------------------------------

def exit_codes() -> dict[str, dict[ExitCode, str]]:
    """Every command's exit codes by its full name ("objects sync"), as declared with `exits`."""
    return declared_codes(main)


def exit_code_table() -> str:
    """The README's table of exit codes (clibase.code_table)."""
    return code_table(main)


@exits({code: code.meaning for code in ExitCode})
@click.group()
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="Configuration file (default ./migration.toml).")
@click.option("--log-json/--log-pretty", default=None, help="Log format (default: JSON unless on a terminal).")
@click.option("--log-level", default="info", show_default=True)
@click.version_option(package_name="migrator")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_json: bool | None, log_level: str) -> None:
    """Zero-downtime delta migration of a live PostgreSQL database onto a new server."""
    log_mod.configure(json=log_json, level=log_level)
    if isinstance(ctx.obj, Ctx):  # made by run(), which reads it again to word an error
        ctx.obj.config_path = config_path
    else:
        ctx.obj = Ctx(config_path)


@exits({ExitCode.FINDING: "blockers found"})
@main.command()
@json_option
@click.pass_obj
def inspect(obj: Ctx, as_json: bool) -> None:
    """Readiness report of the legacy database; changes nothing. Exit 0 ready, 1 blockers found."""
    from migrator import inspect as inspect_mod

    report = inspect_mod.run(obj.cfg)
    emit(report, as_json)
    sys.exit(ExitCode.OK if report.ready else ExitCode.FINDING)


@exits({ExitCode.FINDING: "declined, or a preflight check refused"})
@main.command()
@yes_option
@click.option("--override", "overrides", multiple=True, metavar="BLOCKER",
              type=click.Choice(list(OVERRIDABLE_BLOCKERS)),
              help="Accept a blocker by name (large-objects); recorded, shown by status and go/no-go; repeatable.")
@json_option
@click.pass_obj
def prepare(obj: Ctx, yes: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    """Create the control schema and target schema, and install capture triggers on the legacy database. Refuses
    (exit 1, creating nothing) while a blocker stands that --override does not name."""
    from migrator import prepare as prepare_mod

    confirm(yes, "This installs capture triggers and the _migrator schema on the legacy database")
    result = prepare_mod.prepare(obj.cfg, overrides=overrides)
    emit(result, as_json, result.render_text)


@exits()
@main.command()
@click.option("--workers", type=int, default=None, help="Worker processes (default: [copy] workers, CPU count).")
@click.option("--tables", "only", multiple=True, metavar="SCHEMA.TABLE", help="Copy these tables again.")
@click.option("--max-rate", type=float, default=None, metavar="MB/S", help="Read throttle over all workers.")
@click.option("--worker", "as_worker", is_flag=True,
              help="Join a running copy (from any host) and copy chunks until none is left.")
@click.option("--wait", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="With --worker: how long to wait for a copy to start.")
@click.option("--pause", "control", flag_value="pause", help="Ask a running copy to stop reading the source.")
@click.option("--resume", "control", flag_value="resume", help="Let a paused copy go on.")
@json_option
@click.pass_obj
def copy(obj: Ctx, workers: int | None, only: tuple[str, ...], max_rate: float | None, as_worker: bool,
         wait: float, control: str | None, as_json: bool) -> None:
    """Bulk copy in chunks (heap block or key ranges) from one consistent snapshot; re-run to resume after a
    failure."""
    from migrator import copy as copy_mod
    from migrator import copyworker
    from migrator.terminal import CopyProgress

    if control is not None:
        with audit_mod.recorded(obj.cfg, f"copy --{control}", {}):
            emit(copy_mod.pause(obj.cfg) if control == "pause" else copy_mod.resume(obj.cfg), as_json)
        return
    if as_worker:
        emit(copy_mod.WorkerResult(copyworker.work(obj.cfg, wait=wait)), as_json)
        return
    with CopyProgress(enabled=not as_json and sys.stderr.isatty()) as progress:
        result = copy_mod.run(obj.cfg, workers=workers, progress=progress.update, only=list(only) or None,
                              max_rate=max_rate, overall=progress.overall)
    emit(result, as_json)


@exits({ExitCode.OK: "caught up; --follow: stopped by SIGINT or SIGTERM",
        ExitCode.FINDING: "--check-lag: the oldest pending change is older than SECONDS; or refused: the legacy "
                          "database's capture belongs to another migration"})
@main.command()
@click.option("--until-caught-up", "mode", flag_value="once", default=True,
              help="Apply until nothing is pending, then exit 0 (default).")
@click.option("--follow", "mode", flag_value="follow", help="Keep applying; SIGINT/SIGTERM stop cleanly.")
@click.option("--check-lag", type=float, default=None, metavar="SECONDS",
              help="Apply nothing; exit 1 when the oldest pending change is older than SECONDS.")
@json_option
@click.pass_obj
def sync(obj: Ctx, mode: str, check_lag: float | None, as_json: bool) -> None:
    """Replay the delta log onto the target."""
    from migrator import sync as sync_mod

    if check_lag is not None:
        lag = sync_mod.lag(obj.cfg)
        behind = (lag.oldest_pending_seconds or 0.0) > check_lag
        emit(lag, as_json, lambda: f"{lag.pending_events} events pending, oldest "
                                    f"{lag.oldest_pending_seconds or 0:.1f}s ({'over' if behind else 'within'} {check_lag}s)")
        sys.exit(ExitCode.FINDING if behind else ExitCode.OK)
    stop = stop_on_signals()
    live = mode == "follow" and not as_json

    def on_batch(info: sync_mod.BatchInfo, lag: sync_mod.Lag) -> None:
        if live and info.events:
            click.echo(f"applied {info.events} events in {info.seconds:.2f}s; pending {lag.pending_events}, "
                       f"lag {lag.oldest_pending_seconds or 0:.1f}s", err=True)

    result = sync_mod.sync(obj.cfg, follow=mode == "follow", stop=stop, on_batch=on_batch, samples=True)
    emit(result, as_json, result.render_text)


@exits({ExitCode.FINDING: "rows (or files) differ, listed by key",
        ExitCode.ERROR: "could not verify a table (or the files); the report says why"})
@main.command()
@click.option("--tables", multiple=True, metavar="SCHEMA.TABLE", help="Verify only these tables.")
@click.option("--objects", "with_objects", is_flag=True, help="Also prove the files of [objects] in the target store.")
@click.option("--show-values", is_flag=True, help="Show the differing rows' values (patient data!).")
@click.option("--buckets", type=click.Choice(["auto", "ranges", "hashes"]), default="auto", show_default=True,
              help="How rows are grouped: key ranges read through the key's index, or key-hash buckets read by "
                   "sequential scans (for a cold legacy server); auto chooses per table.")
@json_option
@click.pass_obj
def verify(obj: Ctx, tables: tuple[str, ...], with_objects: bool, show_values: bool, buckets: str,
           as_json: bool) -> None:
    """Row parity (and, with --objects, the files): exit 0 identical, 1 differences (listed by key), 2 could not
    verify."""
    from migrator import status as status_mod
    from migrator import verify as verify_mod

    live = not as_json and sys.stderr.isatty()

    def show(what: str, done: int) -> None:
        click.echo(f"\r  {what}: {done:,} ", err=True, nl=False)

    report = verify_mod.verify(obj.cfg, tables=list(tables) or None, show_values=show_values,
                               progress=show if live else None, buckets=cast(verify_mod.Buckets, buckets))
    if live:
        click.echo("", err=True)
    if report.exit_code == ExitCode.ERROR:
        # Any two databases can be compared, but a target `prepare` never saw explains every table it lacks: say so
        # instead. (After `cleanup`, comparing the two sides still makes sense.)
        status_mod.require_prepared(obj.cfg, after_cleanup=True)
    if not with_objects:
        emit(report, as_json, report.render_text)
        sys.exit(report.exit_code)
    from migrator import objects

    found = objects.verify(obj.cfg, show_values=show_values,
                           progress=(lambda files, _: show("objects", files)) if live else None)
    if live:
        click.echo("", err=True)
    emit({"rows": report.to_dict(), "objects": found.to_dict()}, as_json,
          lambda: report.render_text() + "\n" + found.render_text())
    sys.exit(max(report.exit_code, found.exit_code))


@exits()
@main.group("objects")
def objects_group() -> None:
    """The files rows point to (DICOM images, PDFs): copy them into the target store, quarantine those whose row left
    the source."""


@exits({ExitCode.OK: "done; --follow: stopped by SIGINT or SIGTERM",
        ExitCode.FINDING: "some files could not be copied or quarantined (a location outside its store among them)"})
@objects_group.command("sync")
@click.option("--follow", is_flag=True, help="Keep following the rows every poll_interval (the changed ones, from the "
              "delta log; all every full_pass_interval); SIGINT/SIGTERM stop.")
@click.option("--workers", type=int, default=None, help="Files copied at once (default [objects] workers).")
@click.option("--max-rate", type=float, default=None, metavar="MB/S", help="Throttle over all workers.")
@json_option
@click.pass_obj
def objects_sync(obj: Ctx, follow: bool, workers: int | None, max_rate: float | None, as_json: bool) -> None:
    """Copy every listed file the target store lacks or holds with other bytes, and move to the quarantine the files
    whose row left the source (never deleted); exit 1 when some failed."""
    from migrator import objects
    from migrator.terminal import CopyProgress

    stop = stop_on_signals()
    with CopyProgress(enabled=not as_json and sys.stderr.isatty()) as progress:
        result = objects.sync(obj.cfg, follow=follow, stop=stop, workers=workers, max_rate=max_rate,
                              progress=lambda files, nbytes: progress.update("objects", files, nbytes))
    if stop.is_set() and not follow:
        raise Interrupted(f"objects sync stopped before its pass was over ({result.copied} files copied, and "
                          "recorded)")
    emit(result, as_json)
    sys.exit(ExitCode.OK if result.ok else ExitCode.FINDING)


@exits({ExitCode.FINDING: "declined, or some files could not be removed (listed)"})
@objects_group.command("quarantine")
@click.option("--empty", is_flag=True, help="Delete the quarantined files (after asking; audited).")
@yes_option
@json_option
@click.pass_obj
def objects_quarantine(obj: Ctx, empty: bool, yes: bool, as_json: bool) -> None:
    """List the files objects sync moved to the quarantine (their row left the source); --empty deletes them on the
    operator's word, recorded in the audit trail."""
    from migrator import objects

    if not empty:
        emit(objects.listing(obj.cfg), as_json)
        return
    confirm(yes, f"delete the quarantined files under {obj.cfg.objects.target_root or '?'}")
    with audit_mod.recorded(obj.cfg, "objects quarantine --empty", {}) as rec:
        report = objects.listing(obj.cfg, empty=True, audit_id=rec.id)
        rec.detail = f"{report.emptied} file(s) deleted, {len(report.failed)} failed"
        emit(report, as_json)
        if report.failed:
            sys.exit(ExitCode.FINDING)


@exits()
@main.command()
@json_option
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """The migration's state from the control schema, with the sync lag."""
    from migrator import status as status_mod

    emit(status_mod.read(obj.cfg), as_json)


@exits({ExitCode.FINDING: "no-go (also --check), or declined, or refused: another cutover or rollback is running",
        ExitCode.CUTOVER_STOPPED: ExitCode.CUTOVER_STOPPED.meaning,
        ExitCode.ROLLED_BACK_UNHEALTHY: ExitCode.ROLLED_BACK_UNHEALTHY.meaning,
        ExitCode.UNHEALTHY: ExitCode.UNHEALTHY.meaning})
@main.command()
@yes_option
@click.option("--override", "overrides", multiple=True, metavar="ITEM", type=click.Choice(OVERRIDES),
              help="Accept a failing go/no-go item (lag, verify, sessions, target, sequences, blockers, pooler; "
                   "no-switch: no pooler and no switch_command, so no client moves); repeatable.")
@click.option("--hold", "hold_", is_flag=True, help="Postpone: a cutover waits at the go/no-go point; then exit.")
@click.option("--release-hold", is_flag=True, help="Let a held cutover go on; then exit.")
@click.option("--check", is_flag=True, help="Only print the go/no-go checklist; exit 0 go, 1 no-go. Changes nothing.")
@click.option("--on-unhealthy", type=click.Choice(["rollback", "stop", "ignore"]), default="rollback",
              show_default=True,
              help="When the health gate after the switch finds the clients failing on the target: roll back "
                   "automatically (exit 4), PAUSE them again for the operator (exit 5), or let the cutover stand.")
@json_option
@click.pass_obj
def cutover(obj: Ctx, yes: bool, overrides: tuple[str, ...], hold_: bool, release_hold: bool, check: bool,
            on_unhealthy: str, as_json: bool) -> None:
    """Go/no-go, then pause the pooler, freeze, drain, verify, carry sequences, switch clients, resume; report the
    client-visible pause and the freeze window."""
    from migrator import cutover as cutover_mod
    from migrator import gonogo

    if sum((hold_, release_hold, check)) > 1:
        raise click.UsageError("--hold, --release-hold and --check exclude each other")
    if check:
        checklist = gonogo.run(obj.cfg, overrides=overrides)
        emit({"go": checklist.go, "checklist": checklist.to_list()}, as_json,
              lambda: f"go/no-go: {'GO' if checklist.go else 'NO GO'}\n{checklist.render_text()}")
        sys.exit(ExitCode.OK if checklist.go else ExitCode.FINDING)
    if hold_:
        with audit_mod.recorded(obj.cfg, "cutover --hold", {}):
            cutover_mod.hold(obj.cfg, f"held by {state.operator()}")
        emit({"hold": True}, as_json, lambda: "held: a cutover waits at the go/no-go point until "
                                               "`migrator cutover --release-hold`")
        return
    if release_hold:
        with audit_mod.recorded(obj.cfg, "cutover --release-hold", {}) as rec:
            was = cutover_mod.release_hold(obj.cfg)
            rec.detail = None if was else "there was no hold"
        emit({"hold": False, "was_held": was}, as_json,
              lambda: "hold released: a waiting cutover goes on" if was else "there was no hold")
        return
    confirm(yes, "This freezes writes on the legacy database and moves clients to the target")
    keep_going_on_hangup()
    with audit_mod.recorded(obj.cfg, "cutover", {"overrides": list(overrides), "on_unhealthy": on_unhealthy}) as rec:
        _cutover(obj, overrides, on_unhealthy, as_json, rec)


def _cutover(obj: Ctx, overrides: tuple[str, ...], on_unhealthy: str, as_json: bool,
             rec: audit_mod.Recording) -> None:
    from migrator import cutover as cutover_mod
    from migrator.errors import NoGo

    def show_checklist(checklist: Any) -> None:
        if not as_json:
            click.echo("go/no-go:\n" + checklist.render_text(), err=True)

    try:
        report = cutover_mod.run(obj.cfg, overrides=overrides, on_checklist=show_checklist,
                                 on_unhealthy=on_unhealthy,
                                 on_step=None if as_json else lambda s, st: click.echo(f"  {s}: {st}", err=True))
    except NoGo as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "no_go": str(exc), "checklist": exc.checklist}, indent=2))
        raise
    rec.detail = (f"attempt {report.attempt}, write freeze {report.freeze_seconds or 0:.2f}s"
                  if not report.already_done else "nothing to do: the cutover was done")
    emit(report, as_json, report.render_text)


@exits({ExitCode.FINDING: "declined, or refused: the freeze belongs to another migration; --target: refused: "
                          "the rollback has not completed, or another cutover or rollback is running"})
@main.command()
@yes_option
@click.option("--target", "target", is_flag=True,
              help="Release the target instead, frozen by a completed rollback (its rollback capture is removed).")
@click.pass_obj
def release(obj: Ctx, yes: bool, target: bool) -> None:
    """Make the legacy database writable again after a cutover (capture stays installed); with --target, the target
    after a rollback."""
    from migrator import release as release_mod

    if target:
        confirm(yes, "This makes the target writable again after the rollback (writes there are not carried to the "
                     "legacy database: split-brain risk if clients reach it)")
        with audit_mod.recorded(obj.cfg, "release --target", {"target": True}):
            click.echo(release_mod.run_target(obj.cfg).render_text())
        return
    confirm(yes, "This makes the legacy database writable again (split-brain risk if clients moved)")
    with audit_mod.recorded(obj.cfg, "release", {}):
        click.echo(release_mod.run(obj.cfg).render_text())


@exits({ExitCode.FINDING: "declined, or refused: the capture belongs to another migration, or the target is frozen "
                          "after a rollback (without --release-target)"})
@main.command()
@yes_option
@click.option("--release-freeze", is_flag=True, help="Also end a post-cutover freeze (legacy becomes writable).")
@click.option("--release-target", is_flag=True,
              help="Also end a post-rollback freeze of the target (the target becomes writable).")
@click.option("--migration", "migration_id", metavar="ID",
              help="Remove the capture of this migration (its id, as prepare recorded it) without asking its target, "
                   "which is gone; the configured target is left alone.")
@click.option("--drop-control-schema", "drop", is_flag=True,
              help="After writing its history to a file, drop the control schema from the target too.")
@json_option
@click.pass_obj
def cleanup(obj: Ctx, yes: bool, release_freeze: bool, release_target: bool, migration_id: str | None, drop: bool,
            as_json: bool) -> None:
    """Remove the capture triggers and the _migrator schema from the legacy database; write the run's history and
    audit trail to a file, then offer to drop the control schema from the target."""
    from dataclasses import replace

    from migrator import cleanup as cleanup_mod

    confirm(yes, "This removes capture from the legacy database (and from the target: the rollback window ends); "
                  "changes after it are no longer recorded")
    with audit_mod.recorded(obj.cfg, "cleanup", {"release_freeze": release_freeze, "release_target": release_target,
                                                 "migration": migration_id, "drop_control_schema": drop}):
        result = cleanup_mod.run(obj.cfg, release_freeze=release_freeze, migration=migration_id,
                                 release_target=release_target)
    if migration_id is None:
        written = cleanup_mod.export_history(obj.cfg)
        if written is not None and not drop and not yes and sys.stdin.isatty():
            drop = click.confirm(f"The history is in {written}. Drop the control schema from the target too?",
                                 default=False)
        if drop and written is not None:
            cleanup_mod.drop_control_schema(obj.cfg)
        result = replace(result, history_file=str(written) if written else None,
                         control_schema_dropped=drop and written is not None)
    emit(result, as_json, result.render_text)


@exits()
@main.command(name="audit")
@json_option
@click.pass_obj
def audit_(obj: Ctx, as_json: bool) -> None:
    """The audit trail: every operator action (console and command line) and what the guardian did, with who, when,
    the arguments, the outcome and how long it took."""
    emit(audit_mod.read(obj.cfg), as_json)


@exits()
@main.command(name="report")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Directory of the reports and their history (default .migrator/reports).")
@json_option
@click.pass_obj
def report_(obj: Ctx, out: str | None, as_json: bool) -> None:
    """One HTML file (and its JSON) for the current migration from the control schema: timeline, copy, sync lag,
    cutover steps, verify, checklist, operator actions, environment, the prediction for cutover night
    ([rehearsal] production_dsn or production_bytes and production_rows; production_write_rate) and the earlier
    reports of DIR."""
    from pathlib import Path

    from migrator import report

    emit(report.write(obj.cfg, Path(out) if out else None), as_json)


@exits({ExitCode.FINDING: "declined, or refused: nothing moves the clients back (--override no-switch), or another "
                          "cutover or rollback is running",
        ExitCode.CUTOVER_STOPPED: "the rollback stopped; clients stay on the target, which takes writes"})
@main.command(name="rollback")
@yes_option
@click.option("--override", "overrides", multiple=True, type=click.Choice([NO_SWITCH]),
              help="no-switch: roll back although no pooler and no rollback_command moves the clients back.")
@click.option("--reconnect-clients", is_flag=True,
              help="Have the pooler drop the clients' connections before RESUME (KILL), so that clients whose "
                   "prepared statements the switch lost reconnect and prepare them again (runbook 02, 1a).")
@json_option
@click.pass_obj
def rollback_(obj: Ctx, yes: bool, overrides: tuple[str, ...], reconnect_clients: bool, as_json: bool) -> None:
    """After a cutover: replay every change written on the target onto the legacy database, then move clients back
    (pause the pooler, freeze the target, drain, verify, sequences, release the legacy database, switch, resume)."""
    from migrator import rollback
    from migrator.errors import NoGo

    confirm(yes, "This freezes the target and moves clients back to the legacy database")
    keep_going_on_hangup()
    with audit_mod.recorded(obj.cfg, "rollback", {"overrides": list(overrides)}):
        try:
            report = rollback.run(obj.cfg, overrides=overrides, reconnect_clients=reconnect_clients,
                                  on_step=None if as_json else lambda s, st: click.echo(f"  {s}: {st}", err=True))
        except NoGo as exc:
            click.echo(json.dumps({"ok": False, "no_go": str(exc), "checklist": exc.checklist}, indent=2)
                       if as_json else "go/no-go:\n" + exc.checklist, err=not as_json)
            raise
    emit(report, as_json, report.render_text)


@exits()
@main.command()
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="Where to listen (default [console] listen, 127.0.0.1:8765); beyond loopback it needs TLS.")
@click.option("--insecure", is_flag=True, help="Allow an address beyond loopback without TLS (prints a warning).")
@click.pass_obj
def console(obj: Ctx, listen: str | None, insecure: bool) -> None:
    """The cutover-night web page: status, lag, checklist, steps and audit live; actions with an operator token."""
    from migrator import console as console_mod

    console_mod.run(obj.cfg, listen=listen, insecure=insecure)


@exits({ExitCode.FINDING: "the rehearsal failed (see its report); or refused, changing nothing: no --config (or the "
                          "default ./migration.toml) for a rehearsal on test databases, databases not declared test "
                          "databases, a target neither empty nor made by a rehearsal"})
@main.command()
@click.option("--scale", type=float, default=0.01, show_default=True,
              help="Size of the synthetic PACS (1 ≈ 1.5 M rows); without --config only.")
@click.option("--workload", type=click.Choice(["pacs", "generic"]), default=None,
              help="The write load: pacs (the synthetic PACS writers; the default without --config) or generic "
                   "(writers derived from the catalog, any schema; the default with --config).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None, metavar="N",
              help="--workload generic: write transactions per second over all writers (default 20).")
@click.option("--workload-command", metavar="CMD", default=None,
              help="With --config: the site's own load tool instead, started before the copy and stopped (SIGTERM) "
                   "when the cutover begins; then the check is the full verify.")
@click.option("--workload-tps", type=float, default=40.0, show_default=True,
              help="--workload pacs: write transactions/s per writer.")
@click.option("--writers", type=int, default=2, show_default=True)
@click.option("--keep", is_flag=True, help="Keep the throwaway databases afterwards; with --config, keep migrator's "
                                           "capture (and freeze) on the legacy database.")
@json_option
@click.pass_context
def rehearse(ctx: click.Context, scale: float, workload: str | None, rate: float | None, workload_command: str | None,
             workload_tps: float, writers: int, keep: bool, as_json: bool) -> None:
    """The whole migration under a concurrent write workload, timed: on throwaway databases and a synthetic PACS, or,
    with --config naming a file that declares [rehearsal] test_databases = true, on the site's test databases."""
    from migrator import rehearse as rehearse_mod

    obj = ctx.find_object(Ctx)
    assert obj is not None
    if obj.config_path is None:
        if workload == "generic" or workload_command or rate is not None:
            raise Blocked("refused: a rehearsal with --workload generic or --workload-command runs on the site's test "
                          "databases, named by a configuration given with --config (never the default "
                          "./migration.toml, which may be production's); nothing was changed",
                          hint="migrator --config rehearsal.toml rehearse --workload generic (runbooks/00-rehearsal.md)")
        report = rehearse_mod.run(scale=scale, tps=workload_tps, writers=writers, keep=keep, write_config=keep)
    else:
        report = _rehearse_configured(ctx, obj, workload, rate, workload_command, workload_tps, writers, keep)
    emit(report, as_json)
    sys.exit(ExitCode.OK if report.ok else ExitCode.FINDING)


def _rehearse_configured(ctx: click.Context, obj: Ctx, workload: str | None, rate: float | None,
                         command: str | None, tps: float, writers: int, keep: bool) -> Any:
    from pathlib import Path

    from migrator.rehearse import configured, loads

    assert obj.config_path is not None
    if ctx.get_parameter_source("scale") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--scale sizes the synthetic database; a rehearsal with --config uses the file's")
    if command and workload:
        raise click.UsageError("--workload and --workload-command exclude each other")
    kind = "command" if command else (workload or "generic")
    if rate is not None and kind != "generic":
        raise click.UsageError("--rate is the generic workload's")
    if Path(obj.config_path).resolve() == (Path.cwd() / config_mod.DEFAULT_PATH).resolve():
        raise Blocked(f"refused: --config names the default {config_mod.DEFAULT_PATH}, which may be production's; "
                      "a rehearsal writes to both databases; nothing was changed",
                      hint="Give the rehearsal a file of its own (rehearsal.toml) naming the test databases.")
    spec = loads.LoadSpec(kind, writers=writers, rate=rate if rate is not None else 20.0, tps=tps, command=command)
    return configured.run(obj.cfg, spec, keep=keep)


def run() -> None:
    """Entry point with error handling: our errors become a message, a hint and an exit code (`errors.ExitCode`)."""
    obj = Ctx(None)
    signal.signal(signal.SIGTERM, terminate)
    try:
        main.main(standalone_mode=False, obj=obj)
    except click.exceptions.Abort:  # KeyboardInterrupt (SIGINT, or SIGTERM through _terminate), or Ctrl-D at a prompt
        click.echo("interrupted; run the same command again to continue: it resumes from the recorded state",
                   err=True)
        sys.exit(interrupted_code())
    except click.UsageError as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.ERROR)
    except Interrupted as exc:
        _fail("interrupted", scrub(str(exc)), exc.hint)
        sys.exit(interrupted_code())
    except MigratorError as exc:
        _fail("error", scrub(str(exc)), exc.hint)
        sys.exit(exc.exit_code)
    except psycopg.Error as exc:
        _fail("error", f"database error{f' (SQLSTATE {exc.sqlstate})' if exc.sqlstate else ''}: "
                       f"{database_error(exc)}", database_hint(exc, obj.roles))
        sys.exit(ExitCode.ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to continue", err=True)
        sys.exit(interrupted_code())


def _fail(what: str, message: str, hint: str) -> None:
    click.echo(f"{what}: {message}", err=True)
    if hint:
        click.echo(f"what to do: {hint}", err=True)


if __name__ == "__main__":  # pragma: no cover
    run()
