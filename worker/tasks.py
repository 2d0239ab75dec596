"""Celery tasks: a thin shell around shared.inference.Segmenter (loaded once per worker process).

Start: `celery -A shared.celery_app worker -Q covidseg.interactive,covidseg.bulk --concurrency 1`
(see scripts/localstack.py and docker-compose.yml). The main worker process never imports TensorFlow; each pool
child loads the model once (`worker_process_init`), on the GPU when TensorFlow sees one, else on the CPU.

`process_jobs(job_ids)` is idempotent: it claims each job with a conditional UPDATE (queued, or running with a
stale heartbeat), writes results under fixed keys (results/<job_id>/...), and finishes only while it still holds
the claim, so a duplicate or late message can neither duplicate results nor move a finished job backwards.
"""
from __future__ import annotations

import json
import logging
import os
import threading

import sqlalchemy.exc
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from shared import db
from shared.celery_app import PROCESS_TASK, SWEEP_TASK, celery_app
from shared.storage import ChecksumMismatch, Storage, StorageError, result_key, result_prefix

log = logging.getLogger("covidseg.worker")

#: Errors worth retrying (the service behind them comes back); anything else fails the job for good.
TRANSIENT = (StorageError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, ConnectionError,
             TimeoutError)


def settings():
    return celery_app.conf.covidseg_settings


