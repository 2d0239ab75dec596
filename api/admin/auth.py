"""Admin login sessions and CSRF protection for /admin and /api/v1/admin.

* The session cookie (`covidseg_admin`) holds a random id only: HttpOnly (no script can read it), SameSite=Strict
  (never sent on a request started by another site), Secure when served over HTTPS or COVIDSEG_ADMIN_COOKIE_SECURE.
  The database keeps its SHA-256 (shared.service.admin_users.AdminSession): logout really ends the session.
* CSRF: every state-changing admin request must carry the session's CSRF token (the `X-CSRF-Token` header from the
  dashboard's JS, or a `csrf_token` form field), and its Origin/Referer, when the browser sends one, must be this
  site. The login form itself uses a double-submit cookie (there is no session yet).
* Failed logins are throttled per user name and (more loosely) per client address, per API process.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict, deque
from datetime import timedelta
from functools import wraps
from urllib.parse import urlsplit

from flask import current_app, g, redirect, request, url_for

from api.auth import authenticate, bearer_token
from api.errors import ApiError
from shared.service import admin_users, db

SESSION_COOKIE = "covidseg_admin"
LOGIN_CSRF_COOKIE = "covidseg_login_csrf"
CSRF_HEADER = "X-CSRF-Token"

def services():
    return current_app.extensions["covidseg"]


def cfg(name: str):
    """An admin setting (shared.service.settings, section "web interface and admin dashboard")."""
    return getattr(services().settings, name)


# --- login throttling ------------------------------------------------------------------------------------------
class LoginThrottle:
    """At most `max_failures` failed logins per key (user name, client address) in `window` seconds."""

    def __init__(self, window: float = 900.0):
        self.window = window
        self.failures: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def _prune(self, key: str, now: float) -> deque:
        q = self.failures[key]
        while q and q[0] < now - self.window:
            q.popleft()
        return q

    def blocked(self, keys, max_failures: int) -> bool:
        """A user name is blocked after `max_failures`; a client address only after 4x as many, because a
        hospital's users often share one address (NAT, proxy) and one person must not lock out everybody."""
        now = time.monotonic()
        with self.lock:
            return any(len(self._prune(k, now)) >= (max_failures * 4 if k.startswith("addr:") else max_failures)
                       for k in keys)

    def fail(self, keys) -> None:
        now = time.monotonic()
        with self.lock:
            if len(self.failures) > 50_000:
                self.failures.clear()
            for k in keys:
                self._prune(k, now).append(now)

    def clear(self, keys) -> None:
        with self.lock:
            for k in keys:
                self.failures.pop(k, None)


throttle = LoginThrottle()


def throttle_keys(username: str) -> list[str]:
    return ["user:" + (username or "").strip().lower(), "addr:" + (request.remote_addr or "?")]


# --- sessions --------------------------------------------------------------------------------------------------
def cookie_secure() -> bool:
    return bool(cfg("admin_cookie_secure")) or request.is_secure


def set_session_cookie(resp, sid: str) -> None:
    resp.set_cookie(SESSION_COOKIE, sid, max_age=int(float(cfg("admin_session_hours")) * 3600), path="/",
                    httponly=True, samesite="Strict", secure=cookie_secure())


def clear_session_cookie(resp) -> None:
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=cookie_secure())


def session_lifetime() -> timedelta:
    return timedelta(hours=float(cfg("admin_session_hours")))


def current_admin():
    """(AdminSession, AdminUser) of the request's cookie, or None. Cached on `g`."""
    if "admin" in g:
        return g.admin
    sid = request.cookies.get(SESSION_COOKIE)
    found = None
    if sid:
        with services().Session() as session:
            found = admin_users.load_session(session, sid, timedelta(minutes=float(cfg("admin_idle_minutes"))))
            session.commit()
    g.admin = found
    return found


def same_origin() -> bool:
    """False when the browser says the request comes from another site (Origin, else Referer)."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        return source != "null"
    # host[:port] only: behind a TLS-terminating proxy the scheme the app sees may differ from the browser's.
    return urlsplit(source).netloc.lower() == (request.host or "").lower()


def check_csrf(expected: str, given: str | None) -> None:
    if not same_origin():
        raise ApiError(403, "csrf_failed", "request from another site refused")
    if not admin_users.csrf_matches(expected, given):
        raise ApiError(403, "csrf_failed", "missing or wrong CSRF token; reload the page and try again")


def admin_api(fn):
    """Decorator of /api/v1/admin endpoints: a live admin session (POST/PUT/PATCH/DELETE also need its CSRF
    token), or a bearer token with the `admin` scope (automation; no cookie, so no CSRF). Sets g.actor (the audit
    log's name of who acts: "admin:<user>" or "token:<id>:<name>") and g.admin_name (shown on job timelines)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        token = bearer_token()
        if token is not None:
            info = authenticate(token, "admin")
            g.actor = g.admin_name = info.actor
            return fn(*args, **kwargs)
        found = current_admin()
        if found is None:
            raise ApiError(401, "not_logged_in", "your admin session has ended; log in again")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            check_csrf(found[0].csrf_token, request.headers.get(CSRF_HEADER) or request.form.get("csrf_token"))
        g.admin_name = found[1].username
        g.actor = f"admin:{found[1].username}"
        return fn(*args, **kwargs)
    return wrapper


def audit(session, action: str, target: str | None = None, actor: str | None = None, **detail) -> None:
    """Record an admin action in the audit log (part of `session`'s transaction)."""
    db.audit(session, actor or g.get("actor") or "anonymous", action, target, client=request.remote_addr, **detail)


def admin_page(fn):
    """Decorator of /admin pages: redirect to the login form without a live session."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        if current_admin() is None:
            return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
        return fn(*args, **kwargs)
    return wrapper


def safe_next(target: str | None) -> str:
    """Only local admin paths are accepted as the post-login destination (no open redirect)."""
    if target and target.startswith("/admin") and not target.startswith("//") and "\\" not in target \
            and not urlsplit(target).netloc and not target.startswith("/admin/login"):
        return target
    return url_for("admin.dashboard")


def new_login_csrf() -> str:
    return secrets.token_urlsafe(32)
