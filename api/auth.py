"""Bearer-token authentication and scopes. Tokens are stored as SHA-256 hashes (shared.service.db.hash_token); a
verified token is cached per process for `token_cache_seconds` so the submit path does not query the token
table every time (so a revocation takes effect within that time; an expiry is checked on every request).

Scopes (shared.service.db.SCOPES): `read` for GET, `submit` for everything that creates or changes work,
`admin` for the admin API with a bearer token. A token without the scope a request needs gets 403.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app, g, request
from sqlalchemy import select, update

from api.errors import ApiError
from shared.service import db


def services():
    return current_app.extensions["covidseg"]


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    scopes: frozenset[str]
    expires_at: datetime | None

    @property
    def actor(self) -> str:
        """How the audit log names this token."""
        return f"token:{self.id}:{self.name}"


def scope_for_method(method: str) -> str:
    return "read" if method in ("GET", "HEAD", "OPTIONS") else "submit"


def bearer_token() -> str | None:
    """The request's bearer token, None without an Authorization header; 401 when it is malformed."""
    header = request.headers.get("Authorization", "")
    if not header.strip():
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise ApiError(401, "invalid_token", "malformed Authorization header; expected 'Bearer <token>'")
    return token


def _lookup(token: str) -> TokenInfo:
    hashed = db.hash_token(token)
    svc = services()
    now = time.monotonic()
    hit = svc.token_cache.get(hashed)
    if hit and hit[1] > now:
        return hit[0]
    with svc.Session() as session:
        row = session.execute(select(db.ApiToken.id, db.ApiToken.name, db.ApiToken.scopes, db.ApiToken.expires_at,
                                     db.ApiToken.last_used_at).where(
            db.ApiToken.token_hash == hashed, db.ApiToken.revoked_at.is_(None))).first()
        if row is None:
            svc.token_cache.pop(hashed, None)
            raise ApiError(401, "invalid_token", "unknown or revoked token")
        info = TokenInfo(row.id, row.name, frozenset((row.scopes or db.DEFAULT_SCOPES).split()), row.expires_at)
        stamp = db.utcnow()
        if (info.expires_at is None or info.expires_at > stamp) and (
                row.last_used_at is None or stamp - row.last_used_at > timedelta(minutes=1)):
            session.execute(update(db.ApiToken).where(db.ApiToken.id == info.id).values(last_used_at=stamp))
            session.commit()
    if len(svc.token_cache) > 10_000:
        svc.token_cache.clear()
    svc.token_cache[hashed] = (info, now + svc.settings.token_cache_seconds)
    return info


def authenticate(token: str, scope: str | None) -> TokenInfo:
    """Verify `token` (known, not revoked, not expired) and that it has `scope`; set g.token_id / g.token."""
    info = _lookup(token)
    if info.expires_at is not None and info.expires_at <= db.utcnow():
        raise ApiError(401, "token_expired", "this token has expired; ask for a new one")
    if scope and scope not in info.scopes:
        raise ApiError(403, "insufficient_scope", f"this token lacks the '{scope}' scope "
                       f"(it has: {', '.join(sorted(info.scopes))})")
    g.token_id, g.token = info.id, info
    return info


def require_token(scope: str | None = None) -> int:
    """The request's token id; 401 without a valid token, 403 without `scope` (default: by the HTTP method)."""
    token = bearer_token()
    if token is None:
        raise ApiError(401, "missing_token", "missing bearer token (Authorization: Bearer <token>)")
    return authenticate(token, scope or scope_for_method(request.method)).id