class _Resources:
    """Per-process database engine, session factory, storage client and (lazily) the model."""

    def __init__(self):
        s = settings()
        self.pid = os.getpid()
        self.engine = db.make_engine(s)
        self.Session = db.make_sessionmaker(self.engine)
        self.storage = Storage.from_settings(s)
        self.segmenter = None
        self.lock = threading.Lock()

    def get_segmenter(self):
        with self.lock:
            if self.segmenter is None:
                s = settings()
                if s.tf_threads > 0:
                    import tensorflow as tf
                    tf.config.threading.set_intra_op_parallelism_threads(s.tf_threads)
                    tf.config.threading.set_inter_op_parallelism_threads(max(1, s.tf_threads // 2))
                from shared.inference import Segmenter
                self.segmenter = Segmenter(weights=s.weights or None, backend=s.inference_backend,
                                           batch_size=s.infer_batch_size, threads=s.tf_threads or None,
                                           log=log.info)
                log.info("model loaded in process %s: %s", os.getpid(),
                         {k: v for k, v in self.segmenter.describe().items() if k != "int8_check"})
            return self.segmenter


_resources: _Resources | None = None
_sweeper = None


def resources() -> _Resources:
    global _resources
    if _resources is None or _resources.pid != os.getpid():
        _resources = _Resources()
    return _resources


@signals.worker_process_init.connect
def _load_model_in_child(**_):
    """Each pool child loads the model once, before it takes its first message."""
    resources().get_segmenter()


@signals.worker_ready.connect
def _start_sweep(**_):
    global _sweeper
    from worker.sweep import SweepThread
    _sweeper = SweepThread(settings(), celery_app)
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweep(**_):
    if _sweeper is not None:
        _sweeper.stop_event.set()


class _Heartbeat(threading.Thread):
    def __init__(self, session_factory, job_ids, lease, interval):
        super().__init__(name="covidseg-heartbeat", daemon=True)
        self.session_factory, self.job_ids, self.lease, self.interval = session_factory, job_ids, lease, interval
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.wait(self.interval):
            try:
                with self.session_factory() as session:
                    db.heartbeat(session, self.job_ids, self.lease)
            except Exception as exc:  # noqa: BLE001 - DB briefly down: the next beat may succeed
                log.warning("heartbeat failed: %s", exc)


def _backoff(retries: int) -> int:
    return min(settings().retry_backoff_max, 2 ** retries)


@celery_app.task(name=PROCESS_TASK, bind=True, max_retries=None)
def process_jobs(self, job_ids):
    s = settings()
    r = resources()
    lease = db.new_id()
    worker_name = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    try:
        with r.Session() as session:
            jobs = db.claim_jobs(session, job_ids, lease, worker_name, s.stale_after)
    except TRANSIENT as exc:
        if self.request.retries >= s.task_max_retries:
            log.error("cannot claim %s: %s (the sweep will re-publish them)", job_ids, exc)
            return {"claimed": 0}
        raise self.retry(countdown=_backoff(self.request.retries), exc=exc)
    if not jobs:
        return {"claimed": 0}
    with r.Session() as session:
        for j in [j for j in jobs if j.attempts > s.job_max_attempts]:
            db.finish_failure(session, j.id, lease,
                              f"gave up after {j.attempts - 1} attempts (worker lost or time limit exceeded)")
    jobs = [j for j in jobs if j.attempts <= s.job_max_attempts]
    done: set[str] = set()
    hb = _Heartbeat(r.Session, [j.id for j in jobs], lease, s.heartbeat_interval)
    hb.start()
    try:
        _process(r, jobs, lease, done)
    except (SoftTimeLimitExceeded, *TRANSIENT) as exc:
        pending = [j.id for j in jobs if j.id not in done]
        what = "time limit exceeded" if isinstance(exc, SoftTimeLimitExceeded) else f"{type(exc).__name__}: {exc}"
        log.warning("jobs %s: %s", pending, what)
        if self.request.retries >= s.task_max_retries:
            _fail_all(r, pending, lease, f"gave up after {self.request.retries} retries: {what}")
            return {"claimed": len(jobs), "failed": len(pending)}
        try:
            with r.Session() as session:
                db.release(session, pending, lease)
        except TRANSIENT:
            pass  # still running with a stale heartbeat soon: the claim below (or the sweep) takes it over
        raise self.retry(kwargs={"job_ids": pending}, countdown=_backoff(self.request.retries), exc=exc)
    except Exception as exc:  # noqa: BLE001 - a bug or bad data must fail the jobs, never the worker
        log.exception("jobs %s failed", [j.id for j in jobs])
        _fail_all(r, [j.id for j in jobs if j.id not in done], lease, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        hb.stop_event.set()
    return {"claimed": len(jobs), "done": len(done)}


def _fail_all(r, job_ids, lease, error):
    try:
        with r.Session() as session:
            for jid in job_ids:
                db.finish_failure(session, jid, lease, error)
    except TRANSIENT as exc:
        log.error("cannot record failure of %s: %s", job_ids, exc)


def _process(r: _Resources, jobs, lease: str, done: set) -> None:
    from shared.imageio import decode_image_bytes  # core module (no TensorFlow)
    from shared.render import infected_fraction, mask_png, overlay_png, probability_png

    s = settings()
    images, ok = [], []
    with r.Session() as session:
        for j in jobs:
            try:
                data = r.storage.get_bytes(j.input_key, expect_sha256=j.input_sha256)
            except ChecksumMismatch:
                raise
            try:
                img = decode_image_bytes(data, max_pixels=s.max_pixels)
            except Exception as exc:  # noqa: BLE001 - undecodable input fails this job only
                db.finish_failure(session, j.id, lease, f"cannot decode image: {exc}")
                done.add(j.id)
                continue
            images.append(img)
            ok.append(j)
        db.heartbeat(session, [j.id for j in ok], lease, progress=30)
    if not ok:
        return
    probs = r.get_segmenter().predict(images, batch_size=s.infer_batch_size)
    with r.Session() as session:
        db.heartbeat(session, [j.id for j in ok], lease, progress=70)
        for j, img, prob in zip(ok, images, probs):
            outputs = {"mask": mask_png(prob), "probability": probability_png(prob), "overlay": overlay_png(img, prob)}
            sums = {kind: r.storage.put_bytes(result_key(j.id, kind), png, "image/png")
                    for kind, png in outputs.items()}
            fraction = float(infected_fraction(prob))
            if not db.finish_success(session, j.id, lease, fraction, json.dumps(sums, sort_keys=True)):
                current = session.get(db.Job, j.id, populate_existing=True)
                if current is not None and current.status == db.CANCELLED:
                    r.storage.delete_prefix(result_prefix(j.id))   # cancelled while running: keep no results
            done.add(j.id)


@celery_app.task(name=SWEEP_TASK)
def sweep_task():
    """The recovery sweep as a task (for Celery beat, if one is run; workers also sweep on their own)."""
    import redis

    from worker.sweep import sweep
    s = settings()
    r = resources()
    client = redis.Redis.from_url(s.broker_url, socket_timeout=5)
    rep = sweep(s, r.Session, celery_app, client)
    return {k: len(v) for k, v in rep.items()}
