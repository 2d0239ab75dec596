"""The Celery application and its configuration (from shared.service.settings).

The API imports this module only to *send* tasks by name; it never imports worker/ (and so never TensorFlow).
Workers start with `celery -A shared.service.celery_app worker -Q <queue>`; `include` loads worker.tasks and
worker.study_tasks in the worker only. Run one worker per queue so interactive work never waits behind bulk work:
`-Q covidseg.interactive` and, at a lower CPU priority, `nice -n 10 ... -Q covidseg.bulk` (batches, studies).

Reliability settings: acks_late + reject_on_worker_lost (a message is acknowledged only after the task
finished, and re-queued if the worker child dies), prefetch 1 (a worker holds at most one extra message),
time limits below the Redis visibility timeout (a running task is never redelivered while still alive),
no result backend (job state lives in the database).
"""
from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from shared.service.settings import Settings, get_settings

PROCESS_TASK = "covidseg.process_jobs"
SWEEP_TASK = "covidseg.sweep"
STUDY_TASK = "covidseg.process_study"


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("covidseg", include=["worker.tasks", "worker.study_tasks"])
    exchange = Exchange("covidseg", type="direct")
    app.conf.update(
        broker_url=s.broker_url,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_pool_limit=16,
        broker_transport_options={
            "visibility_timeout": s.broker_visibility_timeout,
            "socket_timeout": 5, "socket_connect_timeout": 3, "health_check_interval": 10,
            "retry_on_timeout": True,
        },
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json", accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=s.worker_concurrency,   # a --concurrency flag overrides it
        task_soft_time_limit=s.task_soft_time_limit,
        task_time_limit=s.task_time_limit,
        task_default_queue=s.queue_interactive,
        task_default_exchange="covidseg",
        task_default_routing_key=s.queue_interactive,
        task_queues=(Queue(s.queue_interactive, exchange, routing_key=s.queue_interactive),
                     Queue(s.queue_bulk, exchange, routing_key=s.queue_bulk)),
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.5},
        worker_proc_alive_timeout=300,      # the child loads TensorFlow + weights before it reports up
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=True, task_send_sent_event=False,   # Flower
        worker_enable_remote_control=True,
    )
    app.conf.covidseg_settings = s
    return app


celery_app = make_celery()
app = celery_app


def chunk_jobs(jobs, size: int):
    """[(job_id, queue, batch_id)] -> [(queue, [job_id, ...])]: slices of one batch travel together (they are
    inferred in one model call), at most `size` per message; singles travel alone."""
    groups: dict[tuple, list[str]] = {}
    for job_id, queue, batch_id in jobs:
        groups.setdefault((queue, batch_id or job_id), []).append(job_id)
    out = []
    for (queue, _), ids in groups.items():
        for i in range(0, len(ids), size):
            out.append((queue, ids[i:i + size]))
    return out


def dispatch(app: Celery, session_factory, jobs, settings: Settings | None = None, mark: bool = True) -> int:
    """Publish process messages for `jobs` ([(job_id, queue, batch_id)]) and record `dispatched_at`.

    Raises kombu/redis errors when the broker is unreachable; the jobs then stay queued with dispatched_at NULL
    and the recovery sweep publishes them later (an accepted job is never lost).
    """
    from shared.service.db import mark_dispatched

    s = settings or app.conf.covidseg_settings
    sent = 0
    for queue, ids in chunk_jobs(jobs, s.infer_batch_size):
        # Published through the default (direct-to-queue) exchange: delivery does not depend on exchange
        # bindings stored in Redis, which a Redis restart without persistence loses until a worker redeclares.
        app.send_task(PROCESS_TASK, kwargs={"job_ids": ids}, queue=Queue(queue, Exchange(""), routing_key=queue))
        if mark:   # (the API sets dispatched_at in its INSERT already: one round trip less per upload)
            with session_factory() as session:
                mark_dispatched(session, ids)
        sent += len(ids)
    return sent


def dispatch_studies(app: Celery, session_factory, studies, settings: Settings | None = None,
                     mark: bool = True) -> int:
    """Publish one process message per study (`studies` = [(study_id, queue, n_slices)]) and record
    `dispatched_at`. The task's time limits come from the slice count (Settings.study_time_limits), so a
    600-slice study fits and a stuck one is still stopped before the broker would redeliver it.

    Raises kombu/redis errors when the broker is unreachable; the studies then stay queued with dispatched_at
    NULL and the recovery sweep publishes them later.
    """
    from shared.service.db import mark_studies_dispatched

    s = settings or app.conf.covidseg_settings
    sent = 0
    for study_id, queue, n_slices in studies:
        soft, hard = s.study_time_limits(n_slices)
        app.send_task(STUDY_TASK, kwargs={"study_id": study_id}, soft_time_limit=soft, time_limit=hard,
                      queue=Queue(queue, Exchange(""), routing_key=queue))
        if mark:
            with session_factory() as session:
                mark_studies_dispatched(session, [study_id])
        sent += 1
    return sent
