"""What `migrator verify` found: per table a `TableParity` (its rows named by key, `RowDifference`), what it could
not compare (`NotCompared`), and the whole `ParityReport` with its exit code, JSON form and text.

The report names rows by their key values (or, without a key, by their row hash; key values that may be patient data
as the migration's keyed hash, see `redaction.KeyMask`) and never carries other column values, unless the operator
asks for them with `show_values`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from migrator.redaction import KeyMask

MAX_LISTED = 100
"""Differences listed per table; the rest are only counted."""

Status = Literal["identical", "in_flight", "different", "error", "not_compared"]
"""not_compared: the rows are identical, but what some of them refer to (large objects) was not compared."""
Kind = Literal["missing", "extra", "different"]
_KIND_TEXT = {"missing": "missing on target", "extra": "extra on target", "different": "different"}


@dataclass(frozen=True)
class RowDifference:
    """One row (or, without a key, one distinct row) that is not the same on both sides."""

    kind: Kind
    """"missing": on the source only (or fewer copies on the target); "extra": the reverse; "different": same key,
    other values."""
    key: tuple[str, ...]
    """Text forms of the key columns; empty for a table without a key. Printed through a `KeyMask`."""
    row_md5: str | None = None
    """For a table without a key: md5 of the row's canonical form (`planning.row_form`), which identifies the row without
    showing it."""
    source_count: int = 1
    target_count: int = 1
    source_row: str | None = None
    """The row text on each side: only with `show_values`."""
    target_row: str | None = None

    def to_dict(self, key_columns: Sequence[str], key_types: Sequence[str], mask: KeyMask) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.row_md5 is None:
            d["key"] = {c: mask.value(t, v) for c, t, v in zip(key_columns, key_types, self.key, strict=True)}
        else:
            d["row_md5"] = self.row_md5
            d["source_count"] = self.source_count
            d["target_count"] = self.target_count
        if self.source_row is not None or self.target_row is not None:
            d["source_row"] = self.source_row
            d["target_row"] = self.target_row
        return d


@dataclass(frozen=True)
class TableParity:
    name: str
    status: Status
    key_columns: tuple[str, ...] = ()
    """Columns that identify a row; empty when the table was compared as a multiset of rows."""
    key_types: tuple[str, ...] = ()
    """Their types on the source, which decide how their values are printed (`redaction.KeyMask`); when not given,
    every key value is printed as a hash."""
    source_rows: int | None = None
    target_rows: int | None = None
    difference_count: int = 0
    """All differences found; at most MAX_LISTED of them are in `differences`."""
    differences: tuple[RowDifference, ...] = ()
    error: str | None = None
    ranges: int = 0
    """Key ranges digested in the first pass."""
    ranges_different: int = 0
    """Of those, ranges whose digests differed (then split again and listed by key)."""
    passes: int = 0
    """Digest passes over the table: the first, plus one per bisection."""
    in_flight: int = 0
    """Rows (or distinct rows) that differed only because the source changed them after the target's sync position:
    verify ran while sync was following. Not differences."""
    rechecked: bool = False
    """The differing ranges were read again once sync had passed the first pass's source snapshot."""
    not_compared: str | None = None
    """What the rows refer to that verify did not compare, and why (large objects named by oid/lo columns)."""

    @property
    def printed_types(self) -> tuple[str, ...]:
        return self.key_types or ("",) * len(self.key_columns)

    def to_dict(self, mask: KeyMask) -> dict[str, Any]:
        return {
            "name": self.name,
            "ranges": self.ranges,
            "ranges_different": self.ranges_different,
            "passes": self.passes,
            "in_flight": self.in_flight,
            "rechecked": self.rechecked,
            "status": self.status,
            "key_columns": list(self.key_columns),
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "difference_count": self.difference_count,
            "differences": [d.to_dict(self.key_columns, self.printed_types, mask) for d in self.differences],
            "error": self.error,
            "not_compared": self.not_compared,
        }


