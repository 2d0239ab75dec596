"""`covidseg submit` and `covidseg fetch`: the overnight bulk client for whole studies (REST, issue 5).

    covidseg submit DIR --server URL [--token T] [--manifest FILE] [--concurrency N] [--retries N]
    covidseg fetch [--manifest FILE] --out DIR [--wait] [--server URL] [--token T]

`submit` walks DIR for studies:
* a folder that directly holds DICOM files (`*.dcm`, or any file with the `DICM` preamble) is one study; its files
  are zipped on the fly (deterministic bytes: sorted, renamed `NNNN.dcm`, fixed timestamps) and sent as one .zip;
* every `.zip`, `.nii` or `.nii.gz` file is one study, sent as it is.
Hidden files and folders are skipped. What is uploaded never carries local file or folder names (they may name
patients): the server sees `study.zip` / `volume.nii.gz`; the mapping stays in the local manifest.

Every study gets a stable `Idempotency-Key`: a hash of its path relative to DIR and of its content digest. The
manifest (JSON, default `./covidseg-manifest.json`, rewritten atomically after every state change) records each
study's key, state and server id. An interrupted run (Ctrl+C, kill -9, reboot) is resumed by running the same
command again: accepted studies are skipped, and a study whose upload reached the server but not the manifest is
sent again with the same key, which the server answers with the existing study - no duplicates, no gaps. A study
whose content changed gets a new key and is submitted again.

Retries: connection errors, timeouts, HTTP 5xx and 429 are retried with exponential backoff and jitter
(`--retries`, `--backoff`; a `Retry-After` header is honoured). Other 4xx answers are never retried: the study
is recorded as rejected with the server's message (a study whose content has not changed is not sent again).
401/403 (token) and 404 (no studies API at that URL) stop the run. If the server stays unreachable, the run stops
with a clear error; the manifest keeps what is left for the next run.

Exit codes of `submit`: 0 every study is accepted; 1 some were rejected or could not be submitted (run it again
to resume); 2 bad arguments (missing folder, no token, bad URL, token refused, manifest of another folder).

`fetch` polls every submitted study and downloads `report.json`, `summary.png`, `mask.nii.gz` and
`lung_mask.nii.gz` (and `mask.seg.dcm`, the DICOM SEG, for DICOM studies) of every finished one into
OUT/<study name>/ (plus OUT/summary.csv with the key numbers).
Files already downloaded (SHA-256 recorded in the manifest and matching the file on disk) are skipped; downloads
go to a temporary file first, so a killed fetch never leaves a half file that counts as done. `--wait` keeps
polling until every study is finished. Exit codes: 0 nothing failed, 1 some studies failed or were cancelled or
a download failed, 2 bad arguments.

Environment (client side; not service settings):
* `COVIDSEG_TOKEN`  - bearer token when `--token` is not given (keeps it out of `ps` and shell history).
* `COVIDSEG_SERVER` - server URL when `--server` is not given.
* `COVIDSEG_BULK_PAUSE_AFTER=N` - testing hook: once the server has accepted the N-th upload of this run, the
  client stops right BEFORE recording it in the manifest (the worst moment for a crash) and sleeps until it is
  killed; it prints `paused after N accepted uploads` on stderr. tests/service/test_bulk_client.py uses it to
  kill -9 the client deterministically half-way.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urljoin, urlparse

from shared.core import dicom_seg
from cli import CLIError, int_at_least

DEFAULT_MANIFEST = "covidseg-manifest.json"
MANIFEST_FORMAT = "covidseg-bulk-manifest"
MANIFEST_VERSION = 1
#: result files of a finished study: local file name -> key in the study's `links`
RESULT_FILES = {"report.json": "report", "summary.png": "summary", "mask.nii.gz": "mask",
                "lung_mask.nii.gz": "lung_mask"}
#: fetched too when the study's `links` has them (DICOM input: the masks as a DICOM SEG)
OPTIONAL_RESULT_FILES = {dicom_seg.FILE_NAME: "dicom_seg"}
FINISHED = ("succeeded", "failed", "cancelled")
PAUSE_ENV = "COVIDSEG_BULK_PAUSE_AFTER"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# studies on disk
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LocalStudy:
    """One study found under the submitted folder."""

    rel: str                 # path relative to the root, posix ("." = the root folder itself)
    kind: str                # "dicom" (a folder of DICOM files), "zip" or "nifti"
    files: list[Path]        # the DICOM files (sorted) or the one file
    name: str = ""           # output folder name (unique; assigned once and kept in the manifest)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def stamp(self) -> str:
        """Cheap change detector (names, sizes, mtimes): the content digest is reused while it matches."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def digest(self) -> str:
        """SHA-256 of the content (for a folder: of each file's name and SHA-256, in order)."""
        if self.kind != "dicom":
            return _sha256_file(self.files[0])
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{_sha256_file(f)}\n".encode())
        return h.hexdigest()

    def upload_name(self) -> tuple[str, str]:
        """(file name sent to the server, content type): never a local name."""
        if self.kind == "dicom" or self.kind == "zip":
            return "study.zip", "application/zip"
        if self.files[0].name.lower().endswith(".nii.gz"):
            return "volume.nii.gz", "application/gzip"
        return "volume.nii", "application/octet-stream"


