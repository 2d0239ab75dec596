"""Admin dashboard for whole studies: the page /admin/studies and /api/v1/admin/studies* (every token's studies).

The page is the same script as the public studies page (api/web/static/studies.js, in admin mode: session cookie
+ X-CSRF-Token instead of a bearer token). State changes reuse the public API's transitions (api.studies.cancel /
retry), and result files stream through the same function.
"""
from __future__ import annotations

import logging

from flask import g, jsonify, request, url_for
from sqlalchemy import func, select

from api.admin import _page, bp_admin, bp_admin_api, load_with_token_name, search_term, with_token_name
from api.admin import auth
from api.admin.auth import admin_api, admin_page, services
from api.params import created_range_and_page, filter_status, page_of
from api.studies import DICOM_SEG_FILE, cancel, has_dicom_seg, retry, study_file_response, study_json
from shared.service import db

log = logging.getLogger("covidseg.admin")


def admin_study_json(study: db.Study, token_name: str | None) -> dict:
    out = study_json(study)
    out["token"] = token_name
    out["worker"] = study.worker
    sid = study.id

    def file_link(name):
        return url_for("admin_api.get_study_file", study_id=sid, name=name)
    out["links"] = {"self": url_for("admin_api.get_study", study_id=sid),
                    "report": file_link("report.json"), "summary": file_link("summary.png"),
                    "mask": file_link("mask.nii.gz"), "lung_mask": file_link("lung_mask.nii.gz"),
                    "overlays_prefix": url_for("admin_api.get_study", study_id=sid) + "/files/overlays/",
                    "cancel": url_for("admin_api.cancel_study", study_id=sid),
                    "retry": url_for("admin_api.retry_study", study_id=sid)}
    if has_dicom_seg(out["report"]):
        out["links"]["dicom_seg"] = file_link(DICOM_SEG_FILE)
    return out


@bp_admin.get("/studies")
@admin_page
def studies_page():
    return _page("admin_studies.html", api_base="/api/v1/admin")


def _load(session, study_id: str):
    return load_with_token_name(session, db.Study, study_id, "study")


@bp_admin_api.get("/studies")
@admin_api
def list_studies():
    """All studies, newest first. Filters: status (comma list), q (study id or its start), created_after,
    created_before; cursor pagination. `counts`: studies per status (all of them, unfiltered)."""
    args = request.args
    q = with_token_name(db.Study)
    q = filter_status(q, db.Study, args)
    term = search_term(args, "a study id")
    if term:
        q = q.where(db.Study.id == term if len(term) == 32 else db.Study.id.like(term + "%"))
    q, limit = created_range_and_page(q, db.Study, args, default_limit=25)
    with services().Session() as session:
        rows = session.execute(q).all()
        counts = dict(session.execute(select(db.Study.status, func.count()).group_by(db.Study.status)).all())
    rows, next_cursor = page_of(rows, limit, seq=lambda row: row[0].seq)
    return jsonify(studies=[admin_study_json(st, name) for st, name in rows],
                   counts={s: int(counts.get(s, 0)) for s in db.STATUSES}, next_cursor=next_cursor)


@bp_admin_api.get("/studies/<study_id>")
@admin_api
def get_study(study_id):
    with services().Session() as session:
        study, name = _load(session, study_id)
    return jsonify(admin_study_json(study, name))


@bp_admin_api.get("/studies/<study_id>/files/<path:name>")
@admin_api
def get_study_file(study_id, name):
    with services().Session() as session:
        study, _ = _load(session, study_id)
    return study_file_response(study, name)


@bp_admin_api.post("/studies/<study_id>/cancel")
@admin_api
def cancel_study(study_id):
    with services().Session() as session:
        study, name = _load(session, study_id)
        before = study.status
        cancel(session, study)
        auth.audit(session, "study.cancel", f"study:{study_id}", from_status=before)
        session.commit()
        log.info("admin %r cancelled study %s", g.admin_name, study_id)
        study, name = _load(session, study_id)
    return jsonify(admin_study_json(study, name))


@bp_admin_api.post("/studies/<study_id>/retry")
@admin_api
def retry_study(study_id):
    with services().Session() as session:
        study, _ = _load(session, study_id)
        before = study.status
        retry(session, study)
        auth.audit(session, "study.retry", f"study:{study_id}", from_status=before)
        session.commit()
        log.info("admin %r retried study %s", g.admin_name, study_id)
    with services().Session() as session:
        study, name = _load(session, study_id)
    resp = jsonify(admin_study_json(study, name))
    resp.status_code = 202
    return resp
