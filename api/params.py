"""Query-parameter parsing shared by the public API and the admin API: status filter, timestamps, opaque
cursors and pages."""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone

from flask import request

from api.errors import ApiError
from shared.service.db import STATUSES


def parse_time(name: str):
    """ISO 8601 query parameter -> aware datetime (UTC when no zone is given); absent or empty -> None."""
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "invalid_time", f"{name} must be an ISO 8601 timestamp") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def encode_cursor(seq: int) -> str:
    """Opaque pagination cursor for the row sequence number `seq`."""
    return base64.urlsafe_b64encode(json.dumps({"s": seq}).encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> int:
    """Inverse of `encode_cursor`; anything this API did not return is a 400 `invalid_cursor`."""
    try:
        seq = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode())["s"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError
        return seq
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None


def created_range_and_page(q, model, args, default_limit: int):
    """Apply the `created_after`/`created_before`, `limit` and `cursor` parameters shared by the job listings.

    Returns (query ordered newest first with limit + 1 rows, limit): the extra row tells whether a next page exists.
    """
    after, before = parse_time("created_after"), parse_time("created_before")
    if after and before and after >= before:
        raise ApiError(400, "invalid_time_range", "the start of the time range must be before its end")
    if after:
        q = q.where(model.created_at >= after)
    if before:
        q = q.where(model.created_at < before)
    try:
        limit = int(args.get("limit", default_limit))
        if not 1 <= limit <= 200:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_limit", "limit must be an integer from 1 to 200") from None
    if args.get("cursor"):
        q = q.where(model.seq < decode_cursor(args["cursor"]))
    return q.order_by(model.seq.desc()).limit(limit + 1), limit


def filter_status(q, model, args):
    """Apply the `status` parameter (comma-separated STATUSES) of the listings; an unknown status is a 400."""
    statuses = [x for x in (args.get("status") or "").split(",") if x]
    bad = [x for x in statuses if x not in STATUSES]
    if bad:
        raise ApiError(400, "invalid_status", f"unknown status {bad[0]!r}; use {', '.join(STATUSES)}")
    return q.where(model.status.in_(statuses)) if statuses else q


def page_of(rows, limit: int, seq=lambda row: row.seq):
    """Split the limit + 1 rows of `created_range_and_page` into (this page, next_cursor or None)."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(seq(rows[-1])) if more and rows else None)