def idempotency_key(rel: str, digest: str) -> str:
    """Stable per study and content: the same study resent (after a crash) gets the same key."""
    return "covidseg-bulk-" + hashlib.sha256(f"{rel}\n{digest}".encode()).hexdigest()[:48]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_dicom(path: Path) -> bool:
    name = path.name.lower()
    if name == "dicomdir":          # a media index, not an image
        return False
    if name.endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _study_file_kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(".nii") or low.endswith(".nii.gz"):
        return "nifti"
    return None


def _strip_suffix(rel: str) -> str:
    low = rel.lower()
    for suf in (".nii.gz", ".nii", ".zip"):
        if low.endswith(suf):
            return rel[: -len(suf)]
    return rel


def scan_studies(root: Path, skip: tuple[Path, ...] = ()) -> tuple[list[LocalStudy], int]:
    """All studies under `root` (sorted by relative path) and the number of other files ignored."""
    root = root.resolve()
    skip_set = {p.resolve() for p in skip}
    studies: list[LocalStudy] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        dicoms = []
        for fn in sorted(filenames):
            p = here / fn
            if fn.startswith(".") or p.resolve() in skip_set or not p.is_file():
                continue
            kind = _study_file_kind(fn)
            if kind:
                studies.append(LocalStudy(rel=p.relative_to(root).as_posix(), kind=kind, files=[p]))
            elif _is_dicom(p):
                dicoms.append(p)
            elif not fn.endswith((".json", ".lock", ".tmp")):
                ignored += 1
        if dicoms:
            studies.append(LocalStudy(rel=rel_dir, kind="dicom", files=dicoms))
    studies.sort(key=lambda s: s.rel)
    return studies, ignored


def default_name(study: LocalStudy, root: Path) -> str:
    """Output folder name: the relative path without .zip/.nii/.nii.gz (the root itself: its own name)."""
    if study.rel == ".":
        return root.resolve().name or "study"
    return _strip_suffix(study.rel) if study.kind != "dicom" else study.rel


