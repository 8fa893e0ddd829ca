"""The delta log: the only code that reads or writes the engine's schema (`_migrator`) on the legacy database, and on
the target during a rollback window (tests/test_names.py checks that no other module names it, but for catalog
reads about it: inspect, pg_dump's exclusion, an error's hint). Sync, rollback, verify and ownership decide; what they
read and write there is composed here.

The event format (triggers/capture.sql). Every INSERT, UPDATE, DELETE and TRUNCATE on a captured table inserts, in
the writer's own transaction, rows of `_migrator.delta_log`:

    txid         xid8         the writer's 64-bit top-level transaction id (pg_current_xact_id())
    captured_at  timestamptz  when it was logged (lag is measured by it)
    rel          oid          the captured table
    op           "char"       I insert, U update, D delete, T truncate
    key          text[]       tables with a key: the key of a row the change touched, as the text forms of the key
                              columns in key order (an UPDATE that changes a key logs the old key and the new one)
    old_row      text         tables without a key: the row before (U, D), its text form under pinned settings
    new_row      text         tables without a key: the row after (I, U)

An event commits or rolls back with the change. Which events a batch holds is decided by transaction visibility
(snapshot.py), never by their order. The log is a parent table that never holds a row; writers insert into one of its
three children, which rotate (rotation.py).

- snapshot.py  Snapshot, the window of a batch, the decoding of a logged key
- triggers.py  the capture triggers and functions: install, the expected sets, present and enabled, remove
- freeze.py    freeze and release (the capture functions' bodies replaced by ones that reject writes)
- rotation.py  the log's children (and their files, which a truncate replaces), switching writers to the next,
               truncating a drained one, the policy sync applies
- apply.py     the Applier, which writes a batch: sync drives it forward, rollback in reverse
- read.py      the log outside a batch: what is pending, whether a log exists, its lock, a table's events in a window,
               the keys of rows changed since a snapshot (objects sync --follow)
- owner.py     the capture's owner row (triggers/owner.sql): read and record; ownership.py decides who may act
- rollback_position.py  the reverse replay's position on the legacy database (triggers/rollback.sql)
"""
