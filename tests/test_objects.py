"""Objects (`migrator objects sync`, `verify --objects`): DICOM files and a PDF in directory stores, rows in real
databases on both sides, every kind of bad file reported by key."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from migrator import objects, state
from migrator.config import Config
from migrator.store import DirectoryStore
from tests.helpers import run_sql

PATIENT = "PAT-CONFIDENTIAL-0042"

SCHEMA = """
CREATE TABLE public.instance (sop_uid text PRIMARY KEY, series_uid text, study_uid text, patient_id text,
                              file_path text, file_size bigint, sha256 bytea);
CREATE TABLE public.report (id int PRIMARY KEY, path text);
"""

QUERY = """
SELECT sop_uid AS key, file_path AS location, file_size AS size, sha256, sop_uid AS sop_instance_uid,
       series_uid AS series_instance_uid, study_uid AS study_instance_uid, patient_id
  FROM public.instance
UNION ALL
SELECT 'report-' || id, path, NULL, NULL, NULL, NULL, NULL, NULL FROM public.report
"""


def dicom_file(path: Path, sop: str, series: str = "1.2.3.4", study: str = "1.2.3", patient: str = PATIENT,
               pixels: int = 64 * 1024) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.SeriesInstanceUID = series
    ds.StudyInstanceUID = study
    ds.PatientID = patient
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 256, pixels // 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(i % 251 for i in range(pixels))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


class Pacs:
    """Rows on both databases and their files in the source store."""

    def __init__(self, tmp_path: Path, source_dsn: str, target_dsn: str) -> None:
        self.source_root, self.target_root = tmp_path / "source-store", tmp_path / "target-store"
        self.source_root.mkdir()
        self.target_root.mkdir()
        self.dsns = (source_dsn, target_dsn)
        for dsn in self.dsns:
            run_sql(dsn, SCHEMA)

    def rows(self, *statements: str) -> None:
        for dsn in self.dsns:
            run_sql(dsn, *statements)

    def instance(self, n: int, *, header_sop: str | None = None) -> str:
        sop = f"1.2.826.0.1.3680043.8.498.{n}"
        location = f"2024/03/{n % 3}/{sop}.dcm"
        data = dicom_file(self.source_root / location, header_sop or sop)
        self.rows(f"INSERT INTO public.instance VALUES ('{sop}', '1.2.3.4', '1.2.3', '{PATIENT}', '{location}', "
                  f"{len(data)}, '\\x{hashlib.sha256(data).hexdigest()}')")
        return sop

    def report(self, n: int) -> Path:
        location = f"reports/{n}.pdf"
        (self.source_root / "reports").mkdir(exist_ok=True)
        (self.source_root / location).write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n")
        self.rows(f"INSERT INTO public.report VALUES ({n}, '{location}')")
        return self.target_root / location

    def target_file(self, sop: str) -> Path:
        (found,) = self.target_root.rglob(f"{sop}.dcm")
        return found


@pytest.fixture
def pacs(tmp_path: Path, source_dsn: str, target_dsn: str) -> Pacs:
    return Pacs(tmp_path, source_dsn, target_dsn)


@pytest.fixture
def ocfg(make_config: Callable[..., Config], pacs: Pacs) -> Config:
    return make_config(objects={"query": QUERY, "source_root": str(pacs.source_root),
                                "target_root": str(pacs.target_root), "workers": 3})


def reasons(report: objects.ObjectReport) -> dict[str, list[str]]:
    return {f.key: list(f.reasons) for f in report.findings}


def as_text(report: objects.ObjectReport) -> str:
    return report.render_text() + "\n" + json.dumps(report.to_dict())


def test_objects_are_copied_byte_for_byte_verified_and_not_read_again_on_resume(pacs: Pacs, ocfg: Config) -> None:
    sops = [pacs.instance(n) for n in range(12)]
    pacs.report(1)
    seen: list[tuple[int, int]] = []

    first = objects.sync(ocfg, progress=lambda files, nbytes: seen.append((files, nbytes)))

    assert (first.listed, first.copied, first.present, first.failed_count) == (13, 13, 0, 0)
    assert seen[-1][0] == 13 and seen[-1][1] == first.bytes_copied
    for sop in sops:
        source_file = next(pacs.source_root.rglob(f"{sop}.dcm"))
        assert pacs.target_file(sop).read_bytes() == source_file.read_bytes()
    assert not [p for p in pacs.target_root.rglob("*") if ".migrator-part-" in p.name]
    report = objects.verify(ocfg)
    assert report.exit_code == 0, report.render_text()
    assert (report.checked, report.finding_count, report.orphan_count) == (13, 0, 0)

    again = objects.sync(ocfg)

    assert (again.copied, again.present, again.bytes_copied) == (0, 13, 0)


def test_a_corrupted_byte_is_reported_by_key_and_the_next_sync_repairs_it(pacs: Pacs, ocfg: Config) -> None:
    sops = [pacs.instance(n) for n in range(5)]
    objects.sync(ocfg)
    damaged = pacs.target_file(sops[2])
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF  # in the pixel data: the header still reads fine
    damaged.write_bytes(bytes(data))

    report = objects.verify(ocfg)

    assert report.exit_code == 1
    assert reasons(report) == {sops[2]: ["SHA-256 differs from the source store's file",
                                         "SHA-256 differs from the row's"]}
    repaired = objects.sync(ocfg)
    assert (repaired.copied, repaired.present) == (1, 4)
    assert objects.verify(ocfg).exit_code == 0


def test_a_missing_file_and_an_orphan_are_reported(pacs: Pacs, ocfg: Config) -> None:
    sops = [pacs.instance(n) for n in range(4)]
    objects.sync(ocfg)
    pacs.target_file(sops[1]).unlink()
    (pacs.target_root / "2024" / "stray.dcm").write_bytes(b"left over")

    report = objects.verify(ocfg)

    assert reasons(report) == {sops[1]: ["missing in the target store"]}
    assert report.orphans == ("2024/stray.dcm",) and report.orphan_count == 1
    assert report.exit_code == 1
    assert "ORPHAN  2024/stray.dcm" in report.render_text()


def test_a_header_whose_sop_instance_uid_disagrees_with_its_row_is_named_without_values(
    pacs: Pacs, ocfg: Config
) -> None:
    good = pacs.instance(1)
    wrong = pacs.instance(2, header_sop="1.2.826.0.1.3680043.8.498.999999")
    objects.sync(ocfg)

    report = objects.verify(ocfg)

    assert reasons(report) == {wrong: ["header SOPInstanceUID differs from the row"]}
    assert good not in reasons(report)
    assert "999999" not in as_text(report)
    shown = objects.verify(ocfg, show_values=True)
    assert "1.2.826.0.1.3680043.8.498.999999" in shown.findings[0].reasons[0]


def test_a_patient_id_mismatch_names_the_tag_never_the_patient(pacs: Pacs, ocfg: Config) -> None:
    sop = pacs.instance(1)
    pacs.rows(f"UPDATE public.instance SET patient_id = 'PAT-OTHER-7' WHERE sop_uid = '{sop}'")
    objects.sync(ocfg)

    report = objects.verify(ocfg)

    assert reasons(report) == {sop: ["header PatientID differs from the row"]}
    assert PATIENT not in as_text(report) and "PAT-OTHER-7" not in as_text(report)


def test_a_non_dicom_file_is_checked_by_bytes_only(pacs: Pacs, ocfg: Config) -> None:
    pdf = pacs.report(7)
    objects.sync(ocfg)
    assert objects.verify(ocfg).exit_code == 0

    pdf.write_bytes(pdf.read_bytes().replace(b"%%EOF", b"%%EOX"))
    report = objects.verify(ocfg)

    assert reasons(report) == {"report-7": ["SHA-256 differs from the source store's file"]}


def test_truncated_and_non_dicom_files_where_dicom_is_expected_are_findings(pacs: Pacs, ocfg: Config) -> None:
    truncated, not_dicom, short = pacs.instance(1), pacs.instance(2), pacs.instance(3)
    objects.sync(ocfg)
    path = pacs.target_file(truncated)
    path.write_bytes(path.read_bytes()[:300])  # cut inside the header
    pacs.target_file(not_dicom).write_bytes(b"%PDF-1.4 not an image")
    path = pacs.target_file(short)
    path.write_bytes(path.read_bytes()[:-1000])  # cut inside the pixel data: only the bytes tell

    found = reasons(objects.verify(ocfg))

    size = next(pacs.source_root.rglob(f"{truncated}.dcm")).stat().st_size
    assert found[truncated] == [f"size 300 in the target store, {size:,} in the source store",
                                f"size 300 differs from the row's {size:,}",
                                "DICOM file truncated: it ends inside the header"]
    assert "not a DICOM file (no DICM preamble), where the row names a DICOM object" in found[not_dicom]
    assert found[short][0].startswith(f"size {size - 1000:,} in the target store")
    assert len(found[short]) == 2  # size against the source and against the row; the header is intact


def test_unreadable_paths_and_bad_locations_are_findings_not_crashes(pacs: Pacs, ocfg: Config) -> None:
    sop = pacs.instance(1)
    pacs.rows("INSERT INTO public.report VALUES (1, '../../etc/passwd'), (2, 'reports/none.pdf')")
    result = objects.sync(ocfg)
    assert result.failed_count == 2 and result.copied == 1
    assert dict(result.failed) == {
        "report-1": "location '../../etc/passwd' is not a relative path inside the store",
        "report-2": "missing in the source store",
    }
    target = pacs.target_file(sop)
    target.unlink()
    target.mkdir()

    report = objects.verify(ocfg)

    assert reasons(report)[sop] == ["a directory, not a file, in the target store"]
    assert reasons(report)["report-2"] == ["missing in the target store", "missing in the source store"]
    assert report.exit_code == 1


def test_the_copy_is_throttled_to_the_configured_rate(pacs: Pacs, ocfg: Config) -> None:
    for n in range(4):
        pacs.instance(n)  # ~4 x 64 kB
    t0 = time.monotonic()
    result = objects.sync(ocfg, max_rate=0.5)
    seconds = time.monotonic() - t0
    assert seconds >= result.bytes_copied / 0.5e6 * 0.8


def test_a_write_whose_read_back_fails_leaves_no_file_behind(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)

    def refuse(_: Any) -> None:
        raise OSError("bad read-back")

    with pytest.raises(OSError):
        store.write("a/b.dcm", iter([b"x" * 10]), refuse)

    assert list(store.locations()) == []
    assert not (tmp_path / "a" / "b.dcm").exists()


def test_copies_are_recorded_in_the_control_schema(pacs: Pacs, ocfg: Config, target_dsn: str) -> None:
    sop = pacs.instance(1)
    objects.sync(ocfg)
    import psycopg

    with psycopg.connect(target_dsn) as conn:
        recorded = state.objects_copied(conn)
    (copy,) = recorded.values()
    assert copy.location.endswith(f"{sop}.dcm")
    assert copy.sha256 == hashlib.sha256(pacs.target_file(sop).read_bytes()).digest()


def test_the_cli_copies_then_verifies_objects_with_rows(pacs: Pacs, ocfg: Config, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from migrator.cli import main

    pacs.instance(1)
    source_dsn, target_dsn = pacs.dsns
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n"
                      f"[objects]\nquery = {json.dumps(QUERY)}\nsource_root = {json.dumps(str(pacs.source_root))}\n"
                      f"target_root = {json.dumps(str(pacs.target_root))}\n")
    runner = CliRunner()

    copied = runner.invoke(main, ["--config", str(config), "objects", "sync", "--json"])
    assert copied.exit_code == 0, copied.output
    assert json.loads(copied.stdout)["copied"] == 1
    verified = runner.invoke(main, ["--config", str(config), "verify", "--objects", "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert report["objects"]["checked"] == 1 and report["rows"]["identical"]
