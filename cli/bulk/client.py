"""HTTP for the bulk client (cli.bulk): a bearer-token `Client` with timeouts and retries, and `MultipartBody`, an
upload streamed from a file.

Connection errors, timeouts, HTTP 5xx and 429 are retried with exponential backoff and jitter (`RetryPolicy`:
`--retries`, `--backoff`; a `Retry-After` header is honoured); any other answer goes back to the caller, whose
message `error_message` extracts. `Fatal` stops the whole run (exit 2); `Stopped`: the run is stopping, no new
request is sent; `TransientFailure`: retries used up (`unreachable` when no answer came at all).
"""
from __future__ import annotations

import io
import random
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urljoin

from cli import CLIError


class Fatal(CLIError):
    """Stops the whole run (token refused, no studies API, server unreachable)."""


class Stopped(Exception):
    """The run is stopping (Ctrl+C, a fatal error elsewhere, server unreachable): no new request is sent."""


class TransientFailure(Exception):
    """Retries exhausted on connection errors / 5xx / 429; `unreachable` when no answer came at all."""

    def __init__(self, message: str, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits base*2^k/2 .. base*2^k seconds (capped)."""

    retries: int = 5
    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * (2 ** attempt))
        d = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.cap))
        return d


def _retry_after(resp) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def error_message(resp) -> str:
    """The server's JSON `error` (with its code), or the start of the body."""
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("error"):
            code = body.get("code")
            return f"{body['error']}" + (f" ({code})" if code else "")
    except ValueError:
        pass
    text = (resp.text or "").strip().replace("\n", " ")
    return text[:200] or resp.reason or "no message"


def _retryable_status(code: int) -> bool:
    return code == 429 or code >= 500


class Client:
    """Bearer-token HTTP client for the studies API: one requests.Session per thread, timeouts, retries."""

    def __init__(self, server: str, token: str, policy: RetryPolicy, timeout: float = 300.0,
                 stop: threading.Event | None = None):
        self.server = server.rstrip("/") + "/"
        self.token = token
        self.policy = policy
        self.timeout = (10.0, timeout)     # (connect, read): the server may check a large upload before answering
        self.stop = stop or threading.Event()
        self._local = threading.local()

    def session(self):
        import requests
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {self.token}"
            s.headers["User-Agent"] = "covidseg-bulk/1"
            self._local.session = s
        return s

    def url(self, path: str) -> str:
        return urljoin(self.server, path.lstrip("/")) if not path.startswith("http") else path

    def request(self, method: str, path: str, *, make_kwargs=None, on_retry=None, **kw):
        """Send with retries on connection errors, timeouts, 429 and 5xx; returns the final response for any
        other status. Raises TransientFailure when the retries are used up, Stopped when the run is stopping."""
        import requests
        last, unreachable = "", True
        for attempt in range(self.policy.retries + 1):
            if self.stop.is_set():
                raise Stopped()
            kwargs = dict(kw)
            if make_kwargs is not None:
                kwargs.update(make_kwargs())
            kwargs.setdefault("timeout", self.timeout)
            retry_after = None
            try:
                resp = self.session().request(method, self.url(path), **kwargs)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                last = f"{type(exc).__name__}: {_short_exc(exc)}"
            else:
                if not _retryable_status(resp.status_code):
                    return resp
                last, unreachable = f"HTTP {resp.status_code}: {error_message(resp)}", False
                retry_after = _retry_after(resp)
                resp.close()
            if on_retry is not None:
                on_retry()
            if attempt < self.policy.retries:
                # wait, but wake up at once when the run is being stopped
                if self.stop.wait(self.policy.delay(attempt, retry_after)):
                    raise Stopped()
        raise TransientFailure(f"{last} (after {self.policy.retries + 1} attempts)", unreachable=unreachable)


def _short_exc(exc: BaseException) -> str:
    text = str(exc)
    # urllib3 wraps the useful part ("Connection refused") deep inside a long repr
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "Remote end closed connection"):
        if marker in text:
            return marker
    return text[:160]


class MultipartBody:
    """A multipart/form-data body streamed from a seekable file (Content-Length known, nothing held in memory),
    reporting bytes sent through `on_bytes`."""

    def __init__(self, fileobj, size: int, filename: str, content_type: str, on_bytes=None):
        self.boundary = uuid.uuid4().hex
        self.head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.file, self.size, self.on_bytes = fileobj, size, on_bytes
        self.file.seek(0)
        self._parts = [io.BytesIO(self.head), self.file, io.BytesIO(self.tail)]
        self.sent = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def read(self, n: int = -1) -> bytes:
        out = b""
        while self._parts and (n < 0 or len(out) < n):
            chunk = self._parts[0].read(-1 if n < 0 else n - len(out))
            if not chunk:
                self._parts.pop(0)
                continue
            out += chunk
        if out and self.on_bytes:     # count the file's bytes only (the bar's total is the file sizes)
            h = len(self.head)
            in_file = (min(max(0, self.sent + len(out) - h), self.size) - min(max(0, self.sent - h), self.size))
            if in_file:
                self.on_bytes(in_file)
        self.sent += len(out)
        return out
