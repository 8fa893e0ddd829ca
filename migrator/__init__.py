"""migrator: zero-downtime delta migration of a live PostgreSQL database (PACS, OIS) onto a new server.

One module per phase, in the order a migration runs:
inspect → prepare → copy → sync → parity (verify) → cutover → rehearse; cleanup ends it.
The delta log (deltalog/: triggers, snapshot window, freeze, rotation, applier) is shared by prepare, sync, cutover,
rollback and cleanup. Other shared pieces: config, errors, log, db (connections), catalog (what the source holds),
state (the control schema).
"""

__version__ = "0.1.0"
