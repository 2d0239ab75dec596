"""REST endpoints for whole studies (issue 5): a DICOM series (one .zip or several DICOM files) or a NIfTI volume.

    POST /api/v1/studies                    multipart `file` field(s), optional form field `series_uid`;
                                            Idempotency-Key: the same token + key answers 200 with the same study
    GET  /api/v1/studies                    status filter, created range, cursor pagination (like jobs)
    GET  /api/v1/studies/<id>               status, progress (0-100), report, links
    POST /api/v1/studies/<id>/cancel        queued/running -> cancelled
    POST /api/v1/studies/<id>/retry         failed/cancelled -> queued
    GET  /api/v1/studies/<id>/files/<path>  a result: mask.nii.gz, lung_mask.nii.gz, report.json, summary.png,
                                            overlays/NNNN.png

Same conventions as the jobs API (api/routes.py): bearer token, JSON errors, Idempotency-Key. The upload is
unpacked and de-identified (shared.core.study.unpack_study_upload, COVIDSEG_STUDY_DEIDENTIFY) in a temporary folder
BEFORE anything is stored; only the normalised input (studies/<id>/input.tar) goes to object storage, the row is
committed, and only then the study is published to the bulk queue and answered 202. If the broker is down the row
stays queued with dispatched_at NULL and the worker's sweep publishes it later: an accepted study is never lost.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import tempfile
import time
from pathlib import Path

from flask import Blueprint, Response, g, jsonify, request, url_for
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from api import limits
from api.auth import require_token, services
from api.errors import ApiError
from api.params import created_range_and_page, filter_status, page_of
from api.routes import _ID, _IDEMPOTENCY_KEY, _iso, _json_body
from api.uploads import discard_unless_committed, file_parts, sanitize_filename
from shared.service import db
from shared.core import dicom_seg
from shared.service.celery_app import dispatch_studies
from shared.service.storage import (is_study_file, study_input_key, study_prefix, study_result_key, study_results_prefix,
                            study_upload_key)

log = logging.getLogger("covidseg.api.studies")

bp_studies = Blueprint("studies", __name__, url_prefix="/api/v1")

#: A DICOM UID: digits separated by dots, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
_SUFFIX = re.compile(r"(?:\.[a-z0-9]{1,8}){0,2}")
#: The result files every succeeded study has (overlays/NNNN.png come on top, one per slice).
STUDY_FILES = ("mask.nii.gz", "lung_mask.nii.gz", "report.json", "summary.png")
#: Also there for a DICOM series (report["dicom_seg"] names it): infection + lung as a DICOM SEG.
DICOM_SEG_FILE = dicom_seg.FILE_NAME
_CONTENT_TYPES = {".png": "image/png", ".json": "application/json", ".gz": "application/gzip",
                  ".nii": "application/octet-stream", ".dcm": "application/dicom"}
#: How shared.core.study words a refusal by its caps (max_files, max_bytes): answered 413 rather than 400.
_CAP_ERRORS = ("too many files", "upload too large")
#: Multipart framing on top of the files themselves (boundaries, part headers, the series_uid field).
_MULTIPART_SLACK = 1024 * 1024


@bp_studies.before_request
def _authenticate_and_limit():
    token_id = require_token()
    if request.method == "POST":
        limits.check_rate(token_id)
    if request.endpoint == "studies.submit_study":
        # A study is much larger than one slice: its own request cap, applied before the body is read.
        s = services().settings
        request.max_content_length = s.study_max_upload_bytes + _MULTIPART_SLACK
        request.max_form_parts = max(1000, 2 * s.study_max_files + 10)


# --- representation --------------------------------------------------------------------------------------------
def file_url(study_id: str, name: str) -> str:
    return url_for("studies.get_study_file", study_id=study_id, name=name)


def study_links(study_id: str, report: dict | None = None) -> dict:
    links = {"self": url_for("studies.get_study", study_id=study_id),
             "report": file_url(study_id, "report.json"), "summary": file_url(study_id, "summary.png"),
             "mask": file_url(study_id, "mask.nii.gz"), "lung_mask": file_url(study_id, "lung_mask.nii.gz"),
             "overlays_prefix": url_for("studies.get_study", study_id=study_id) + "/files/overlays/",
             "cancel": url_for("studies.cancel_study", study_id=study_id),
             "retry": url_for("studies.retry_study", study_id=study_id)}
    if has_dicom_seg(report):
        links["dicom_seg"] = file_url(study_id, DICOM_SEG_FILE)
    return links


def has_dicom_seg(report: dict | None) -> bool:
    """Whether a succeeded study's report says a DICOM SEG was written (DICOM series input)."""
    return isinstance(report, dict) and report.get("dicom_seg") == DICOM_SEG_FILE


