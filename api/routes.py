"""HTTP routes: /healthz, /readyz, /api/v1/* (jobs, batches, OpenAPI) and the legacy POST /predict."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from api import limits
from api.auth import require_token, services
from api.errors import ApiError, error_response
from api.params import created_range_and_page, filter_status, page_of
from api.publish import Publisher
from api.uploads import check_upload, discard_unless_committed, file_parts
from shared.service import db
from shared.service.celery_app import dispatch
from shared.service.storage import RESULT_KINDS, input_key, result_key

log = logging.getLogger("covidseg.api")

bp_health = Blueprint("health", __name__)
bp_v1 = Blueprint("v1", __name__, url_prefix="/api/v1")
bp_predict = Blueprint("predict", __name__)

_ID = re.compile(r"^[0-9a-f]{32}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


# --- health --------------------------------------------------------------------------------------------------
@bp_health.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp_health.get("/readyz")
def readyz():
    import redis

    svc = services()
    checks = {}
    try:
        with svc.engine.connect() as conn:   # reachable AND migrated (the schema comes only from Alembic)
            conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(svc.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        svc.storage.ping()
        checks["storage"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["storage"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    resp = jsonify(status="ready" if ok else "unavailable", checks=checks)
    resp.status_code = 200 if ok else 503
    return resp


# --- auth + JSON bodies --------------------------------------------------------------------------------------
@bp_v1.before_request
@bp_predict.before_request
def _authenticate():
    token_id = require_token()
    if request.method == "POST":
        limits.check_rate(token_id)


def _json_body() -> dict:
    """Optional JSON object body of POST actions; malformed JSON is a 400."""
    if not request.content_length and not request.data:
        return {}
    if not request.is_json:
        return {}
    try:
        body = json.loads(request.get_data(cache=True) or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return body


# --- representations -----------------------------------------------------------------------------------------
def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if dt else None


def job_json(job: db.Job) -> dict:
    svc = services()
    s = svc.settings
    out = {
        "id": job.id, "status": job.status, "batch_id": job.batch_id, "position": job.position,
        "queue": job.queue, "progress": job.progress, "attempts": job.attempts, "error": job.error,
        "retries": job.retries or 0, "previous_error": job.previous_error, "handbacks": job.handbacks or 0,
        "infected_fraction": job.infected_fraction,
        "created_at": _iso(job.created_at), "updated_at": _iso(job.updated_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "input": {"name": job.original_name, "format": job.input_format, "width": job.width, "height": job.height,
                  "size": job.input_size, "sha256": job.input_sha256},
        "links": {"self": url_for("v1.get_job", job_id=job.id),
                  "cancel": url_for("v1.cancel_job", job_id=job.id),
                  "retry": url_for("v1.retry_job", job_id=job.id)},
        "results": None,
    }
    if job.batch_id:
        out["links"]["batch"] = url_for("v1.get_batch", batch_id=job.batch_id)
    if job.status == db.SUCCEEDED:
        sums = json.loads(job.result_checksums or "{}")
        results = {}
        for kind in RESULT_KINDS:
            if s.result_links == "presigned":
                link = svc.storage.presigned_url(result_key(job.id, kind))
            else:
                link = url_for("v1.get_result", job_id=job.id, kind=kind, _external=True)
            results[kind] = {"url": link, "sha256": sums.get(kind), "content_type": "image/png"}
            out["links"][kind] = url_for("v1.get_result", job_id=job.id, kind=kind)
        out["results"] = results
        if s.result_links == "presigned":
            out["results_expire_in"] = s.presign_ttl_seconds
    return out


def _get_job_or_404(session, job_id: str) -> db.Job:
    if not _ID.match(job_id or ""):
        raise ApiError(404, "job_not_found", "no such job")
    job = session.execute(select(db.Job).where(db.Job.id == job_id, db.Job.token_id == g.token_id)).scalar()
    if job is None:
        raise ApiError(404, "job_not_found", "no such job")
    return job


# --- submission ----------------------------------------------------------------------------------------------
def _read_files(max_files: int | None = None):
    svc = services()
    s = svc.settings
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "expected_multipart", "send the slices as multipart/form-data `file` fields")
    files, other = file_parts("file", s.max_request_bytes)
    if not files:
        raise ApiError(400, "no_file", "no `file` field in the request" +
                       (f" (got fields {other[:5]})" if other else ""))
    limit = max_files or s.max_files_per_request
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"{len(files)} files; at most {limit} per request")
    checked = []
    for i, (filename, data) in enumerate(files):
        if not isinstance(data, bytes):
            data = data.read(s.max_upload_bytes + 1)
        checked.append(check_upload(data, filename, s, i))
    return checked


def _create_jobs(checked, queue: str, idem_key: str | None = None):
    """Store inputs, insert rows (+ idempotency record) in one transaction, publish. Returns (status, body)."""
    svc = services()
    shas = [hashlib.sha256(c.data).hexdigest() for c in checked]
    fingerprint = hashlib.sha256(json.dumps([[h, c.name] for h, c in zip(shas, checked)]).encode()).hexdigest()
    if idem_key:
        replay = _idempotent_replay(idem_key, fingerprint)
        if replay is not None:
            return replay
    limits.charge_quota(g.token_id, len(checked))  # a replay above is not charged again
    ids = [db.new_id() for _ in checked]
    batch_id = db.new_id() if len(checked) > 1 else None
    now = db.utcnow()
    body = {
        "batch_id": batch_id,
        "jobs": [{"id": jid, "status": db.QUEUED, "name": c.name, "links": {"self": url_for("v1.get_job", job_id=jid)}}
                 for jid, c in zip(ids, checked)],
        "links": {"batch": url_for("v1.get_batch", batch_id=batch_id)} if batch_id else {},
    }
    job_rows = [dict(id=jid, token_id=g.token_id, batch_id=batch_id, position=pos, status=db.QUEUED, queue=queue,
                     progress=0, attempts=0, created_at=now, updated_at=now, dispatched_at=now,
                     input_key=input_key(jid), input_sha256=sha, input_size=len(c.data), input_format=c.fmt,
                     width=c.width, height=c.height, original_name=c.name)
                for pos, (jid, c, sha) in enumerate(zip(ids, checked, shas))]
    try:
        for jid, c, sha in zip(ids, checked, shas):
            svc.storage.put_bytes(input_key(jid), c.data, c.content_type, sha,
                                  metadata={"format": c.fmt, "original-name": c.name or ""})
        # Core INSERTs in one transaction (no ORM unit of work: the submit path stays cheap)
        with svc.engine.begin() as conn:
            if batch_id:
                conn.execute(insert(db.Batch), [dict(id=batch_id, token_id=g.token_id, created_at=now,
                                                     total=len(ids), queue=queue)])
            conn.execute(insert(db.Job), job_rows)
            if idem_key:
                conn.execute(insert(db.IdempotencyKey), [dict(token_id=g.token_id, key=idem_key,
                                                              fingerprint=fingerprint, status_code=202,
                                                              response=json.dumps(body), created_at=now)])
    except Exception as exc:
        # Undo the uploads unless the rows may exist (the COMMIT itself can fail after the server applied it),
        # so that no input outlives a refused submission. Then either a concurrent request with the same key won
        # (replay its answer) or the error stands (a database or storage outage: 503, the client retries).
        discard_unless_committed(db.Job, ids[0], lambda: _remove_uploads(ids),
                                 ", ".join(input_key(j) for j in ids))
        replay = _idempotent_replay(idem_key, fingerprint) if idem_key and isinstance(exc, IntegrityError) else None
        if replay is None:
            raise
        return replay
    # stored and committed: the message follows from the publisher thread (api/publish.py; the sweep backs it up)
    publisher().publish([(jid, queue, batch_id) for jid in ids])
    return 202, body


def _remove_uploads(ids: list[str]) -> None:
    svc = services()
    for jid in ids:
        try:
            svc.storage.client.remove_object(svc.storage.bucket, input_key(jid))
        except Exception:  # noqa: BLE001 - best effort
            pass


def publisher() -> Publisher:
    """This app's background publisher (one per process)."""
    ext = current_app.extensions
    pub = ext.get("covidseg.publisher")
    if pub is None:
        svc = services()
        with svc.lock:
            pub = ext.get("covidseg.publisher")
            if pub is None:
                pub = ext["covidseg.publisher"] = Publisher(svc.celery, svc.Session, svc.settings)
    return pub


