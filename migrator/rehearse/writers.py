"""The workload's worker processes: each plays the application on its own connection.

Short transactions (studies arriving, reports, demographic corrections that may change a study's UID, purges, studies
re-sent under the same UID, radiotherapy courses, audit events with exact duplicates), some rolled back on purpose, at
a bounded rate, until told to stop or a deadline; the "long" role keeps opening a transaction, writing, sleeping and
committing, so that some commits arrive late.

Workers deliberately do not pin session settings the way migrator does: they use different DateStyle, TimeZone and
extra_float_digits, as the several applications writing into a real PACS do, so capture must not depend on them.
Database errors (a frozen database, lock timeouts, conflicts between workers) are counted by SQLSTATE and the worker
carries on; a worker never crashes on a database error. Each worker keeps its part of the ledger (see
`migrator.rehearse.workload`) and sends it in its `Report` when it stops.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from migrator.rehearse.pacs import STUDY_UID_ROOT
from migrator.rehearse.spec import ROLLED_BACK_MARKER, Report, Survey, WorkloadSpec, end_failed

# Session settings per worker (by index, cycling): the applications' own, never migrator's pinned ones.
_SESSION_SETTINGS: tuple[dict[str, str], ...] = (
    {},
    {"DateStyle": "SQL,DMY", "TimeZone": "America/New_York", "extra_float_digits": "0",
     "IntervalStyle": "sql_standard"},
    {"DateStyle": "German", "TimeZone": "Asia/Kolkata", "extra_float_digits": "1", "bytea_output": "escape"},
)
# Bounds every statement: a worker blocked behind a cutover's locks gives up, counts it and tries again.
_TIMEOUTS = {"lock_timeout": "5s", "statement_timeout": "30s"}
_RECONNECT_PAUSE = 0.5


def worker_main(dsn: str, spec: WorkloadSpec, index: int, role: str, survey: Survey, stop: Any, ready: Any,
                 results: Any) -> None:
    """Entry point of a worker process: run until told to stop, then report (always, whatever happened)."""
    worker = _Worker(dsn, spec, index, role, survey, stop, ready)
    try:
        worker.run()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent decides what happens next
        pass
    finally:
        worker.close()
        results.put(worker.report)


@dataclass
class _Outcome:
    """What a transaction did to the ledger, applied only once it has committed."""

    present: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    rollback: bool = False
    patients: list[int] = field(default_factory=list)


class _KeyPool:
    """The studies a worker owns and that exist: O(1) add, remove and random pick."""

    def __init__(self) -> None:
        self._keys: list[str] = []
        self._where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str) -> None:
        if key not in self._where:
            self._where[key] = len(self._keys)
            self._keys.append(key)

    def discard(self, key: str) -> None:
        i = self._where.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._where[last] = i

    def pick(self, rng: random.Random) -> str:
        return self._keys[rng.randrange(len(self._keys))]


_FAMILY_NAMES = ["Meier", "O'Connor", "Trần", "Fernández", "Jones", "de Vries", "Петрова", "李", "Παπαδάκης", "Ng"]
_GIVEN_NAMES = ["Lena", "Jürgen", "Chloé", "Marek", "Amina", "Hye-jin", "Ole", "", None]
_DESCRIPTIONS = [
    "CT Thorax nativ", "Röntgen Thorax p.a.", "جمجمة", "胸部 CT", 'MR "LWS"', "path\\to\\prior", "two\nlines",
    "a\tb", "d'après l'examen", "", "MRT Schädel mit KM", "Узи брюшной полости",
]
_MODALITIES: list[list[str] | None] = [["CT"], ["MR", "PR"], ["CR"], ["US", "SR"], [], ["PT", "CT"], None]
_STATUSES = ["ARRIVED", "READ", "PRELIMINARY", "FINAL", "AMENDED", None]
_BODY_PARTS = ["CHEST", "HEAD", "ABDOMEN", "KNEE", None]
_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"]
_ACTORS = ["ris", "pacs-router", "dr.weiß", "viewer-07", "süd-ambulanz"]
_ACTIONS = ["VIEW", "EXPORT", "PRINT", "ROUTE"]
_INTENTS = ["curative", "palliative", "adjuvant", None]

_INSERT_INSTANCES = """
INSERT INTO public.instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at,
                             transfer_syntax)