def _loads(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def study_json(study: db.Study) -> dict:
    """The public representation (also the base of the admin dashboard's)."""
    report = _loads(study.report) if study.status == db.SUCCEEDED else None
    return {
        "id": study.id, "status": study.status, "progress": round(float(study.progress or 0.0), 1),
        "n_slices": study.n_slices, "format": study.input_format, "deidentified": study.deidentified,
        "queue": study.queue, "attempts": study.attempts, "error": study.error,
        "retries": study.retries or 0, "previous_error": study.previous_error, "handbacks": study.handbacks or 0,
        "created_at": _iso(study.created_at), "updated_at": _iso(study.updated_at),
        "started_at": _iso(study.started_at), "finished_at": _iso(study.finished_at),
        "metadata": _loads(study.meta) or {},
        "report": report,
        "links": study_links(study.id, report),
    }


def _get_study_or_404(session, study_id: str) -> db.Study:
    if not _ID.match(study_id or ""):
        raise ApiError(404, "study_not_found", "no such study")
    study = session.execute(select(db.Study).where(db.Study.id == study_id,
                                                   db.Study.token_id == g.token_id)).scalar()
    if study is None:
        raise ApiError(404, "study_not_found", "no such study")
    return study


def study_file_response(study: db.Study, name: str) -> Response:
    """Stream one result file of a study from object storage (public and admin API)."""
    if not is_study_file(name):
        raise ApiError(404, "unknown_file", "no such result file; use " + ", ".join(STUDY_FILES) +
                       ", overlays/NNNN.png or (DICOM input) " + DICOM_SEG_FILE)
    if study.status != db.SUCCEEDED:
        raise ApiError(409, "study_not_succeeded",
                       f"study is {study.status}; results exist only once it succeeded")
    try:
        chunks, size = services().storage.stream(study_result_key(study.id, name))
    except KeyError:
        raise ApiError(404, "file_not_found", f"{name} is not among this study's results") from None
    suffix = Path(name).suffix.lower()
    resp = Response(chunks, mimetype=_CONTENT_TYPES.get(suffix, "application/octet-stream"))
    if size:
        resp.headers["Content-Length"] = str(size)
    if suffix not in (".png", ".json"):
        base = Path(name).name
        resp.headers["Content-Disposition"] = f'attachment; filename="study-{study.id[:8]}-{base}"'
    return resp


# --- submission --------------------------------------------------------------------------------------------------
def _read_study_files() -> list[tuple[str, bytes]]:
    """The uploaded files as (sanitised name, bytes); size and count caps are checked while reading."""
    s = services().settings
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "expected_multipart", "send the study as multipart/form-data `file` field(s)")
    files, other = file_parts("file", s.study_max_upload_bytes + _MULTIPART_SLACK)
    if not files:
        raise ApiError(400, "no_file", "no `file` field in the request" +
                       (f" (got fields {other[:5]})" if other else ""))
    if len(files) > s.study_max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files; at most {s.study_max_files} per study")
    out, total = [], 0
    for i, (filename, f) in enumerate(files):
        data = f if isinstance(f, bytes) else f.read(s.study_max_upload_bytes - total + 1)
        total += len(data)
        if total > s.study_max_upload_bytes:
            raise ApiError(413, "study_too_large", f"the study is larger than {s.study_max_upload_bytes} bytes")
        name = sanitize_filename(filename) or f"file{i + 1}"
        if not data:
            raise ApiError(400, "empty_file", f"file #{i + 1} ({name}) is empty")
        out.append((name, data))
    return out


def _fingerprint(files, series_uid: str | None) -> str:
    """Identifies the upload (file contents in any order + the chosen series) for Idempotency-Key checks."""
    sums = sorted(hashlib.sha256(data).hexdigest() for _, data in files)
    return hashlib.sha256(json.dumps([sums, series_uid or ""]).encode()).hexdigest()


def _tar_folder(folder: Path) -> bytes:
    """The normalised study folder as an uncompressed tar (one object, one checksum; DICOM is not compressible
    enough to be worth the CPU and NIfTI is already gzip)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                info = tarfile.TarInfo(p.relative_to(folder).as_posix())
                info.size, info.mtime, info.mode = p.stat().st_size, 0, 0o644
                with open(p, "rb") as fh:
                    tar.addfile(info, fh)
    return buf.getvalue()


def _tar_files(files) -> bytes:
    """The upload as received (only stored with de-identification off), under generated member names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(files):
            suffix = "".join(Path(name).suffixes[-2:]).lower()
            info = tarfile.TarInfo(f"{i:04d}" + (suffix if _SUFFIX.fullmatch(suffix) else ""))
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _existing(session, key: str) -> db.Study | None:
    return session.execute(select(db.Study).where(db.Study.token_id == g.token_id,
                                                  db.Study.idempotency_key == key)).scalar()