def _idempotent_replay(key: str, fingerprint: str):
    svc = services()
    with svc.Session() as session:
        row = session.execute(select(db.IdempotencyKey).where(db.IdempotencyKey.token_id == g.token_id,
                                                              db.IdempotencyKey.key == key)).scalar()
    if row is None:
        return None
    if row.created_at < db.utcnow() - timedelta(hours=svc.settings.idempotency_ttl_hours):
        return None
    if row.fingerprint != fingerprint:
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was used with a different request")
    body = json.loads(row.response)
    body["idempotent_replay"] = True
    return row.status_code, body


@bp_v1.post("/jobs")
def submit_jobs():
    svc = services()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 printable ASCII characters")
    checked = _read_files()
    queue = svc.settings.queue_interactive if len(checked) == 1 else svc.settings.queue_bulk
    status, body = _create_jobs(checked, queue, key)
    resp = jsonify(body)
    resp.status_code = status
    if len(body["jobs"]) == 1:
        resp.headers["Location"] = body["jobs"][0]["links"]["self"]
    elif body.get("links", {}).get("batch"):
        resp.headers["Location"] = body["links"]["batch"]
    return resp


# --- reading -------------------------------------------------------------------------------------------------
@bp_v1.get("/jobs/<job_id>")
def get_job(job_id):
    with services().Session() as session:
        return jsonify(job_json(_get_job_or_404(session, job_id)))