def write_study_zip(study: LocalStudy, out) -> None:
    """Zip a DICOM folder into the file object `out`, byte-identical on every run (the server fingerprints the
    upload: a resent study must be the same request)."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i, f in enumerate(study.files):
            info = zipfile.ZipInfo(f"{i:04d}.dcm", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, f.read_bytes(), compresslevel=1)


# --------------------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class JsonRecord:
    """A JSON file holding per-study entries, rewritten atomically (temporary file + fsync + rename) after every
    change, so a crash leaves either the old or the new version. Thread-safe."""

    FORMAT = "covidseg-json-record"

    def __init__(self, path: Path, data: dict):
        self.path = Path(path)
        self.data = data
        self.lock = threading.RLock()
        self._lockfile = None

    @classmethod
    def load(cls, path: Path, missing_hint: str = ""):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CLIError(f"{path} not found{missing_hint}") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CLIError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT or \
                not isinstance(data.get("studies"), dict):
            raise CLIError(f"{path} is not a {cls.FORMAT} file")
        if data.get("version", 0) > MANIFEST_VERSION:
            raise CLIError(f"{path} was written by a newer covidseg (version {data['version']})")
        return cls(path, data)

    @classmethod
    def new(cls, path: Path, **fields):
        rec = cls(path, {"format": cls.FORMAT, "version": MANIFEST_VERSION, **fields, "created_at": _now(),
                         "updated_at": _now(), "studies": {}})
        rec.save()
        return rec

    def lock_exclusive(self, what: str) -> None:
        """Refuse a second process on the same file (the lock dies with the process, even on kill -9)."""
        import fcntl
        f = open(str(self.path) + ".lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise CLIError(f"another covidseg {what} is using {self.path}") from None
        self._lockfile = f

    @property
    def studies(self) -> dict:
        return self.data["studies"]

    def update(self, entry_id: str, /, **fields) -> dict:
        """Set fields of one study's entry and save; returns a copy of the entry."""
        with self.lock:
            entry = self.studies.setdefault(entry_id, {})
            entry.update(fields)
            entry["updated_at"] = _now()
            self.save()
            return dict(entry)

    def save(self) -> None:
        with self.lock:
            self.data["updated_at"] = _now()
            text = json.dumps(self.data, indent=1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(OSError):   # make the rename itself durable
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)


class Manifest(JsonRecord):
    """What `submit` did, keyed by each study's path relative to the submitted folder: name, kind, digest,
    Idempotency-Key, state (pending | uploading | accepted | rejected), server study id, last error."""

    FORMAT = MANIFEST_FORMAT

    @classmethod
    def open_or_create(cls, path: Path, root: Path, server: str) -> "Manifest":
        path = Path(path)
        if not path.exists():
            return cls.new(path, root=str(root), server=server)
        m = cls.load(path)
        if m.data.get("root") != str(root):
            raise CLIError(f"manifest {path} belongs to folder {m.data.get('root')}, not {root}; "
                           "use another --manifest for this folder")
        if m.data.get("server") != server:
            raise CLIError(f"manifest {path} records studies on {m.data.get('server')}, not {server}; "
                           "use another --manifest for this server")
        return m


class FetchState(JsonRecord):
    """What `fetch` downloaded into one output folder (OUT/.covidseg-fetch.json), keyed by server study id:
    name, last status, progress, key report numbers and the SHA-256 of every downloaded file. Kept apart from
    the manifest so that `fetch --wait` can run while `submit` is still uploading."""

    FORMAT = "covidseg-fetch-state"
    FILENAME = ".covidseg-fetch.json"


# --------------------------------------------------------------------------------------------------------------
# HTTP with retries
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------------------------------------------
def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


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


def _check_auth_and_api(resp, server: str) -> None:
    """A refused token or a server without the studies API stops the run (exit 2): nothing would succeed."""
    if resp.status_code in (401, 403):
        raise Fatal(f"the server refused the token (HTTP {resp.status_code}: {error_message(resp)})")
    if resp.status_code in (404, 405):
        raise Fatal(f"{server} has no studies API (HTTP {resp.status_code} from {resp.url}); is --server right?")


# --------------------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SubmitOutcome:
    rel: str
    result: str             # accepted | already | rejected | error | skipped
    message: str = ""


@dataclass
class _Progress:
    studies: object = None
    bytes: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_bytes(self, n: int) -> None:
        if self.bytes is not None:
            with self.lock:
                self.bytes.update(n)

    def add_total(self, n: int) -> None:
        if self.bytes is not None and n:
            with self.lock:
                self.bytes.total = max(0, (self.bytes.total or 0) + n)
                self.bytes.refresh()


