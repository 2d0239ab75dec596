"""Recovery sweep: re-queues jobs whose worker died and re-publishes jobs whose message was lost.

Runs at worker start-up and every `sweep_interval` seconds in a thread of each worker's main process (it does
not import TensorFlow), and on demand with `covidseg service sweep`. Concurrent sweeps are safe: every change is
a conditional UPDATE, and a duplicate message for a job is a no-op for the task.

1. `running` jobs without a heartbeat for `stale_after` s -> `queued` again (or `failed` after
   `job_max_attempts` claims: a slice that keeps killing workers must not loop forever), then published.
2. `queued` jobs never published (the API could not reach Redis) -> published.
3. `queued` jobs published more than `dispatch_grace` s ago whose message is in no queue and not held unacked
   by any worker (e.g. Redis restarted without persistence) -> published again.

Whole studies (shared.service.db.Study, worker/study_tasks.py) get the same three steps.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
from datetime import timedelta

from sqlalchemy import delete, select

from shared.service import db
from shared.service.celery_app import dispatch, dispatch_studies
from shared.service.settings import Settings

log = logging.getLogger("covidseg.sweep")
#: kombu's Redis transport keeps prioritised messages in lists named <queue><SEP><priority>.
_PRIORITY_SEP = "\x06\x16"
#: Above this many waiting messages the broker scan (step 3) is skipped for one round (bounded cost).
BROKER_SCAN_LIMIT = 100_000


def _job_ids_of_message(raw) -> set[str]:
    try:
        msg = json.loads(raw)
        if isinstance(msg, list):  # unacked hash entries are [message, exchange, routing_key]
            msg = msg[0]
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
        kwargs = payload[1] if isinstance(payload, list) else payload.get("kwargs", {})
        ids = set(kwargs.get("job_ids", []))
        if isinstance(kwargs.get("study_id"), str):   # worker.study_tasks messages
            ids.add(kwargs["study_id"])
        return ids
    except Exception:  # noqa: BLE001 - foreign or malformed message: not ours
        return set()


def jobs_in_broker(redis_client, queues) -> set[str] | None:
    """Job ids referenced by waiting or unacknowledged messages; None when there are too many to scan."""
    keys = []
    for q in queues:
        keys.append(q)
        keys.extend(f"{q}{_PRIORITY_SEP}{p}" for p in range(1, 10))
    total = sum(redis_client.llen(k) for k in keys) + redis_client.hlen("unacked")
    if total > BROKER_SCAN_LIMIT:
        return None
    ids: set[str] = set()
    for k in keys:
        for raw in redis_client.lrange(k, 0, -1):
            ids |= _job_ids_of_message(raw)
    for raw in redis_client.hvals("unacked"):
        ids |= _job_ids_of_message(raw)
    return ids


def sweep(settings: Settings, session_factory, celery_app, redis_client=None) -> dict:
    """One recovery round over jobs and studies; returns the ids touched per step."""
    report = {"requeued": [], "failed": [], "published": [], "republished_lost": []}
    with session_factory() as session:
        requeued, failed = db.requeue_stale(session, settings.stale_after, settings.job_max_attempts)
    report["requeued"], report["failed"] = requeued, failed
    now = db.utcnow()
    with session_factory() as session:
        undispatched = session.execute(select(db.Job.id, db.Job.queue, db.Job.batch_id).where(
            db.Job.status == db.QUEUED, db.Job.dispatched_at.is_(None),
            db.Job.updated_at < now - timedelta(seconds=2)).order_by(db.Job.seq).limit(10000)).all()
        overdue = session.execute(select(db.Job.id, db.Job.queue, db.Job.batch_id).where(
            db.Job.status == db.QUEUED, db.Job.dispatched_at.is_not(None),
            db.Job.dispatched_at < now - timedelta(seconds=settings.dispatch_grace))
            .order_by(db.Job.seq).limit(10000)).all()
        again = session.execute(select(db.Job.id, db.Job.queue, db.Job.batch_id).where(
            db.Job.id.in_(requeued), db.Job.status == db.QUEUED)).all() if requeued else []
    todo = [tuple(r) for r in again] + [tuple(r) for r in undispatched if r[0] not in set(requeued)]
    report["published"] = [r[0] for r in todo]
    scan: list = []

    def present():   # one broker scan per round, shared by jobs and studies
        if not scan:
            scan.append(jobs_in_broker(redis_client, settings.queues))
        return scan[0]
    if overdue and redis_client is not None and present() is not None:
        lost = [tuple(r) for r in overdue if r[0] not in present()]
        todo += lost
        report["republished_lost"] = [r[0] for r in lost]
    if todo:
        dispatch(celery_app, session_factory, todo, settings)
    report.update(sweep_studies(settings, session_factory, celery_app,
                                present if redis_client is not None else lambda: None))
    with session_factory() as session:   # retention of Idempotency-Key records
        session.execute(delete(db.IdempotencyKey).where(
            db.IdempotencyKey.created_at < now - timedelta(hours=settings.idempotency_ttl_hours)))
        session.commit()
    if any(report.values()):
        log.warning("sweep: %s", {k: len(v) for k, v in report.items()})
    return report


def sweep_studies(settings: Settings, session_factory, celery_app, present=lambda: None) -> dict:
    """The sweep's three steps for studies. `present()` returns the ids referenced by broker messages (None when
    unknown). Returns {"studies_requeued", "studies_failed", "studies_published", "studies_republished_lost"}."""
    S = db.Study
    with session_factory() as session:
        requeued, failed = db.requeue_stale_studies(session, settings.stale_after, settings.job_max_attempts)
    now = db.utcnow()
    cols = (S.id, S.queue, S.n_slices)
    with session_factory() as session:
        undispatched = session.execute(select(*cols).where(
            S.status == db.QUEUED, S.dispatched_at.is_(None), S.updated_at < now - timedelta(seconds=2))
            .order_by(S.seq).limit(1000)).all()
        overdue = session.execute(select(*cols).where(
            S.status == db.QUEUED, S.dispatched_at.is_not(None),
            S.dispatched_at < now - timedelta(seconds=settings.dispatch_grace)).order_by(S.seq).limit(1000)).all()
        again = session.execute(select(*cols).where(S.id.in_(requeued), S.status == db.QUEUED)).all() \
            if requeued else []
    todo = [tuple(r) for r in again] + [tuple(r) for r in undispatched if r[0] not in set(requeued)]
    published = [r[0] for r in todo]
    lost = []
    if overdue:
        ids = present()
        if ids is not None:
            lost = [tuple(r) for r in overdue if r[0] not in ids]
    if todo or lost:
        dispatch_studies(celery_app, session_factory, todo + lost, settings)
    return {"studies_requeued": requeued, "studies_failed": failed, "studies_published": published,
            "studies_republished_lost": [r[0] for r in lost]}


class SweepThread(threading.Thread):
    """Daemon thread running `sweep` now and every `settings.sweep_interval` seconds until stopped."""

    def __init__(self, settings: Settings, celery_app):
        super().__init__(name="covidseg-sweep", daemon=True)
        self.settings = settings
        self.celery_app = celery_app
        self.stop_event = threading.Event()

    def run(self):
        import redis

        engine = db.make_engine(self.settings)
        session_factory = db.make_sessionmaker(engine)
        client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=5, socket_connect_timeout=3)
        while not self.stop_event.is_set():
            try:
                sweep(self.settings, session_factory, self.celery_app, client)
            except Exception as exc:  # noqa: BLE001 - DB/Redis briefly down: try again next round
                log.warning("sweep failed: %s", exc)
            self.stop_event.wait(self.settings.sweep_interval)
        engine.dispose()
