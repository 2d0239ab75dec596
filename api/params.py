"""Query-parameter parsing shared by the public API and the admin API: status filter, timestamps, opaque
cursors and pages."""
from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timedelta, timezone

from flask import request

from api.errors import ApiError
from shared.service.db import STATUSES


#: RFC 3339 date-time (the OpenAPI `date-time` format): any letter case for T and Z, any number of fractional
#: digits (kept to microseconds), a leap second (read as :59).
_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?$")


def parse_time(name: str):
    """RFC 3339 / ISO 8601 query parameter -> aware UTC datetime (UTC when no zone is given); absent or empty ->
    None. Instants outside Python's years 1-9999 are clamped to them (a filter from year 0 means "from the start")."""
    raw = request.args.get(name)
    if not raw:
        return None
    m = _RFC3339.match(raw)
    try:
        if m is None:  # other ISO 8601 forms Python reads (a date alone, no seconds)
            dt = datetime.fromisoformat(raw)
            return dt.astimezone(timezone.utc) if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
        y, mo, d, h, mi, sec, frac, zone = m.groups()
        naive = datetime(max(1, int(y)), int(mo), int(d), int(h), int(mi), min(int(sec), 59),
                         int((frac or "0")[:6].ljust(6, "0")))
        offset = timedelta(0)
        if zone and zone not in "Zz":
            offset = (1 if zone[0] == "+" else -1) * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            if abs(offset) >= timedelta(hours=24):
                raise ValueError("offset out of range")
    except (ValueError, OverflowError):
        raise ApiError(400, "invalid_time", f"{name} must be an ISO 8601 timestamp") from None
    try:
        utc = naive - offset
    except OverflowError:
        utc = datetime.max if offset < timedelta(0) else datetime.min
    return utc.replace(tzinfo=timezone.utc)


#: A cursor is the decimal sequence number of the last row of the previous page (at most 18 digits, so it always
#: fits a 64-bit column): any such string is a valid cursor, which the OpenAPI document can say exactly.
CURSOR_PATTERN = r"^[0-9]{1,18}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(seq: int) -> str:
    """Pagination cursor for the row sequence number `seq`."""
    return str(int(seq))


def decode_cursor(raw: str) -> int:
    """Inverse of `encode_cursor` (cursors of the earlier base64 form are still read); anything else is a 400
    `invalid_cursor`."""
    if _CURSOR.match(raw):
        return int(raw)
    try:
        seq = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode())["s"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 10 ** 18:
            raise ValueError
        return seq
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None


def created_range_and_page(q, model, args, default_limit: int):
    """Apply the `created_after`/`created_before`, `limit` and `cursor` parameters shared by the job listings.

    Returns (query ordered newest first with limit + 1 rows, limit): the extra row tells whether a next page exists.
    """
    after, before = parse_time("created_after"), parse_time("created_before")
    # created_after >= created_before is an empty range: a valid query that matches nothing
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
