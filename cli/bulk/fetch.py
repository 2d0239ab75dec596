"""`covidseg fetch --out DIR` (cli.bulk): poll every study the manifest records as accepted and download the
results of the finished ones.

The result files (`RESULT_FILES`, plus `OPTIONAL_RESULT_FILES`: the DICOM SEG of DICOM studies) go to
OUT/<study name>/, the key numbers (`REPORT_NUMBERS`) to OUT/summary.csv. A download goes to a temporary file
first and is checked against the server's SHA-256 when it publishes one; the SHA-256 recorded in the fetch state
(records.FetchState) lets a later run skip files already downloaded and intact. `--wait` keeps polling until
every study is finished. Exit codes: 0 nothing failed, 1 some studies failed or were cancelled or a download
failed, 2 bad arguments.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

from shared.core import dicom_seg
from cli import CLIError

from .client import Client, Fatal, TransientFailure, error_message
from .common import _CHUNK, _policy, _server_url, _sha256_file, _table, _token
from .records import FetchState, Manifest, _now

#: result files of a finished study: local file name -> key in the study's `links`
RESULT_FILES = {"report.json": "report", "summary.png": "summary", "mask.nii.gz": "mask",
                "lung_mask.nii.gz": "lung_mask"}
#: fetched too when the study's `links` has them (DICOM input: the masks as a DICOM SEG)
OPTIONAL_RESULT_FILES = {dicom_seg.FILE_NAME: "dicom_seg"}
FINISHED = ("succeeded", "failed", "cancelled")


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