@dataclass(frozen=True)
class NotCompared:
    """Something of the source a whole-database verify did not compare, said plainly rather than skipped."""

    name: str
    """"schema.name" of a relation, "large objects" or "post-data"."""
    kind: str
    """"materialized view", "foreign table", "large objects", or "post-data" (items a copy left for sync)."""
    reason: str
    data: bool
    """Source data that may be missing on the target (large objects): the verify cannot say identical (exit 2).
    False for what is derived or held elsewhere (materialized views, foreign tables): listed, exit unchanged."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParityReport:
    source: str
    """host:port/dbname of each side (never a password)."""
    target: str
    tables: tuple[TableParity, ...]
    show_values: bool = False
    not_compared: tuple[NotCompared, ...] = ()
    mask: KeyMask = field(default_factory=KeyMask.ephemeral, repr=False, compare=False)
    """How keys are printed: the migration's keyed hash for key values that may be patient data, unless
    `show_values`."""

    @property
    def _keys(self) -> KeyMask:
        return dataclasses.replace(self.mask, show_values=self.show_values)

    @property
    def identical(self) -> bool:
        return all(t.status == "identical" for t in self.tables) and not any(n.data for n in self.not_compared)

    @property
    def rows_identical(self) -> bool:
        """Every table's rows identical, though what some refer to (large objects, a blocker the operator overrode
        at prepare) was not compared: what the cutover's and rollback's full verify require."""
        return all(t.status in ("identical", "not_compared") for t in self.tables)

    @property
    def exit_code(self) -> int:
        """0 identical (rows in flight aside); 1 rows differ; 2 some table could not be verified, or source data
        (large objects) could not be compared (which outweighs differences found)."""
        if any(t.status == "error" or t.not_compared for t in self.tables) or any(n.data for n in self.not_compared):
            return 2
        return 1 if any(t.status == "different" for t in self.tables) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "identical": self.identical,
            "exit_code": self.exit_code,
            "tables": [t.to_dict(self._keys) for t in self.tables],
            "not_compared": [n.to_dict() for n in self.not_compared],
        }

    def render_text(self) -> str:
        lines = [f"verify {self.source} (source) against {self.target} (target)"]
        width = max((len(t.name) for t in self.tables), default=0)
        for t in self.tables:
            lines.extend(_render_table(t, width, self._keys))
        counts = {s: sum(1 for t in self.tables if t.status == s)
                  for s in ("identical", "in_flight", "different", "error", "not_compared")}
        in_flight = f"{counts['in_flight']} in flight, " if counts["in_flight"] else ""
        refs = f"{counts['not_compared']} with large objects not compared, " if counts["not_compared"] else ""
        lines.append(
            f"{len(self.tables)} table(s): {counts['identical']} identical, {in_flight}{refs}{counts['different']} "
            f"different, {counts['error']} not verified"
        )
        for n in self.not_compared:
            kind = f" ({n.kind})" if n.kind != n.name else ""
            lines.append(f"  NOT COMPARED  {n.name}{kind}: {n.reason}")
        return "\n".join(lines)


def _render_table(t: TableParity, width: int, mask: KeyMask) -> list[str]:
    head = {"identical": "identical", "in_flight": "in flight", "different": "DIFFERENT", "error": "ERROR",
            "not_compared": "NOT COMPARED"}[t.status]
    if t.status == "error":
        return [f"  {head:<9}  {t.name:<{width}}  {t.error}"]
    note = [f"      not compared: {t.not_compared}"] if t.not_compared else []
    rows = f"{t.source_rows:,} rows" if t.source_rows == t.target_rows else (
        f"{t.source_rows:,} rows on source, {t.target_rows:,} on target"
    )
    ranges = f"; {t.ranges_different:,} of {t.ranges:,} key ranges differed" if t.ranges_different else ""
    flight = f"; {t.in_flight:,} row(s) in flight (changed on the source, not yet applied)" if t.in_flight else ""
    if t.status == "not_compared":
        return [f"  {head}  {t.name:<{width}}  {rows}, rows identical{flight}", *note]
    if t.status in ("identical", "in_flight"):
        return [f"  {head:<9}  {t.name:<{width}}  {rows}{flight}", *note]
    lines = [f"  {head:<9}  {t.name:<{width}}  {rows}; {t.difference_count:,} difference(s){ranges}{flight}"]
    for d in t.differences:
        if d.row_md5 is not None:
            ident = f"row md5 {d.row_md5}: {d.source_count} on source, {d.target_count} on target"
        else:
            ident = ", ".join(f"{c}={_show_key(mask, ty, v)}"
                              for c, ty, v in zip(t.key_columns, t.printed_types, d.key, strict=True))
        lines.append(f"      {_KIND_TEXT[d.kind]:<17}  {ident}")
        if d.source_row is not None:
            lines.append(f"          source: {d.source_row}")
        if d.target_row is not None:
            lines.append(f"          target: {d.target_row}")
    if t.difference_count > len(t.differences):
        lines.append(f"      ... and {t.difference_count - len(t.differences):,} more")
    return lines + note


def _show_key(mask: KeyMask, type_: str, value: str) -> str:
    if mask.hashes(type_):
        return mask.value(type_, value)
    return value if value.lstrip("-").isdigit() else json.dumps(value, ensure_ascii=False)


