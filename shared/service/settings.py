"""ONE typed settings object for the service (API, workers, CLI, scripts), read from environment variables.

Every field is a `COVIDSEG_<FIELD>` environment variable (upper case), documented here with its default;
docs/SERVICE.md's settings table is generated from these declarations (`settings_markdown_table()`).
This module imports nothing heavy (no Flask, Celery, TensorFlow) so every process can load it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Mapping

ENV_PREFIX = "COVIDSEG_"


def _f(default, doc: str):
    return field(default=default, metadata={"doc": doc})


class SettingsError(ValueError):
    """An environment variable holds a value of the wrong type or an inconsistent combination."""


@dataclass(frozen=True)
class Settings:
    # --- database -------------------------------------------------------------------------------------------
    database_url: str = _f("sqlite:///var/covidseg.db",
                           "SQLAlchemy URL of the job database: SQLite for development, "
                           "postgresql+psycopg2://... in production. The schema comes only from `make migrate`.")
    db_pool_size: int = _f(10, "Connections kept open per process (PostgreSQL).")
    db_max_overflow: int = _f(20, "Extra connections a process may open under load (PostgreSQL).")
    db_pool_timeout: float = _f(10.0, "Seconds to wait for a pooled connection before failing the request.")
    # --- queue -----------------------------------------------------------------------------------------------
    broker_url: str = _f("redis://127.0.0.1:6379/0", "Celery broker (Redis) URL.")
    broker_visibility_timeout: int = _f(3600, "Redis visibility timeout (s): an unacknowledged message is "
                                              "redelivered after this long. Must exceed task_time_limit.")
    queue_interactive: str = _f("covidseg.interactive", "High-priority queue: single uploads and /predict.")
    queue_bulk: str = _f("covidseg.bulk", "Bulk queue: multi-file batches and whole studies (served by a "
                                          "dedicated, lower-priority worker).")
    # --- object storage ---------------------------------------------------------------------------------------
    s3_endpoint: str = _f("127.0.0.1:8333", "host:port of the S3 server (MinIO, SeaweedFS, AWS).")
    s3_access_key: str = _f("covidseg", "S3 access key.")
    s3_secret_key: str = _f("covidseg-secret", "S3 secret key.")
    s3_secure: bool = _f(False, "Use HTTPS for S3.")
    s3_region: str = _f("us-east-1", "S3 region (used for request signing).")
    s3_bucket: str = _f("covidseg", "Bucket holding uploads (inputs/) and results (results/).")
    s3_public_endpoint: str = _f("", "host:port clients use for presigned URLs when it differs from "
                                     "s3_endpoint (e.g. behind a proxy); empty = s3_endpoint.")
    result_links: str = _f("presigned", "How job results are linked: 'presigned' (short-lived S3 URLs) or "
                                        "'api' (streamed through the API with the bearer token).")
    presign_ttl_seconds: int = _f(300, "Lifetime of presigned result URLs (s).")
    s3_timeout: float = _f(10.0, "Connect/read timeout of one S3 request (s).")
    # --- uploads --------------------------------------------------------------------------------------------
    max_upload_bytes: int = _f(32 * 1024 * 1024, "Largest accepted file (bytes).")
    max_request_bytes: int = _f(256 * 1024 * 1024, "Largest accepted request body (bytes); larger bodies are "
                                                    "refused from the Content-Length before reading.")
    max_files_per_request: int = _f(500, "Most files in one POST /api/v1/jobs (one batch).")
    max_pixels: int = _f(40_000_000, "Largest accepted width*height, read from the image header before "
                                      "decoding (decompression bombs).")
    min_side: int = _f(8, "Smallest accepted width or height (pixels).")
    # --- jobs and workers -------------------------------------------------------------------------------------
    task_soft_time_limit: int = _f(120, "Soft time limit of one task (s): the task stops and the job is "
                                        "retried or failed.")
    task_time_limit: int = _f(150, "Hard time limit (s): the worker child is killed. > task_soft_time_limit.")
    task_max_retries: int = _f(5, "Retries of a task after transient storage/database errors.")
    retry_backoff_max: int = _f(60, "Upper bound of the exponential retry back-off (s).")
    job_max_attempts: int = _f(3, "Claims of one job (worker crashes, timeouts) before it is marked failed; "
                                  "claims handed back after a storage or database outage (handbacks) do not "
                                  "count: task_max_retries bounds those.")
    heartbeat_interval: float = _f(5.0, "A running job's heartbeat period (s).")
    stale_after: float = _f(45.0, "A running job without a heartbeat for this long is re-queued by the sweep "
                                  "(its worker died). > 2 * heartbeat_interval.")
    dispatch_grace: float = _f(30.0, "A queued job whose message is not in the broker after this long (s) is "
                                     "re-published (lost message, e.g. Redis restarted without persistence).")
    sweep_interval: float = _f(15.0, "Period of the worker's recovery sweep (s); it also runs at start-up.")
    infer_batch_size: int = _f(8, "Slices of one batch inferred together in one task.")
    predict_timeout: float = _f(60.0, "POST /predict waits this long (s) for the job before answering 504.")
    weights: str = _f("", "Weights file for the worker; empty = the shipped weights.")
    inference_backend: str = _f("auto", "Segmenter backend: auto | fp32 | bf16 | int8.")
    tf_threads: int = _f(0, "Inference threads per worker process (TensorFlow intra/inter-op, onnxruntime "
                            "intra-op); 0 = the runtime's default (all cores).")
    worker_concurrency: int = _f(2, "Processes in a worker's pool, each with its own copy of the model (~350 MB "
                                    "for INT8). On a CPU, 2 processes interleave one task's I/O and the model's "
                                    "serial sections with the other's parallel ones: 2 x all cores gave 1.3x the "
                                    "model throughput of 1 on 2 cores. Use 1 per GPU.")
    # --- whole studies (api/studies.py, worker/study_tasks.py) ----------------------------------------------------
    study_deidentify: bool = _f(True, "De-identify uploaded DICOM studies (PS3.15 basic profile subset: names, IDs, "
                                      "dates, addresses, institution, UIDs re-mapped, private tags) before "
                                      "anything is stored. Only turn off for data that is already anonymous.")
    study_uid_salt: str = _f("", "Secret key of the salted series-UID hash kept in the database and of the "
                                 "re-mapped DICOM UIDs; empty = the project's fixed salt (set a secret in "
                                 "production, and keep it: the same study then maps to the same UIDs).")
    study_max_upload_bytes: int = _f(1024 * 1024 * 1024, "Largest accepted study upload: all files of one "
                                                          "POST /api/v1/studies together (bytes).")
    study_max_files: int = _f(1000, "Most DICOM files in one study upload (multipart files or zip members).")
    study_max_unpacked_bytes: int = _f(4 * 1024 * 1024 * 1024, "Largest total size of a study's files after "
                                                                "unzipping (zip bombs are refused).")
    study_seconds_per_slice: float = _f(2.0, "Time budget of a study task per slice (s); with "
                                             "study_time_limit_base it sets the task's soft time limit, capped "
                                             "below broker_visibility_timeout.")
    study_time_limit_base: int = _f(300, "Fixed part of a study task's soft time limit (s): download, model "
                                         "load, lung masks, outputs.")
    study_progress_interval: float = _f(1.0, "A running study writes its progress to the database at most this "
                                             "often (s).")
    # --- API ------------------------------------------------------------------------------------------------
    api_bind: str = _f("127.0.0.1:8000", "gunicorn bind address of the API.")
    api_workers: int = _f(2, "gunicorn worker processes.")
    api_threads: int = _f(8, "Threads per gunicorn worker (gthread).")
    token_cache_seconds: float = _f(30.0, "A verified token is trusted this long per API process before the "
                                          "database is asked again (revocation delay).")
    rate_limit_per_minute: int = _f(600, "Submissions (POST of jobs, studies, /predict, cancel, retry) one token "
                                         "may make per minute, shared by every API process (Redis); more get "
                                         "429 with Retry-After. 0 = no limit.")
    daily_quota: int = _f(0, "Slices plus studies one token may submit per UTC day; more get 429 with "
                             "Retry-After (until midnight UTC). 0 = no quota.")
    idempotency_ttl_hours: int = _f(24, "Idempotency-Key records are kept this long.")
    log_level: str = _f("INFO", "Log level of the API and workers.")
    # --- web interface and admin dashboard (docs/WEB.md) -----------------------------------------------------
    admin_session_hours: float = _f(8.0, "An admin login lasts at most this long (h), however active.")
    admin_idle_minutes: float = _f(30.0, "An admin session unused for this long (min) ends.")
    admin_cookie_secure: bool = _f(False, "Mark the admin session cookie Secure (HTTPS only). Set true behind a "
                                          "TLS proxy; over direct HTTPS it is Secure anyway.")
    admin_login_max_failures: int = _f(5, "Failed admin logins per user name and per client address within 15 "
                                          "minutes before further attempts are refused for a while.")
    flower_url: str = _f("", "Flower (Celery monitor) URL linked from the admin dashboard; empty = no link.")
    admin_inspect_timeout: float = _f(1.0, "Seconds the dashboard waits for workers to answer Celery inspect.")
    admin_cache_seconds: float = _f(10.0, "Queue depths and workers online are cached this long (s) per API "
                                          "process.")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = env_name(f.name)
            if name in env:
                values[f.name] = _parse(f, env[name])
        values.update(overrides)
        s = cls(**values)
        s.validate()
        return s

    def replace(self, **changes) -> "Settings":
        s = dataclasses.replace(self, **changes)
        s.validate()
        return s

    def validate(self) -> None:
        problems = []
        if self.task_time_limit <= self.task_soft_time_limit:
            problems.append("task_time_limit must exceed task_soft_time_limit")
        if self.broker_visibility_timeout <= self.task_time_limit:
            problems.append("broker_visibility_timeout must exceed task_time_limit")
        if self.stale_after <= 2 * self.heartbeat_interval:
            problems.append("stale_after must exceed 2 * heartbeat_interval")
        if self.result_links not in ("presigned", "api"):
            problems.append("result_links must be 'presigned' or 'api'")
        if self.queue_interactive == self.queue_bulk:
            problems.append("queue_interactive and queue_bulk must differ")
        if self.broker_visibility_timeout <= self.study_time_limit_base + 60:
            problems.append("broker_visibility_timeout must exceed study_time_limit_base + 60")
        if self.study_seconds_per_slice <= 0:
            problems.append("study_seconds_per_slice must be positive")
        for name in ("max_upload_bytes", "max_request_bytes", "max_files_per_request", "max_pixels",
                     "infer_batch_size", "job_max_attempts", "api_workers", "api_threads", "study_max_upload_bytes",
                     "study_max_files", "study_max_unpacked_bytes", "worker_concurrency"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("rate_limit_per_minute", "daily_quota"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 (off) or positive")
        if problems:
            raise SettingsError("; ".join(problems))

    def env(self) -> dict[str, str]:
        """This object as environment variables (to start another process with the same settings)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[env_name(f.name)] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return out

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def study_time_limits(self, n_slices: int) -> tuple[int, int]:
        """(soft, hard) time limits (s) of the task of a study with `n_slices` slices: study_time_limit_base +
        study_seconds_per_slice per slice, capped so the hard limit stays below the broker's visibility timeout
        (a running study is never redelivered while its worker is alive)."""
        hard_cap = self.broker_visibility_timeout - 30
        soft = int(self.study_time_limit_base + self.study_seconds_per_slice * max(1, int(n_slices)))
        soft = min(soft, hard_cap - 30)
        return soft, min(soft + 60, hard_cap)

    @property
    def queues(self) -> tuple[str, str]:
        return (self.queue_interactive, self.queue_bulk)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse(f: dataclasses.Field, raw: str):
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    name = env_name(f.name)
    try:
        if typ == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ == "int":
            return int(raw.strip().replace("_", ""))
        if typ == "float":
            return float(raw.strip())
        return raw
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {typ}") from None


def settings_fields():
    """(env name, type, default, doc) for every setting (docs and tests)."""
    return [(env_name(f.name), f.type if isinstance(f.type, str) else f.type.__name__, f.default,
             f.metadata["doc"]) for f in fields(Settings)]


def settings_markdown_table() -> str:
    rows = ["| Variable | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for name, typ, default, doc in settings_fields():
        d = ("true" if default else "false") if isinstance(default, bool) else str(default)
        rows.append(f"| `{name}` | {typ} | `{d}` | {doc} |")
    return "\n".join(rows)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings.from_env()


if __name__ == "__main__":  # `python -m shared.service.settings` prints the table for docs/SERVICE.md
    print(settings_markdown_table())