@bp_v1.get("/jobs/<job_id>/results/<kind>")
def get_result(job_id, kind):
    svc = services()
    if kind not in RESULT_KINDS:
        raise ApiError(404, "unknown_result", f"result must be one of {', '.join(RESULT_KINDS)}")
    with svc.Session() as session:
        job = _get_job_or_404(session, job_id)
    resp = result_response(job, kind)
    resp.headers["Cache-Control"] = "private, max-age=300"
    return resp


def result_response(job: db.Job, kind: str) -> Response:
    """Stream one result PNG (`kind` already checked) of a job from object storage; public and admin API."""
    if job.status != db.SUCCEEDED:
        raise ApiError(409, "job_not_succeeded", f"job is {job.status}; results exist only once it succeeded")
    try:
        chunks, size = services().storage.stream(result_key(job.id, kind))
    except KeyError:
        raise ApiError(404, "result_missing", "result object not found") from None
    resp = Response(chunks, mimetype="image/png")
    if size:
        resp.headers["Content-Length"] = str(size)
    return resp








@bp_v1.get("/jobs")
def list_jobs():
    args = request.args
    q = filter_status(select(db.Job).where(db.Job.token_id == g.token_id), db.Job, args)
    if "batch_id" in args:
        if not _ID.match(args["batch_id"]):
            raise ApiError(400, "invalid_batch_id", "batch_id must be a batch id")
        q = q.where(db.Job.batch_id == args["batch_id"])
    q, limit = created_range_and_page(q, db.Job, args, default_limit=50)
    with services().Session() as session:
        rows, next_cursor = page_of(session.execute(q).scalars().all(), limit)
    return jsonify(jobs=[job_json(j) for j in rows], next_cursor=next_cursor)


