"""SQLAlchemy 2 models (jobs, batches, studies, API tokens, idempotency keys) and the engine/session factory.

The schema is created ONLY by Alembic (`make migrate`, migrations/); nothing here calls `create_all`.
Job state changes are conditional UPDATEs (`WHERE status IN (...)`) so that concurrent API requests, workers and
the recovery sweep can never move a job backwards (e.g. from succeeded to running).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, MetaData,
                        String, Text, UniqueConstraint, create_engine, event, text)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

from shared.service.settings import Settings

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)

#: Integer primary key type that autoincrements on SQLite too (SQLite needs INTEGER PRIMARY KEY).
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s",
          "pk": "pk_%(table_name)s"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC)."""
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


#: What a token may do. read: GET its own jobs, studies and results; submit: create, cancel and retry its own jobs
#: and studies (and POST /predict); admin: the admin API (/api/v1/admin, every token's work) with a bearer token.
SCOPES = ("read", "submit", "admin")
DEFAULT_SCOPES = "read submit"


class ApiToken(Base):
    """Bearer tokens. Only the SHA-256 of a token is stored; `prefix` identifies it in listings. `scopes` is a
    space-separated subset of SCOPES; a token past `expires_at` (or revoked) is refused."""
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scopes: Mapped[str] = mapped_column(String(64), nullable=False, default=DEFAULT_SCOPES,
                                        server_default=DEFAULT_SCOPES)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Who did what, when: admin logins and actions, token management. `actor` is "admin:<user>",
    "token:<id>:<name>" or "cli"; `target` names the object ("job:<id>", "study:<id>", "token:<id>")."""
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    actor: Mapped[str] = mapped_column(String(140), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target: Mapped[str | None] = mapped_column(String(140))
    client: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("ix_audit_events_at", "at"),)


class Batch(Base):
    """Several files submitted in one request."""
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    total: Mapped[int] = mapped_column(Integer, nullable=False)
    queue: Mapped[str] = mapped_column(String(64), nullable=False)
    jobs: Mapped[list["Job"]] = relationship(back_populates="batch", order_by="Job.position")
    __table_args__ = (Index("ix_batches_token_created", "token_id", "created_at"),)


class Job(Base):
    """One slice to segment. `seq` orders jobs (cursor pagination); `id` is the public identifier."""
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), nullable=False, unique=True, default=new_id)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), nullable=False)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"))
    position: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=QUEUED)
    queue: Mapped[str] = mapped_column(String(64), nullable=False)
    progress: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    retries: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    previous_error: Mapped[str | None] = mapped_column(Text)   # why the run before the last retry ended
    # claims handed back after a storage/database outage: counted in attempts, not against job_max_attempts
    handbacks: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(200))
    input_key: Mapped[str] = mapped_column(String(200), nullable=False)
    input_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    input_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_format: Mapped[str] = mapped_column(String(16), nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    original_name: Mapped[str | None] = mapped_column(String(255))
    infected_fraction: Mapped[float | None] = mapped_column(Float)
    result_checksums: Mapped[str | None] = mapped_column(Text)  # JSON {"mask": sha256, ...}
    batch: Mapped[Batch | None] = relationship(back_populates="jobs")
    __table_args__ = (
        CheckConstraint("status IN ('queued','running','succeeded','failed','cancelled')", name="status"),
        CheckConstraint("progress >= 0 AND progress <= 100", name="progress"),
        Index("ix_jobs_status_created", "status", "created_at"),       # dashboard: by status over time
        Index("ix_jobs_token_seq", "token_id", "seq"),                  # listing (cursor pagination)
        Index("ix_jobs_token_status_seq", "token_id", "status", "seq"),  # listing filtered by status
        Index("ix_jobs_batch_status", "batch_id", "status"),           # batch counts
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),   # sweep: stale running jobs
        Index("ix_jobs_created_at", "created_at"),                    # time filters / retention
    )


class IdempotencyKey(Base):
    """Replays the first response of a POST /api/v1/jobs for a retried request with the same key."""
    __tablename__ = "idempotency_keys"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), nullable=False)
    key: Mapped[str] = mapped_column(String(200), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    response: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    __table_args__ = (UniqueConstraint("token_id", "key", name="uq_idempotency_keys_token_key"),
                      Index("ix_idempotency_keys_created_at", "created_at"))


# ---------------------------------------------------------------------------------------------------------------
def make_engine(settings: Settings | str) -> Engine:
    url = settings if isinstance(settings, str) else settings.database_url
    s = None if isinstance(settings, str) else settings
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_pre_ping=False)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
        return engine
    kw = {}
    if s is not None:
        kw = dict(pool_size=s.db_pool_size, max_overflow=s.db_max_overflow, pool_timeout=s.db_pool_timeout)
    return create_engine(url, pool_pre_ping=True, pool_recycle=1800,
                         connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {}, **kw)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(bind=engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


# --- tokens ----------------------------------------------------------------------------------------------------
TOKEN_PREFIX = "cs_"


def hash_token(token: str) -> str:
    """SHA-256 hex of a bearer token (tokens are 256-bit random, so an unsalted hash is safe to store)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(text: str) -> str:
    """"read,submit" / "read submit" -> the canonical "read submit"; ValueError names an unknown scope."""
    given = {s for s in text.replace(",", " ").split() if s}
    unknown = given - set(SCOPES)
    if unknown or not given:
        raise ValueError(f"unknown scope {', '.join(sorted(unknown))}; choose from {', '.join(SCOPES)}" if unknown
                         else f"give at least one scope of {', '.join(SCOPES)}")
    return " ".join(s for s in SCOPES if s in given)


