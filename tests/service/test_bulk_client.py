"""The overnight bulk client (`covidseg submit` / `covidseg fetch`, the package cli/bulk/) against the real
stack (gunicorn API, Celery workers, Redis, SeaweedFS, SQLite).

Studies are tiny (3-5 real CT slices from tests/fixtures, as DICOM series built with pydicom and NIfTI volumes
built with nibabel). The client runs as a real subprocess; it is killed with SIGKILL half-way through a run with
the documented hook COVIDSEG_BULK_PAUSE_AFTER, which stops it at the worst moment: after the server accepted a
study and before the manifest recorded it.
"""
from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
# tests/core/helpers.py: the one DICOM/NIfTI builder of the test suite (pytest puts tests/ on sys.path)
from core.helpers import FIXTURE_SLICES as SLICES
from core.helpers import fixture_slice_hu
from core.helpers import write_dicom_series as core_write_dicom_series
from core.helpers import write_nifti as core_write_nifti

REPO = Path(__file__).resolve().parents[2]
SQLITE = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


# --- studies on disk ---------------------------------------------------------------------------------------------
def hu_stack(n: int, offset: int = 0) -> np.ndarray:
    """(n, 256, 256) int16 HU from the real fixture slices."""
    out = [fixture_slice_hu(SLICES[(offset + k) % len(SLICES)]) for k in range(n)]
    return np.clip(np.round(np.stack(out)), -1024, 3071).astype(np.int16)


def write_dicom_series(folder: Path, hu: np.ndarray, *, names=None, dz: float = 2.5) -> list[Path]:
    """One CT series, files written in reverse spatial order, IPP along +z, 0.7 mm pixels."""
    return core_write_dicom_series(folder, hu, spacing=(0.7, 0.7), dz=dz, origin=(-90.0, -90.0, 10.0),
                                   order="reversed", names=names, patient=("Bulk^Test", "BULK01"))


def write_nifti(path: Path, hu: np.ndarray) -> Path:
    return core_write_nifti(path, np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([0.7, 0.7, 2.5, 1.0]))


def make_studies(root: Path) -> dict[str, str]:
    """Four small studies in a realistic layout; returns {relative path: kind}."""
    # DICOM files without extension, recognised by their DICM preamble
    write_dicom_series(root / "ward_a" / "p01", hu_stack(4), names=[f"IMG{n:03d}" for n in range(4)])
    write_nifti(root / "ward_a" / "p02.nii.gz", hu_stack(3, offset=1))
    tmp = root.parent / (root.name + "-p03")
    files = write_dicom_series(tmp, hu_stack(3, offset=2))
    (root / "ward_b").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "ward_b" / "p03.zip", "w") as zf:
        for f in files:
            zf.write(f, f"series/{f.name}")
    write_dicom_series(root / "ward_b" / "p04", hu_stack(5, offset=3))
    (root / "ward_b" / "notes.txt").write_text("not a study\n")
    (root / ".cache").mkdir()
    write_nifti(root / ".cache" / "hidden.nii.gz", hu_stack(3))
    return {"ward_a/p01": "dicom", "ward_a/p02.nii.gz": "nifti", "ward_b/p03.zip": "zip", "ward_b/p04": "dicom"}


