"""`verify --objects`: every listed object proven in the target store, and the target store's orphans.

Each object must be present, with the same size and SHA-256 as the source store's file (and as the row's `size` /
`sha256` when the query gives them); when the row carries DICOM identifiers, the file must be DICOM (read with
pydicom, stopping before the pixel data) and its header must carry the same identifiers. Files without identifiers
(PDF reports, RT plans) are checked by bytes only. Files in the target store that no row on either side references
are orphans; the files `objects sync` moved to the quarantine (their row left the source) are not in the store any
more, and are counted apart. A bad file is a finding by key with a reason, never a crash; reports say which tag
disagrees, not its values, unless the operator asks with `show_values`.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from migrator import db, log, state
from migrator.config import Config
from migrator.errors import MigratorError
from migrator.objects.copying import digest
from migrator.objects.listing import MAX_LISTED, ObjectRow, list_objects, message, settings
from migrator.store import BadLocation, Store, normalise, open_store


@dataclass(frozen=True)
class ObjectFinding:
    key: str
    location: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "location": self.location, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class ObjectReport:
    source_store: str
    target_store: str
    checked: int = 0
    bytes_checked: int = 0
    findings: tuple[ObjectFinding, ...] = ()
    finding_count: int = 0
    orphans: tuple[str, ...] = ()
    orphan_count: int = 0
    quarantined: int = 0
    """Files `objects sync` moved to the quarantine (their row left the source): not orphans, not findings."""
    quarantine_root: str = ""
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """0 every object proven; 1 findings or orphans; 2 could not verify."""
        if self.error is not None:
            return 2
        return 1 if self.finding_count or self.orphan_count else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_store": self.source_store, "target_store": self.target_store, "checked": self.checked,
            "bytes_checked": self.bytes_checked, "finding_count": self.finding_count,
            "findings": [f.to_dict() for f in self.findings], "orphan_count": self.orphan_count,
            "orphans": list(self.orphans), "quarantined": self.quarantined, "quarantine": self.quarantine_root,
            "error": self.error, "exit_code": self.exit_code,
        }

    def render_text(self) -> str:
        lines = [f"objects {self.source_store} (source) against {self.target_store} (target)"]
        if self.error is not None:
            return "\n".join([*lines, f"  ERROR  {self.error}"])
        for f in self.findings:
            lines.append(f"  BAD     key={f.key}  {f.location}: {'; '.join(f.reasons)}")
        if self.finding_count > len(self.findings):
            lines.append(f"  ... and {self.finding_count - len(self.findings):,} more")
        for o in self.orphans:
            lines.append(f"  ORPHAN  {o}: no row references it")
        if self.orphan_count > len(self.orphans):
            lines.append(f"  ... and {self.orphan_count - len(self.orphans):,} more orphans")
        lines.append(f"{self.checked:,} object(s) checked ({self.bytes_checked / 1e6:.1f} MB): "
                     f"{self.checked - self.finding_count:,} identical, {self.finding_count:,} bad, "
                     f"{self.orphan_count:,} orphan(s)")
        if self.quarantined:
            lines.append(f"{self.quarantined:,} file(s) in the quarantine {self.quarantine_root} (their row left the "
                         "source; `migrator objects quarantine` lists them)")
        return "\n".join(lines)


def _check(row: ObjectRow, source: Store, target: Store, show_values: bool) -> tuple[list[str], int]:
    """Reasons the target store's copy of one object is not proven (empty: proven), and the bytes read there."""
    try:
        location = normalise(row.location)
    except BadLocation as exc:
        return [str(exc)], 0
    reasons: list[str] = []
    target_digest = _side_digest(target, location, "target", reasons)
    source_digest = _side_digest(source, location, "source", reasons)
    if target_digest is None:
        return reasons, 0
    size, digest = target_digest
    if source_digest is not None:
        if source_digest[0] != size:
            reasons.append(f"size {size:,} in the target store, {source_digest[0]:,} in the source store")
        elif source_digest[1] != digest:
            reasons.append("SHA-256 differs from the source store's file")
    if row.size is not None and row.size != size:
        reasons.append(f"size {size:,} differs from the row's {row.size:,}")
    elif row.sha256 is not None and row.sha256 != digest:
        reasons.append("SHA-256 differs from the row's")
    if row.dicom:
        reasons += _check_header(row, target, location, show_values)
    return reasons, size