def create_token(session, name: str, scopes: str = DEFAULT_SCOPES,
                 expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Create a token; returns (row, the plaintext token — shown once, never stored)."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name[:100], prefix=plain[:10], token_hash=hash_token(plain), created_at=utcnow(),
                   scopes=parse_scopes(scopes), expires_at=expires_at)
    session.add(row)
    session.flush()
    return row, plain


def audit(session, actor: str, action: str, target: str | None = None, client: str | None = None,
          **detail) -> None:
    """Add an audit event to `session` (committed with the action it records)."""
    session.add(AuditEvent(at=utcnow(), actor=actor[:140], action=action[:64], target=target and target[:140],
                           client=client and client[:64],
                           detail=json.dumps(detail, sort_keys=True, default=str) if detail else None))


# --- job state transitions (conditional updates: a finished job never moves backwards) -------------------------
from datetime import timedelta  # noqa: E402

from sqlalchemy import and_, func, or_, select, update  # noqa: E402


# Generic transitions, shared by Job and Study (both have the same lifecycle columns: status, claim_token,
# attempts, progress, heartbeat_at, started_at, finished_at, dispatched_at, error, updated_at). Each one is a
# conditional UPDATE, so concurrent workers, the sweep and the API can never move a row backwards.
def _stale_heartbeat(model, stale):
    return or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale)


