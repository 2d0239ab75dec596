"""Publishing the submit path's Celery messages from one background thread per API process.

POST /api/v1/jobs answers 202 once the inputs are in S3 and the job rows are committed (with `dispatched_at`
set); the Celery message follows a moment later from this thread, so the request does not pay Celery's
publishing cost (about 1 ms of CPU per message plus a Redis round trip). Nothing accepted can be lost by this:

* if publishing fails (Redis down), the jobs' `dispatched_at` is cleared and the workers' recovery sweep
  publishes them as soon as it can (worker/sweep.py, step 2), exactly as when the request published itself;
* if the API process dies between the commit and the publish, the jobs are queued with `dispatched_at` set and
  no message: the sweep's lost-message check re-publishes them after `dispatch_grace` (step 3);
* on a graceful shutdown the queue is flushed first (gunicorn's `worker_exit` hook, and `atexit`).

Under load several submissions wait here at once; their single-slice jobs then travel in one message of up to
`infer_batch_size` ids (one publish instead of many; the worker infers them in one model call).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections import deque

from sqlalchemy import update

from shared.service import db
from shared.service.celery_app import dispatch

log = logging.getLogger("covidseg.api")
_ALL: "weakref.WeakSet[Publisher]" = weakref.WeakSet()


class Publisher:
    """A queue of [(job_id, queue, batch_id)] lists drained by one daemon thread (started on first use, per
    process: gunicorn forks its workers before any request)."""

    def __init__(self, celery, session_factory, settings):
        self.celery, self.Session, self.settings = celery, session_factory, settings
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        _ALL.add(self)

    def publish(self, jobs) -> None:
        """Queue messages for `jobs` ([(job_id, queue, batch_id)], already committed) and return at once."""
        with self._cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="covidseg-publisher", daemon=True)
                self._thread.start()
            self._items.append(list(jobs))
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far was published (or failed over to the sweep); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items)
                jobs = [j for item in self._items for j in item]
                self._items.clear()
                self._busy = True
            try:
                self._send(jobs)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, jobs) -> None:
        # single-slice jobs waiting together share messages (up to infer_batch_size ids each, per queue)
        grouped = [(jid, queue, batch_id or f"singles:{queue}") for jid, queue, batch_id in jobs]
        try:
            dispatch(self.celery, self.Session, grouped, self.settings, mark=False)
        except Exception as exc:  # noqa: BLE001 - broker down: the jobs are stored; the sweep publishes them
            log.warning("publish failed (%s); %d jobs stay queued for the sweep", exc, len(jobs))
            try:
                with self.Session() as session:
                    session.execute(update(db.Job).where(db.Job.id.in_([j[0] for j in jobs]),
                                                         db.Job.status == db.QUEUED).values(dispatched_at=None))
                    session.commit()
            except Exception:  # noqa: BLE001 - then the sweep's lost-message check finds them after dispatch_grace
                pass


def flush_all(timeout: float = 10.0) -> None:
    """Flush every publisher of this process (at exit: nothing accepted waits for the sweep needlessly)."""
    for p in list(_ALL):
        if p._pid == os.getpid():
            p.flush(timeout)


atexit.register(flush_all)
