"""Celery task for whole studies (issue 5): one task per study on the BULK queue.

`process_study(study_id)` downloads the normalised, de-identified input the API stored
(studies/<id>/input.tar), reads it with shared.core.study.load_study, runs shared.core.study.analyse_study with the worker's
Segmenter (loaded once per process by worker.tasks) and writes shared.core.study.study_outputs to
studies/<id>/results/. Progress (percent) goes to the database at most every `study_progress_interval` s;
a heartbeat thread keeps the claim alive so the recovery sweep can tell a slow study from a dead worker.

Idempotent like the slice jobs: the study is claimed with a conditional UPDATE under a fresh lease; results go to
fixed keys (a re-run after kill -9 overwrites them); it is finished only while the lease is held, so a late or
duplicate message can never move a finished or cancelled study backwards. Cancelling (status leaves `running`)
makes `should_stop()` true at the next batch and the task stops without results. Transient errors (S3, database)
release the study and retry with back-off, `task_max_retries` times; bad input fails the study with the reason.
Time limits come with the message (shared.service.celery_app.dispatch_studies: base + seconds per slice, below the
broker's visibility timeout).
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from shared.service import db
from shared.service.celery_app import STUDY_TASK, celery_app
from shared.service.storage import study_input_key, study_result_key, study_results_prefix
from worker.tasks import TRANSIENT, _backoff, claim_with_retry, resources, settings

log = logging.getLogger("covidseg.worker.study")

#: Share of the progress bar per phase: reading the input, the model over the slices, writing the outputs.
LOAD_PCT, ANALYSE_PCT = 3.0, 87.0


class _Stopped(Exception):
    """The study left `running` under our lease (cancelled, or taken over by the sweep): stop quietly."""


class _StudyHeartbeat(threading.Thread):
    """Refreshes the study's heartbeat every `interval` s; `lost` is set once the lease is gone."""

    def __init__(self, session_factory, study_id: str, lease: str, interval: float):
        super().__init__(name="covidseg-study-heartbeat", daemon=True)
        self.session_factory, self.study_id, self.lease, self.interval = session_factory, study_id, lease, interval
        self.stop_event = threading.Event()
        self.lost = threading.Event()

    def run(self):
        while not self.stop_event.wait(self.interval):
            try:
                with self.session_factory() as session:
                    if not db.study_heartbeat(session, self.study_id, self.lease):
                        self.lost.set()
                        return
            except Exception as exc:  # noqa: BLE001 - DB briefly down: the next beat may succeed
                log.warning("study heartbeat failed: %s", exc)