def _claim(session, model, row_id: str, lease: str, worker: str, stale_after: float, progress) -> bool:
    """queued (or running with a stale heartbeat) -> running under `lease`; not committed."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after)
    claimable = or_(model.status == QUEUED, and_(model.status == RUNNING, _stale_heartbeat(model, stale)))
    res = session.execute(update(model).where(model.id == row_id, claimable).values(
        status=RUNNING, claim_token=lease, worker=worker[:200], attempts=model.attempts + 1, started_at=now,
        heartbeat_at=now, updated_at=now, progress=progress, error=None))
    return bool(res.rowcount)


def _heartbeat(session, model, ids, lease: str, progress=None) -> int:
    now = utcnow()
    values = {"heartbeat_at": now, "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    res = session.execute(update(model).where(model.id.in_(list(ids)), model.status == RUNNING,
                                              model.claim_token == lease).values(**values))
    session.commit()
    return res.rowcount


def _finish_success(session, model, row_id: str, lease: str, **result) -> bool:
    """running (under `lease`) -> succeeded, storing the `result` columns."""
    now = utcnow()
    res = session.execute(update(model).where(model.id == row_id, model.status == RUNNING,
                                              model.claim_token == lease)
                          .values(status=SUCCEEDED, progress=100, finished_at=now, updated_at=now,
                                  heartbeat_at=now, error=None, **result))
    session.commit()
    return res.rowcount == 1


def _finish_failure(session, model, row_id: str, lease: str | None, error: str) -> bool:
    now = utcnow()
    cond = [model.id == row_id, model.status == RUNNING]
    if lease is not None:
        cond.append(model.claim_token == lease)
    res = session.execute(update(model).where(*cond).values(status=FAILED, error=error[:2000], finished_at=now,
                                                            updated_at=now))
    session.commit()
    return res.rowcount == 1


def _release(session, model, ids, lease: str, count_attempt: bool = True) -> list[str]:
    """running (under `lease`) -> queued. `count_attempt=False` records a hand-back (`handbacks` + 1): the run
    was stopped by a transient storage or database error (bounded by the task's own retries, task_max_retries),
    not by a crash or a time limit, so it must not use up the crash budget (job_max_attempts, which counts
    attempts - handbacks). `attempts` still counts every claim, so model runs <= attempts holds."""
    now = utcnow()
    out = []
    values = dict(status=QUEUED, claim_token=None, progress=0, updated_at=now, dispatched_at=now)
    if not count_attempt:
        values["handbacks"] = model.handbacks + 1
    for row_id in ids:
        res = session.execute(update(model).where(model.id == row_id, model.status == RUNNING,
                                                  model.claim_token == lease).values(**values))
        if res.rowcount:
            out.append(row_id)
    session.commit()
    return out


def _mark_dispatched(session, model, ids) -> None:
    now = utcnow()
    session.execute(update(model).where(model.id.in_(list(ids)), model.status == QUEUED)
                    .values(dispatched_at=now, updated_at=now))
    session.commit()


def _cancel(session, model, row_id: str) -> bool:
    now = utcnow()
    res = session.execute(update(model).where(model.id == row_id, model.status.in_(ACTIVE))
                          .values(status=CANCELLED, finished_at=now, updated_at=now, claim_token=None))
    session.commit()
    return res.rowcount == 1


def _retry(session, model, row_id: str, result_columns: tuple[str, ...]) -> bool:
    """failed/cancelled -> queued with a fresh attempt budget; `result_columns` (model-specific outputs) cleared.

    The history stays: `retries` counts the retries and `previous_error` keeps why the last run ended (its error,
    or "cancelled"); UPDATE's right-hand sides read the row's values from before the statement."""
    now = utcnow()
    res = session.execute(update(model).where(model.id == row_id, model.status.in_((FAILED, CANCELLED)))
                          .values(status=QUEUED, attempts=0, handbacks=0, error=None, progress=0, finished_at=None,
                                  retries=model.retries + 1, previous_error=func.coalesce(model.error, model.status),
                                  started_at=None, heartbeat_at=None, claim_token=None, dispatched_at=None,
                                  updated_at=now, **{c: None for c in result_columns}))
    session.commit()
    return res.rowcount == 1


def _requeue_stale(session, model, stale_after: float, max_attempts: int, limit: int) -> tuple[list[str], list[str]]:
    """Running rows without a heartbeat for `stale_after` s: back to queued, or failed after `max_attempts`
    claims (a row that keeps killing workers must not loop forever). Returns (requeued ids, failed ids)."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after)
    rows = session.execute(select(model.id, model.attempts - model.handbacks, model.claim_token).where(
        model.status == RUNNING, _stale_heartbeat(model, stale)).limit(limit)).all()
    requeued, failed = [], []
    for row_id, attempts, lease in rows:  # attempts here: claims that did not end in a hand-back
        # re-check lease and heartbeat in the UPDATE: the row may have been reclaimed since the SELECT
        base = update(model).where(model.id == row_id, model.status == RUNNING,
                                   (model.claim_token == lease) if lease else model.claim_token.is_(None),
                                   _stale_heartbeat(model, stale))
        if attempts >= max_attempts:
            res = session.execute(base.values(
                status=FAILED, finished_at=now, updated_at=now,
                error=f"gave up after {attempts} attempts (worker lost or time limit exceeded)"))
            (failed if res.rowcount else []).append(row_id)
        else:
            res = session.execute(base.values(status=QUEUED, claim_token=None, progress=0, dispatched_at=None,
                                              updated_at=now))
            (requeued if res.rowcount else []).append(row_id)
    session.commit()
    return requeued, failed


#: Output columns of each model, cleared when a failed/cancelled row is retried.
JOB_RESULT_COLUMNS = ("infected_fraction", "result_checksums")
STUDY_RESULT_COLUMNS = ("report", "result_checksums")


def claim_jobs(session, job_ids, lease: str, worker: str, stale_after: float) -> list[Job]:
    """Mark queued jobs (or running jobs whose heartbeat is stale) as running under `lease`.

    Returns the claimed rows; jobs that are finished, cancelled or held by a live worker are skipped.
    """
    claimed = [jid for jid in job_ids if _claim(session, Job, jid, lease, worker, stale_after, progress=10)]
    session.commit()
    if not claimed:
        return []
    rows = session.execute(select(Job).where(Job.id.in_(claimed))).scalars().all()
    order = {j: i for i, j in enumerate(claimed)}
    return sorted(rows, key=lambda r: order[r.id])


def heartbeat(session, job_ids, lease: str, progress: int | None = None) -> int:
    """Refresh heartbeat (and progress) of running jobs held under `lease`; returns how many were still held."""
    return _heartbeat(session, Job, job_ids, lease, progress)


def finish_success(session, job_id: str, lease: str, infected_fraction: float, checksums_json: str) -> bool:
    """running -> succeeded with the job's results; False if the lease was lost."""
    return _finish_success(session, Job, job_id, lease, infected_fraction=infected_fraction,
                           result_checksums=checksums_json)


def finish_failure(session, job_id: str, lease: str | None, error: str) -> bool:
    """running -> failed (`lease` None: whoever holds it); False if the job was no longer running."""
    return _finish_failure(session, Job, job_id, lease, error)


def release(session, job_ids, lease: str, count_attempt: bool = True) -> list[str]:
    """Give running jobs back to the queue (the task retries them); see `_release` for `count_attempt`."""
    return _release(session, Job, job_ids, lease, count_attempt)


def mark_dispatched(session, job_ids) -> None:
    """Record that queued jobs were handed to the broker (the sweep re-sends undispatched ones)."""
    _mark_dispatched(session, Job, job_ids)


def cancel_job(session, job_id: str) -> bool:
    """queued/running -> cancelled; False if the job had already finished."""
    return _cancel(session, Job, job_id)


def retry_job(session, job_id: str) -> bool:
    """failed/cancelled -> queued, results cleared; False otherwise."""
    return _retry(session, Job, job_id, JOB_RESULT_COLUMNS)


def requeue_stale(session, stale_after: float, max_attempts: int) -> tuple[list[str], list[str]]:
    """Running jobs without a heartbeat for `stale_after` s: back to queued, or failed after `max_attempts`.

    Returns (requeued ids, failed ids).
    """
    return _requeue_stale(session, Job, stale_after, max_attempts, limit=5000)


# --- studies (whole CT volumes: a DICOM series or a NIfTI file; issue 5) ----------------------------------------
class Study(Base):
    """One whole CT study, processed as one task on the bulk queue (worker/study_tasks.py).

    Only non-identifying data is kept: `meta` is the whitelisted metadata of shared.core.study.unpack_study_upload
    (modality, shape, spacing, orientation, series count, a salted hash of the series UID) and `report` the
    numbers of report.json. Patient names, IDs, dates and client file names never reach this table.
    `idempotency_key` is unique per token: a retried upload with the same key answers with the same study.
    """
    __tablename__ = "studies"
    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), nullable=False, unique=True, default=new_id)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=QUEUED)
    queue: Mapped[str] = mapped_column(String(64), nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    n_slices: Mapped[int] = mapped_column(Integer, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    retries: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    previous_error: Mapped[str | None] = mapped_column(Text)   # why the run before the last retry ended
    # claims handed back after a storage/database outage: counted in attempts, not against job_max_attempts
    handbacks: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    upload_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)  # SHA-256 over the uploaded files
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(200))
    input_key: Mapped[str] = mapped_column(String(200), nullable=False)      # normalised, de-identified input
    input_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    input_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_format: Mapped[str] = mapped_column(String(16), nullable=False)    # dicom | nifti
    deidentified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    meta: Mapped[str | None] = mapped_column(Text)                 # JSON, non-identifying metadata only
    report: Mapped[str | None] = mapped_column(Text)               # JSON report.json (numbers, no identifiers)
    result_checksums: Mapped[str | None] = mapped_column(Text)     # JSON {"mask.nii.gz": sha256, ...}
    __table_args__ = (
        CheckConstraint("status IN ('queued','running','succeeded','failed','cancelled')", name="status"),
        CheckConstraint("progress >= 0 AND progress <= 100", name="progress"),
        UniqueConstraint("token_id", "idempotency_key", name="uq_studies_token_idempotency_key"),
        Index("ix_studies_status_created", "status", "created_at"),        # dashboard: by status over time
        Index("ix_studies_token_seq", "token_id", "seq"),                   # listing (cursor pagination)
        Index("ix_studies_token_status_seq", "token_id", "status", "seq"),  # listing filtered by status
        Index("ix_studies_status_heartbeat", "status", "heartbeat_at"),     # sweep: stale running studies
        Index("ix_studies_created_at", "created_at"),                      # time filters / retention
    )


