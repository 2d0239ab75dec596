"""Bad input never hurts the service: every refusal is the right 4xx with a JSON `error`, nothing is stored
outside the bucket's generated keys, and the service stays healthy afterwards."""
from __future__ import annotations

import re
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from sqlalchemy import select, update

from shared.service import db

# every object the service may write (other test modules share the bucket: studies live under studies/<id>/)
KEY_RE = re.compile(r"^(inputs/[0-9a-f]{32}|results/[0-9a-f]{32}/(mask|probability|overlay)\.png"
                    r"|studies/[0-9a-f]{32}/(input\.tar|upload|results/(overlays/)?[A-Za-z0-9_-]{1,64}"
                    r"(\.[A-Za-z0-9]{1,8}){1,2}))$")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(w=64, h=48) -> bytes:
    import cv2
    img = (np.arange(w * h, dtype=np.uint32).reshape(h, w) % 251).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def jpeg_bytes(w=64, h=48) -> bytes:
    import cv2
    img = (np.arange(w * h, dtype=np.uint32).reshape(h, w) % 251).astype(np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def tiff_bytes(w=64, h=48) -> bytes:
    import cv2
    img = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)   # incompressible
    return cv2.imencode(".tiff", img)[1].tobytes()


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A few hundred bytes declaring 10^10 pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def corrupt_crc_png() -> bytes:
    data = bytearray(png_bytes())
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF
    return bytes(data)


def _files(*items):
    return [("file", it) for it in items]


@pytest.fixture(scope="module")
def finished_job(stack):
    """A job of this token set to succeeded directly in the database (no worker needed)."""
    r = stack.submit([("done.png", png_bytes(), "image/png")])
    assert r.status_code == 202, r.text
    jid = r.json()["jobs"][0]["id"]
    with stack.Session() as s:
        s.execute(update(db.Job).where(db.Job.id == jid).values(status=db.SUCCEEDED, progress=100))
        s.commit()
    return jid


@pytest.fixture(scope="module")
def other_tokens_job(stack):
    import localstack
    other = localstack.create_token(stack.env, "other-client")
    r = requests.post(stack.url + "/api/v1/jobs", headers={"Authorization": f"Bearer {other}"},
                      files=_files(("x.png", png_bytes(), "image/png")), timeout=30)
    assert r.status_code == 202
    return r.json()["jobs"][0]["id"]


