"""Query-parameter parsing shared by the public API and the admin API: timestamps and opaque cursors."""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone

from flask import request

from api.errors import ApiError


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