#: Keys of unpack_study_upload's metadata that may be stored (everything else is dropped before the INSERT).
STUDY_META_KEYS = ("format", "modality", "n_slices", "shape", "spacing", "orientation", "series_count",
                   "series_uid_hash", "n_files", "skipped_files", "deidentified", "is_hu")


def study_meta_json(meta: dict | None) -> str:
    """The whitelisted, JSON-safe part of a study's metadata (no identifiers can slip into the database)."""
    import json

    out = {}
    for k in STUDY_META_KEYS:
        v = (meta or {}).get(k)
        if isinstance(v, (bool, int, float)) or v is None:
            out[k] = v
        elif isinstance(v, str):
            out[k] = v[:64]
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (int, float)) else str(x)[:32] for x in list(v)[:8]]
    return json.dumps({k: v for k, v in out.items() if v is not None}, sort_keys=True)


def claim_study(session, study_id: str, lease: str, worker: str, stale_after: float) -> Study | None:
    """queued (or running with a stale heartbeat) -> running under `lease`; None when not claimable."""
    claimed = _claim(session, Study, study_id, lease, worker, stale_after, progress=0.0)
    session.commit()
    if not claimed:
        return None
    return session.execute(select(Study).where(Study.id == study_id)).scalar_one()


def study_heartbeat(session, study_id: str, lease: str, progress: float | None = None) -> bool:
    """Refresh the heartbeat (and progress) of a study held under `lease`; False once the lease is lost
    (cancelled, or taken over by the sweep): the worker then stops."""
    if progress is not None:
        progress = max(0.0, min(100.0, float(progress)))
    return _heartbeat(session, Study, [study_id], lease, progress) == 1


