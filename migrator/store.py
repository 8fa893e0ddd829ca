"""Object stores: where the files that rows point to live (DICOM images, PDFs, plans), behind one small interface.

`objects sync` and `verify --objects` see a store only through `Store`, so an object store (S3, Azure Blob) can
follow the directory store without touching them. A location is a relative, '/'-separated path inside the store. A
store never reads or writes outside its root: a location that is absolute, climbs out with '..', or resolves outside
the root through a symbolic link (a link as the file, or a linked directory on the way) is refused (`BadLocation`)
and reported by the caller, never followed.

Writes are atomic: bytes go to a temporary name next to the final one, are flushed to disk (fsync), checked, and only
then renamed into place, so a reader never sees half a file and a crash leaves at most a temporary file behind.

Clinical files are never deleted by `objects sync`: a file whose row left the source is moved (`quarantine`, a
rename inside the same filesystem) into the store's quarantine folder, which `locations` does not list. Only
`purge`, on the operator's word (`migrator objects quarantine --empty`), deletes a quarantined file.
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
QUARANTINE_DIR = ".migrator-quarantine"
"""The quarantine folder, at the top of the target store (so on its filesystem: moving a file there is a rename); flat,
one file per entry named `<entry id>-<file name>`."""


class BadLocation(MigratorError):
    """A location that is not a relative path inside the store, or that resolves outside it."""


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
        """Size and modification time of the object, or None when there is none. OSError when unreadable,
        BadLocation when the location leaves the store."""
        ...

    def open(self, location: str) -> BinaryIO:
        """The object's bytes for reading. FileNotFoundError when absent, OSError when unreadable."""
        ...

    def write(self, location: str, chunks: Iterator[bytes], check: Callable[[BinaryIO], None]) -> Stat:
        """Write the object atomically from `chunks`; `check` reads the written bytes before they take the name and
        raises to abandon the write."""
        ...

    def locations(self) -> Iterator[str]:
        """Every object in the store (temporary files and the quarantine excluded)."""
        ...

    def quarantine(self, location: str, name: str) -> bool:
        """Move the object into the quarantine as `name` (a file name there), by a rename, durably; False when the
        store holds no object there (nothing moved)."""
        ...

    def quarantined(self, name: str) -> bool:
        """Whether the quarantine holds `name`."""
        ...

    def purge(self, name: str) -> bool:
        """Delete `name` from the quarantine (the operator's word); False when it was not there."""
        ...

    def quarantine_root(self) -> str:
        """Where the quarantine is, for reports and the runbook."""
        ...


def normalise(location: str) -> str:
    """The canonical form of a location; BadLocation when it is absolute, empty or leaves the store."""
    path = PurePosixPath(location.replace("\\", "/"))
    if not location or path.is_absolute() or ".." in path.parts or location.startswith(("/", "\\")):
        raise BadLocation(f"location {location!r} is not a relative path inside the store")
    text = str(path)
    if text in ("", "."):
        raise BadLocation(f"location {location!r} names no file")
    if path.parts[0] == QUARANTINE_DIR:
        raise BadLocation(f"location {location!r} is inside the store's quarantine")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryStore:
    """Objects as files under a root directory; its quarantine is the folder QUARANTINE_DIR under the root."""

    def __init__(self, root: str | Path, side: str = "target") -> None:
        self.root = Path(root)
        self.side = side
        self._real = Path(os.path.realpath(self.root))
        self._quarantine = self._real / QUARANTINE_DIR

    def describe(self) -> str:
        return str(self.root)

    def quarantine_root(self) -> str:
        return str(self.root / QUARANTINE_DIR)

    def _inside(self, path: Path, location: str) -> Path:
        """`path` with every symbolic link resolved, refused unless it stays under the root."""
        real = Path(os.path.realpath(path))
        if real != self._real and self._real not in real.parents:
            raise BadLocation(f"location {location!r} resolves outside the {self.side} store (symbolic link)")
        return real

    def _path(self, location: str) -> Path:
        """The file's path with its directories resolved; the file itself must not be a link leaving the store."""
        text = normalise(location)
        return self._inside(self._real / text, text)

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
        # A directory made by someone else between the check and the mkdir could be a link: look again.
        final = self._inside(final, location)
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
        _fsync_dir(final.parent)
        st = final.stat()
        return Stat(st.st_size, st.st_mtime_ns)

    def locations(self) -> Iterator[str]:
        for directory, dirs, files in os.walk(self._real):
            base = Path(directory).relative_to(self._real)
            if base == Path("."):
                dirs[:] = [d for d in dirs if d != QUARANTINE_DIR]
            for name in files:
                if TEMP_MARK not in name:
                    yield (base / name).as_posix()

    def _in_quarantine(self, name: str) -> Path:
        if "/" in name or name in ("", ".", ".."):
            raise BadLocation(f"{name!r} is not a name in the quarantine")
        return self._quarantine / name

    def quarantine(self, location: str, name: str) -> bool:
        # The directory entry at the location moves (a link stays a link); its directories are resolved.
        text = normalise(location)
        source = self._inside((self._real / text).parent, text) / PurePosixPath(text).name
        dest = self._in_quarantine(name)
        if not source.exists() and not source.is_symlink():
            return False
        if not self._quarantine.is_dir():
            self._quarantine.mkdir(exist_ok=True)
            _fsync_dir(self._real)  # the folder's own entry, before anything is moved into it
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(f"the quarantine already holds {name}")
        os.rename(source, dest)  # same filesystem (EXDEV otherwise: never a copy and delete)
        # Durable before it is recorded as done: the entry left the location and arrived in the quarantine.
        _fsync_dir(self._quarantine)
        _fsync_dir(source.parent)
        return True

    def quarantined(self, name: str) -> bool:
        path = self._in_quarantine(name)
        return path.exists() or path.is_symlink()

    def purge(self, name: str) -> bool:
        try:
            self._in_quarantine(name).unlink()
        except FileNotFoundError:
            return False
        return True


def open_store(root: str | None, side: str) -> Store:
    """The store configured for one side (`[objects] source_root` / `target_root`)."""
    if not root:
        raise MigratorError(f"no {side} object store: set [objects] {side}_root in the configuration",
                            hint="Add the directory that holds the files to [objects] in migration.toml.")
    return DirectoryStore(root, side)
