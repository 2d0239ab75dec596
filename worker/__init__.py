"""Celery worker: tasks (worker.tasks) and the recovery sweep (worker.sweep)."""