@bp_v1.get("/batches/<batch_id>")
def get_batch(batch_id):
    if not _ID.match(batch_id or ""):
        raise ApiError(404, "batch_not_found", "no such batch")
    with services().Session() as session:
        batch = session.execute(select(db.Batch).where(db.Batch.id == batch_id,
                                                       db.Batch.token_id == g.token_id)).scalar()
        if batch is None:
            raise ApiError(404, "batch_not_found", "no such batch")
        counts = dict(session.execute(select(db.Job.status, func.count()).where(db.Job.batch_id == batch_id)
                                      .group_by(db.Job.status)).all())
        progress_sum = session.execute(select(func.coalesce(func.sum(db.Job.progress), 0))
                                       .where(db.Job.batch_id == batch_id)).scalar()
        jobs = session.execute(select(db.Job.id, db.Job.status, db.Job.position).where(db.Job.batch_id == batch_id)
                               .order_by(db.Job.position).limit(1000)).all()
    counts = {s: int(counts.get(s, 0)) for s in db.STATUSES}
    finished = sum(counts[s] for s in db.TERMINAL)
    total = batch.total
    return jsonify(
        id=batch.id, created_at=_iso(batch.created_at), total=total, counts=counts,
        percent_done=round(100.0 * finished / total, 1) if total else 100.0,
        progress=round(float(progress_sum) / total, 1) if total else 100.0,
        done=finished == total,
        jobs=[{"id": j, "status": st, "position": p, "links": {"self": url_for("v1.get_job", job_id=j)}}
              for j, st, p in jobs],
        links={"self": url_for("v1.get_batch", batch_id=batch.id),
               "jobs": url_for("v1.list_jobs", batch_id=batch.id)})


# --- actions -------------------------------------------------------------------------------------------------
@bp_v1.post("/jobs/<job_id>/cancel")
def cancel_job(job_id):
    _json_body()
    svc = services()
    with svc.Session() as session:
        job = _get_job_or_404(session, job_id)
        if job.status != db.CANCELLED:
            if not db.cancel_job(session, job.id):
                session.refresh(job)
                if job.status != db.CANCELLED:
                    raise ApiError(409, "job_finished", f"job already {job.status}; it cannot be cancelled")
        session.refresh(job)
        return jsonify(job_json(job))


@bp_v1.post("/jobs/<job_id>/retry")
def retry_job(job_id):
    _json_body()
    svc = services()
    with svc.Session() as session:
        job = _get_job_or_404(session, job_id)
        if not db.retry_job(session, job.id):
            session.refresh(job)
            raise ApiError(409, "job_not_retryable",
                           f"job is {job.status}; only failed or cancelled jobs can be retried")
        try:
            svc.storage.delete_prefix(f"results/{job.id}/")
        except Exception:  # noqa: BLE001 - stale partial results are overwritten by the re-run anyway
            pass
    try:
        dispatch(svc.celery, svc.Session, [(job.id, job.queue, job.batch_id)], svc.settings)
    except Exception as exc:  # noqa: BLE001
        log.warning("publish failed (%s); the sweep will publish job %s", exc, job.id)
    with svc.Session() as session:
        job = _get_job_or_404(session, job_id)
        resp = jsonify(job_json(job))
        resp.status_code = 202
        return resp


@bp_v1.get("/openapi.json")
def openapi():
    from api.openapi import spec
    return jsonify(spec(services().settings))


# --- legacy /predict ---------------------------------------------------------------------------------------
@bp_predict.post("/predict")
def predict():
    """The predecessor's endpoint: multipart `file` in, overlay PNG out; runs through the same queue."""
    svc = services()
    checked = _read_files(max_files=1)
    _, body = _create_jobs(checked, svc.settings.queue_interactive)
    job_id = body["jobs"][0]["id"]
    deadline = time.monotonic() + svc.settings.predict_timeout
    delay = 0.05
    while True:
        with svc.Session() as session:
            status, error, fraction = session.execute(select(db.Job.status, db.Job.error, db.Job.infected_fraction)
                                                      .where(db.Job.id == job_id)).one()
        if status == db.SUCCEEDED:
            chunks, size = svc.storage.stream(result_key(job_id, "overlay"))
            resp = Response(chunks, mimetype="image/png")
            resp.headers["X-Job-Id"] = job_id
            resp.headers["X-Infected-Fraction"] = f"{fraction:.6f}"
            return resp
        if status in (db.FAILED, db.CANCELLED):
            return error_response(422, "prediction_failed", error or f"job {status}", job_id=job_id)
        if time.monotonic() > deadline:
            return error_response(504, "prediction_timeout",
                                  f"no result within {svc.settings.predict_timeout:g} s; poll the job",
                                  job_id=job_id, links={"job": url_for("v1.get_job", job_id=job_id)})
        time.sleep(delay)
        delay = min(0.25, delay * 1.5)
