"""migrator: zero-downtime delta migration of a live PostgreSQL database (PACS, OIS) onto a new server.

One module (or package) per command, named after it, in the order a migration runs:
inspect → prepare → copy → sync → verify/ → objects → cutover (rollback, release) → cleanup; rehearse/ runs them
all; status, audit, report and console/ show where a migration stands.
copyworker is copy's worker side (claims a chunk, streams it from the source's COPY into the target's); postdata
builds the target's constraints once the rows they relate were read under one snapshot.
The delta log (deltalog/: triggers, snapshot window, freeze, rotation, applier) is shared by prepare, sync, verify,
cutover, rollback and cleanup; switchover (pooler session, switch command, the step runner) by cutover and rollback,
with health (the gate after a switch), guardian (the process that sees a flow through when its own dies) and
recovery (resolving a flow whose process died); faults holds the points where tests make a process die.
Other shared pieces: config (with configmessages, how a refused file is told), errors, passwords and redaction (what
may be printed), log, terminal (drawing on a terminal), db (connections), catalog (what the source holds), schema
(pg_dump/pg_restore of the schema), store (object stores), pooler (PgBouncer), ownership (which migration a capture
serves), gonogo (the checklist), state/ (the control schema).
"""

__version__ = "0.1.0"
