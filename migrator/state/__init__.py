"""The control-state store: the one package that reads and writes the control schema on the target.

Runs, per-table copy progress and boundaries, the applied sync position, cutover attempts and steps, and operator
flags live here, so every phase can be resumed from what is recorded. The schema itself is created from
control_schema.sql (what alembic's offline mode writes for the revisions in `versions/`) and upgraded by alembic
(`upgrade`); the functions take an open target connection so that callers can write state in the same transaction as
the data it describes (the applied position commits with the changes it covers).

Callers use the names re-exported here (`state.position(conn)`); the modules hold them by concern:

- `control`: `relation` (how the package's modules name a control table), `upgrade` (`preload_upgrade`, `catch_up`), `exists`, `drop`
- `phases`: the migration row (each phase's time, the copy snapshot, the frozen flag) and each captured table's state
- `copying`: the running copy's exported snapshot, the chunks (block or key ranges), the workers' progress
- `sync_position`: the applied sync position, moved compare-and-set
- `cutover_steps`: cutover and rollback attempts and their steps (with what each measured), the health gate's
  verdicts, the pooler entries a cutover rewrote
- `flags`: every operator flag and every value passed between phases as a flag, each name declared once (among
  them the post-data copy left for sync)
- `operators`: who acts, and the blockers an operator accepted by name
- `object_copies`: the files `objects sync` has proved in the target store, the quarantine of those whose row left
  the source, and where `objects sync --follow` stands in the delta log
- `secret`: the migration's key for keyed hashes of key values
- `rehearsal`: the mark that a rehearsal made this target, each rehearsal's phases and outcome
- `audit`: the audit trail of operator actions (append-only), and the run's history that `cleanup` exports
- `samples`: what sync saw every few seconds (lag, pending events per table, delta log size), for the console
"""

from __future__ import annotations

from migrator.state.audit import (
    AuditRow,
    History,
    audit_end,
    audit_once,
    audit_present,
    audit_rows,
    audit_start,
    history,
)
from migrator.state.control import Conn, catch_up, drop, exists, preload_upgrade, upgrade
from migrator.state.copying import (
    Chunk,
    CopyRun,
    chunk_copied,
    chunks,
    claim_chunk,
    copy_heartbeat,
    copy_run,
    copy_workers,
    finish_copy_run,
    plan_chunks,
    reset_chunks,
    start_copy_run,
    worker_gone,
    worker_progress,
)
from migrator.state.cutover_steps import (
    PoolerEntry,
    attempts,
    finish_attempt,
    health_passes,
    pooler_entries,
    record_attempt_pooler,
    record_health,
    save_pooler_entry,
    set_pointing,
    start_attempt,
    step_figures,
    step_finished,
    step_started,
)
from migrator.state.flags import (
    CLEANUP_FLAG,
    COPY_PAUSED_FLAG,
    HOLD_FLAG,
    POST_DATA_DEFERRED_FLAG,
    POST_DATA_PENDING_FLAG,
    VERIFY_FLAG,
    DeferredPostData,
    add_post_data_pending,
    cleaned_up,
    clear_flag,
    clear_post_data_deferred,
    clear_post_data_pending,
    copy_paused,
    cutover_held,
    cutover_hold,
    defer_post_data,
    flag,
    hold_cutover,
    last_verify,
    pause_copy,
    post_data_deferred,
    post_data_pending,
    record_cleanup,
    record_verify,
    release_cutover_hold,
    resume_copy,
    set_flag,
)
from migrator.state.object_copies import (
    ObjectCopy,
    ObjectPosition,
    QuarantineEntry,
    clock,
    copies_not_listed,
    copies_of_keys,
    objects_copied,
    objects_position,
    quarantine_done,
    quarantine_emptied,
    quarantine_entries,
    record_objects,
    record_quarantine,
    save_objects_position,
)
from migrator.state.operators import Override, operator, overrides, record_override
from migrator.state.phases import (
    Migration,
    MigrationColumn,
    TableState,
    clear,
    mark,
    migration,
    register_tables,
    require_prepared,
    reset_tables,
    set_fingerprint,
    start_migration,
    table_copied,
    table_copy_started,
    tables,
)
from migrator.state.rehearsal import (
    Rehearsal,
    drop_control_schema,
    finish_rehearsal,
    rehearsal_phase,
    rehearsals,
    start_rehearsal,
)
from migrator.state.samples import SyncSample, record_sample, samples
from migrator.state.secret import key_secret
from migrator.state.sync_position import Position, advance_position, init_position, lock_position, position

__all__ = [
    "AuditRow", "History", "SyncSample", "audit_end", "audit_once", "audit_present", "audit_rows", "audit_start",
    "cutover_hold", "drop", "history", "record_sample", "samples",
    "CLEANUP_FLAG", "COPY_PAUSED_FLAG", "HOLD_FLAG", "POST_DATA_DEFERRED_FLAG", "POST_DATA_PENDING_FLAG",
    "VERIFY_FLAG", "Chunk", "Conn", "CopyRun", "DeferredPostData", "Migration", "MigrationColumn",
    "ObjectCopy", "ObjectPosition", "QuarantineEntry", "clock", "copies_not_listed", "copies_of_keys",
    "objects_position", "quarantine_done", "quarantine_emptied", "quarantine_entries", "record_quarantine",
    "save_objects_position", "Override", "PoolerEntry", "Position", "Rehearsal", "TableState", "add_post_data_pending",
    "advance_position", "attempts", "chunk_copied", "chunks", "claim_chunk", "cleaned_up", "clear",
    "clear_flag", "clear_post_data_deferred", "clear_post_data_pending", "copy_heartbeat", "copy_paused",
    "copy_run", "copy_workers", "cutover_held", "defer_post_data", "drop_control_schema", "exists", "finish_attempt",
    "finish_copy_run", "finish_rehearsal", "flag", "health_passes", "hold_cutover", "init_position", "key_secret", "last_verify", "lock_position",
    "mark", "migration", "objects_copied", "operator", "overrides", "pause_copy", "plan_chunks", "preload_upgrade", "catch_up",
    "pooler_entries", "position", "post_data_deferred", "post_data_pending", "record_attempt_pooler",
    "record_cleanup", "record_health", "record_objects", "record_override", "record_verify", "register_tables",
    "rehearsal_phase", "rehearsals",
    "release_cutover_hold", "require_prepared", "reset_chunks", "reset_tables", "resume_copy",
    "save_pooler_entry", "set_fingerprint", "set_flag", "set_pointing", "start_attempt", "start_copy_run",
    "start_rehearsal",
    "start_migration", "step_figures", "step_finished", "step_started", "table_copied", "table_copy_started", "tables",
    "upgrade", "worker_gone", "worker_progress",
]
