"""gunicorn settings for the API, derived from shared.settings (COVIDSEG_API_*).

gthread workers: the submit path is I/O-bound (multipart parse, one S3 PUT, one DB commit, one Redis publish), so
a few processes with several threads each keep latency flat under concurrency; /predict waits hold a thread.
"""
from shared.settings import get_settings

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