class Submitter:
    """Uploads the studies of one folder, recording every step in the manifest."""

    def __init__(self, root: Path, manifest: Manifest, client: Client, progress: _Progress,
                 resubmit_rejected: bool = False):
        self.root, self.manifest, self.client, self.progress = root, manifest, client, progress
        self.resubmit_rejected = resubmit_rejected
        pause = os.environ.get(PAUSE_ENV, "").strip()
        self.pause_after = int(pause) if pause.isdigit() and int(pause) > 0 else None
        self._accepted_this_run = 0
        self._count_lock = threading.Lock()

    def prepare(self, study: LocalStudy) -> dict:
        """The study's manifest entry with an up-to-date digest and key (a changed study starts afresh)."""
        entry = dict(self.manifest.studies.get(study.rel) or {})
        stamp = study.stamp()
        if entry.get("stamp") == stamp and entry.get("digest"):
            return entry
        digest = study.digest()
        key = idempotency_key(study.rel, digest)
        if entry.get("key") == key:
            return self.manifest.update(study.rel, stamp=stamp)
        fields = dict(name=study.name, kind=study.kind, n_files=len(study.files), size=study.size, stamp=stamp,
                      digest=digest, key=key, state="pending", study_id=None, error=None, http_status=None,
                      attempts=0, fetched={})
        if entry.get("key"):
            fields["previous_study_id"] = entry.get("study_id")   # content changed since it was sent
        return self.manifest.update(study.rel, **fields)

    def submit_one(self, study: LocalStudy) -> SubmitOutcome:
        entry = self.prepare(study)
        if entry.get("state") == "accepted":
            return SubmitOutcome(study.rel, "already")
        if entry.get("state") == "rejected" and not self.resubmit_rejected:
            return SubmitOutcome(study.rel, "rejected", entry.get("error") or "")
        if self.client.stop.is_set():
            return SubmitOutcome(study.rel, "skipped")
        self.manifest.update(study.rel, state="uploading", attempts=int(entry.get("attempts") or 0) + 1,
                             last_try_at=_now())
        filename, ctype = study.upload_name()
        with contextlib.ExitStack() as stack:
            if study.kind == "dicom":
                fileobj = stack.enter_context(tempfile.TemporaryFile(prefix="covidseg-study-", suffix=".zip"))
                write_study_zip(study, fileobj)
                size = fileobj.tell()
                self.progress.add_total(size - study.size)   # the bar counted the unzipped files
            else:
                fileobj = stack.enter_context(open(study.files[0], "rb"))
                size = os.fstat(fileobj.fileno()).st_size
            sent = {"n": 0}
            requests_before = int(entry.get("requests") or 0)
            tries = {"n": 0}     # HTTP requests sent for this study in this run (retries included)

            def on_bytes(n):
                sent["n"] += n
                self.progress.add_bytes(n)

            def make_kwargs():
                tries["n"] += 1
                self.progress.add_bytes(-sent["n"])      # a retried upload starts again from zero
                sent["n"] = 0
                body = MultipartBody(fileobj, size, filename, ctype, on_bytes)
                return {"data": body, "headers": {"Content-Type": body.content_type,
                                                  "Content-Length": str(len(body)),
                                                  "Idempotency-Key": entry["key"]}}
            try:
                resp = self.client.request("POST", "api/v1/studies", make_kwargs=make_kwargs)
            except Stopped:
                self.manifest.update(study.rel, state="pending", requests=requests_before + tries["n"])
                return SubmitOutcome(study.rel, "skipped")
            except TransientFailure as exc:
                self.manifest.update(study.rel, state="pending", error=str(exc), http_status=None,
                                     requests=requests_before + tries["n"])
                if exc.unreachable:
                    self.client.stop.set()
                    raise
                return SubmitOutcome(study.rel, "error", str(exc))
        code = resp.status_code
        n_requests = requests_before + tries["n"]
        _check_auth_and_api(resp, self.client.server)
        if code in (200, 201, 202):
            try:
                body = resp.json()
                study_id = body["id"]
            except (ValueError, KeyError, TypeError):
                msg = f"HTTP {code} without a study id: {resp.text[:200]!r}"
                self.manifest.update(study.rel, state="pending", error=msg, http_status=code, requests=n_requests)
                return SubmitOutcome(study.rel, "error", msg)
            self._maybe_pause()
            self.manifest.update(study.rel, state="accepted", study_id=study_id, http_status=code, error=None,
                                 server_status=body.get("status"), accepted_at=_now(), requests=n_requests,
                                 replayed=code == 200 or bool(body.get("idempotent_replay")))
            return SubmitOutcome(study.rel, "accepted", "existing study (idempotent replay)"
                                 if code == 200 or body.get("idempotent_replay") else "")
        msg = f"HTTP {code}: {error_message(resp)}"
        self.manifest.update(study.rel, state="rejected", error=msg, http_status=code, requests=n_requests)
        return SubmitOutcome(study.rel, "rejected", msg)

    def _maybe_pause(self) -> None:
        """Testing hook COVIDSEG_BULK_PAUSE_AFTER (module docstring): stop between the server's answer and the
        manifest write, until killed."""
        with self._count_lock:
            self._accepted_this_run += 1
            n = self._accepted_this_run
        if self.pause_after is not None and n >= self.pause_after:
            self.client.stop.set()             # no new uploads start
            print(f"paused after {n} accepted uploads ({PAUSE_ENV}={self.pause_after}); waiting to be killed",
                  file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


def cmd_submit(args) -> int:
    """`covidseg submit DIR`: upload every study under DIR once (resumable)."""
    from tqdm import tqdm

    root = Path(args.dir).expanduser()
    if not root.is_dir():
        raise CLIError(f"{args.dir}: no such folder")
    root = root.resolve()
    server = _server_url(args.server)
    token = _token(args)
    manifest_path = Path(args.manifest).expanduser().resolve()
    studies, ignored = scan_studies(root, skip=(manifest_path, Path(str(manifest_path) + ".lock")))
    if not studies:
        raise CLIError(f"no studies in {root} (expected folders of DICOM files, .zip, .nii or .nii.gz files)")
    manifest = Manifest.open_or_create(manifest_path, root, server)
    manifest.lock_exclusive("submit")
    if ignored:
        print(f"warning: ignored {ignored} file(s) that are neither DICOM, .zip, .nii nor .nii.gz",
              file=sys.stderr)
    _assign_names(studies, manifest, root)

    client = Client(server, token, _policy(args), timeout=args.timeout)
    # one cheap request first: an unreachable server, a bad token or a wrong URL fail before any upload
    try:
        resp = client.request("GET", "api/v1/studies", params={"limit": 1})
    except TransientFailure as exc:
        what = "cannot reach" if exc.unreachable else "no usable answer from"
        print(f"error: {what} {server}: {exc}; nothing was submitted (run again later: the manifest "
              f"{manifest_path} keeps the {len(studies)} studies)", file=sys.stderr)
        return 1
    _check_auth_and_api(resp, server)

    todo_bytes = sum(s.size for s in studies
                     if (manifest.studies.get(s.rel) or {}).get("state") not in ("accepted", "rejected"))
    progress = _Progress()
    progress.studies = tqdm(total=len(studies), desc="studies", unit="study", file=sys.stderr, position=0,
                            mininterval=0.5)
    progress.bytes = tqdm(total=todo_bytes, desc="upload", unit="B", unit_scale=True, unit_divisor=1024,
                          file=sys.stderr, position=1, mininterval=0.5)
    sub = Submitter(root, manifest, client, progress, resubmit_rejected=args.resubmit_rejected)
    outcomes: list[SubmitOutcome] = []
    fatal: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="upload")
    try:   # Ctrl+C: no new uploads; the ones in flight finish (their answers are recorded)
        futures = {pool.submit(sub.submit_one, s): s for s in studies}
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                outcomes.append(fut.result())
            except TransientFailure as exc:
                outcomes.append(SubmitOutcome(s.rel, "error", str(exc)))
                fatal = fatal or exc
            except Fatal as exc:
                client.stop.set()
                fatal = fatal or exc
                outcomes.append(SubmitOutcome(s.rel, "skipped"))
            progress.studies.update(1)
    finally:
        client.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        progress.studies.close()
        progress.bytes.close()
    if isinstance(fatal, Fatal):
        raise fatal
    return _submit_summary(studies, manifest, outcomes, fatal, server, manifest_path)


