"""Copying one object into the target store: written under a temporary name, fsynced, read back and compared by
SHA-256 with the bytes read from the source, and only then renamed into place; skipped when the recorded copy still
matches both files (size and modification time, without reading them). Workers share one rate limit (`Throttle`)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from migrator import state
from migrator.objects.listing import ObjectRow, message
from migrator.store import BadLocation, Stat, Store, normalise

CHUNK = 1 << 20
MISSING = "missing in the source store"


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
class Outcome:
    row: ObjectRow
    kind: Literal["copied", "present", "failed", "missing"]
    """"missing": no file in the source store (a failure, unless the row changed since the pass's snapshot)."""
    nbytes: int = 0
    record: state.ObjectCopy | None = None
    reason: str | None = None


def sha256(f: BinaryIO) -> tuple[int, bytes]:
    h, n = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return n, h.digest()


def digest(store: Store, location: str) -> tuple[int, bytes]:
    with store.open(location) as f:
        return sha256(f)


class Copier:
    """Copies one listed object given its recorded copy (None: none); safe to call from several threads."""

    def __init__(self, source: Store, target: Store, throttle: Throttle) -> None:
        self.source, self.target, self.throttle = source, target, throttle

    def __call__(self, row: ObjectRow, known: state.ObjectCopy | None) -> Outcome:
        try:
            return self._copy(row, known)
        except BadLocation as exc:
            return Outcome(row, "failed", reason=str(exc))
        except FileNotFoundError:
            # The source file went between its stat and its read (the application deleted it): looked at again.
            return Outcome(row, "missing", reason=MISSING)
        except OSError as exc:
            return Outcome(row, "failed", reason=f"{message(exc)} ({type(exc).__name__})")

    def _copy(self, row: ObjectRow, known: state.ObjectCopy | None) -> Outcome:
        location = normalise(row.location)
        source_stat = self.source.stat(location)
        if source_stat is None:
            return Outcome(row, "missing", reason=MISSING)
        target_stat = self.target.stat(location)
        if target_stat is not None and target_stat.size == source_stat.size:
            if known is not None and (known.size, known.mtime_ns, known.source_mtime_ns) == (
                    target_stat.size, target_stat.mtime_ns, source_stat.mtime_ns):
                if known.key == row.key:
                    return Outcome(row, "present")
                return Outcome(row, "present", record=state.ObjectCopy(
                    location, known.size, known.sha256, known.mtime_ns, row.key, source_stat.size,
                    source_stat.mtime_ns))
            # Same size but no record of these two files: read both and keep the file when the bytes agree.
            size, source_digest = digest(self.source, location)
            if (size, source_digest) == digest(self.target, location):
                return Outcome(row, "present", record=state.ObjectCopy(
                    location, size, source_digest, target_stat.mtime_ns, row.key, source_stat.size,
                    source_stat.mtime_ns))
        return self._write(row, location, source_stat)

    def _write(self, row: ObjectRow, location: str, source_stat: Stat) -> Outcome:
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
            if sha256(written) != (read, hasher.digest()):
                raise OSError(f"the copy of {location} read back with other bytes than the source's")

        written = self.target.write(location, chunks(), check)
        return Outcome(row, "copied", nbytes=read, record=state.ObjectCopy(
            location, read, hasher.digest(), written.mtime_ns, row.key, source_stat.size, source_stat.mtime_ns))