def raw_http(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send a request whose declared Content-Length may exceed what we send; read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 2000:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


CASES = [
    # name, method, path, kwargs-builder, expected status, expected code
    ("no file field", "post", "/api/v1/jobs", lambda: {"files": {"other": ("a.png", png_bytes())}}, 400, "no_file"),
    ("no body at all", "post", "/api/v1/jobs", lambda: {"data": b""}, 415, "expected_multipart"),
    ("JSON instead of multipart", "post", "/api/v1/jobs", lambda: {"json": {"file": "x"}}, 415,
     "expected_multipart"),
    ("empty file", "post", "/api/v1/jobs", lambda: {"files": _files(("a.png", b"", "image/png"))}, 400,
     "empty_file"),
    ("text renamed .png", "post", "/api/v1/jobs",
     lambda: {"files": _files(("scan.png", b"hello, I am text\n" * 20, "image/png"))}, 415, "unsupported_media_type"),
    ("truncated PNG", "post", "/api/v1/jobs",
     lambda: {"files": _files(("t.png", png_bytes()[:-40], "image/png"))}, 400, "corrupt_image"),
    ("PNG with a bad CRC", "post", "/api/v1/jobs",
     lambda: {"files": _files(("c.png", corrupt_crc_png(), "image/png"))}, 400, "corrupt_image"),
    ("truncated JPEG", "post", "/api/v1/jobs",
     lambda: {"files": _files(("t.jpg", jpeg_bytes()[:200], "image/jpeg"))}, 400, "corrupt_image"),
    ("truncated TIFF", "post", "/api/v1/jobs",
     lambda: {"files": _files(("t.tif", tiff_bytes(256, 256)[:-1000], "image/tiff"))}, 400, None),
    ("100000x100000 PNG header", "post", "/api/v1/jobs",
     lambda: {"files": _files(("bomb.png", bomb_png(), "image/png"))}, 413, "too_many_pixels"),
    ("2x2 image", "post", "/api/v1/jobs", lambda: {"files": _files(("tiny.png", png_bytes(2, 2), "image/png"))},
     422, "image_too_small"),
    ("file over the per-file cap", "post", "/api/v1/jobs",
     lambda: {"files": _files(("big.png", png_bytes() + b"\0" * (5 * 1024 * 1024), "image/png"))}, 413,
     "file_too_large"),
    ("too many files", "post", "/api/v1/jobs",
     lambda: {"files": _files(*[(f"{i}.png", png_bytes(), "image/png") for i in range(26)])}, 413,
     "too_many_files"),
    ("one good, one bad file (no partial batch)", "post", "/api/v1/jobs",
     lambda: {"files": _files(("ok.png", png_bytes(), "image/png"), ("bad.png", b"GIF89a....", "image/png"))},
     415, "unsupported_media_type"),
    ("passwd text named ../../etc/passwd", "post", "/api/v1/jobs",
     lambda: {"files": _files(("../../etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n", "text/plain"))}, 415,
     "unsupported_media_type"),
    ("bad Idempotency-Key", "post", "/api/v1/jobs",
     lambda: {"files": _files(("a.png", png_bytes(), "image/png")), "headers": {"Idempotency-Key": "x" * 300}},
     400, "invalid_idempotency_key"),
    ("wrong token", "get", "/api/v1/jobs", lambda: {"headers": {"Authorization": "Bearer cs_not-a-real-token"}},
     401, "invalid_token"),
    ("missing token", "get", "/api/v1/jobs", lambda: {"headers": {"Authorization": None}}, 401, "missing_token"),
    ("Basic auth instead of Bearer", "get", "/api/v1/jobs",
     lambda: {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 401, "invalid_token"),
    ("missing token on /predict", "post", "/predict",
     lambda: {"headers": {"Authorization": None}, "files": _files(("a.png", png_bytes(), "image/png"))}, 401, "missing_token"),
    ("missing token on openapi", "get", "/api/v1/openapi.json", lambda: {"headers": {"Authorization": None}}, 401, "missing_token"),
    ("unknown job id", "get", "/api/v1/jobs/" + "0" * 32, lambda: {}, 404, "job_not_found"),
    ("malformed job id", "get", "/api/v1/jobs/..%2F..%2Fetc%2Fpasswd", lambda: {}, 404, None),
    ("unknown batch", "get", "/api/v1/batches/" + "f" * 32, lambda: {}, 404, "batch_not_found"),
    ("bad cursor", "get", "/api/v1/jobs", lambda: {"params": {"cursor": "not-a-cursor!"}}, 400, "invalid_cursor"),
    ("forged cursor", "get", "/api/v1/jobs", lambda: {"params": {"cursor": "eyJzIjogLTF9"}}, 400, "invalid_cursor"),
    ("bad status filter", "get", "/api/v1/jobs", lambda: {"params": {"status": "done"}}, 400, "invalid_status"),
    ("bad limit", "get", "/api/v1/jobs", lambda: {"params": {"limit": "100000"}}, 400, "invalid_limit"),
    ("bad created_after", "get", "/api/v1/jobs", lambda: {"params": {"created_after": "yesterday"}}, 400,
     "invalid_time"),
    ("bad batch_id filter", "get", "/api/v1/jobs", lambda: {"params": {"batch_id": "'; DROP TABLE jobs;--"}}, 400,
     "invalid_batch_id"),
    ("unknown API route", "get", "/api/v1/nothing-here", lambda: {}, 404, "not_found"),
    ("wrong method", "delete", "/api/v1/jobs", lambda: {}, 405, "method_not_allowed"),
    ("/predict with two files", "post", "/predict",
     lambda: {"files": _files(("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png"))}, 413,
     "too_many_files"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(stack, case):
    name, method, path, build, status, code = case
    kw = build()
    headers = {**stack.auth, **kw.pop("headers", {})}   # None removes a header
    r = getattr(requests, method)(stack.url + path, headers=headers, timeout=30, **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    if code:
        assert body["code"] == code, body


def test_truncated_dicom(stack, make_dicom):
    img = (np.arange(64 * 48, dtype=np.int32).reshape(48, 64) % 1000).astype(np.int16)
    good = make_dicom(img)
    r = stack.submit([("t.dcm", good[:-500], "application/dicom")])
    assert r.status_code == 400 and r.json()["code"] in ("corrupt_image", "invalid_image"), r.text


def test_job_state_conflicts(stack, finished_job, other_tokens_job):
    # cancel of a finished job
    r = stack.post(f"/api/v1/jobs/{finished_job}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "job_finished"
    # retry of a succeeded job
    r = stack.post(f"/api/v1/jobs/{finished_job}/retry")
    assert r.status_code == 409 and r.json()["code"] == "job_not_retryable"
    # malformed JSON body on an action
    r = stack.post(f"/api/v1/jobs/{finished_job}/cancel", data=b"{not json",
                   headers={**stack.auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    r = stack.post(f"/api/v1/jobs/{finished_job}/cancel", data=b"[1, 2]",
                   headers={**stack.auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    # unknown result kind; result of a job that has not succeeded
    r = stack.get(f"/api/v1/jobs/{finished_job}/results/secrets")
    assert r.status_code == 404 and r.json()["code"] == "unknown_result"
    queued = stack.submit([("q.png", png_bytes(), "image/png")]).json()["jobs"][0]["id"]
    assert stack.post(f"/api/v1/jobs/{queued}/cancel").status_code == 200
    r = stack.get(f"/api/v1/jobs/{queued}/results/mask")
    assert r.status_code == 409 and r.json()["code"] == "job_not_succeeded"
    # another client's job is invisible
    r = stack.get(f"/api/v1/jobs/{other_tokens_job}")
    assert r.status_code == 404 and r.json()["code"] == "job_not_found"
    r = stack.post(f"/api/v1/jobs/{other_tokens_job}/cancel")
    assert r.status_code == 404


def test_request_body_over_the_cap_is_refused_before_reading(stack):
    declared = 10 * 1024 * 1024 * 1024    # 10 GiB declared; we send only a little
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {stack.token}\r\n"
            f"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: {declared}\r\n\r\n").encode()
    status, body = raw_http(stack.port, head, b"--xx\r\n" + b"\0" * 4096)
    assert status == 413
    assert b"request_too_large" in body
    # and a real 9 MiB body through requests (over the 8 MiB cap)
    big = png_bytes() + b"\0" * (9 * 1024 * 1024)
    try:
        r = requests.post(stack.url + "/api/v1/jobs", headers=stack.auth, files=_files(("x.png", big, "image/png")),
                          timeout=60)
        assert r.status_code == 413 and r.json()["code"] == "request_too_large"
    except requests.ConnectionError:
        pass  # the server may close the connection while we are still sending; it did not accept the body


def test_hostile_filename_is_only_sanitised_metadata(stack):
    r = stack.submit([("../../etc/passwd", png_bytes(), "image/png")])
    assert r.status_code == 202, r.text
    job = r.json()["jobs"][0]
    assert job["name"] == "passwd"
    with stack.Session() as s:
        row = s.execute(select(db.Job).where(db.Job.id == job["id"])).scalar_one()
    assert row.input_key == f"inputs/{job['id']}" and row.original_name == "passwd"
    assert stack.storage.exists(f"inputs/{job['id']}")
    assert not Path("/etc/passwd").read_bytes().startswith(b"\x89PNG")


def test_service_healthy_and_bucket_clean_after_abuse(stack):
    # runs after the cases above (file order): the API still answers and everything stored has a generated key
    assert requests.get(stack.url + "/healthz", timeout=10).json() == {"status": "ok"}
    r = requests.get(stack.url + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}
    keys = stack.storage.list_keys()
    assert keys and all(KEY_RE.match(k) for k in keys), [k for k in keys if not KEY_RE.match(k)]
    assert stack.api.poll() is None
    from localstack import REPO
    assert not (REPO / "etc").exists() and not (REPO.parent / "etc" / "passwd").exists()