class _Progress:
    """The progress callback and the `should_stop` check handed to shared.core.study.analyse_study.

    Writes are throttled (at most one per `interval` s, and always the last one), and every write doubles as a
    lease check: a cancelled study is noticed at the next batch.
    """

    def __init__(self, session_factory, study_id: str, lease: str, interval: float, heartbeat: _StudyHeartbeat):
        self.session_factory, self.study_id, self.lease = session_factory, study_id, lease
        self.interval, self.heartbeat = interval, heartbeat
        self.last_write = 0.0
        self.last_check = 0.0
        self.stopped = False

    def set(self, percent: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = self.last_check = now
        try:
            with self.session_factory() as session:
                if not db.study_heartbeat(session, self.study_id, self.lease, progress=round(percent, 1)):
                    self.stopped = True
        except TRANSIENT as exc:  # progress is best effort; the heartbeat thread keeps the claim
            log.warning("study %s: progress not written: %s", self.study_id, exc)

    def analysis(self, done: int, total: int) -> None:
        """`progress(done_slices, total_slices)` of analyse_study."""
        frac = done / total if total else 1.0
        self.set(LOAD_PCT + ANALYSE_PCT * frac, force=done >= total)

    def should_stop(self) -> bool:
        if self.stopped or self.heartbeat.lost.is_set():
            self.stopped = True
            return True
        now = time.monotonic()
        if now - self.last_check >= self.interval:
            self.last_check = now
            try:
                with self.session_factory() as session:
                    row = session.execute(select(db.Study.status, db.Study.claim_token)
                                          .where(db.Study.id == self.study_id)).first()
                self.stopped = row is None or row[0] != db.RUNNING or row[1] != self.lease
            except TRANSIENT:
                pass
        return self.stopped

    def check(self) -> None:
        if self.should_stop():
            raise _Stopped()


def _extract(data: bytes, dest: Path) -> None:
    """Unpack the API's input tar (regular files only, no links, no paths outside `dest`)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(dest, filter="data")


@celery_app.task(name=STUDY_TASK, bind=True, max_retries=None)
def process_study(self, study_id):
    s = settings()
    r = resources()
    lease, worker_name, study = claim_with_retry(
        self, lambda session, lease, name: db.claim_study(session, study_id, lease, name, s.stale_after),
        f"study {study_id}")
    if study is None:
        return {"claimed": 0}   # finished, cancelled or held by a live worker: a duplicate message is a no-op
    if db.crashed_runs(study) > s.job_max_attempts:
        with r.Session() as session:
            db.study_finish_failure(session, study_id, lease, f"gave up after {db.crashed_runs(study) - 1} "
                                                              "attempts (worker lost or time limit exceeded)")
        return {"claimed": 1, "failed": 1}
    hb = _StudyHeartbeat(r.Session, study_id, lease, s.heartbeat_interval)
    hb.start()
    progress = _Progress(r.Session, study_id, lease, s.study_progress_interval, hb)
    try:
        _run(r, study, progress)
    except _Stopped:
        _after_stop(r, study_id)
        return {"claimed": 1, "stopped": 1}
    except SoftTimeLimitExceeded:
        soft, _ = s.study_time_limits(study.n_slices)
        log.warning("study %s: time limit of %d s exceeded", study_id, soft)
        _fail(r, study_id, lease, f"time limit of {soft} s exceeded ({study.n_slices} slices); "
                                  "retry it, or raise COVIDSEG_STUDY_SECONDS_PER_SLICE")
        return {"claimed": 1, "failed": 1}
    except TRANSIENT as exc:
        if progress.stopped:
            _after_stop(r, study_id)
            return {"claimed": 1, "stopped": 1}
        what = f"{type(exc).__name__}: {exc}"
        log.warning("study %s: %s", study_id, what)
        if self.request.retries >= s.task_max_retries:
            _fail(r, study_id, lease, f"gave up after {self.request.retries} retries: {what}")
            return {"claimed": 1, "failed": 1}
        try:
            with r.Session() as session:
                db.study_release(session, study_id, lease, count_attempt=False)  # an outage is no crash
        except TRANSIENT:
            pass  # still running with a stale heartbeat soon: the retry's claim (or the sweep) takes it over
        raise self.retry(countdown=_backoff(self.request.retries), exc=exc)
    except Exception as exc:  # noqa: BLE001 - bad data or a bug fails this study, never the worker
        if progress.stopped:   # analyse_study may signal a stop with an exception of its own
            _after_stop(r, study_id)
            return {"claimed": 1, "stopped": 1}
        from shared.core.study import StudyError
        if isinstance(exc, StudyError):
            _fail(r, study_id, lease, str(exc))
        else:
            log.exception("study %s failed", study_id)
            _fail(r, study_id, lease, f"internal error: {type(exc).__name__}: {exc}")
        return {"claimed": 1, "failed": 1}
    finally:
        hb.stop_event.set()
    return {"claimed": 1, "done": 1}


def _fail(r, study_id: str, lease: str, error: str) -> None:
    try:
        with r.Session() as session:
            db.study_finish_failure(session, study_id, lease, error)
    except TRANSIENT as exc:
        log.error("cannot record failure of study %s: %s (the sweep re-queues it)", study_id, exc)


def _after_stop(r, study_id: str) -> None:
    """A stopped study keeps no partial results when it was cancelled (a sweep takeover rewrites them anyway)."""
    try:
        with r.Session() as session:
            status = session.execute(select(db.Study.status).where(db.Study.id == study_id)).scalar()
        if status == db.CANCELLED:
            r.storage.delete_prefix(study_results_prefix(study_id))
        log.info("study %s stopped (%s)", study_id, status)
    except TRANSIENT as exc:
        log.warning("study %s: cleanup after stop failed: %s", study_id, exc)


def _run(r, study: db.Study, progress: _Progress) -> None:
    from shared.core.study import analyse_study, load_study, n_outputs, study_outputs

    s = settings()
    data = r.storage.get_bytes(study.input_key or study_input_key(study.id), expect_sha256=study.input_sha256)
    progress.check()
    with tempfile.TemporaryDirectory(prefix="covidseg-study-") as tmp:
        folder = Path(tmp) / "input"
        folder.mkdir()
        _extract(data, folder)
        del data
        volume = load_study(folder)
    progress.set(LOAD_PCT, force=True)
    progress.check()
    analysis = analyse_study(volume, r.get_segmenter(), batch_size=s.infer_batch_size,
                             progress=progress.analysis, should_stop=progress.should_stop)
    progress.check()
    sums: dict[str, str] = {}
    expected = n_outputs(volume)
    for i, (name, payload, content_type) in enumerate(study_outputs(volume, analysis)):
        sums[name] = r.storage.put_bytes(study_result_key(study.id, name), payload, content_type)
        progress.set(LOAD_PCT + ANALYSE_PCT + (99.0 - LOAD_PCT - ANALYSE_PCT) * min(1.0, (i + 1) / expected))
        if i % 16 == 0:
            progress.check()
    report = analysis.report
    with r.Session() as session:
        ok = db.study_finish_success(session, study.id, progress.lease, json.dumps(report, sort_keys=True),
                                     json.dumps(sums, sort_keys=True))
    if not ok:
        progress.stopped = True
        raise _Stopped()
    log.info("study %s succeeded: %d slices, %s", study.id, volume.n_slices,
             {k: report.get(k) for k in ("lesion_volume_ml", "percent_involved", "ct_score")})