def _side_digest(store: Store, location: str, side: str, reasons: list[str]) -> tuple[int, bytes] | None:
    try:
        return digest(store, location)
    except BadLocation as exc:
        reasons.append(str(exc))
    except FileNotFoundError:
        reasons.append(f"missing in the {side} store")
    except IsADirectoryError:
        reasons.append(f"a directory, not a file, in the {side} store")
    except OSError as exc:
        reasons.append(f"unreadable in the {side} store ({message(exc)})")
    return None


def _check_header(row: ObjectRow, store: Store, location: str, show_values: bool) -> list[str]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with store.open(location) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            found = {keyword: ds.get(keyword) for keyword, _ in row.identifiers}
            # pydicom returns what it read up to the end of a cut file: a header that ends the file is truncated
            # when identifiers the row names are absent from it.
            at_end = f.read(1) == b""
    except InvalidDicomError:
        return ["not a DICOM file (no DICM preamble), where the row names a DICOM object"]
    except OSError as exc:
        return [f"unreadable DICOM header ({message(exc)})"]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged files: each is a finding
        return [f"DICOM header unreadable: truncated or damaged ({type(exc).__name__})"]
    reasons = []
    for keyword, expected in row.identifiers:
        value = found.get(keyword)
        if value is None or str(value).strip() == "":
            if at_end:
                return ["DICOM file truncated: it ends inside the header"]
            reasons.append(f"header has no {keyword}")
        elif str(value).strip() != expected.strip():
            detail = f": header {str(value)!r}, row {expected!r}" if show_values else ""
            reasons.append(f"header {keyword} differs from the row{detail}")
    return reasons


def verify(cfg: Config, *, show_values: bool = False, workers: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> ObjectReport:
    """Prove every listed object in the target store; list the target store's orphans."""
    s = settings(cfg)
    assert s.query is not None
    source, target = open_store(s.source_root, "source"), open_store(s.target_root, "target")
    workers = max(1, workers or s.workers)
    quarantined = 0
    referenced: set[str] = set()
    findings: list[ObjectFinding] = []
    count = checked = nbytes = 0
    try:
        with db.session(cfg.target_dsn, role="target", application_name="migrator-verify") as conn:
            for row in list_objects(conn, s.query):
                _reference(referenced, row.location)
            conn.rollback()
            quarantined = len(state.quarantine_entries(conn))
        with db.session(cfg.source_dsn, role="source", application_name="migrator-verify") as conn, \
                cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify-objects") as pool:
            pending: set[cf.Future[tuple[ObjectRow, list[str], int]]] = set()

            def collect(done: set[cf.Future[tuple[ObjectRow, list[str], int]]]) -> None:
                nonlocal count, checked, nbytes
                for f in done:
                    row, reasons, size = f.result()
                    checked += 1
                    nbytes += size
                    if reasons:
                        count += 1
                        if len(findings) < MAX_LISTED:
                            findings.append(ObjectFinding(row.key, row.location, tuple(reasons)))
                if progress is not None:
                    progress(checked, nbytes)

            def job(row: ObjectRow) -> tuple[ObjectRow, list[str], int]:
                return (row, *_check(row, source, target, show_values))

            for row in list_objects(conn, s.query):
                _reference(referenced, row.location)
                pending.add(pool.submit(job, row))
                if len(pending) >= workers * 4:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    collect(done)
            done, _ = cf.wait(pending)
            collect(done)
        orphans = sorted(loc for loc in target.locations() if loc not in referenced)
    except (psycopg.Error, MigratorError, OSError) as exc:
        return ObjectReport(source.describe(), target.describe(), error=message(exc))
    findings.sort(key=lambda f: f.key)
    log.get(phase="verify").info("verify.objects", checked=checked, bad=count, orphans=len(orphans),
                                 quarantined=quarantined)
    return ObjectReport(source.describe(), target.describe(), checked, nbytes, tuple(findings), count,
                        tuple(orphans[:MAX_LISTED]), len(orphans), quarantined, target.quarantine_root())


def _reference(referenced: set[str], location: str) -> None:
    try:
        referenced.add(normalise(location))
    except BadLocation:
        pass
