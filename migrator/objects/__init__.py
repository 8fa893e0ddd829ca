"""The files rows point to: `migrator objects sync` copies them into the target store, follows the rows' changes and
deletions, and `verify --objects` proves them.

A PACS database is only the index; the images are files. `[objects] query` lists them, run on the source (and, for
orphans, on the target): one row per object with `key` and `location` (relative to the store root; any SQL
expression, since stores often derive the path from an id), and optionally `size`, `sha256` (bytea or hex text) and
the DICOM identifiers `sop_instance_uid`, `series_instance_uid`, `study_instance_uid`, `patient_id`.

- listing.py    the query: rows whole or by key or location, the tables it reads
- copying.py    one file copied (temporary name, fsync, read back, SHA-256, rename), the shared rate limit
- passes.py     `objects sync`: full passes and follow passes (the rows the delta log says changed), position
- quarantine.py files whose row left the source: recorded, then moved (never deleted); listed and emptied on the
                operator's word
- verify.py     `verify --objects`: every listed file proven, orphans apart from the quarantine

A store (migrator/store.py) never reads or writes outside its root: a location that climbs out, is absolute, or
resolves outside through a symbolic link, on either side, is refused and reported by key.
"""

from __future__ import annotations

from migrator.objects.copying import Throttle
from migrator.objects.listing import DICOM_COLUMNS, MAX_LISTED, ObjectRow, list_objects, query_tables
from migrator.objects.passes import ObjectSyncResult, sync
from migrator.objects.quarantine import QuarantineReport, listing
from migrator.objects.verify import ObjectFinding, ObjectReport, verify

__all__ = ["DICOM_COLUMNS", "MAX_LISTED", "ObjectFinding", "ObjectReport", "ObjectRow", "ObjectSyncResult",
           "QuarantineReport", "Throttle", "list_objects", "listing", "query_tables", "sync", "verify"]