SELECT %(series)s || '.' || n, %(series)s, n, %(path)s || n || '.dcm', %(size)s + n,
       sha256(convert_to(%(series)s || '.' || n, 'UTF8')), now(), %(syntax)s
  FROM generate_series(1, %(count)s) AS n
"""
_DELETE_ONE_DUPLICATE = """
DELETE FROM public.audit_event
 WHERE ctid = (SELECT ctid FROM public.audit_event
                WHERE event_time = %s AND actor = %s AND action = %s AND object_uid IS NOT DISTINCT FROM %s
                LIMIT 1)
"""


def _new_uid() -> str:
    # DICOM UIDs derived from a UUID (PS3.5 B.2): unique across workers and across runs whatever the seed.
    return f"2.25.{uuid.uuid4().int}"


class _Worker:
    def __init__(self, dsn: str, spec: WorkloadSpec, index: int, role: str, survey: Survey, stop: Any,
                 ready: Any) -> None:
        self.dsn = dsn
        self.spec = spec
        self.index = index
        self.role = role
        self.survey = survey
        self.stop = stop
        self.ready = ready  # released once, at the first connection
        self.rng = random.Random(spec.seed * 1_000_003 + index)
        self.report = Report()
        self.conn: psycopg.Connection[Any] | None = None
        self.own = _KeyPool()
        self.own_patients: list[int] = []
        self.max_course = survey.max_course
        self.duplicates: list[tuple[datetime, str, str, str | None]] = []
        kinds = [(k, w) for k, w in spec.mix if w > 0]
        self.kinds = [k for k, _ in kinds]
        self.weights = [w for _, w in kinds]

    # The loop -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        limit = self.spec.duration if self.spec.duration is not None else self.spec.max_duration
        deadline = time.monotonic() + limit
        parent = multiprocessing.parent_process()
        next_at = time.monotonic()
        attempts = 0
        while (not self.stop.is_set() and time.monotonic() < deadline and attempts < self.spec.max_transactions
               and (parent is None or parent.is_alive())):
            if self.conn is None or self.conn.closed:
                self._connect()
                continue
            attempts += 1
            kind = "long" if self.role == "long" else self.rng.choices(self.kinds, self.weights)[0]
            self._attempt(kind)
            if self.role == "long":
                self.stop.wait(self.spec.long_transaction_pause)
            elif self.spec.tps:
                next_at += 1 / self.spec.tps
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
                elif delay < -1:  # fell behind (a frozen database, lock waits): do not burst to catch up
                    next_at = time.monotonic()

    def _connect(self) -> None:
        settings = {**_TIMEOUTS, **_SESSION_SETTINGS[self.index % len(_SESSION_SETTINGS)]}
        try:
            self.conn = psycopg.connect(
                self.dsn,
                application_name=f"pacs-app-workload-{self.index}",
                options=" ".join(f"-c {k}={v}" for k, v in settings.items()),
                connect_timeout=10,
            )
        except psycopg.Error:
            self.report.failed["connection"] += 1
            self.stop.wait(_RECONNECT_PAUSE)
            return
        if self.ready is not None:
            self.ready.release()
            self.ready = None

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()

    def _attempt(self, kind: str) -> None:
        assert self.conn is not None
        outcome: _Outcome | None = None
        try:
            outcome = getattr(self, f"_tx_{kind}")()
            assert outcome is not None
            if outcome.rollback:
                self.conn.rollback()
                self.report.rolled_back += 1
            else:
                self._commit(outcome)
            self.report.kinds[kind] += 1
        except psycopg.Error as exc:
            self._failed(exc.sqlstate or "connection")
        except Exception as exc:  # a bug in this module: count it (tests assert there are none) and go on
            self._failed(f"python:{type(exc).__name__}")

    def _commit(self, outcome: _Outcome) -> None:
        assert self.conn is not None
        try:
            self.conn.commit()
        except psycopg.OperationalError:
            if self.conn.broken:  # the COMMIT may or may not have happened
                for uid in [*outcome.present, *outcome.gone]:
                    self.report.ledger[uid] = "unknown"
                    self.own.discard(uid)
            raise
        self.report.committed += 1
        for uid in outcome.gone:
            self.report.ledger[uid] = "gone"
            self.own.discard(uid)
        for uid in outcome.present:
            self.report.ledger[uid] = "present"
            self.own.add(uid)
        self.own_patients.extend(outcome.patients)

    def _failed(self, state: str) -> None:
        self.report.failed[state] += 1
        end_failed(self.conn, state, self.stop)

    # Picking rows ---------------------------------------------------------------------------------------------

    def _x(self, query: str, params: Any = None) -> psycopg.Cursor[Any]:
        assert self.conn is not None
        return self.conn.execute(query, params)

    def _study(self) -> str:
        """A study this worker owns, or one of the built database's (perhaps purged already: then 0 rows change).

        Updates may touch any study, but removals must keep to these two (see the ledger in the module doc), so all
        transactions pick their study here.
        """
        if self.own and (self.rng.random() < 0.5 or not self.survey.base_studies):
            return self.own.pick(self.rng)
        return f"{STUDY_UID_ROOT}{self.rng.randint(1, max(1, self.survey.base_studies))}"

    def _patient(self) -> int:
        # Only patients known to exist: ids in between may belong to rolled-back inserts.
        if self.own_patients and self.rng.random() < 0.2:
            return self.rng.choice(self.own_patients)
        return self.rng.randint(1, max(1, self.survey.base_patients))

    def _now_minus(self, minutes: int) -> datetime:
        return datetime.now(UTC) - timedelta(minutes=self.rng.randint(0, minutes),
                                             microseconds=self.rng.randint(0, 999_999))

    # Building blocks ------------------------------------------------------------------------------------------

    def _insert_patient(self) -> int:
        row = self._x(
            "INSERT INTO public.patient (mrn, family_name, given_name, birth_date, sex, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, now()) RETURNING patient_id",
            (f"W{self.index}-{uuid.uuid4().hex[:12].upper()}", self.rng.choice(_FAMILY_NAMES),
             self.rng.choice(_GIVEN_NAMES), date(1930, 1, 1) + timedelta(days=self.rng.randint(0, 33000)),
             self.rng.choice(["F", "M", "O", None])),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def _insert_study(self, uid: str, patient_id: int, *, marked: bool = False) -> None:
        """One study as a modality sends it: the study, 1-3 series, 2-4 instances each."""
        rng = self.rng
        text = ROLLED_BACK_MARKER if marked else None
        meta = {"station": f"STN{rng.randint(1, 9)}", "priority": rng.choice(["routine", "stat"]),
                "dose": {"ctdi": round(rng.uniform(1, 40), 2), "dlp": rng.uniform(10, 900)},
                "Bemerkung": rng.choice(_DESCRIPTIONS), "rev": 0, "empty": None}
        self._x(
            "INSERT INTO public.study (study_uid, patient_id, accession, study_date, modalities, description, meta,"
            " status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (uid, patient_id, text or f"W{rng.randint(0, 10**9):09d}", self._now_minus(600),
             rng.choice(_MODALITIES), text or rng.choice(_DESCRIPTIONS),
             None if rng.random() < 0.1 else Jsonb(meta), rng.choice(_STATUSES)),
        )
        for number in range(1, rng.randint(1, 3) + 1):
            series_uid = _new_uid()
            count = rng.randint(2, 4)
            self._x(
                "INSERT INTO public.series (series_uid, study_uid, modality, series_number, body_part, instance_count)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (series_uid, uid, rng.choice(["CT", "MR", "CR", "US"]), number, text or rng.choice(_BODY_PARTS),
                 count),
            )
            self._x(_INSERT_INSTANCES, {
                "series": series_uid, "count": count, "path": f"/pacs/store/incoming/{series_uid}/",
                "size": rng.randint(100_000, 3_000_000), "syntax": text or rng.choice(_TRANSFER_SYNTAXES),
            })

    def _insert_audit(self, object_uid: str | None, *, action: str | None = None, twice: bool = False) -> None:
        event = (datetime.now(UTC), self.rng.choice(_ACTORS), action or self.rng.choice(_ACTIONS), object_uid)
        self._x("INSERT INTO public.audit_event (event_time, actor, action, object_uid) VALUES (%s, %s, %s, %s)",
                event)
        if twice:  # the interface engine's double delivery: an exact duplicate row
            self._x("INSERT INTO public.audit_event (event_time, actor, action, object_uid) VALUES (%s, %s, %s, %s)",
                    event)
            self.duplicates.append(event)
            del self.duplicates[:-100]

    # Transactions: each returns what it did; `_attempt` commits it, or rolls it back when asked to ------------

    def _tx_arrive(self) -> _Outcome:
        new_patient = self.rng.random() < 0.3
        patient_id = self._insert_patient() if new_patient else self._patient()
        uid = _new_uid()
        self._insert_study(uid, patient_id)
        return _Outcome(present=[uid], patients=[patient_id] if new_patient else [])

    def _tx_report(self) -> _Outcome:
        uid = self._study()
        report = {"report": {"reader": self.rng.choice(_ACTORS), "impression": self.rng.choice(_DESCRIPTIONS)}}
        self._x(
            "UPDATE public.study SET status = %s, description = %s, meta = coalesce(meta, '{}') || %s"
            " WHERE study_uid = %s",
            (self.rng.choice(_STATUSES), self.rng.choice(_DESCRIPTIONS), Jsonb(report), uid),
        )
        self._x(
            "UPDATE public.instance SET transfer_syntax = %s, received_at = now()"
            " WHERE series_uid IN (SELECT series_uid FROM public.series WHERE study_uid = %s)",
            (self.rng.choice(_TRANSFER_SYNTAXES), uid),
        )
        return _Outcome()

    def _tx_demographics(self) -> _Outcome:
        patient_id = self._patient()
        self._x(
            "UPDATE public.patient SET family_name = %s, given_name = %s, updated_at = now() WHERE patient_id = %s",
            (self.rng.choice(_FAMILY_NAMES), self.rng.choice(_GIVEN_NAMES), patient_id),
        )
        if self.rng.random() < 0.3:
            # The study was filed under the wrong patient: it moves, and gets a new UID (cascades to its series).
            old, new = self._study(), _new_uid()
            moved = self._x(
                "UPDATE public.study SET study_uid = %s, patient_id = %s WHERE study_uid = %s", (new, patient_id, old)
            ).rowcount
            if moved:
                return _Outcome(present=[new], gone=[old])
        return _Outcome()

    def _tx_purge(self) -> _Outcome:
        uid = self._study()
        deleted = self._x("DELETE FROM public.study WHERE study_uid = %s", (uid,)).rowcount
        return _Outcome(gone=[uid] if deleted else [])

    def _tx_resend(self) -> _Outcome:
        """The modality sends a study again: delete it and insert it anew under the same UID, in one transaction."""
        if not self.own:
            return self._tx_arrive()
        uid = self.own.pick(self.rng)
        row = self._x("DELETE FROM public.study WHERE study_uid = %s RETURNING patient_id", (uid,)).fetchone()
        if row is not None:
            self._insert_study(uid, int(row[0]))
        return _Outcome()

    def _tx_resend_split(self) -> _Outcome:
        """The same as `_tx_resend`, but the delete and the insert commit separately."""
        if not self.own:
            return self._tx_arrive()
        uid = self.own.pick(self.rng)
        row = self._x("DELETE FROM public.study WHERE study_uid = %s RETURNING patient_id", (uid,)).fetchone()
        if row is None:
            return _Outcome()
        self._commit(_Outcome(gone=[uid]))
        self._insert_study(uid, int(row[0]))
        return _Outcome(present=[uid])

    def _tx_savepoint(self) -> _Outcome:
        """Work, a mistake rolled back to a savepoint (sometimes after an error), more work, commit."""
        uid = self._study()
        self._insert_audit(uid)
        self._x("SAVEPOINT before_mistake")
        self._insert_study(_new_uid(), self._patient(), marked=True)
        self._x("UPDATE public.patient SET family_name = %s WHERE patient_id = %s",
                (ROLLED_BACK_MARKER, self._patient()))
        if self.rng.random() < 0.5:
            try:  # the application inserts a study that is already there, and recovers
                self._x("INSERT INTO public.study (study_uid, description) VALUES (%s, %s)",
                        (uid, ROLLED_BACK_MARKER))
            except psycopg.errors.UniqueViolation:
                pass
        self._x("ROLLBACK TO SAVEPOINT before_mistake")
        self._x("UPDATE public.study SET status = 'READ' WHERE study_uid = %s", (uid,))
        return _Outcome()

    def _tx_rollback(self) -> _Outcome:
        """Writes of every kind, then ROLLBACK: none of them may appear anywhere."""
        self._insert_study(_new_uid(), self._patient(), marked=True)
        self._x("UPDATE public.study SET description = %s WHERE study_uid = %s",
                (ROLLED_BACK_MARKER, self._study()))
        if self.own:  # an owned study survives its rolled-back purge; the ledger still says present
            self._x("DELETE FROM public.study WHERE study_uid = %s", (self.own.pick(self.rng),))
        self._insert_audit(None, action=ROLLED_BACK_MARKER)
        self._x(
            'INSERT INTO oncology."Treatment Course" (patient_id, intent, prescribed_dose, fractions, notes)'
            " VALUES (%s, 'curative', 50, 25, %s)",
            (self._patient(), ROLLED_BACK_MARKER),
        )
        return _Outcome(rollback=True)

    def _tx_treatment(self) -> _Outcome:
        rng = self.rng
        if rng.random() < 0.4 or not self.max_course:
            row = self._x(
                'INSERT INTO oncology."Treatment Course" (patient_id, intent, prescribed_dose, delivered_dose,'
                ' fractions, start_date, "order", plan_window, notes)'
                " VALUES (%s, %s, %s, 0, %s, current_date, 1,"
                "         tstzrange(now(), now() + make_interval(days => %s)), %s) RETURNING course_id",
                (self._patient(), rng.choice(_INTENTS), round(rng.uniform(20, 80), 3), rng.choice([0, 5, 25, 30]),
                 rng.randint(1, 60), rng.choice(_DESCRIPTIONS)),
            ).fetchone()
            assert row is not None
            self.max_course = max(self.max_course, int(row[0]))
        else:
            # A fraction delivered: ids beyond the built ones may be gaps (rolled back): then nothing is updated.
            self._x(
                'UPDATE oncology."Treatment Course"'
                "   SET delivered_dose = coalesce(delivered_dose, 0) + coalesce(dose_per_fraction, 0),"
                '       "order" = coalesce("order", 0) + 1, notes = %s,'
                "       plan_window = CASE WHEN lower(plan_window) < now() THEN tstzrange(lower(plan_window), now())"
                "                          ELSE plan_window END"
                " WHERE course_id = %s",
                (rng.choice(_DESCRIPTIONS), rng.randint(1, self.max_course)),
            )
        return _Outcome()

    def _tx_audit(self) -> _Outcome:
        for _ in range(self.rng.randint(1, 3)):
            self._insert_audit(self._study() if self.rng.random() < 0.9 else None, twice=self.rng.random() < 0.3)
        if self.duplicates and self.rng.random() < 0.25:
            # Cleaning up a double delivery: rows have no key, so one of the twins goes by its ctid.
            self._x(_DELETE_ONE_DUPLICATE, self.duplicates.pop(self.rng.randrange(len(self.duplicates))))
        return _Outcome()

    def _tx_long(self) -> _Outcome:
        """A study arrives in a transaction that stays open, so that it commits late (cut short by stop)."""
        patient_id = self._patient()
        uid = _new_uid()
        self._insert_study(uid, patient_id)
        self._x("UPDATE public.study SET status = 'READ' WHERE study_uid = %s", (self._study(),))
        self._insert_audit(uid, twice=True)
        self.stop.wait(self.spec.long_transaction_seconds)
        return _Outcome(present=[uid])
