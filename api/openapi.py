"""The OpenAPI 3.1 document served at /api/v1/openapi.json (tests check it lists every route)."""
from __future__ import annotations

from api.params import CURSOR_PATTERN
from shared.service.db import STATUSES
from shared.service.settings import Settings, get_settings
from shared.service.storage import RESULT_KINDS

#: A comma-separated list of statuses, exactly as the listings accept it.
STATUS_LIST_PATTERN = "^({s})?(,({s}))*$".format(s="|".join(STATUSES))
#: What an Idempotency-Key may be (api.routes._IDEMPOTENCY_KEY): 1-200 printable ASCII characters, no space.
IDEMPOTENCY_KEY_PATTERN = "^[\\x21-\\x7e]{1,200}$"
#: Media types of a slice upload's parts; the type is read from the content, and these name what is accepted.
SLICE_MEDIA_TYPES = "image/png, image/jpeg, image/tiff, application/dicom"
STUDY_MEDIA_TYPES = "application/zip, application/dicom, application/gzip, application/octet-stream"


#: Fields of a job's and a study's run history (both tables share the state machine in shared/service/db.py).
_RUN_HISTORY = {
    "attempts": {"type": "integer", "description": "claims by a worker since the last retry"},
    "handbacks": {"type": "integer", "description": "of those, claims handed back after a storage or database "
                                                    "outage (not counted against COVIDSEG_JOB_MAX_ATTEMPTS)"},
    "error": {"type": ["string", "null"]},
    "retries": {"type": "integer", "description": "times POST .../retry re-queued it"},
    "previous_error": {"type": ["string", "null"],
                       "description": "how the run before the last retry ended (its error, or 'cancelled')"},
}
_TIMESTAMPS = {
    "created_at": {"type": "string", "format": "date-time"},
    "updated_at": {"type": "string", "format": "date-time"},
    "started_at": {"type": ["string", "null"], "format": "date-time"},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
}


def _err(desc):
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _id_param(name):
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}


#: A time-range bound of the listings: an RFC 3339 date-time, or empty (no bound).
_OPTIONAL_TIME = {"type": "string", "anyOf": [{"format": "date-time"}, {"maxLength": 0}]}


def _list_params(*extra):
    """Query parameters of a cursor-paginated listing (jobs, studies); `extra` go after `status`."""
    return [{"name": "status", "in": "query", "schema": {"type": "string", "pattern": STATUS_LIST_PATTERN},
             "description": "comma-separated: " + ",".join(STATUSES)},
            *extra,
            {"name": "created_after", "in": "query", "schema": _OPTIONAL_TIME,
             "description": "RFC 3339; empty = no bound; a range with created_after >= created_before is empty"},
            {"name": "created_before", "in": "query", "schema": _OPTIONAL_TIME, "description": "RFC 3339, exclusive"},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200,
                                                        "default": 50}},
            {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^$|" + CURSOR_PATTERN},
             "description": "next_cursor of the previous page; empty or absent: the first page"}]


def _cancel_retry_paths(base: str, noun: str, plural: str, common: dict) -> dict:
    """POST {base}/{noun_id}/cancel and /retry: the same lifecycle for jobs and studies."""
    param = _id_param(f"{noun}_id")
    return {
        f"{base}/{{{noun}_id}}/cancel": {"post": {
            "summary": f"cancel a queued or running {noun} (idempotent for cancelled {plural})",
            "parameters": [param],
            "responses": {"200": {"description": noun}, "400": _err("malformed JSON body"),
                          "404": _err(f"unknown {noun}"), "409": _err(f"{noun} already finished"), **common}}},
        f"{base}/{{{noun}_id}}/retry": {"post": {
            "summary": f"re-run a failed or cancelled {noun}",
            "parameters": [param],
            "responses": {"202": {"description": f"{noun}, queued again"}, "400": _err("malformed JSON body"),
                          "404": _err(f"unknown {noun}"), "409": _err(f"{noun} is not failed or cancelled"),
                          **common}}},
    }


