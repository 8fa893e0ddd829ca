"""migrator: zero-downtime delta migration of a live PostgreSQL database (PACS, OIS) onto a new server.

One module per phase, in the order a migration runs:
inspect → capture (prepare, freeze, cleanup) → copy → replay (sync) → parity (verify) → cutover → rehearse.
Shared pieces: config, errors, log, db (connections), catalog (what the source holds), state (the control schema).
"""

__version__ = "0.1.0"