def _replay(study: db.Study, fingerprint: str):
    if study.upload_fingerprint != fingerprint:
        raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different upload")
    body = study_json(study)
    body["idempotent_replay"] = True
    resp = jsonify(body)
    resp.status_code = 200
    resp.headers["Location"] = body["links"]["self"]
    return resp


def _unpack(files, dest: Path, series_uid: str | None) -> dict:
    """shared.core.study.unpack_study_upload with the service's caps; any problem with the upload becomes a 4xx."""
    from shared.core.study import StudyError, unpack_study_upload

    s = services().settings
    try:
        return unpack_study_upload(files, dest, series_uid=series_uid, deidentify=s.study_deidentify,
                                   max_files=s.study_max_files, max_bytes=s.study_max_unpacked_bytes,
                                   salt=s.study_uid_salt or None)
    except StudyError as exc:
        message = str(exc)
        if message.startswith(_CAP_ERRORS):   # the caps on files and unpacked bytes: too large, like the jobs API
            raise ApiError(413, "study_too_large", message) from None
        raise ApiError(400, "invalid_study", message) from None
    except (MemoryError, OSError) as exc:
        # our side (disk, memory): not the client's fault. Only the type is logged (messages may quote data).
        log.error("study upload could not be unpacked: %s", type(exc).__name__)
        raise ApiError(503, "study_unpack_failed", "the upload could not be unpacked on the server; retry later") \
            from None
    except Exception as exc:  # noqa: BLE001 - a reader choked on malformed input: the client's problem
        log.warning("study upload refused: %s", type(exc).__name__)
        raise ApiError(400, "invalid_study", f"the upload could not be read as a CT study "
                                             f"({type(exc).__name__})") from None


@bp_studies.post("/studies")
def submit_study():
    svc = services()
    s = svc.settings
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 printable ASCII characters")
    files = _read_study_files()
    series_uid = (request.form.get("series_uid") or "").strip() or None
    if series_uid is not None and (len(series_uid) > 64 or not _UID.match(series_uid)):
        raise ApiError(400, "invalid_series_uid", "series_uid must be a DICOM UID (digits and dots, at most 64)")
    fingerprint = _fingerprint(files, series_uid)
    if key:
        with svc.Session() as session:
            found = _existing(session, key)
        if found is not None:
            return _replay(found, fingerprint)

    t0 = time.monotonic()
    study_id = db.new_id()
    with tempfile.TemporaryDirectory(prefix="covidseg-study-upload-") as tmp:
        dest = Path(tmp) / "study"
        meta = _unpack(files, dest, series_uid) or {}
        fmt = "nifti" if (dest / "volume.nii.gz").exists() else "dicom"
        n_slices = int(meta.get("n_slices") or (len(list(dest.glob("*.dcm"))) if fmt == "dicom" else 0))
        if n_slices <= 0:
            raise ApiError(400, "invalid_study", "the upload holds no CT slices")
        payload = _tar_folder(dest)
    limits.charge_quota(g.token_id, 1)  # a valid study only (a refused upload costs nothing)
    meta = dict(meta, format=fmt)
    # Nothing identifying is stored: the de-identified, normalised input only (the upload itself only when
    # de-identification is switched off, i.e. the data is anonymous already).
    try:
        input_sha = svc.storage.put_bytes(study_input_key(study_id), payload, "application/x-tar",
                                          metadata={"format": fmt})
        if not s.study_deidentify:
            svc.storage.put_bytes(study_upload_key(study_id), _tar_files(files), "application/x-tar")
    except Exception:
        _delete_quietly(study_id)  # a half-stored study (S3 went away between the two objects) leaves nothing
        raise
    now = db.utcnow()
    row = dict(id=study_id, token_id=g.token_id, status=db.QUEUED, queue=s.queue_bulk, progress=0.0,
               n_slices=n_slices, attempts=0, idempotency_key=key, upload_fingerprint=fingerprint, created_at=now,
               updated_at=now, dispatched_at=now, input_key=study_input_key(study_id), input_sha256=input_sha,
               input_size=len(payload), input_format=fmt, deidentified=bool(s.study_deidentify),
               meta=db.study_meta_json(meta))
    try:
        with svc.engine.begin() as conn:
            conn.execute(insert(db.Study), [row])
    except Exception as exc:
        # no stored input may outlive a refused submission
        discard_unless_committed(db.Study, study_id, lambda: _delete_quietly(study_id), study_prefix(study_id))
        if key and isinstance(exc, IntegrityError):  # a concurrent request with the same key won: its study
            with svc.Session() as session:
                found = _existing(session, key)
            if found is not None:
                return _replay(found, fingerprint)
        raise
    # the answer describes the study as accepted (queued), as POST /jobs does: read before the message goes out,
    # or a fast worker's "running" could race into it
    with svc.Session() as session:
        body = study_json(session.execute(select(db.Study).where(db.Study.id == study_id)).scalar_one())
    try:
        dispatch_studies(svc.celery, svc.Session, [(study_id, s.queue_bulk, n_slices)], s, mark=False)
    except Exception as exc:  # noqa: BLE001 - broker down: the study is stored; the sweep publishes it
        log.warning("publish of study %s failed (%s); it stays queued for the sweep", study_id, exc)
        try:
            with svc.Session() as session:
                session.execute(update(db.Study).where(db.Study.id == study_id, db.Study.status == db.QUEUED)
                                .values(dispatched_at=None))
                session.commit()
        except Exception:  # noqa: BLE001 - then the sweep's lost-message check finds it after dispatch_grace
            pass
    log.info("study %s accepted: %s, %d slices, %d bytes stored in %.2f s", study_id, fmt, n_slices,
             len(payload), time.monotonic() - t0)
    resp = jsonify(body)
    resp.status_code = 202
    resp.headers["Location"] = url_for("studies.get_study", study_id=study_id)
    return resp