def study_finish_success(session, study_id: str, lease: str, report_json: str, checksums_json: str) -> bool:
    """running -> succeeded with report.json and the result checksums; False if the lease was lost."""
    return _finish_success(session, Study, study_id, lease, report=report_json, result_checksums=checksums_json)


def study_finish_failure(session, study_id: str, lease: str | None, error: str) -> bool:
    """running -> failed (`lease` None: whoever holds it); False if the study was no longer running."""
    return _finish_failure(session, Study, study_id, lease, error)


def study_release(session, study_id: str, lease: str, count_attempt: bool = True) -> bool:
    """Give a running study back to the queue (the task retries it); see `_release` for `count_attempt`."""
    return bool(_release(session, Study, [study_id], lease, count_attempt))


def mark_studies_dispatched(session, study_ids) -> None:
    """Record that queued studies were handed to the broker."""
    _mark_dispatched(session, Study, study_ids)


def cancel_study(session, study_id: str) -> bool:
    """queued/running -> cancelled; False if the study had already finished."""
    return _cancel(session, Study, study_id)


def retry_study(session, study_id: str) -> bool:
    """failed/cancelled -> queued, report and checksums cleared; False otherwise."""
    return _retry(session, Study, study_id, STUDY_RESULT_COLUMNS)


def requeue_stale_studies(session, stale_after: float, max_attempts: int) -> tuple[list[str], list[str]]:
    """Running studies without a heartbeat for `stale_after` s: back to queued, or failed after `max_attempts`
    claims. Returns (requeued ids, failed ids)."""
    return _requeue_stale(session, Study, stale_after, max_attempts, limit=1000)


def crashed_runs(row) -> int:
    """Claims of a job or study that did not end in a hand-back: what job_max_attempts limits."""
    return (row.attempts or 0) - (row.handbacks or 0)