def _idempotency_header(description: str) -> dict:
    return {"name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}, "description": description}


def spec(settings: Settings | None = None) -> dict:
    """The document; the upload limits in it are those of `settings` (default: the process's)."""
    s = settings or get_settings()
    upload = {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"],
                   "properties": {"file": {"type": "array", "minItems": 1, "maxItems": s.max_files_per_request,
                                           "items": {"type": "string", "format": "binary"},
                                           "description": "One or more PNG/JPEG/TIFF/DICOM slices (type read "
                                                          "from the content). Several files form a batch."}}},
        "encoding": {"file": {"contentType": SLICE_MEDIA_TYPES}}}}}
    one_slice = {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"],
                   "properties": {"file": {"type": "string", "format": "binary",
                                           "description": "one PNG/JPEG/TIFF/DICOM slice"}}},
        "encoding": {"file": {"contentType": SLICE_MEDIA_TYPES}}}}}
    common = {"401": _err("missing, malformed, unknown, revoked or expired bearer token"),
              "403": _err("the token lacks the scope: read for GET, submit for POST"),
              "503": _err("a backing service is down")}
    limited = {"description": "rate limit or daily quota of the token exceeded (COVIDSEG_RATE_LIMIT_PER_MINUTE, "
                              "COVIDSEG_DAILY_QUOTA)",
               "headers": {"Retry-After": {"description": "seconds until the request may succeed",
                                           "schema": {"type": "integer", "minimum": 1}}},
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    submit_common = {**common, "429": limited}
    return {
        "openapi": "3.1.0",
        "info": {"title": "covidseg job service", "version": "1",
                 "description": "Segments COVID-19 infection in lung CT slices and whole studies. Every "
                                "error is JSON "
                                "{\"error\": message, \"code\": machine_code}. Tokens have scopes: read "
                                "(GET), submit (POST), admin (the admin API)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "code"],
                          "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"}, "status": {"enum": list(STATUSES)},
                    "batch_id": {"type": ["string", "null"]}, "position": {"type": "integer"},
                    "queue": {"type": "string"}, "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                    **_RUN_HISTORY,
                    "infected_fraction": {"type": ["number", "null"]},
                    **_TIMESTAMPS,
                    "input": {"type": "object"},
                    "results": {"type": ["object", "null"], "description": "when succeeded: "
                                + ", ".join(RESULT_KINDS) + " -> {url, sha256, content_type}; url is a "
                                "short-lived presigned S3 URL or an API URL (COVIDSEG_RESULT_LINKS)"},
                    "links": {"type": "object"}}},
                "Submitted": {"type": "object", "properties": {
                    "batch_id": {"type": ["string", "null"]},
                    "jobs": {"type": "array", "items": {"type": "object"}}, "links": {"type": "object"},
                    "idempotent_replay": {"type": "boolean"}}},
                "Study": {"type": "object", "properties": {
                    "id": {"type": "string"}, "status": {"enum": list(STATUSES)},
                    "progress": {"type": "number", "minimum": 0, "maximum": 100},
                    "n_slices": {"type": "integer"}, "format": {"enum": ["dicom", "nifti"]},
                    "deidentified": {"type": "boolean"}, "queue": {"type": "string"},
                    **_RUN_HISTORY,
                    **_TIMESTAMPS,
                    "metadata": {"type": "object", "description": "non-identifying: modality, shape, spacing, "
                                                                  "orientation, series count, hashed series UID"},
                    "report": {"type": ["object", "null"], "description": "report.json when succeeded: "
                               "lesion_volume_ml, lung_volume_ml, percent_involved, ct_score (0-4), sides, "
                               "voxel_volume_mm3, spacing_mm, shape, n_slices, top_slices, model, lung_method, "
                               "dicom_seg (mask.seg.dcm or null), warnings"},
                    "links": {"type": "object", "description": "self, report, summary, mask, lung_mask, "
                                                                "overlays_prefix, cancel, retry; dicom_seg "
                                                                "for DICOM input"},
                    "idempotent_replay": {"type": "boolean"}}},
                "Batch": {"type": "object", "properties": {
                    "id": {"type": "string"}, "total": {"type": "integer"},
                    "counts": {"type": "object", "properties": {s: {"type": "integer"} for s in STATUSES}},
                    "percent_done": {"type": "number"}, "progress": {"type": "number"}, "done": {"type": "boolean"},
                    "jobs": {"type": "array", "items": {"type": "object"}}}},
            },
        },
        "paths": {
            "/healthz": {"get": {"summary": "process is up", "security": [],
                                 "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "database, Redis and object storage reachable", "security": [],
                                "responses": {"200": {"description": "ready"}, "503": _err("not ready")}}},
            "/api/v1/openapi.json": {"get": {"summary": "this document",
                                             "responses": {"200": {"description": "OpenAPI document"}, **common}}},
            "/api/v1/jobs": {
                "post": {"summary": "submit one slice (a job) or many (a batch)",
                         "parameters": [_idempotency_header("a retried request with the same key and files "
                                                            "returns the first answer; no duplicate work")],
                         "requestBody": upload,
                         "responses": {"202": {"description": "accepted", "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/Submitted"}}}},
                             "400": _err("no file, empty, corrupt or truncated image, bad Idempotency-Key"),
                             "413": _err("file/request too large, too many files, too many pixels"),
                             "415": _err("not multipart, or not a PNG/JPEG/TIFF/DICOM image"),
                             "422": _err("image too small, Idempotency-Key reused with other files"),
                             **submit_common}},
                "get": {"summary": "list jobs, newest first (cursor pagination)",
                        "parameters": _list_params(
                            {"name": "batch_id", "in": "query",
                             "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}),
                        "responses": {"200": {"description": "{jobs: [Job], next_cursor}"},
                                      "400": _err("bad filter, limit or cursor"), **common}}},
            "/api/v1/jobs/{job_id}": {"get": {
                "summary": "job status, progress, timestamps, attempts, error, infected fraction, result links",
                "parameters": [_id_param("job_id")],
                "responses": {"200": {"description": "job", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Job"}}}}, "404": _err("unknown job"), **common}}},
            "/api/v1/jobs/{job_id}/results/{kind}": {"get": {
                "summary": "stream a result PNG through the API",
                "parameters": [_id_param("job_id"), {"name": "kind", "in": "path", "required": True,
                                                     "schema": {"enum": list(RESULT_KINDS)}}],
                "responses": {"200": {"description": "PNG", "content": {"image/png": {}}},
                              "404": _err("unknown job or result"), "409": _err("job has not succeeded"),
                              **common}}},
            **_cancel_retry_paths("/api/v1/jobs", "job", "jobs", submit_common),
            "/api/v1/batches/{batch_id}": {"get": {
                "summary": "batch progress: counts per status and percent done",
                "parameters": [_id_param("batch_id")],
                "responses": {"200": {"description": "batch", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Batch"}}}}, "404": _err("unknown batch"),
                    **common}}},
            "/api/v1/studies": {
                "post": {"summary": "submit a whole study: one .zip of a DICOM series, several DICOM files, or one "
                                    ".nii/.nii.gz (processed on the bulk queue)",
                         "parameters": [_idempotency_header("the same token + key answers 200 with the "
                                                            "existing study (the same key with another upload "
                                                            "is a 422)")],
                         "requestBody": {"required": True, "content": {"multipart/form-data": {
                             "schema": {"type": "object", "required": ["file"], "properties": {
                                 "file": {"type": "array", "minItems": 1, "maxItems": s.study_max_files,
                                          "items": {"type": "string", "format": "binary"},
                                          "description": "a .zip of a DICOM series, DICOM files, or one "
                                                         ".nii/.nii.gz"},
                                 "series_uid": {"type": "string", "maxLength": 64,
                                                "pattern": "^[0-9]+(\\.[0-9]+)*$",
                                                "description": "pick this series when the upload holds several "
                                                               "(default: the largest)"}}},
                             "encoding": {"file": {"contentType": STUDY_MEDIA_TYPES}}}}},
                         "responses": {
                             "202": {"description": "accepted (queued)", "content": {"application/json": {
                                 "schema": {"$ref": "#/components/schemas/Study"}}}},
                             "200": {"description": "Idempotency-Key replay: the existing study"},
                             "400": _err("no file, empty file, broken or mixed series, bad zip, not DICOM/NIfTI, "
                                         "bad series_uid or Idempotency-Key"),
                             "413": _err("upload too large, too many files, zip bomb"),
                             "415": _err("not multipart"),
                             "422": _err("Idempotency-Key reused with another upload"), **submit_common}},
                "get": {"summary": "list studies, newest first (cursor pagination)",
                        "parameters": _list_params(),
                        "responses": {"200": {"description": "{studies: [Study], next_cursor}"},
                                      "400": _err("bad filter, limit or cursor"), **common}}},
            "/api/v1/studies/{study_id}": {"get": {
                "summary": "study status, progress (percent), attempts, error, report and links",
                "parameters": [_id_param("study_id")],
                "responses": {"200": {"description": "study", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Study"}}}}, "404": _err("unknown study"), **common}}},
            "/api/v1/studies/{study_id}/files/{name}": {"get": {
                "summary": "stream a result file: mask.nii.gz, lung_mask.nii.gz, report.json, summary.png, "
                           "overlays/NNNN.png; mask.seg.dcm (DICOM SEG: infection + lung) for DICOM input",
                "parameters": [_id_param("study_id"), {"name": "name", "in": "path", "required": True,
                                                       "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the file", "content": {
                    "application/gzip": {}, "application/json": {}, "image/png": {}}},
                    "404": _err("unknown study or file"), "409": _err("study has not succeeded"), **common}}},
            **_cancel_retry_paths("/api/v1/studies", "study", "studies", submit_common),
            "/predict": {"post": {
                "summary": "legacy: one slice in, overlay PNG out (queued like any job; waits "
                           "COVIDSEG_PREDICT_TIMEOUT seconds)",
                "requestBody": one_slice,
                "responses": {"200": {"description": "overlay PNG; headers X-Job-Id, X-Infected-Fraction",
                                      "content": {"image/png": {}}},
                              "400": _err("bad upload"), "413": _err("too large"), "415": _err("not an image"),
                              "422": _err("the job failed"), "504": _err("no result in time (job continues)"),
                              **submit_common}}},
        },
    }
