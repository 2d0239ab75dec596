"""Web interface (`/`): upload CT slices, follow their jobs, view and download the results.

The page is static HTML + plain JS (api/web/static/app.js) that talks only to the public REST API (/api/v1) with
an API token the user types once per browser tab (kept in sessionStorage, sent as `Authorization: Bearer`).
This blueprint also serves the stylesheet the admin dashboard shares, and sets the security headers of every
HTML page (strict Content-Security-Policy: no inline script, nothing from other origins).
"""
from __future__ import annotations

from flask import Blueprint, current_app, render_template

bp_web = Blueprint("web", __name__, template_folder="templates", static_folder="static",
                   static_url_path="/static/web")

#: No inline script or style attributes from the server, no other origin: the pages work offline in a hospital
#: network and an injected string can not run as script. blob: images are results fetched with the token.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def security_headers(resp, cache: str = "no-store"):
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    resp.headers.setdefault("Cache-Control", cache)
    return resp


@bp_web.after_request
def _headers(resp):
    return security_headers(resp, "no-cache")


@bp_web.get("/")
def index():
    s = current_app.extensions["covidseg"].settings
    return render_template("index.html", api_base="/api/v1", max_upload_bytes=s.max_upload_bytes,
                           max_files=s.max_files_per_request)


@bp_web.get("/studies")
def studies():
    """Whole CT studies: upload a DICOM series or NIfTI volume, follow progress, see the report (issue 5)."""
    s = current_app.extensions["covidseg"].settings
    return render_template("studies.html", api_base="/api/v1", max_upload_bytes=s.study_max_upload_bytes)