def _assign_names(studies: list[LocalStudy], manifest: Manifest, root: Path) -> None:
    """Give each study a unique output name, keeping names already recorded in the manifest."""
    taken = {e.get("name") for rel, e in manifest.studies.items() if e.get("name")}
    for s in studies:
        entry = manifest.studies.get(s.rel)
        if entry and entry.get("name"):
            s.name = entry["name"]
            continue
        base = default_name(s, root)
        name, k = base, 2
        if name in taken:
            name = s.rel if s.rel != "." else base
        while name in taken:
            name, k = f"{base}~{k}", k + 1
        taken.add(name)
        s.name = name
        manifest.studies.setdefault(s.rel, {})["name"] = name
    manifest.save()


def _human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _submit_summary(studies, manifest, outcomes, fatal, server, manifest_path) -> int:
    by_rel = {o.rel: o for o in outcomes}
    rows, counts, problems = [], {}, []
    for s in studies:
        e = manifest.studies.get(s.rel, {})
        o = by_rel.get(s.rel)
        state = e.get("state") or "pending"
        if state == "uploading":
            state = "pending"
        label = {"already": "accepted (earlier run)"}.get(o.result if o else "", state)
        if o and o.result == "accepted" and o.message:
            label = "accepted (existing study)"
        counts[state] = counts.get(state, 0) + 1
        note = e.get("error") if state != "accepted" else ""
        if note:
            problems.append(f"  {s.name}: {note}")
        rows.append([s.name, s.kind, _human_size(s.size), label, (e.get("study_id") or "-")[:12],
                     (note or "")[:60] + ("..." if len(note or "") > 60 else "")])
    print(_table(rows, ["study", "kind", "size", "state", "study id", "message"]))
    if problems:
        print("\nnot accepted:\n" + "\n".join(problems))
    n_acc = counts.get("accepted", 0)
    n_rej = counts.get("rejected", 0)
    n_left = len(studies) - n_acc - n_rej
    print(f"\n{len(studies)} studies: {n_acc} accepted, {n_rej} rejected, {n_left} not submitted "
          f"(manifest {manifest_path})")
    if fatal is not None:
        print(f"error: {server} is unreachable: {fatal}; {n_left} studies not submitted; run the same command "
              "again to resume", file=sys.stderr)
        return 1
    if n_left:
        print(f"error: {n_left} studies could not be submitted (see the messages above); run the same command "
              "again to resume", file=sys.stderr)
        return 1
    if n_rej:
        print(f"error: the server rejected {n_rej} studies (see the messages above)", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------------------------
def _safe_out_dir(out: Path, name: str) -> Path:
    """OUT/<name>, refusing names that would escape OUT (a hand-edited manifest)."""
    target = (out / name).resolve()
    if target != out and out not in target.parents:
        raise CLIError(f"study name {name!r} in the manifest leads outside {out}")
    return target


def _download(client: Client, link: str, dest: Path, expected_sha: str | None) -> str:
    """Stream one result file into `dest` (temporary file + rename); returns its SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()

    resp = client.request("GET", link, stream=True)
    try:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {error_message(resp)}")
        fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in resp.iter_content(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            if expected_sha and expected_sha != digest:
                raise RuntimeError(f"checksum mismatch for {dest.name} (server {expected_sha[:12]}, got "
                                   f"{digest[:12]})")
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        resp.close()
    return digest


def _server_checksums(body: dict) -> dict[str, str]:
    """SHA-256 per result file if the server publishes them (a `files` or `results` mapping)."""
    out = {}
    for key in ("files", "results", "checksums"):
        v = body.get(key)
        if isinstance(v, dict):
            for name, meta in v.items():
                if isinstance(meta, dict) and isinstance(meta.get("sha256"), str):
                    out[name] = meta["sha256"]
                elif isinstance(meta, str) and len(meta) == 64:
                    out[name] = meta
    return out


def _fetch_study(client: Client, state: FetchState, out: Path, study_id: str, name: str) -> tuple[str, str]:
    """Poll one study and download its results when it succeeded. Returns (status, message)."""
    resp = client.request("GET", f"api/v1/studies/{study_id}")
    if resp.status_code in (401, 403):
        raise Fatal(f"the server refused the token (HTTP {resp.status_code}: {error_message(resp)})")
    if resp.status_code != 200:
        msg = f"HTTP {resp.status_code}: {error_message(resp)}"
        state.update(study_id, name=name, status="error", error=msg)
        return "error", msg
    body = resp.json()
    status = body.get("status") or "unknown"
    fields = dict(name=name, status=status, progress=body.get("progress"), error=body.get("error"))
    if isinstance(body.get("report"), dict):
        fields["report"] = {k: body["report"].get(k) for k in REPORT_NUMBERS}
    state.update(study_id, **fields)
    if status != "succeeded":
        return status, body.get("error") or ""
    folder = _safe_out_dir(out, name)
    links = body.get("links") or {}
    sums = _server_checksums(body)
    fetched = dict(state.studies[study_id].get("fetched") or {})
    wanted = {**RESULT_FILES, **{f: k for f, k in OPTIONAL_RESULT_FILES.items() if links.get(k)}}
    for fname, link_key in wanted.items():
        dest = folder / fname
        have = fetched.get(fname)
        if have and dest.is_file() and sums.get(fname) in (None, have) and _sha256_file(dest) == have:
            continue       # already downloaded and intact
        link = links.get(link_key) or f"/api/v1/studies/{study_id}/files/{fname}"
        fetched[fname] = _download(client, link, dest, sums.get(fname))
        state.update(study_id, fetched=dict(fetched), fetched_at=_now())
    state.update(study_id, status="downloaded", error=None)
    return "succeeded", ""


REPORT_NUMBERS = ("ct_score", "percent_involved", "lesion_volume_ml", "lung_volume_ml", "n_slices")


def _write_summary_csv(out: Path, manifest: Manifest, state: FetchState) -> Path:
    """OUT/summary.csv: one row per study in the manifest, with the key numbers of the finished ones."""
    path = out / "summary.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study", "status", "study_id", *REPORT_NUMBERS, "error"])
    for rel, e in sorted(manifest.studies.items(), key=lambda kv: kv[1].get("name") or kv[0]):
        sid = e.get("study_id") if e.get("state") == "accepted" else None
        st = state.studies.get(sid) or {} if sid else {}
        rep = st.get("report") or {}
        status = {"downloaded": "succeeded"}.get(st.get("status"), st.get("status")) if sid else \
            (e.get("state") or "pending")
        err = st.get("error") if sid else e.get("error")
        w.writerow([e.get("name") or rel, status or "accepted", sid or "",
                    *["" if rep.get(k) is None else rep[k] for k in REPORT_NUMBERS], err or ""])
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path


def _submitted(manifest_path: Path) -> tuple[Manifest, dict[str, str], int]:
    """(manifest, {study id: name} of the accepted studies, number of studies not accepted). Re-read on every
    polling round: `submit` may still be adding studies."""
    manifest = Manifest.load(manifest_path, " (it is written by `covidseg submit`; see --manifest)")
    ids = {e["study_id"]: e.get("name") or rel for rel, e in manifest.studies.items()
           if e.get("state") == "accepted" and e.get("study_id")}
    return manifest, ids, len(manifest.studies) - len(ids)


def cmd_fetch(args) -> int:
    """`covidseg fetch --out DIR`: download the results of every finished study in the manifest."""
    from tqdm import tqdm

    manifest_path = Path(args.manifest).expanduser().resolve()
    manifest, ids, not_submitted = _submitted(manifest_path)
    server = _server_url(args.server or manifest.data.get("server"))
    token = _token(args)
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder")
    if not ids:
        raise CLIError(f"no submitted studies in {manifest_path} (run `covidseg submit` first)")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / FetchState.FILENAME
    state = FetchState.load(state_path) if state_path.exists() else FetchState.new(state_path, server=server)
    state.lock_exclusive("fetch")
    client = Client(server, token, _policy(args), timeout=args.timeout)

    results: dict[str, tuple[str, str]] = {}
    bar = tqdm(total=len(ids), desc="finished", unit="study", file=sys.stderr, mininterval=0.5)
    unreachable = None
    try:
        while True:
            for sid, name in ids.items():
                if results.get(sid, ("",))[0] in FINISHED + ("error",):
                    continue
                try:
                    status, msg = _fetch_study(client, state, out, sid, name)
                except TransientFailure as exc:
                    unreachable = exc
                    break
                except (RuntimeError, OSError) as exc:     # a download that failed or did not match its checksum
                    status, msg = "error", str(exc)
                    state.update(sid, name=name, status="error", error=msg)
                results[sid] = (status, msg)
                if status in FINISHED + ("error",):
                    bar.update(1)
            running = [sid for sid in ids if results.get(sid, ("",))[0] not in FINISHED + ("error",)]
            if running:
                mean = sum(state.studies.get(sid, {}).get("progress") or 0.0 for sid in running) / len(running)
                bar.set_postfix_str(f"{len(running)} not finished, mean progress {mean:.0f}%", refresh=True)
            else:
                bar.set_postfix_str("", refresh=True)
            if unreachable is not None or not args.wait or not running:
                break
            time.sleep(args.interval)
            manifest, ids, not_submitted = _submitted(manifest_path)   # submit may have added studies
            bar.total = len(ids)
    finally:
        bar.close()
    csv_path = _write_summary_csv(out, manifest, state)

    rows = []
    for sid, name in ids.items():
        st = state.studies.get(sid) or {}
        status, msg = results.get(sid, ("not polled", ""))
        rep = st.get("report") or {}
        files = sum((out / name / f).is_file() for f in (st.get("fetched") or {}))
        rows.append([name, status, f"{st.get('progress') or 0:.0f}%",
                     "-" if rep.get("ct_score") is None else str(rep["ct_score"]),
                     "-" if rep.get("percent_involved") is None else f"{rep['percent_involved']:.1f}",
                     f"{files}/{max(len(RESULT_FILES), len(st.get('fetched') or {}))}", (msg or "")[:80]])
    print(_table(rows, ["study", "status", "progress", "CT score", "% involved", "files", "message"]))
    n = {k: sum(1 for sid in ids if results.get(sid, ("",))[0] == k)
         for k in ("succeeded", "failed", "cancelled", "error")}
    waiting = len(ids) - sum(n.values())
    print(f"\n{len(ids)} submitted studies: {n['succeeded']} downloaded, {n['failed']} failed, "
          f"{n['cancelled']} cancelled, {n['error']} errors, {waiting} not finished; {not_submitted} in the "
          f"manifest not accepted; results in {out} (+ {csv_path.name})")
    if unreachable is not None:
        print(f"error: {server} is unreachable: {unreachable}; run fetch again later", file=sys.stderr)
        return 1
    if n["failed"] or n["cancelled"] or n["error"]:
        print("error: some studies failed, were cancelled or could not be downloaded (see above)",
              file=sys.stderr)
        return 1
    if waiting:
        print(f"{waiting} studies are still being processed; run fetch again, or use --wait", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=DEFAULT_MANIFEST,
                   help=f"local JSON record of the run (default ./{DEFAULT_MANIFEST})")
    p.add_argument("--token", default=None, help="bearer token (default: $COVIDSEG_TOKEN)")
    p.add_argument("--retries", type=int_at_least(0, "an integer >= 0"), default=5,
                   help="retries of a request after connection errors, timeouts, 429 and 5xx (default 5)")
    p.add_argument("--backoff", type=_nonneg_float, default=1.0,
                   help="first retry delay in seconds, doubled each time, with jitter (default 1)")
    p.add_argument("--timeout", type=_nonneg_float, default=300.0,
                   help="seconds to wait for an answer (default 300)")


def register(subparsers) -> None:
    """Add `submit` and `fetch`."""
    s = subparsers.add_parser("submit", help="upload a folder of studies (resumable, idempotent)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("dir", metavar="DIR", help="folder of studies (DICOM folders, .zip, .nii, .nii.gz)")
    s.add_argument("--server", default=None, help="service URL, e.g. http://host:8000 (default: $COVIDSEG_SERVER)")
    s.add_argument("--concurrency", type=int_at_least(1, "a positive integer"), default=2,
                   help="parallel uploads (default 2)")
    s.add_argument("--resubmit-rejected", action="store_true",
                   help="send studies the server rejected before again (by default only if their files changed)")
    _add_common(s)
    s.set_defaults(func=cmd_submit)

    f = subparsers.add_parser("fetch", help="download the results of submitted studies",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--out", required=True, help="folder for the results (OUT/<study name>/...)")
    f.add_argument("--wait", action="store_true", help="keep polling until every study is finished")
    f.add_argument("--interval", type=_nonneg_float, default=10.0, help="seconds between polls with --wait")
    f.add_argument("--server", default=None, help="service URL (default: the one in the manifest)")
    _add_common(f)
    f.set_defaults(func=cmd_fetch)
