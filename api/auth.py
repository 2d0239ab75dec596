"""Bearer-token authentication. Tokens are stored as SHA-256 hashes (shared.service.db.hash_token); a verified hash is
cached per process for `token_cache_seconds` so the submit path does not query the token table every time."""
from __future__ import annotations

import time
from datetime import timedelta

from flask import current_app, g, request
from sqlalchemy import select, update

from api.errors import ApiError
from shared.service import db


def services():
    return current_app.extensions["covidseg"]


def require_token() -> int:
    header = request.headers.get("Authorization", "")
    if not header.strip():
        raise ApiError(401, "missing_token", "missing bearer token (Authorization: Bearer <token>)")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise ApiError(401, "invalid_token", "malformed Authorization header; expected 'Bearer <token>'")
    hashed = db.hash_token(token)
    svc = services()
    now = time.monotonic()
    hit = svc.token_cache.get(hashed)
    if hit and hit[1] > now:
        g.token_id = hit[0]
        return hit[0]
    with svc.Session() as session:
        row = session.execute(select(db.ApiToken.id, db.ApiToken.last_used_at).where(
            db.ApiToken.token_hash == hashed, db.ApiToken.revoked_at.is_(None))).first()
        if row is None:
            svc.token_cache.pop(hashed, None)
            raise ApiError(401, "invalid_token", "unknown or revoked token")
        token_id, last_used = row
        stamp = db.utcnow()
        if last_used is None or stamp - last_used > timedelta(minutes=1):
            session.execute(update(db.ApiToken).where(db.ApiToken.id == token_id).values(last_used_at=stamp))
            session.commit()
    if len(svc.token_cache) > 10_000:
        svc.token_cache.clear()
    svc.token_cache[hashed] = (token_id, now + svc.settings.token_cache_seconds)
    g.token_id = token_id
    return token_id
