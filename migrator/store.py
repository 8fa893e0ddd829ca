"""Object stores: where the files that rows point to live (DICOM images, PDFs, plans), behind one small interface.

`objects sync` and `verify --objects` see a store only through `Store`, so an object store (S3, Azure Blob) can
follow the directory store without touching them. A location is a relative, '/'-separated path inside the store; a
location that is absolute or climbs out of the store with '..' is refused (`BadLocation`), never followed.

Writes are atomic: bytes go to a temporary name next to the final one, are flushed to disk (fsync), checked, and only
then renamed into place, so a reader never sees half a file and a crash leaves at most a temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from migrator.errors import MigratorError

TEMP_MARK = ".migrator-part-"
"""Part of the name of a file being written; such files are never listed as objects."""


class BadLocation(MigratorError):
    """A location that is not a relative path inside the store."""


@dataclass(frozen=True)
class Stat:
    size: int
    mtime_ns: int


class Store(Protocol):
    """A place that holds objects by location."""

    def describe(self) -> str:
        """Where the store is, for reports."""
        ...

    def stat(self, location: str) -> Stat | None:
        """Size and modification time of the object, or None when there is none. OSError when unreadable."""
        ...

    def open(self, location: str) -> BinaryIO:
        """The object's bytes for reading. FileNotFoundError when absent, OSError when unreadable."""
        ...

    def write(self, location: str, chunks: Iterator[bytes], check: Callable[[BinaryIO], None]) -> Stat:
        """Write the object atomically from `chunks`; `check` reads the written bytes before they take the name and
        raises to abandon the write."""
        ...

    def locations(self) -> Iterator[str]:
        """Every object in the store (temporary files excluded)."""
        ...


def normalise(location: str) -> str:
    """The canonical form of a location; BadLocation when it is absolute, empty or leaves the store."""
    path = PurePosixPath(location.replace("\\", "/"))
    if not location or path.is_absolute() or ".." in path.parts or location.startswith(("/", "\\")):
        raise BadLocation(f"location {location!r} is not a relative path inside the store")
    text = str(path)
    if text in ("", "."):
        raise BadLocation(f"location {location!r} names no file")
    return text


class DirectoryStore:
    """Objects as files under a root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, location: str) -> Path:
        return self.root / normalise(location)

    def stat(self, location: str) -> Stat | None:
        try:
            st = self._path(location).stat()
        except FileNotFoundError:
            return None
        return Stat(st.st_size, st.st_mtime_ns)

    def open(self, location: str) -> BinaryIO:
        return self._path(location).open("rb")

    def write(self, location: str, chunks: Iterator[bytes], check: Callable[[BinaryIO], None]) -> Stat:
        final = self._path(location)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.with_name(f".{final.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with temp.open("xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            with temp.open("rb") as written:
                check(written)
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        # The rename is durable only once the directory entry is on disk too.
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        st = final.stat()
        return Stat(st.st_size, st.st_mtime_ns)

    def locations(self) -> Iterator[str]:
        for directory, _, files in os.walk(self.root):
            base = Path(directory).relative_to(self.root)
            for name in files:
                if TEMP_MARK not in name:
                    yield (base / name).as_posix()


def open_store(root: str | None, side: str) -> Store:
    """The store configured for one side (`[objects] source_root` / `target_root`)."""
    if not root:
        raise MigratorError(f"no {side} object store: set [objects] {side}_root in the configuration",
                            hint="Add the directory that holds the files to [objects] in migration.toml.")
    return DirectoryStore(root)
