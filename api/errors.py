"""JSON errors: every refusal is a 4xx (or 503 when a backing service is down) with {"error": ..., "code": ...}."""
from __future__ import annotations

import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("covidseg.api")


class ApiError(Exception):
    """An error answer: `status`, a JSON body {"error": message, "code": code, **extra}, and `headers`."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, **extra):
    body = {"error": message, "code": code}
    body.update(extra)
    resp = jsonify(body)
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="covidseg"'
    return resp


def register_error_handlers(app) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        resp = error_response(exc.status, exc.code, exc.message, **exc.extra)
        resp.headers.update(exc.headers)
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                415: "unsupported_media_type"}.get(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"))
        msg = exc.description or exc.name
        if exc.code == 413:
            msg = "request body too large"
        resp = error_response(exc.code or 500, code, msg)
        # keep the exception's own headers: a 405 must say which methods are allowed (Allow, RFC 9110)
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        from shared.service.storage import StorageError
        import sqlalchemy.exc
        if isinstance(exc, StorageError):
            log.warning("storage unavailable: %s", exc)
            return error_response(503, "storage_unavailable", "object storage is unavailable; retry later")
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.TimeoutError)):
            log.warning("database unavailable: %s", exc)
            return error_response(503, "database_unavailable", "the database is unavailable; retry later")
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