def _delete_quietly(study_id: str) -> None:
    try:
        services().storage.delete_prefix(study_prefix(study_id))
    except Exception:  # noqa: BLE001 - an orphaned object costs space only
        pass


# --- reading -------------------------------------------------------------------------------------------------------
@bp_studies.get("/studies")
def list_studies():
    args = request.args
    q = select(db.Study).where(db.Study.token_id == g.token_id)
    q = filter_status(q, db.Study, args)
    q, limit = created_range_and_page(q, db.Study, args, default_limit=50)
    with services().Session() as session:
        rows = session.execute(q).scalars().all()
    rows, next_cursor = page_of(rows, limit)
    return jsonify(studies=[study_json(st) for st in rows], next_cursor=next_cursor)


@bp_studies.get("/studies/<study_id>")
def get_study(study_id):
    with services().Session() as session:
        return jsonify(study_json(_get_study_or_404(session, study_id)))


@bp_studies.get("/studies/<study_id>/files/<path:name>")
def get_study_file(study_id, name):
    with services().Session() as session:
        study = _get_study_or_404(session, study_id)
    resp = study_file_response(study, name)
    resp.headers["Cache-Control"] = "private, max-age=300"
    return resp


# --- actions -------------------------------------------------------------------------------------------------------
def cancel(session, study: db.Study) -> db.Study:
    """queued/running -> cancelled (idempotent on cancelled; 409 once finished). Public and admin API."""
    if study.status != db.CANCELLED and not db.cancel_study(session, study.id):
        session.refresh(study)
        if study.status != db.CANCELLED:
            raise ApiError(409, "study_finished", f"study already {study.status}; it cannot be cancelled")
    session.refresh(study)
    return study


def retry(session, study: db.Study) -> None:
    """failed/cancelled -> queued, old results removed, published to the bulk queue. Public and admin API."""
    svc = services()
    if not db.retry_study(session, study.id):
        session.refresh(study)
        raise ApiError(409, "study_not_retryable",
                       f"study is {study.status}; only failed or cancelled studies can be retried")
    try:
        svc.storage.delete_prefix(study_results_prefix(study.id))
    except Exception:  # noqa: BLE001 - stale partial results are overwritten by the re-run anyway
        pass
    try:
        dispatch_studies(svc.celery, svc.Session, [(study.id, study.queue, study.n_slices)], svc.settings)
    except Exception as exc:  # noqa: BLE001 - the sweep publishes queued studies that were never dispatched
        log.warning("publish failed (%s); the sweep will publish study %s", exc, study.id)


@bp_studies.post("/studies/<study_id>/cancel")
def cancel_study(study_id):
    _json_body()
    with services().Session() as session:
        study = cancel(session, _get_study_or_404(session, study_id))
        return jsonify(study_json(study))


@bp_studies.post("/studies/<study_id>/retry")
def retry_study(study_id):
    _json_body()
    svc = services()
    with svc.Session() as session:
        retry(session, _get_study_or_404(session, study_id))
    with svc.Session() as session:
        resp = jsonify(study_json(_get_study_or_404(session, study_id)))
    resp.status_code = 202
    return resp
