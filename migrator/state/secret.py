"""The migration's secret for keyed hashes of key values, kept on the target (revision 0008)."""

from __future__ import annotations

from psycopg import sql

from migrator.config import CONTROL_SCHEMA
from migrator.state.control import Conn, relation


def key_secret(conn: Conn) -> bytes | None:
    """The migration's secret for keyed hashes of key values (`redaction.KeyMask`): 32 random bytes, made on first
    use and kept here, on the target, never on the legacy database. None when the control schema predates it (the
    next `prepare` adds it). The caller commits."""
    import secrets

    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.key_secret",))
        row = cur.fetchone()
        if not (row and row[0]):
            return None
        cur.execute(sql.SQL("SELECT secret FROM {} WHERE id = 1").format(relation("key_secret")))
        row = cur.fetchone()
        if row is None:
            # A concurrent first use may have made it meanwhile: keep theirs, so the migration has one secret.
            cur.execute(sql.SQL("INSERT INTO {} (id, secret) VALUES (1, %s) ON CONFLICT (id) DO UPDATE "
                                "SET id = excluded.id RETURNING secret").format(relation("key_secret")),
                        (secrets.token_bytes(32),))
            row = cur.fetchone()
    assert row is not None
    return bytes(row[0])
