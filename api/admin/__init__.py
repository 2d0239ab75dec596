"""Admin dashboard: pages under /admin and admin-only JSON endpoints under /api/v1/admin.

The pages are HTML shells; api/admin/static/admin.js fills them from /api/v1/admin/* (the single source of truth
is the API, as for the upload page). Admins log in with a user name and password (`covidseg admin create`); see
api/admin/auth.py for the session cookie, CSRF and throttling rules.
"""
from __future__ import annotations

import json
import logging
import re
from datetime import datetime

from flask import Blueprint, g, jsonify, make_response, redirect, render_template, request, url_for
from sqlalchemy import or_, select

from api.admin import auth, stats
from api.admin.auth import admin_api, admin_page, cfg, services
from api.errors import ApiError
from api.params import created_range_and_page, filter_status, page_of
from api.routes import result_response
from api.web import security_headers
from shared.service import admin_users, db
from shared.service.storage import RESULT_KINDS

log = logging.getLogger("covidseg.admin")

bp_admin = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates",
                     static_folder="static", static_url_path="/static")
bp_admin_api = Blueprint("admin_api", __name__, url_prefix="/api/v1/admin")

_ID = re.compile(r"^[0-9a-f]{32}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{1,32}$")


@bp_admin.after_request
@bp_admin_api.after_request
def _headers(resp):
    return security_headers(resp, "no-store")


# --- pages -----------------------------------------------------------------------------------------------------
def _login_form(error: str | None = None, status: int = 200, username: str = ""):
    token = auth.new_login_csrf()
    resp = make_response(render_template("admin_login.html", error=error, csrf_token=token, username=username,
                                         next=request.values.get("next", "")), status)
    resp.set_cookie(auth.LOGIN_CSRF_COOKIE, token, max_age=3600, path="/admin/login", httponly=True,
                    samesite="Strict", secure=auth.cookie_secure())
    return resp


@bp_admin.get("/login")
def login():
    if auth.current_admin() is not None:
        return redirect(auth.safe_next(request.args.get("next")))
    return _login_form()


@bp_admin.post("/login")
def login_post():
    username = (request.form.get("username") or "").strip()[:admin_users.USERNAME_MAX]
    password = request.form.get("password") or ""
    if not auth.same_origin() or not admin_users.csrf_matches(request.cookies.get(auth.LOGIN_CSRF_COOKIE),
                                                              request.form.get("csrf_token")):
        return _login_form("The login form expired. Please try again.", 400, username)
    keys = auth.throttle_keys(username)
    if auth.throttle.blocked(keys, int(cfg("admin_login_max_failures"))):
        log.warning("admin login throttled for %r from %s", username, request.remote_addr)
        return _login_form("Too many failed logins. Wait 15 minutes and try again.", 429, username)
    svc = services()
    with svc.Session() as session:
        user = admin_users.authenticate(session, username, password)
        if user is None:
            auth.throttle.fail(keys)
            auth.audit(session, "admin.login_failed", f"admin:{username}", actor="anonymous")
            session.commit()
            log.warning("failed admin login for %r from %s", username, request.remote_addr)
            return _login_form("Wrong user name or password.", 401, username)
        sid, _row = admin_users.start_session(session, user, auth.session_lifetime())
        auth.audit(session, "admin.login", actor=f"admin:{user.username}")
        session.commit()
    auth.throttle.clear(keys[:1])
    log.info("admin %r logged in from %s", username, request.remote_addr)
    resp = redirect(auth.safe_next(request.form.get("next")), 303)
    auth.set_session_cookie(resp, sid)
    resp.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/admin/login")
    return resp


@bp_admin.post("/logout")
def logout():
    found = auth.current_admin()
    if found is not None:
        auth.check_csrf(found[0].csrf_token, request.form.get("csrf_token") or request.headers.get(auth.CSRF_HEADER))
        with services().Session() as session:
            admin_users.end_session(session, request.cookies.get(auth.SESSION_COOKIE))
            auth.audit(session, "admin.logout", actor=f"admin:{found[1].username}")
            session.commit()
    resp = redirect(url_for("admin.login"), 303)
    auth.clear_session_cookie(resp)
    return resp


def _page(template: str, **kw):
    sess, user = auth.current_admin()
    return render_template(template, admin=user, csrf_token=sess.csrf_token,
                           flower_url=cfg("flower_url"), **kw)


@bp_admin.get("")
@bp_admin.get("/")
@admin_page
def dashboard():
    return _page("admin_dashboard.html")


@bp_admin.get("/jobs/<job_id>")
@admin_page
def job_page(job_id):
    if not _ID.match(job_id):
        return _page("admin_job.html", job_id=""), 404
    return _page("admin_job.html", job_id=job_id)


# --- JSON: jobs --------------------------------------------------------------------------------------------------
def _iso(dt):
    return stats.iso(dt)


