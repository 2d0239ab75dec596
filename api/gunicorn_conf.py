"""gunicorn settings for the API, derived from shared.service.settings (COVIDSEG_API_*).

gthread workers: a submission is one S3 PUT and one DB commit (the Celery message follows from a background
thread, api/publish.py), mostly waiting on those servers, so a few processes with several threads each keep the
CPU busy; /predict waits hold a thread. On the 2-core reference machine 2 workers x 8 threads, 3 x 16, 2 x 16 and
4 x 4 gave the same 50-client throughput within the noise of a shared machine (scripts/bench_service.py
--api-workers/--api-threads), so the defaults stay at 2 x 8: more processes only add memory and context switches.
"""
from shared.service.settings import get_settings

_s = get_settings()
bind = _s.api_bind
workers = _s.api_workers
threads = _s.api_threads
worker_class = "gthread"
timeout = int(_s.predict_timeout) + 30
graceful_timeout = 20
keepalive = 5
backlog = 512
accesslog = None
errorlog = "-"
loglevel = _s.log_level.lower()
preload_app = False      # each worker builds its own DB pool / clients after the fork


def worker_exit(server, worker):
    """Publish what is still queued in this worker's publisher before it exits (api/publish.py)."""
    from api.publish import flush_all
    flush_all()
