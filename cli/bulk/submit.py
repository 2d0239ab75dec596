"""`covidseg submit DIR` (cli.bulk): upload every study under DIR once, resumably.

`Submitter` records every step in the manifest (records.Manifest): a study is `uploading` while its request is
on its way, then `accepted` (with the server's study id) or `rejected` (with the server's message). An
interrupted run is resumed by running the same command again: accepted studies are skipped, and a study whose
upload reached the server but not the manifest is sent again with the same Idempotency-Key, which the server
answers with the existing study. 4xx answers other than 429 are never retried; 401/403 (token) and 404 (no
studies API at that URL) stop the run (`_check_auth_and_api`). `cmd_submit` ends with a summary table; exit
codes: 0 every study is accepted, 1 some were rejected or could not be submitted, 2 bad arguments.

Testing hook `COVIDSEG_BULK_PAUSE_AFTER=N` (`PAUSE_ENV`): once the server has accepted the N-th upload of this
run, the client stops right BEFORE recording it in the manifest (the worst moment for a crash) and sleeps until it
is killed; it prints `paused after N accepted uploads` on stderr. tests/service/test_bulk_client.py uses it to
kill -9 the client deterministically half-way.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from cli import CLIError

from .client import Client, Fatal, MultipartBody, Stopped, TransientFailure, error_message
from .common import _policy, _server_url, _table, _token
from .discovery import LocalStudy, default_name, idempotency_key, scan_studies, write_study_zip
from .records import Manifest, _now

PAUSE_ENV = "COVIDSEG_BULK_PAUSE_AFTER"


def _check_auth_and_api(resp, server: str) -> None:
    """A refused token or a server without the studies API stops the run (exit 2): nothing would succeed."""
    if resp.status_code in (401, 403):
        raise Fatal(f"the server refused the token (HTTP {resp.status_code}: {error_message(resp)})")
    if resp.status_code in (404, 405):
        raise Fatal(f"{server} has no studies API (HTTP {resp.status_code} from {resp.url}); is --server right?")


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