# --- running the client --------------------------------------------------------------------------------------
def client_env(token: str | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDSEG_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if token:
        env["COVIDSEG_TOKEN"] = token
    env.update({k: str(v) for k, v in extra.items()})
    return env


def covidseg(args, env, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def load_manifest(path: Path) -> dict:
    return json.loads(path.read_text())["studies"]


def server_studies(stack, token: str) -> list[dict]:
    """Every study of `token`, through the API's cursor pagination."""
    out, cursor = [], None
    while True:
        params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        r = stack.get("/api/v1/studies", headers={"Authorization": f"Bearer {token}"}, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["studies"]
        cursor = body.get("next_cursor")
        if not cursor:
            return out


@pytest.fixture
def token(stack):
    """A token of its own per test: the server's study list is then exactly this test's studies."""
    import localstack
    return localstack.create_token(stack.env, "bulk-client-test")


# --- tests without the stack ---------------------------------------------------------------------------------
def test_scan_names_keys_and_deterministic_zip(tmp_path):
    from cli.bulk import idempotency_key, scan_studies, write_study_zip

    root = tmp_path / "night"
    expected = make_studies(root)
    studies, ignored = scan_studies(root)
    assert {s.rel: s.kind for s in studies} == expected          # hidden folders skipped
    assert ignored == 1                                          # notes.txt
    p01 = next(s for s in studies if s.rel == "ward_a/p01")
    assert len(p01.files) == 4
    # the zip sent for a DICOM folder is byte-identical every time, and carries no local file names
    a, b = io.BytesIO(), io.BytesIO()
    write_study_zip(p01, a)
    time.sleep(0.01)
    write_study_zip(p01, b)
    assert a.getvalue() == b.getvalue()
    names = zipfile.ZipFile(a).namelist()
    assert names == ["0000.dcm", "0001.dcm", "0002.dcm", "0003.dcm"]
    # the key is stable for unchanged content and changes with the content
    k1 = idempotency_key(p01.rel, p01.digest())
    assert k1 == idempotency_key(p01.rel, p01.digest())
    data = bytearray(p01.files[0].read_bytes())
    data[-1] ^= 0xFF
    p01.files[0].write_bytes(bytes(data))
    assert idempotency_key(p01.rel, p01.digest()) != k1
    assert idempotency_key("ward_a/other", p01.digest()) != idempotency_key(p01.rel, p01.digest())


def test_bad_arguments_exit_2(tmp_path, monkeypatch, capsys):
    import cli

    monkeypatch.delenv("COVIDSEG_TOKEN", raising=False)
    monkeypatch.delenv("COVIDSEG_SERVER", raising=False)
    (tmp_path / "empty").mkdir()
    m = tmp_path / "m.json"
    cases = [
        (["submit", str(tmp_path / "missing"), "--server", "http://127.0.0.1:9", "--token", "t"], "no such folder"),
        (["submit", str(tmp_path / "empty"), "--server", "http://127.0.0.1:9"], "no token"),
        (["submit", str(tmp_path / "empty"), "--server", "127.0.0.1:9", "--token", "t"], "http(s) URL"),
        (["submit", str(tmp_path / "empty"), "--token", "t", "--manifest", str(m)], "no server"),
        (["submit", str(tmp_path / "empty"), "--server", "http://127.0.0.1:9", "--token", "t",
          "--manifest", str(m)], "no studies"),
        (["submit", str(tmp_path), "--server", "http://127.0.0.1:9", "--token", "t", "--concurrency", "0"],
         "positive integer"),
        (["fetch", "--manifest", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")], "not found"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err
    # a manifest made for another folder is refused instead of being mixed up
    (tmp_path / "a").mkdir()
    write_nifti(tmp_path / "a" / "x.nii.gz", hu_stack(3))
    (tmp_path / "b").mkdir()
    write_nifti(tmp_path / "b" / "y.nii.gz", hu_stack(3))
    rc = cli.main(["submit", str(tmp_path / "a"), "--server", "http://127.0.0.1:9", "--token", "t",
                   "--manifest", str(m), "--retries", "0"])
    assert rc == 1                                                 # nobody listens on port 9
    assert cli.main(["submit", str(tmp_path / "b"), "--server", "http://127.0.0.1:9", "--token", "t",
                     "--manifest", str(m)]) == 2
    assert "belongs to folder" in capsys.readouterr().err


def test_server_down_retries_then_clear_error(tmp_path):
    import localstack

    root = tmp_path / "night"
    make_studies(root)
    port = localstack.free_port()          # nothing listens there
    manifest = tmp_path / "m.json"
    r = covidseg(["submit", root, "--server", f"http://127.0.0.1:{port}", "--manifest", manifest,
                  "--retries", "2", "--backoff", "0.05"], client_env("some-token"), timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"cannot reach http://127.0.0.1:{port}" in r.stderr
    assert "Connection refused" in r.stderr and "after 3 attempts" in r.stderr
    assert "Traceback" not in r.stderr
    entries = load_manifest(manifest)
    assert len(entries) == 4 and not any(e.get("state") == "accepted" for e in entries.values())


# --- against the real stack ----------------------------------------------------------------------------------
@SQLITE
def test_killed_half_way_then_resumed_every_study_exactly_once(stack, token, tmp_path):
    stack.ensure_worker()
    root = tmp_path / "night"
    expected = make_studies(root)
    manifest = tmp_path / "manifest.json"
    out = tmp_path / "results"
    args = ["submit", root, "--server", stack.url, "--manifest", manifest, "--concurrency", "1"]

    # run 1: stopped (then SIGKILLed) after the server accepted the 2nd study, before the manifest recorded it
    err_path = tmp_path / "run1.err"
    with open(err_path, "w") as err, open(tmp_path / "run1.out", "w") as outf:
        proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, stdout=outf,
                                stderr=err, env=client_env(token, COVIDSEG_BULK_PAUSE_AFTER=2),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "paused after 2 accepted uploads" not in err_path.read_text():
            assert proc.poll() is None, f"client exited early: {err_path.read_text()}\n{stack.tail_logs()}"
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    entries = load_manifest(manifest)
    states = sorted(e.get("state", "pending") for e in entries.values())
    assert states == ["accepted", "pending", "pending", "uploading"], entries
    assert len(server_studies(stack, token)) == 2        # the server has one study more than the manifest says

    # run 2: resumes; the study lost between server and manifest is answered by the server, not duplicated
    r = covidseg(args, client_env(token))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("accepted (existing study)") == 1, r.stdout
    assert r.stdout.count("accepted (earlier run)") == 1, r.stdout
    entries = load_manifest(manifest)
    assert set(entries) == set(expected)
    assert all(e["state"] == "accepted" for e in entries.values())
    on_server = server_studies(stack, token)
    assert len(on_server) == 4
    assert {s["id"] for s in on_server} == {e["study_id"] for e in entries.values()}
    from sqlalchemy import select

    from shared.service import db
    with stack.Session() as session:
        keys = session.execute(select(db.Study.idempotency_key).where(
            db.Study.id.in_([e["study_id"] for e in entries.values()]))).scalars().all()
    assert sorted(keys) == sorted(e["key"] for e in entries.values())     # one row per key

    # run 3: nothing left to do
    r = covidseg(args, client_env(token))
    assert r.returncode == 0 and r.stdout.count("accepted (earlier run)") == 4, r.stdout + r.stderr
    assert len(server_studies(stack, token)) == 4

    # fetch --wait: every study finishes and all four result files of each are downloaded, plus the DICOM SEG of
    # the three DICOM studies (not of the NIfTI one)
    r = covidseg(["fetch", "--manifest", manifest, "--out", out, "--wait", "--interval", "1"], client_env(token))
    assert r.returncode == 0, r.stdout + r.stderr + stack.tail_logs()
    by_id = {s["id"]: s for s in server_studies(stack, token)}
    assert all(s["status"] == "succeeded" for s in by_id.values()), by_id
    for rel, e in entries.items():
        folder = out / e["name"]
        dicom = not rel.endswith(".nii.gz")
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["lung_mask.nii.gz", "mask.nii.gz", "report.json", "summary.png"] + ["mask.seg.dcm"] * dicom), rel
        if dicom:
            assert (folder / "mask.seg.dcm").read_bytes()[128:132] == b"DICM"
        assert json.loads((folder / "report.json").read_text()) == by_id[e["study_id"]]["report"]
        assert (folder / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import nibabel as nib
    src = nib.load(str(root / "ward_a" / "p02.nii.gz"))
    mask = nib.load(str(out / entries["ward_a/p02.nii.gz"]["name"] / "mask.nii.gz"))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    rows = (out / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 5 and all(",succeeded," in row for row in rows[1:]), rows

    # fetch again: nothing downloaded; a damaged file is noticed and downloaded again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*") if p.parent != out}
    damaged = out / entries["ward_b/p04"]["name"] / "summary.png"
    good = damaged.read_bytes()
    r = covidseg(["fetch", "--manifest", manifest, "--out", out], client_env(token))
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    damaged.write_bytes(b"not a png")
    r = covidseg(["fetch", "--manifest", manifest, "--out", out], client_env(token))
    assert r.returncode == 0, r.stdout + r.stderr
    assert damaged.read_bytes() == good
    assert sum(p.stat().st_mtime_ns != stamps[p] for p in stamps) == 1


@SQLITE
def test_rejected_study_is_reported_and_not_retried(stack, token, tmp_path):
    root = tmp_path / "night"
    root.mkdir()
    write_nifti(root / "good.nii.gz", hu_stack(3))
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(3000))         # gzip magic, then garbage
    with zipfile.ZipFile(root / "notdicom.zip", "w") as zf:
        zf.writestr("a.txt", "hello")
    manifest = tmp_path / "m.json"
    args = ["submit", root, "--server", stack.url, "--manifest", manifest, "--retries", "3", "--backoff", "0.05"]
    r = covidseg(args, client_env(token))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rejected 2 studies" in r.stderr and "Traceback" not in r.stderr
    entries = load_manifest(manifest)
    for rel in ("broken.nii.gz", "notdicom.zip"):
        e = entries[rel]
        assert e["state"] == "rejected" and 400 <= e["http_status"] < 500 and e["http_status"] != 429, e
        assert e["requests"] == 1, e                        # a 4xx is never retried
        assert e["error"].startswith(f"HTTP {e['http_status']}: ") and len(e["error"]) > 20
        assert e["error"] in r.stdout[: 10_000] or e["error"][:60] in r.stdout
    assert entries["good.nii.gz"]["state"] == "accepted"
    assert len(server_studies(stack, token)) == 1
    # the next run does not send them again (their content did not change) and still reports them
    r = covidseg(args, client_env(token))
    assert r.returncode == 1 and "rejected 2 studies" in r.stderr
    entries = load_manifest(manifest)
    assert entries["broken.nii.gz"]["requests"] == 1 and entries["notdicom.zip"]["requests"] == 1
    assert len(server_studies(stack, token)) == 1


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the real API, but for each study upload: the 1st attempt reaches the server and its answer is
    lost (connection dropped), the 2nd gets a 503, the 3rd goes through. Counts the uploads per key."""

    daemon_threads = True

    def __init__(self, target: str):
        self.target = target
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _forward(self, body):
        import requests
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        return requests.request(self.command, self.server.target + self.path, data=body, headers=headers,
                                timeout=300)

    def _answer(self, resp):
        self.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        key = self.headers.get("Idempotency-Key")
        if self.command == "POST" and self.path.startswith("/api/v1/studies") and key:
            with self.server.lock:
                attempt = self.server.attempts[key] = self.server.attempts.get(key, 0) + 1
            if attempt == 1:
                self._forward(body)                 # the server creates the study ...
                self.close_connection = True        # ... and the client never hears of it
                self.connection.shutdown(2)
                return
            if attempt == 2:
                payload = b'{"error": "maintenance", "code": "unavailable"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        self._answer(self._forward(body))

    do_GET = do_POST = _handle


@SQLITE
def test_lost_answers_and_5xx_are_retried_without_duplicates(stack, token, tmp_path):
    proxy = _FlakyProxy(stack.url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "night"
        expected = make_studies(root)
        manifest = tmp_path / "m.json"
        r = covidseg(["submit", root, "--server", f"http://127.0.0.1:{proxy.server_address[1]}",
                      "--manifest", manifest, "--retries", "4", "--backoff", "0.05"], client_env(token))
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert r.returncode == 0, r.stdout + r.stderr
    entries = load_manifest(manifest)
    assert set(entries) == set(expected)
    assert sorted(proxy.attempts.values()) == [3, 3, 3, 3]
    assert all(e["state"] == "accepted" and e["requests"] == 3 and e["replayed"] for e in entries.values())
    on_server = server_studies(stack, token)
    assert sorted(s["id"] for s in on_server) == sorted(e["study_id"] for e in entries.values())


@SQLITE
def test_refused_token_stops_the_run(stack, tmp_path):
    root = tmp_path / "night"
    root.mkdir()
    write_nifti(root / "a.nii.gz", hu_stack(3))
    r = covidseg(["submit", root, "--server", stack.url, "--manifest", tmp_path / "m.json"],
                 client_env("not-a-real-token"))
    assert r.returncode == 2 and "refused the token" in r.stderr and "401" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