def _secs(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


def admin_job_json(job: db.Job, token_name: str | None, full: bool = False) -> dict:
    out = {
        "id": job.id, "status": job.status, "batch_id": job.batch_id, "queue": job.queue,
        "name": job.original_name, "progress": job.progress, "attempts": job.attempts, "worker": job.worker,
        "error": job.error if full else (job.error[:300] if job.error else None),
        "retries": job.retries or 0, "previous_error": job.previous_error if full else None,
        "infected_fraction": job.infected_fraction, "token": token_name,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "links": {"self": url_for("admin_api.get_job", job_id=job.id),
                  "page": url_for("admin.job_page", job_id=job.id),
                  "retry": url_for("admin_api.retry_job", job_id=job.id),
                  "cancel": url_for("admin_api.cancel_job", job_id=job.id)},
    }
    if full:
        end = job.finished_at if job.status in db.TERMINAL else None
        out.update({
            "updated_at": _iso(job.updated_at), "dispatched_at": _iso(job.dispatched_at),
            "heartbeat_at": _iso(job.heartbeat_at), "position": job.position,
            "input": {"name": job.original_name, "format": job.input_format, "width": job.width,
                      "height": job.height, "size": job.input_size, "sha256": job.input_sha256},
            "durations": {"waiting_s": _secs(job.created_at, job.started_at),
                          "running_s": _secs(job.started_at, end),
                          "total_s": _secs(job.created_at, end)},
        })
        if job.status == db.SUCCEEDED:
            for kind in RESULT_KINDS:
                out["links"][kind] = url_for("admin_api.get_result", job_id=job.id, kind=kind)
    return out








@bp_admin_api.get("/jobs")
@admin_api
def list_jobs():
    """All jobs (every token), newest first. Filters: status (comma list), batch_id, created_after,
    created_before, q (job id, id prefix or batch id); cursor pagination (`next_cursor`)."""
    args = request.args
    q = with_token_name(db.Job)
    q = filter_status(q, db.Job, args)
    batch = (args.get("batch_id") or "").strip().lower()
    if batch:
        if not _ID.match(batch):
            raise ApiError(400, "invalid_batch_id", "a batch id has 32 characters 0-9 and a-f")
        q = q.where(db.Job.batch_id == batch)
    term = search_term(args, "a job or batch id")
    if term:
        q = q.where(or_(db.Job.id == term, db.Job.batch_id == term) if len(term) == 32
                    else db.Job.id.like(term + "%"))
    q, limit = created_range_and_page(q, db.Job, args, default_limit=25)
    with services().Session() as session:
        rows = session.execute(q).all()
    rows, next_cursor = page_of(rows, limit, seq=lambda row: row[0].seq)
    return jsonify(jobs=[admin_job_json(j, name) for j, name in rows], next_cursor=next_cursor)


def search_term(args, what: str) -> str:
    """The admin listings' `q` parameter, lower-cased: an id or the start of one; anything else is a 400."""
    term = (args.get("q") or "").strip().lower()
    if term and not _HEX_PREFIX.match(term):
        raise ApiError(400, "invalid_search", f"search for {what} (characters 0-9 and a-f)")
    return term


def with_token_name(model):
    """SELECT (row, name of its API token) for Job or Study: the admin views show whose work it is."""
    return select(model, db.ApiToken.name).join(db.ApiToken, db.ApiToken.id == model.token_id, isouter=True)


def load_with_token_name(session, model, row_id: str, noun: str):
    """(row, token name) of one job or study by id; 404 `<noun>_not_found` for a malformed or unknown id."""
    row = None
    if _ID.match(row_id or ""):
        row = session.execute(with_token_name(model).where(model.id == row_id)).first()
    if row is None:
        raise ApiError(404, f"{noun}_not_found", f"no such {noun}")
    return row


def _load(session, job_id: str):
    return load_with_token_name(session, db.Job, job_id, "job")


@bp_admin_api.get("/jobs/<job_id>")
@admin_api
def get_job(job_id):
    with services().Session() as session:
        job, name = _load(session, job_id)
        actions = admin_users.actions_of(session, job.id)
    out = admin_job_json(job, name, full=True)
    out["admin_actions"] = [{"action": a.action, "by": a.username, "at": _iso(a.at), "from_status": a.from_status,
                             "previous_error": a.previous_error, "previous_attempts": a.previous_attempts,
                             "previous_worker": a.previous_worker} for a in actions]
    if actions and actions[-1].action == "retry":
        # the latest (re)queue time: waiting is measured from the last retry, not from the first submission
        out["durations"]["waiting_s"] = _secs(max(actions[-1].at, job.created_at), job.started_at)
        out["durations"]["total_s"] = _secs(max(actions[-1].at, job.created_at),
                                            job.finished_at if job.status in db.TERMINAL else None)
    return jsonify(out)


@bp_admin_api.get("/jobs/<job_id>/results/<kind>")
@admin_api
def get_result(job_id, kind):
    svc = services()
    if kind not in RESULT_KINDS:
        raise ApiError(404, "unknown_result", f"result must be one of {', '.join(RESULT_KINDS)}")
    with svc.Session() as session:
        job, _ = _load(session, job_id)
    return result_response(job, kind)


def _snapshot(job: db.Job):
    """The fields the audit trail keeps, read before the state change."""
    from types import SimpleNamespace
    return SimpleNamespace(id=job.id, status=job.status, error=job.error, attempts=job.attempts, worker=job.worker)


@bp_admin_api.post("/jobs/<job_id>/cancel")
@admin_api
def cancel_job(job_id):
    svc = services()
    with svc.Session() as session:
        job, name = _load(session, job_id)
        if job.status != db.CANCELLED:
            before = _snapshot(job)
            if not db.cancel_job(session, job.id):
                session.refresh(job)
                raise ApiError(409, "job_finished", f"the job already {job.status}; it can no longer be cancelled")
            admin_users.record_action(session, before, g.admin_name, "cancel")
            auth.audit(session, "job.cancel", f"job:{job_id}", from_status=before.status)
            session.commit()
            log.info("admin %r cancelled job %s", g.admin_name, job_id)
        job, name = _load(session, job_id)
    return jsonify(admin_job_json(job, name, full=True))


@bp_admin_api.post("/jobs/<job_id>/retry")
@admin_api
def retry_job(job_id):
    """Same transition as POST /api/v1/jobs/<id>/retry (shared.service.db.retry_job + publish), for any token's job."""
    from shared.service.celery_app import dispatch
    svc = services()
    with svc.Session() as session:
        job, _ = _load(session, job_id)
        before = _snapshot(job)
        if not db.retry_job(session, job.id):
            session.refresh(job)
            raise ApiError(409, "job_not_retryable",
                           f"the job is {job.status}; only failed or cancelled jobs can be retried")
        admin_users.record_action(session, before, g.admin_name, "retry")
        auth.audit(session, "job.retry", f"job:{job_id}", from_status=before.status)
        session.commit()
    try:
        svc.storage.delete_prefix(f"results/{job.id}/")
    except Exception:  # noqa: BLE001 - partial results are overwritten by the re-run anyway
        pass
    try:
        dispatch(svc.celery, svc.Session, [(job.id, job.queue, job.batch_id)], svc.settings)
    except Exception as exc:  # noqa: BLE001 - the recovery sweep publishes undispatched queued jobs
        log.warning("publish failed (%s); the sweep will publish job %s", exc, job.id)
    log.info("admin %r retried job %s", g.admin_name, job_id)
    with svc.Session() as session:
        job, name = _load(session, job_id)
    resp = jsonify(admin_job_json(job, name, full=True))
    resp.status_code = 202
    return resp


# --- JSON: figures -----------------------------------------------------------------------------------------------
@bp_admin_api.get("/stats")
@admin_api
def get_stats():
    try:
        hours = int(request.args.get("hours", 24))
        if not 1 <= hours <= 168:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_hours", "hours must be an integer from 1 to 168") from None
    now = db.utcnow()
    with services().Session() as session:
        return jsonify(counters=stats.counters(session, now), throughput=stats.throughput(session, hours, now),
                       generated_at=stats.iso(now))


@bp_admin_api.get("/workers")
@admin_api
def get_workers():
    svc = services()
    out = dict(stats.monitor.get(svc.settings, svc.celery, float(cfg("admin_cache_seconds")),
                                 float(cfg("admin_inspect_timeout"))))
    out["flower_url"] = cfg("flower_url") or None
    return jsonify(out)


@bp_admin_api.get("/me")
@admin_api
def me():
    if "token" in g:  # a bearer token with the admin scope
        return jsonify(username=g.admin_name, scopes=sorted(g.token.scopes),
                       token_expires_at=stats.iso(g.token.expires_at) if g.token.expires_at else None)
    sess, user = g.admin
    return jsonify(username=user.username, session_expires_at=stats.iso(sess.expires_at))


@bp_admin_api.get("/audit")
@admin_api
def list_audit():
    """The audit log, newest first: ?actor=, ?action= (prefix, e.g. "job."), ?limit= (1-500, default 100)."""
    try:
        limit = int(request.args.get("limit", 100))
        if not 1 <= limit <= 500:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_limit", "limit must be an integer from 1 to 500") from None
    q = select(db.AuditEvent).order_by(db.AuditEvent.id.desc()).limit(limit)
    if request.args.get("actor"):
        q = q.where(db.AuditEvent.actor == request.args["actor"][:140])
    if request.args.get("action"):
        q = q.where(db.AuditEvent.action.startswith(request.args["action"][:64], autoescape=True))
    with services().Session() as session:
        rows = session.scalars(q).all()
    return jsonify(events=[{"id": r.id, "at": stats.iso(r.at), "actor": r.actor, "action": r.action,
                            "target": r.target, "client": r.client,
                            "detail": json.loads(r.detail) if r.detail else None} for r in rows])


from api.admin import studies as _studies  # noqa: E402,F401 - whole studies (issue 5): routes on the blueprints above
