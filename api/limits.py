"""Per-token rate limits and daily quotas on submissions, counted in Redis so that every API process (and every
API host) shares one count.

- Rate: fixed one-minute windows, `rate_limit_per_minute` submission requests per token per window.
- Quota: `daily_quota` units (one per slice, one per study) per token per UTC day.

Over either: 429 with a JSON message and `Retry-After` (seconds until the window or the day ends). When Redis
cannot be reached the request is let through and a warning is logged: the limiter protects capacity, and a
broker outage already shows up as 503 on the submission itself.
"""
from __future__ import annotations

import logging
import time

from flask import current_app

from api.errors import ApiError

log = logging.getLogger("covidseg.api")


def _redis():
    svc = current_app.extensions["covidseg"]
    client = getattr(svc, "redis", None)
    if client is None:
        import redis

        client = redis.Redis.from_url(svc.settings.broker_url, socket_timeout=1, socket_connect_timeout=1)
        svc.redis = client
    return client


def _charge(key: str, amount: int, limit: int, ttl: int, retry_after: int, what: str, refund: bool) -> None:
    try:
        client = _redis()
        pipe = client.pipeline()
        pipe.incrby(key, amount)
        pipe.expire(key, ttl)
        used = int(pipe.execute()[0])
        if used > limit and refund:  # a refused submission does not use up the quota
            client.decrby(key, amount)
    except Exception as exc:  # noqa: BLE001 - Redis down: let the request through (see module docstring)
        log.warning("rate limiter unavailable (%s); request not counted", type(exc).__name__)
        return
    if used > limit:
        raise ApiError(429, "rate_limited", f"{what}: limit {limit}, try again in {retry_after} s",
                       headers={"Retry-After": str(retry_after)})


def check_rate(token_id: int) -> None:
    """Count one submission request of `token_id` in the current minute."""
    limit = current_app.extensions["covidseg"].settings.rate_limit_per_minute
    if limit:
        now = time.time()
        window = int(now // 60)
        _charge(f"covidseg:rate:{token_id}:{window}", 1, limit, 120, max(1, int(60 - now % 60) + 1),
                "too many submissions per minute for this token", refund=False)


def charge_quota(token_id: int, units: int) -> None:
    """Count `units` (slices or studies) against today's quota of `token_id`."""
    quota = current_app.extensions["covidseg"].settings.daily_quota
    if quota:
        now = time.time()
        day = int(now // 86400)
        _charge(f"covidseg:quota:{token_id}:{day}", units, quota, 2 * 86400, max(1, int(86400 - now % 86400) + 1),
                "daily submission quota of this token is used up", refund=True)
