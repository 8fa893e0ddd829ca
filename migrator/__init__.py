"""migrator: zero-downtime delta migration of a live PostgreSQL database (PACS, OIS) onto a new server.

One module (or package) per command, named after it, in the order a migration runs:
inspect → prepare → copy → sync → verify/ → objects → cutover (rollback) → cleanup; rehearse/ runs them all.
copyworker is copy's worker side (claims a chunk, streams it from the source's COPY into the target's).
The delta log (deltalog/: triggers, snapshot window, freeze, rotation, applier) is shared by prepare, sync, verify,
cutover, rollback and cleanup; switchover (pooler session, switch command, the step runner) by cutover and rollback.
Other shared pieces: config, errors, redaction, log, db (connections), catalog (what the source holds), ownership
(which migration a capture serves), gonogo (the checklist), state/ (the control schema).
"""

__version__ = "0.1.0"
