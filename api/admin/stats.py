"""Dashboard figures: job counters, hourly throughput + median latency, queue depth and the Celery workers online.

Everything here is read-only. Worker inspection is a broadcast that waits for replies, so it runs with a short
timeout and its answer (and the queue depths) is cached per API process for `admin_cache_seconds`.
"""
from __future__ import annotations

import statistics
import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, func, select

from shared.service import db

#: kombu's Redis transport keeps prioritised messages in lists named <queue><SEP><priority>.
_PRIORITY_SEP = "\x06\x16"
#: Throughput looks at jobs finished in the last `hours`; those created earlier than this are ignored (index use).
CREATED_HORIZON = timedelta(hours=72)
#: Upper bound of rows read for the Python (SQLite) aggregation.
MAX_ROWS = 200_000


def _hour(dt: datetime) -> datetime:
    return dt.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if dt else None


def counters(session, now: datetime | None = None) -> dict:
    now = now or db.utcnow()
    day = now - timedelta(hours=24)
    active = dict(session.execute(select(db.Job.status, func.count()).where(db.Job.status.in_(db.ACTIVE))
                                  .group_by(db.Job.status)).all())
    finished = dict(session.execute(
        select(db.Job.status, func.count()).where(db.Job.status.in_(db.TERMINAL),
                                                  db.Job.created_at >= now - CREATED_HORIZON,
                                                  db.Job.finished_at >= day)
        .group_by(db.Job.status)).all())
    return {"queued": int(active.get(db.QUEUED, 0)), "running": int(active.get(db.RUNNING, 0)),
            "failed_24h": int(finished.get(db.FAILED, 0)), "succeeded_24h": int(finished.get(db.SUCCEEDED, 0)),
            "cancelled_24h": int(finished.get(db.CANCELLED, 0))}


def throughput(session, hours: int = 24, now: datetime | None = None) -> list[dict]:
    """One entry per hour (oldest first, the current hour last): jobs finished (succeeded, failed) and the median
    latency (submission to result, seconds) of the jobs that succeeded in that hour."""
    now = now or db.utcnow()
    last = _hour(now)
    first = last - timedelta(hours=hours - 1)
    buckets = {first + timedelta(hours=i): {"succeeded": 0, "failed": 0, "median_latency_s": None}
               for i in range(hours)}
    window = and_(db.Job.status.in_((db.SUCCEEDED, db.FAILED)), db.Job.finished_at >= first,
                  db.Job.created_at >= first - CREATED_HORIZON)
    if session.bind.dialect.name == "postgresql":
        hour = func.date_trunc("hour", func.timezone("UTC", db.Job.finished_at))
        latency = func.extract("epoch", db.Job.finished_at - db.Job.created_at)
        q = select(hour, db.Job.status, func.count(),
                   func.percentile_cont(0.5).within_group(latency)).where(window).group_by(hour, db.Job.status)
        for h, status, n, med in session.execute(q).all():
            key = h.replace(tzinfo=timezone.utc)
            if key in buckets:
                buckets[key][status] = int(n)
                if status == db.SUCCEEDED and med is not None:
                    buckets[key]["median_latency_s"] = round(float(med), 2)
    else:
        lat: dict[datetime, list[float]] = {}
        rows = session.execute(select(db.Job.status, db.Job.created_at, db.Job.finished_at).where(window)
                               .limit(MAX_ROWS)).all()
        for status, created, finished in rows:
            key = _hour(finished)
            if key not in buckets:
                continue
            buckets[key][status] += 1
            if status == db.SUCCEEDED:
                lat.setdefault(key, []).append((finished - created).total_seconds())
        for key, values in lat.items():
            buckets[key]["median_latency_s"] = round(statistics.median(values), 2)
    return [{"hour": iso(h), "finished": b["succeeded"] + b["failed"], **b} for h, b in sorted(buckets.items())]


# --- broker + workers (cached) ---------------------------------------------------------------------------------
class WorkerMonitor:
    """Queue depths (Redis LLEN) and workers online (Celery `inspect().active()`), cached for `ttl` seconds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cached: dict | None = None
        self.expires = 0.0

    def get(self, settings, celery_app, ttl: float, timeout: float) -> dict:
        now = time.monotonic()
        with self.lock:   # one inspection at a time per process; the others wait for its answer
            if self.cached is not None and now < self.expires:
                return self.cached
            out = {"queues": queue_depths(settings), "checked_at": iso(db.utcnow())}
            if any(q.get("error") for q in out["queues"]):   # broker down: inspect would only hang on retries
                out.update({"workers": [], "workers_error": "the broker (Redis) is unreachable"})
            else:
                out.update(inspect_workers(celery_app, timeout))
            self.cached, self.expires = out, time.monotonic() + ttl
            return out


def queue_depths(settings) -> list[dict]:
    import redis
    out = []
    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            for q in settings.queues:
                names = [q] + [f"{q}{_PRIORITY_SEP}{p}" for p in range(1, 10)]
                pipe = client.pipeline()
                for n in names:
                    pipe.llen(n)
                out.append({"name": q, "depth": int(sum(pipe.execute()))})
            out.append({"name": "unacknowledged (held by workers)", "depth": int(client.hlen("unacked"))})
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the dashboard shows the broker as unreachable
        return [{"name": q, "depth": None, "error": f"broker unreachable ({type(exc).__name__})"}
                for q in settings.queues]
    return out


def inspect_workers(celery_app, timeout: float) -> dict:
    try:
        replies = celery_app.control.inspect(timeout=timeout).active() or {}
    except Exception as exc:  # noqa: BLE001
        return {"workers": [], "workers_error": f"workers could not be asked ({type(exc).__name__})"}
    workers = []
    for name, tasks in sorted(replies.items()):
        job_ids = []
        for t in tasks or []:
            kw = t.get("kwargs") or {}
            job_ids.extend(kw.get("job_ids", []) if isinstance(kw, dict) else [])
        workers.append({"name": name, "active_tasks": len(tasks or []), "job_ids": job_ids[:50]})
    return {"workers": workers, "workers_error": None}


monitor = WorkerMonitor()
