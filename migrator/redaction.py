"""What may be printed about rows: database errors without row values, and keys that may be patient data as hashes.

Two rules, used by every phase that prints (logs, errors, reports):

* A server's error names what failed (SQLSTATE, constraint, table, column) but never the row: PostgreSQL puts row
  values in DETAIL (`Failing row contains (...)`, `Key (mrn)=(...)`), in CONTEXT (a COPY's column value), in the
  query text it echoes, and, for data exceptions, in the message itself (`invalid input syntax for type date:
  "..."`). `database_error` builds the message from the error's fields; `scrub` cleans free text (log lines, a
  traceback, an error's message) by the same rules, and removes passwords
  (`config.redact`, from migrator/passwords.py).
* A key value is printed as it is only when its column is an integer or a uuid (surrogate ids and generated UIDs name a
  row without telling anything about a patient). Any other key column (text, varchar, dates, timestamps, numeric,
  composites) may be a patient's name, birth date or MRN, or a DICOM UID that embeds one (the DICOM de-identification
  profile replaces UIDs for that reason), and is printed as `hmac:<16 hex>`: an HMAC-SHA256 keyed by the migration's
  secret (`state.key_secret`, on the target), so the same key reads alike in every finding and run of a migration, and
  a dictionary of names cannot reverse it. `--show-values` prints the values.

`database_hint` says what to do about a database error no phase turned into one of ours, by its SQLSTATE.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator.config import CAPTURE_SCHEMA, CONTROL_SCHEMA, redact

PLAIN_KEY_TYPES = frozenset({"smallint", "integer", "bigint", "uuid"})
"""Key column types whose values are printed as they are; every other key value is printed as its keyed hash."""
HIDDEN = "…"

# A line that begins a part of a server message that may carry row values or query text (with literal values), and
# what ends it: a hint (kept), or the next section of a Python traceback.
_VALUE_SECTION = re.compile(r"^\s*(?:ERROR:\s+)?(?:DETAIL|CONTEXT|QUERY|STATEMENT|LINE \d+):")
_SECTION_END = re.compile(r"^\s*(?:HINT:|Traceback \(most recent call last\)|The above exception was|"
                          r"During handling of the above exception)")
_FAILING_ROW = re.compile(r"(Failing row contains )\(.*")
_KEY_VALUES = re.compile(r"(Key \([^)]*\)=)\(.*")
# Data errors that quote the value they could not take (PostgreSQL's wording): `invalid input syntax for type date:
# "..."`, `malformed array literal: "..."`, `date/time field value out of range: "..."`, `value "..." is out of range
# for type integer`, `invalid value "..." for "MM"`, `invalid byte sequence for encoding "UTF8": 0x...`.
_DATA_VALUE = re.compile(r'((?:invalid input|literal|out of range)[^"\n]*?:\s+)".*"')
_VALUE_QUOTED = re.compile(r'((?:^|\s)(?:invalid )?value )".*?"(?=( is out of range| for "))')
_BYTE_SEQUENCE = re.compile(r'(invalid byte sequence for encoding "[^"\n]*": ).*')


def scrub(text: str) -> str:
    """Free text (a log value, an error message, a traceback) without passwords and without the row values a server
    error may carry: DETAIL, CONTEXT and echoed query text are dropped up to the next hint or traceback section,
    and `Failing row contains (...)`, `Key (...)=(...)` and the values data errors quote are cut wherever they are."""
    kept: list[str] = []
    hiding = False
    for line in redact(text).split("\n"):
        if _VALUE_SECTION.match(line):
            hiding = True
            continue
        if hiding and not _SECTION_END.match(line):
            continue
        hiding = False
        line = _FAILING_ROW.sub(rf"\1({HIDDEN})", line)
        line = _KEY_VALUES.sub(rf"\1({HIDDEN})", line)
        line = _DATA_VALUE.sub(rf'\1"{HIDDEN}"', line)
        line = _VALUE_QUOTED.sub(rf'\1"{HIDDEN}"', line)
        line = _BYTE_SEQUENCE.sub(rf"\1{HIDDEN}", line)
        kept.append(line)
    return "\n".join(kept)


def database_error(exc: psycopg.Error) -> str:
    """A server's (or the driver's) error as it may be printed: its first message line without values, then the
    SQLSTATE and the names of the constraint, table and column involved (never DETAIL or CONTEXT)."""
    diag = exc.diag
    primary = diag.message_primary or (str(exc).strip().split("\n")[0] if str(exc).strip() else type(exc).__name__)
    names: list[str] = []
    if diag.sqlstate:
        names.append(f"SQLSTATE {diag.sqlstate}")
    for label, value in (("constraint", diag.constraint_name), ("table", diag.table_name),
                         ("column", diag.column_name)):
        if value and f'"{value}"' not in primary:
            names.append(f"{label} {value}")
    return scrub(primary).strip() + (f" ({', '.join(names)})" if names else "")


@dataclass(frozen=True)
class KeyMask:
    """How key values are printed: plain for integer and uuid columns (or with `show_values`), otherwise as an HMAC
    keyed by the migration's secret."""

    secret: bytes = field(repr=False)
    show_values: bool = False

    @classmethod
    def ephemeral(cls, *, show_values: bool = False) -> KeyMask:
        """A mask with a secret of this process only: hashes do not match across runs, but never show a value.
        For when the control schema is not there (yet)."""
        return cls(secrets.token_bytes(32), show_values)

    @classmethod
    def of(cls, target: psycopg.Connection[Any], *, show_values: bool = False) -> KeyMask:
        """The migration's mask, from the control schema on `target` (making the secret on first use; the caller
        commits); a process-local one when the control schema, or its secret table, is missing."""
        from migrator import state

        secret = state.key_secret(target) if state.exists(target) else None
        return cls(secret, show_values) if secret is not None else cls.ephemeral(show_values=show_values)

    def hashes(self, column_type: str) -> bool:
        return not self.show_values and column_type not in PLAIN_KEY_TYPES

    def value(self, column_type: str, value: str | None) -> str:
        """One key column's value (its text form) as it may be printed."""
        if value is None:
            return "NULL"
        if not self.hashes(column_type):
            return value
        return "hmac:" + hmac.new(self.secret, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def key(self, columns: Sequence[str], types: Sequence[str], values: Sequence[str | None]) -> str:
        """A row's key as `(col=value, ...)`."""
        return "(" + ", ".join(f"{c}={self.value(t, v)}"
                               for c, t, v in zip(columns, types, values, strict=True)) + ")"


# --- database errors that reach the operator unnamed --------------------------------------------------------------
# A psycopg error no phase turned into one of ours: the hint follows its SQLSTATE (class), and the schema it names.

def database_hint(exc: psycopg.Error, roles: str = "") -> str:
    """What to do about a database error, by its SQLSTATE; `roles` names the roles migrator connects as (for a
    privilege error), e.g. "source: alice, target: bob"."""
    state = exc.sqlstate or ""
    text = str(exc)
    if state in ("42P01", "42704", "3F000", "42883"):  # undefined table, object, schema, function
        schema = re.search(rf'(?<!\w)"?({re.escape(CONTROL_SCHEMA)}|{re.escape(CAPTURE_SCHEMA)})"?\.', text)
        if schema and schema.group(1) == CONTROL_SCHEMA:
            return "The target has no control schema: run `migrator prepare --yes` first."
        if schema:
            return ("The legacy database has no capture (schema _migrator): run `migrator prepare --yes` first; "
                    "if `migrator cleanup` removed it, this migration is over.")
        return ("An object named above does not exist: it was dropped or renamed during the migration (DDL), or "
                "[tables] names something the servers do not have. Check it on both servers; after DDL, follow "
                "the runbook (prepare, copy, sync).")
    if state == "42501" or state.startswith("28"):  # insufficient privilege; invalid authorization
        who = f" ({roles})" if roles else ""
        return (f"A role migrator connects as{who} lacks the privilege named above. Grant it (the source role must "
                "read the captured tables and create triggers on them; the target role must be a superuser or "
                "the database owner with SET ON PARAMETER session_replication_role), or connect as a role that "
                "has it; then run the command again.")
    if state == "55P03":  # lock not available
        return ("Another session holds a lock migrator needs (pg_locks shows which); run the command again when it "
                "has finished, or end that session.")
    if state == "57014":  # query canceled: statement_timeout, or cancelled by an operator
        return ("A statement was cancelled (statement_timeout, or pg_cancel_backend); run the command again; if it "
                "repeats, raise [sync] statement_timeout or find what slows the server.")
    if state in ("40001", "40P01"):  # serialization failure, deadlock
        return "A concurrent transaction conflicted with this one; run the command again."
    if state.startswith("53"):  # insufficient resources
        return ("The server named above lacks resources (disk space, memory or connections, see the message); "
                "free them and run the command again.")
    if state.startswith("08") or state.startswith("57P") or isinstance(exc, psycopg.OperationalError):
        return ("The connection to a server was lost or refused: check that both servers are reachable and run the "
                "command again; every command resumes from the recorded state.")
    return ("The database refused a statement (SQLSTATE above); every command resumes from the recorded state, so "
            "run it again once the cause is fixed; if it repeats, keep the log for a bug report.")
