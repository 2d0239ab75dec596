"""Celery tasks: a thin shell around shared.core.inference.Segmenter (loaded once per worker process).

Start: `celery -A shared.service.celery_app worker -Q covidseg.interactive,covidseg.bulk` (pool size:
COVIDSEG_WORKER_CONCURRENCY; see scripts/localstack.py and docker-compose.yml). The main worker process never
imports TensorFlow; each pool child loads the model once (`worker_process_init`), on the GPU when TensorFlow sees one, else on the CPU.

`process_jobs(job_ids)` is idempotent: it claims each job with a conditional UPDATE (queued, or running with a
stale heartbeat), writes results under fixed keys (results/<job_id>/...), and finishes only while it still holds
the claim, so a duplicate or late message can neither duplicate results nor move a finished job backwards.

Throughput: the slices of one message are inferred in ONE model call (up to `infer_batch_size`; batches are
published in messages of that size). A single-slice interactive message also claims up to that many other
waiting single-slice jobs of its queue (`_gather`), so a burst of uploads is inferred at batch 8 too. Inputs are
fetched and results rendered + stored by a small per-process thread pool, so S3 round trips overlap and PNG
encoding uses every core; the time left outside the model call is logged per task (`task timings:`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy.exc
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from shared.service import db
from shared.service.celery_app import PROCESS_TASK, SWEEP_TASK, celery_app
from shared.service.storage import Storage, StorageError, result_key, result_prefix

log = logging.getLogger("covidseg.worker")
#: Threads per worker process for S3 transfers and result rendering (I/O-bound; PNG encoding releases the GIL).
IO_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None

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
                from shared.core.inference import Segmenter
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


class _Clock:
    """Wall and process-CPU seconds per phase of one task, logged as one `task timings:` line (the service
    benchmark sums them: where a worker's time goes besides the model call)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.start = self._last = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.phases[name] = self.phases.get(name, 0.0) + now[0] - self._last[0]
        self.phases[name + "_cpu"] = self.phases.get(name + "_cpu", 0.0) + now[1] - self._last[1]
        self._last = now

    def line(self, slices: int) -> str:
        self.lap("other")
        total = self._last[0] - self.start[0], self._last[1] - self.start[1]
        return (f"task timings: slices={slices} " + " ".join(f"{k}={v:.3f}" for k, v in self.phases.items())
                + f" total={total[0]:.3f} total_cpu={total[1]:.3f}")


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


def claim_with_retry(task, claim, what):
    """Run `claim(session, lease, worker_name)` under a fresh lease, for the job and the study tasks alike.

    A transient DB error re-runs the task with back-off; after `task_max_retries` it gives up and returns None as
    the claim (the sweep re-publishes the work). Returns (lease, worker_name, claimed)."""
    lease = db.new_id()
    worker_name = f"{task.request.hostname or 'worker'}:{os.getpid()}"
    try:
        with resources().Session() as session:
            return lease, worker_name, claim(session, lease, worker_name)
    except TRANSIENT as exc:
        if task.request.retries >= settings().task_max_retries:
            log.error("cannot claim %s: %s (the sweep will re-publish it)", what, exc)
            return lease, worker_name, None
        raise task.retry(countdown=_backoff(task.request.retries), exc=exc)


@celery_app.task(name=PROCESS_TASK, bind=True, max_retries=None)
def process_jobs(self, job_ids):
    s = settings()
    r = resources()
    clock = _Clock()
    lease, worker_name, jobs = claim_with_retry(
        self, lambda session, lease, name: db.claim_jobs(session, job_ids, lease, name, s.stale_after), job_ids)
    if not jobs:
        return {"claimed": 0}
    with r.Session() as session:
        for j in [j for j in jobs if db.crashed_runs(j) > s.job_max_attempts]:
            db.finish_failure(session, j.id, lease, f"gave up after {db.crashed_runs(j) - 1} attempts "
                              "(worker lost or time limit exceeded)")
    jobs = [j for j in jobs if db.crashed_runs(j) <= s.job_max_attempts]
    jobs += _gather(r, jobs, lease, worker_name)
    clock.lap("claim")
    done: set[str] = set()
    hb = _Heartbeat(r.Session, [j.id for j in jobs], lease, s.heartbeat_interval)
    hb.start()
    try:
        _process(r, jobs, lease, done, clock)
    except (SoftTimeLimitExceeded, *TRANSIENT) as exc:
        pending = [j.id for j in jobs if j.id not in done]
        what = "time limit exceeded" if isinstance(exc, SoftTimeLimitExceeded) else f"{type(exc).__name__}: {exc}"
        log.warning("jobs %s: %s", pending, what)
        if self.request.retries >= s.task_max_retries:
            _fail_all(r, pending, lease, f"gave up after {self.request.retries} retries: {what}")
            return {"claimed": len(jobs), "failed": len(pending)}
        try:
            with r.Session() as session:  # a time limit counts as an attempt, a storage/DB outage does not
                db.release(session, pending, lease, count_attempt=isinstance(exc, SoftTimeLimitExceeded))
        except TRANSIENT:
            pass  # still running with a stale heartbeat soon: the claim below (or the sweep) takes it over
        raise self.retry(kwargs={"job_ids": pending}, countdown=_backoff(self.request.retries), exc=exc)
    except Exception as exc:  # noqa: BLE001 - a bug or bad data must fail the jobs, never the worker
        log.exception("jobs %s failed", [j.id for j in jobs])
        _fail_all(r, [j.id for j in jobs if j.id not in done], lease, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        hb.stop_event.set()
    log.info(clock.line(len(jobs)))
    return {"claimed": len(jobs), "done": len(done)}


def _gather(r, jobs, lease: str, worker_name: str) -> list:
    """Claim more waiting single-slice jobs of the same interactive queue, so one model call serves up to
    infer_batch_size of them (a burst of uploads is inferred at batch 8, not one slice at a time).

    Safe with acks_late: the gathered jobs' own messages stay in the broker; when delivered they find the job
    finished (or running under a live lease) and are no-ops. If this worker dies, the gathered jobs go stale and
    the recovery sweep re-queues them, exactly like the message's own jobs.
    """
    s = settings()
    room = s.infer_batch_size - len(jobs)
    if room <= 0 or not jobs or any(j.queue != s.queue_interactive or j.batch_id for j in jobs):
        return []
    try:
        with r.Session() as session:
            ids = session.execute(select(db.Job.id).where(
                db.Job.status == db.QUEUED, db.Job.queue == s.queue_interactive, db.Job.batch_id.is_(None),
                db.Job.id.not_in([j.id for j in jobs])).order_by(db.Job.seq).limit(room)).scalars().all()
            extra = db.claim_jobs(session, ids, lease, worker_name, s.stale_after) if ids else []
            for j in [j for j in extra if db.crashed_runs(j) > s.job_max_attempts]:
                db.finish_failure(session, j.id, lease, f"gave up after {db.crashed_runs(j) - 1} attempts "
                                  "(worker lost or time limit exceeded)")
    except TRANSIENT as exc:   # an optimisation: the message's own jobs go ahead (anything claimed goes stale
        log.warning("gather failed: %s", exc)   # and the sweep re-queues it)
        return []
    return [j for j in extra if db.crashed_runs(j) <= s.job_max_attempts]


def _fail_all(r, job_ids, lease, error):
    try:
        with r.Session() as session:
            for jid in job_ids:
                db.finish_failure(session, jid, lease, error)
    except TRANSIENT as exc:
        log.error("cannot record failure of %s: %s", job_ids, exc)


def _io_pool() -> ThreadPoolExecutor:
    """Per-process threads for the task's S3 transfers and PNG work (cv2 and hashlib release the GIL)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool, _pool_pid = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="covidseg-io"), os.getpid()
    return _pool


def _fetch_decode(r, job, max_pixels):
    """(image, None) or (None, reason) for one job's input; transient storage errors propagate."""
    from shared.core.imageio import decode_image_bytes  # core module (no TensorFlow)

    data = r.storage.get_bytes(job.input_key, expect_sha256=job.input_sha256)
    try:
        return decode_image_bytes(data, max_pixels=max_pixels), None
    except Exception as exc:  # noqa: BLE001 - undecodable input fails this job only
        return None, f"cannot decode image: {exc}"


def _render_store(r, job_id, img, prob):
    """Render the three result PNGs of one job and store them; returns (checksums, infected fraction)."""
    from shared.core.render import infected_fraction, mask_png, overlay_png, probability_png

    outputs = {"mask": mask_png(prob), "probability": probability_png(prob), "overlay": overlay_png(img, prob)}
    sums = {kind: r.storage.put_bytes(result_key(job_id, kind), png, "image/png") for kind, png in outputs.items()}
    return sums, float(infected_fraction(prob))


def _process(r: _Resources, jobs, lease: str, done: set, clock: _Clock) -> None:
    """Fetch + decode every input (in parallel), infer them all in ONE model call (batch <= infer_batch_size),
    then render + store each job's results (in parallel) and finish the jobs under the lease."""
    s = settings()
    pool = _io_pool()
    fetched = list(pool.map(lambda j: _fetch_decode(r, j, s.max_pixels), jobs))   # re-raises transient errors
    images, ok = [], []
    with r.Session() as session:
        for j, (img, reason) in zip(jobs, fetched):
            if img is None:
                db.finish_failure(session, j.id, lease, reason)
                done.add(j.id)
                continue
            images.append(img)
            ok.append(j)
        if ok:
            db.heartbeat(session, [j.id for j in ok], lease, progress=30)
    clock.lap("fetch")
    if not ok:
        return
    probs = r.get_segmenter().predict(images, batch_size=s.infer_batch_size)
    clock.lap("infer")
    # Store only what this lease still holds: a worker that was frozen or cut off while another took its jobs
    # over must not rewrite their results (the lease protects the rows; this protects the objects).
    with r.Session() as session:
        db.heartbeat(session, [j.id for j in ok], lease, progress=70)
        held = set(session.scalars(select(db.Job.id).where(db.Job.id.in_([j.id for j in ok]),
                                                           db.Job.status == db.RUNNING,
                                                           db.Job.claim_token == lease)).all())
    lost = [j.id for j in ok if j.id not in held]
    if lost:
        log.warning("jobs %s: lease lost before storing results (taken over or cancelled); not stored", lost)
        done.update(lost)
    keep = [(j, img, prob) for j, img, prob in zip(ok, images, probs) if j.id in held]
    stored = [pool.submit(_render_store, r, j.id, img, prob) for j, img, prob in keep]
    with r.Session() as session:
        for (j, _, _), fut in zip(keep, stored):
            sums, fraction = fut.result()          # a storage error here propagates: the task retries
            if not db.finish_success(session, j.id, lease, fraction, json.dumps(sums, sort_keys=True)):
                status = session.scalar(select(db.Job.status).where(db.Job.id == j.id))  # by id, not by seq
                if status == db.CANCELLED:
                    r.storage.delete_prefix(result_prefix(j.id))   # cancelled while running: keep no results
            done.add(j.id)
    clock.lap("store")


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
