"""Which databases a rehearsal on the site's test databases may write to, and how it starts over on its own target.

A rehearsal changes both databases of the configuration, so before it changes anything (`admit`) it requires that
the configuration declares them test databases (`[rehearsal] test_databases = true`), that the target is empty or
was made by an earlier rehearsal (its control schema holds the rehearsal mark, `state.rehearsals`, which a rehearsal
writes there before anything else), and that the legacy database holds no capture but that earlier rehearsal's.
A refusal changes nothing. Starting over (`start_over`) removes the earlier rehearsal's capture from the legacy
database (`migrator cleanup`, the freeze included), then every user object from the target, its control schema
last, so that a rehearsal killed half-way through it is still recognised as a rehearsal's target.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass

from psycopg import sql

from migrator import cleanup, db, ownership, state
from migrator.config import CONTROL_SCHEMA, Config
from migrator.deltalog import triggers
from migrator.errors import Blocked, MigratorError
from migrator.log import get
from migrator.rehearse import pacs


@dataclass(frozen=True)
class Admitted:
    earlier: int
    """Rehearsals recorded on the target (0: it is empty)."""
    legacy_capture: bool
    """The legacy database holds the earlier rehearsal's capture (kept with --keep, or left by a failure)."""


def admit(cfg: Config, workload: str) -> Admitted:
    """Refuse, changing nothing, unless both databases may be written by a rehearsal (see the module docstring)."""
    log = get(phase="rehearse")
    if not cfg.rehearsal.test_databases:
        log.warning("rehearse.refused", reason="not_test_databases")
        raise Blocked("refused: the configuration does not declare its databases test databases, and a rehearsal "
                      "writes to both (a workload on the legacy database, a migration to the target)",
                      hint="Use a configuration of its own for the rehearsal, pointing at a restored copy of the "
                           "legacy database and an empty target, with [rehearsal] test_databases = true "
                           "(runbooks/00-rehearsal.md).")
    db.refuse_same_database(cfg.source_dsn, cfg.target_dsn)
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target, \
            db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        earlier = state.rehearsals(target)
        found = ownership.foreign_objects(target)
        if (state.exists(target) or found) and not earlier:
            log.warning("rehearse.refused", reason="target_not_empty", objects=len(found))
            what = (f"{len(found)} object(s) no rehearsal made: {', '.join(found[:10])}{' ...' if len(found) > 10 else ''}"
                    if found else "a migration's control schema that no rehearsal made")
            raise Blocked(f"refused: the target holds {what}; a rehearsal migrates only into an empty database or "
                          "one an earlier rehearsal made", hint="Point [target] at a new, empty database (createdb).")
        m = state.migration(target) if earlier else None
        ownership.check(source, m, "rehearse")
        if workload == "pacs" and not pacs.is_synthetic(source):
            raise Blocked("refused: --workload pacs writes the synthetic PACS schema, which the legacy database "
                          "does not hold", hint="Use --workload generic (any schema) or --workload-command.")
        capture = triggers.has_capture(source)
    return Admitted(len(earlier), capture)


def start_over(cfg: Config, admitted: Admitted) -> str:
    """Remove what an earlier rehearsal left (its capture on the legacy database, everything on the target); what
    was done, for the report."""
    if not admitted.earlier:
        return ""
    done = []
    if admitted.legacy_capture:
        cleanup.run(cfg, release_freeze=True, release_target=True)
        done.append("removed its capture from the legacy database")
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        target.execute(sql.SQL(_EMPTY).format(control=sql.Literal(CONTROL_SCHEMA)))
        left = ownership.foreign_objects(target)
        if left:
            raise MigratorError(f"the target still holds {len(left)} object(s) after emptying it: "
                                f"{', '.join(left[:10])}", hint="Drop them by hand (or recreate the target database "
                                                               "empty) and rehearse again.")
        state.drop_control_schema(target)
    get(phase="rehearse").info("rehearse.target_emptied", rehearsals_before=admitted.earlier)
    return "; ".join(["emptied the target an earlier rehearsal made", *done])


def mark(cfg: Config, workload: str) -> int:
    """Record the rehearsal on the (empty) target before anything else is made there; its id."""
    with db.session(cfg.target_dsn, role="target") as target:
        state.upgrade(target)
        rehearsal_id = state.start_rehearsal(target, workload, db.describe_dsn(cfg.source_dsn), _os_user())
        target.commit()
    return rehearsal_id


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


# Every user object of the target, in the order that needs the fewest cascades: schemas other than public (and the
# control schema, dropped last by migrator.state), extensions, then public's relations, routines and types. The
# statements are composed by the server (format with %I, and reg* types that print themselves quoted); the block
# itself is composed with psycopg.sql (it holds the control schema's name as a literal).
_EMPTY = """
DO $empty$
DECLARE r record;
BEGIN
    FOR r IN SELECT nspname FROM pg_namespace
              WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public', {control})
                AND nspname NOT LIKE 'pg\\_%'
    LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', r.nspname);
    END LOOP;
    FOR r IN SELECT extname FROM pg_extension WHERE extname <> 'plpgsql' LOOP
        EXECUTE format('DROP EXTENSION IF EXISTS %I CASCADE', r.extname);
    END LOOP;
    FOR r IN SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c
              WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
                AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                                          AND d.deptype IN ('e', 'i', 'a'))
    LOOP
        EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                       CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.rel);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS routine, p.prokind FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace
                AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                                          AND d.deptype = 'e')
    LOOP
        EXECUTE format('DROP %s IF EXISTS %s CASCADE', CASE r.prokind WHEN 'a' THEN 'AGGREGATE' ELSE 'ROUTINE' END,
                       r.routine);
    END LOOP;
    FOR r IN SELECT t.oid::regtype AS type, t.typtype FROM pg_type t
              WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('c', 'd', 'e', 'r', 'm')
                AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
                AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
                                                          AND d.deptype IN ('e', 'i'))
    LOOP
        EXECUTE format('DROP %s IF EXISTS %s CASCADE', CASE r.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, r.type);
    END LOOP;
END
$empty$
"""
