"""Helpers of both `submit` and `fetch` (cli.bulk): the --server / --token / retry options, a file's SHA-256,
the plain-text summary table."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from cli import CLIError

from .client import RetryPolicy

_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _server_url(text: str | None) -> str:
    text = (text or os.environ.get("COVIDSEG_SERVER") or "").strip()
    if not text:
        raise CLIError("no server: give --server URL (or set COVIDSEG_SERVER)")
    u = urlparse(text)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise CLIError(f"--server must be an http(s) URL like http://host:8000, got {text!r}")
    return text.rstrip("/")


def _token(args) -> str:
    tok = (args.token or os.environ.get("COVIDSEG_TOKEN") or "").strip()
    if not tok:
        raise CLIError("no token: give --token T or set COVIDSEG_TOKEN (create one with `covidseg token create`)")
    return tok


def _policy(args) -> RetryPolicy:
    return RetryPolicy(retries=args.retries, base=args.backoff, cap=max(args.backoff, 60.0))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
