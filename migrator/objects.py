"""The files rows point to: `migrator objects sync` copies them into the target store, `verify --objects` proves them.

A PACS database is only the index; the images are files. `[objects] query` lists them, run on the source (and, for
orphans, on the target): one row per object with `key` and `location` (relative to the store root; any SQL
expression, since stores often derive the path from an id), and optionally `size`, `sha256` (bytea or hex text) and
the DICOM identifiers `sop_instance_uid`, `series_instance_uid`, `study_instance_uid`, `patient_id`.

Sync copies each listed file the target store lacks or holds with other bytes: written under a temporary name,
fsynced, read back and compared by SHA-256 with the bytes read from the source, and only then renamed into place.
Files are copied as they are, never rewrapped. Each copy is recorded in the control schema with the size and
modification time the written file has, so a resumed run skips it without reading it again. Workers copy in
parallel under one shared rate limit.

Verify checks every listed object in the target store: present, same size and SHA-256 as the source store's file
(and as the row's `size` / `sha256` when the query gives them); when the row carries DICOM identifiers, the file must
be DICOM (read with pydicom, stopping before the pixel data) and its header must carry the same identifiers. Files
without identifiers (PDF reports, RT plans) are checked by bytes only. Files in the target store that no row on
either side references are orphans. A bad file is a finding by key with a reason, never a crash; reports say which
tag disagrees, not its values, unless the operator asks with `show_values`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, LiteralString, cast

import psycopg
from psycopg import sql

from migrator import db, log, state
from migrator.config import Config, ObjectSettings, redact
from migrator.errors import ConfigError, MigratorError
from migrator.store import BadLocation, Stat, Store, normalise, open_store

CHUNK = 1 << 20
MAX_LISTED = 100
"""Findings (and orphans) listed in a report; the rest are only counted."""
_RECORD_EVERY = 500

DICOM_COLUMNS: dict[str, str] = {
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "patient_id": "PatientID",
}
"""Query column -> the DICOM header keyword it must agree with."""


@dataclass(frozen=True)
class ObjectRow:
    """One object as the query lists it."""

    key: str
    location: str
    size: int | None = None
    sha256: bytes | None = None
    identifiers: tuple[tuple[str, str], ...] = ()
    """(DICOM keyword, value the row holds) for each identifier column the query gives a value for."""

    @property
    def dicom(self) -> bool:
        """A DICOM file is expected exactly when the row names some DICOM identifier."""
        return bool(self.identifiers)


def list_objects(conn: psycopg.Connection[Any], query: str) -> Iterator[ObjectRow]:
    """Stream the rows of the objects query (server-side cursor, in the caller's transaction)."""
    with conn.cursor(name="migrator_objects") as cur:
        cur.execute(sql.SQL(cast(LiteralString, query)))
        names = [d.name.lower() for d in cur.description or ()]
        lacking = [c for c in ("key", "location") if c not in names]
        if lacking:
            raise ConfigError(f"[objects] query gives no column(s) {', '.join(lacking)}",
                              hint="Name the query's columns: key, location, and optionally size, sha256, "
                                   + ", ".join(DICOM_COLUMNS) + ".")
        at = {n: i for i, n in enumerate(names)}
        while batch := cur.fetchmany(2000):
            for r in batch:
                yield _row(r, at)


def _row(r: tuple[Any, ...], at: dict[str, int]) -> ObjectRow:
    def get(name: str) -> Any:
        return r[at[name]] if name in at else None

    size = get("size")
    digest = get("sha256")
    if isinstance(digest, str):
        try:
            digest = bytes.fromhex(digest)
        except ValueError:
            digest = None
    elif digest is not None:
        digest = bytes(digest)
    if digest is not None and len(digest) != 32:
        digest = None
    idents = tuple((keyword, str(get(col))) for col, keyword in DICOM_COLUMNS.items() if get(col) is not None)
    return ObjectRow(str(get("key")), "" if get("location") is None else str(get("location")),
                     None if size is None else int(size), digest, idents)


def _settings(cfg: Config) -> ObjectSettings:
    if not cfg.objects.query:
        raise ConfigError("no [objects] query in the configuration",
                          hint="Add [objects] query, source_root and target_root to migration.toml.")
    return cfg.objects


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return redact(str(exc).strip() or type(exc).__name__)


# --- copying ------------------------------------------------------------------------------------------------------

class Throttle:
    """One rate limit shared by every worker: each chunk books the next slot of a virtual clock and waits for it."""

    def __init__(self, megabytes_per_second: float | None) -> None:
        self.rate = None if not megabytes_per_second else megabytes_per_second * 1e6
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def take(self, nbytes: int) -> None:
        if self.rate is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


@dataclass(frozen=True)
class _Outcome:
    row: ObjectRow
    kind: Literal["copied", "present", "failed"]
    nbytes: int = 0
    record: state.ObjectCopy | None = None
    reason: str | None = None


@dataclass
class ObjectSyncResult:
    passes: int = 0
    listed: int = 0
    copied: int = 0
    present: int = 0
    """Already in the target store with the source's bytes (recorded, or read and compared)."""
    bytes_copied: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of objects that could not be copied (first MAX_LISTED)."""
    failed_count: int = 0

    @property
    def ok(self) -> bool:
        return self.failed_count == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes, "listed": self.listed, "copied": self.copied, "present": self.present,
            "bytes_copied": self.bytes_copied, "seconds": round(self.seconds, 3),
            "megabytes_per_second": round(self.bytes_copied / 1e6 / self.seconds, 1) if self.seconds else None,
            "failed_count": self.failed_count,
            "failed": [{"key": k, "reason": r} for k, r in self.failed],
        }

    def render_text(self) -> str:
        lines = [f"objects: {self.listed:,} listed, {self.copied:,} copied ({self.bytes_copied / 1e6:.1f} MB), "
                 f"{self.present:,} already present, {self.failed_count:,} failed; {self.seconds:.1f}s"]
        lines += [f"  FAILED  key={k}: {r}" for k, r in self.failed]
        if self.failed_count > len(self.failed):
            lines.append(f"  ... and {self.failed_count - len(self.failed):,} more")
        return "\n".join(lines)


def _sha256(f: BinaryIO) -> tuple[int, bytes]:
    h, n = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return n, h.digest()


def _digest(store: Store, location: str) -> tuple[int, bytes]:
    with store.open(location) as f:
        return _sha256(f)


class _Copier:
    def __init__(self, source: Store, target: Store, throttle: Throttle,
                 recorded: dict[str, state.ObjectCopy]) -> None:
        self.source, self.target, self.throttle, self.recorded = source, target, throttle, recorded

    def __call__(self, row: ObjectRow) -> _Outcome:
        try:
            return self._copy(row)
        except BadLocation as exc:
            return _Outcome(row, "failed", reason=str(exc))
        except OSError as exc:
            return _Outcome(row, "failed", reason=f"{_message(exc)} ({type(exc).__name__})")

    def _copy(self, row: ObjectRow) -> _Outcome:
        location = normalise(row.location)
        source_stat = self.source.stat(location)
        if source_stat is None:
            return _Outcome(row, "failed", reason="missing in the source store")
        target_stat = self.target.stat(location)
        if target_stat is not None and target_stat.size == source_stat.size:
            known = self.recorded.get(location)
            if known is not None and (known.size, known.mtime_ns) == (target_stat.size, target_stat.mtime_ns):
                return _Outcome(row, "present")
            # Same size but no record of it: read both and keep the file when the bytes agree.
            size, digest = _digest(self.source, location)
            if (size, digest) == _digest(self.target, location):
                return _Outcome(row, "present", record=state.ObjectCopy(location, size, digest, target_stat.mtime_ns))

        hasher = hashlib.sha256()
        read = 0

        def chunks() -> Iterator[bytes]:
            nonlocal read
            with self.source.open(location) as f:
                while chunk := f.read(CHUNK):
                    self.throttle.take(len(chunk))
                    hasher.update(chunk)
                    read += len(chunk)
                    yield chunk

        def check(written: BinaryIO) -> None:
            if _sha256(written) != (read, hasher.digest()):
                raise OSError(f"the copy of {location} read back with other bytes than the source's")

        written: Stat = self.target.write(location, chunks(), check)
        return _Outcome(row, "copied", nbytes=read,
                        record=state.ObjectCopy(location, read, hasher.digest(), written.mtime_ns))


def sync(cfg: Config, *, follow: bool = False, stop: threading.Event | None = None, workers: int | None = None,
         max_rate: float | None = None, progress: Callable[[int, int], None] | None = None) -> ObjectSyncResult:
    """Copy every listed object the target store lacks (or holds with other bytes); with `follow`, again every
    `poll_interval` until `stop` is set. `progress(files, bytes)` is called as objects are done."""
    settings = _settings(cfg)
    source, target = open_store(settings.source_root, "source"), open_store(settings.target_root, "target")
    throttle = Throttle(max_rate if max_rate is not None else settings.max_rate)
    workers = max(1, workers or settings.workers)
    stop = stop or threading.Event()
    logger = log.get(phase="objects")
    result = ObjectSyncResult()
    started = time.monotonic()
    with db.session(cfg.target_dsn, role="target", application_name="migrator-objects") as tconn, \
            db.session(cfg.source_dsn, role="source", application_name="migrator-objects") as sconn:
        state.upgrade(tconn)
        while not stop.is_set():
            copier = _Copier(source, target, throttle, state.objects_copied(tconn))
            tconn.commit()
            _one_pass(sconn, tconn, settings, copier, workers, stop, result, progress, started)
            sconn.rollback()
            result.passes += 1
            logger.info("objects.pass", listed=result.listed, copied=result.copied, present=result.present,
                        failed=result.failed_count, bytes=result.bytes_copied)
            if not follow:
                break
            stop.wait(settings.poll_interval)
    result.seconds = time.monotonic() - started
    return result


def _one_pass(sconn: psycopg.Connection[Any], tconn: psycopg.Connection[Any], settings: ObjectSettings,
              copier: _Copier, workers: int, stop: threading.Event, result: ObjectSyncResult,
              progress: Callable[[int, int], None] | None, started: float) -> None:
    assert settings.query is not None
    pending: set[cf.Future[_Outcome]] = set()
    records: list[state.ObjectCopy] = []
    failed_before = result.failed_count
    result.listed = 0

    def collect(done: set[cf.Future[_Outcome]]) -> None:
        for f in done:
            out = f.result()
            if out.kind == "copied":
                result.copied += 1
                result.bytes_copied += out.nbytes
            elif out.kind == "present":
                result.present += 1
            else:
                result.failed_count += 1
                if len(result.failed) < MAX_LISTED:
                    result.failed.append((out.row.key, out.reason or "failed"))
            if out.record is not None:
                records.append(out.record)
        if len(records) >= _RECORD_EVERY:
            state.record_objects(tconn, records)
            tconn.commit()
            records.clear()
        if progress is not None:
            progress(result.copied + result.present + result.failed_count, result.bytes_copied)

    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="objects") as pool:
        try:
            for row in list_objects(sconn, settings.query):
                if stop.is_set():
                    break
                result.listed += 1
                pending.add(pool.submit(copier, row))
                if len(pending) >= workers * 4:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    collect(done)
        finally:
            done, _ = cf.wait(pending)
            collect(done)
            state.record_objects(tconn, records)
            tconn.commit()
    if result.failed_count > failed_before:
        log.get(phase="objects").warning("objects.failed", count=result.failed_count - failed_before)


# --- verifying ----------------------------------------------------------------------------------------------------

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
            "orphans": list(self.orphans), "error": self.error, "exit_code": self.exit_code,
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
        return _digest(store, location)
    except FileNotFoundError:
        reasons.append(f"missing in the {side} store")
    except IsADirectoryError:
        reasons.append(f"a directory, not a file, in the {side} store")
    except OSError as exc:
        reasons.append(f"unreadable in the {side} store ({_message(exc)})")
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
        return [f"unreadable DICOM header ({_message(exc)})"]
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
    settings = _settings(cfg)
    assert settings.query is not None
    source, target = open_store(settings.source_root, "source"), open_store(settings.target_root, "target")
    workers = max(1, workers or settings.workers)
    referenced: set[str] = set()
    findings: list[ObjectFinding] = []
    count = checked = nbytes = 0
    try:
        with db.session(cfg.target_dsn, role="target", application_name="migrator-verify") as conn:
            for row in list_objects(conn, settings.query):
                _reference(referenced, row.location)
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

            for row in list_objects(conn, settings.query):
                _reference(referenced, row.location)
                pending.add(pool.submit(job, row))
                if len(pending) >= workers * 4:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    collect(done)
            done, _ = cf.wait(pending)
            collect(done)
        orphans = sorted(loc for loc in target.locations() if loc not in referenced)
    except (psycopg.Error, MigratorError, OSError) as exc:
        return ObjectReport(source.describe(), target.describe(), error=_message(exc))
    findings.sort(key=lambda f: f.key)
    log.get(phase="verify").info("verify.objects", checked=checked, bad=count, orphans=len(orphans))
    return ObjectReport(source.describe(), target.describe(), checked, nbytes, tuple(findings), count,
                        tuple(orphans[:MAX_LISTED]), len(orphans))


def _reference(referenced: set[str], location: str) -> None:
    try:
        referenced.add(normalise(location))
    except BadLocation:
        pass
