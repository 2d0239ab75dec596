"""End to end on real services with the shipped weights: upload -> queue -> worker -> results in S3."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    import cv2
    assert data[:8] == PNG_SIG, data[:16]
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img.shape[1], img.shape[0]


def _source_size(path) -> tuple[int, int]:
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return img.shape[1], img.shape[0]


def test_single_slice_end_to_end(stack, slice_paths):
    stack.ensure_worker()
    src = slice_paths[0]
    r = stack.submit([src])
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["batch_id"] is None and len(body["jobs"]) == 1
    job_id = body["jobs"][0]["id"]
    assert r.headers["Location"].endswith(job_id)
    job = stack.wait_job(job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 100 and job["attempts"] == 1 and job["error"] is None
    assert 0.0 <= job["infected_fraction"] <= 1.0
    assert job["input"]["name"] == src.name
    assert job["started_at"] and job["finished_at"] and job["created_at"] <= job["finished_at"]
    size = _source_size(src)
    assert (job["input"]["width"], job["input"]["height"]) == size
    for kind in ("mask", "probability", "overlay"):
        res = job["results"][kind]
        data = requests.get(res["url"], timeout=30).content          # presigned S3 URL, no token needed
        assert _png_size(data) == size
        import hashlib
        assert hashlib.sha256(data).hexdigest() == res["sha256"]
        streamed = stack.get(job["links"][kind])                     # the same bytes through the API
        assert streamed.status_code == 200 and streamed.headers["Content-Type"] == "image/png"
        assert streamed.content == data
    import cv2
    mask = cv2.imdecode(np.frombuffer(requests.get(job["results"]["mask"]["url"], timeout=30).content, np.uint8),
                        cv2.IMREAD_UNCHANGED)
    assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
    assert sorted(stack.storage.list_keys(f"results/{job_id}/")) == [
        f"results/{job_id}/mask.png", f"results/{job_id}/overlay.png", f"results/{job_id}/probability.png"]


def test_legacy_predict_returns_overlay_png(stack, slice_paths):
    stack.ensure_worker()
    src = slice_paths[-1]
    r = stack.post("/predict", files={"file": (src.name, src.read_bytes())}, timeout=200)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "image/png"
    assert _png_size(r.content) == _source_size(src)
    job = stack.get(f"/api/v1/jobs/{r.headers['X-Job-Id']}").json()
    assert job["status"] == "succeeded" and job["queue"] == stack.settings.queue_interactive
    assert float(r.headers["X-Infected-Fraction"]) == pytest.approx(job["infected_fraction"], abs=1e-5)


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_batch_of_20_reaches_100_percent(stack, slice_paths):
    stack.ensure_worker()
    items = [slice_paths[i % len(slice_paths)] for i in range(20)]
    r = stack.submit(items)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["batch_id"] and len(body["jobs"]) == 20
    batch = stack.wait_batch(body["batch_id"], timeout=400)
    assert batch["percent_done"] == 100.0 and batch["total"] == 20
    assert batch["counts"]["succeeded"] == 20, batch
    assert [j["position"] for j in batch["jobs"]] == list(range(20))
    listed = stack.get("/api/v1/jobs", params={"batch_id": body["batch_id"], "limit": 200}).json()["jobs"]
    assert {j["queue"] for j in listed} == {stack.settings.queue_bulk}
    for j in listed[:3]:
        assert _png_size(requests.get(j["results"]["overlay"]["url"], timeout=30).content) == \
            (j["input"]["width"], j["input"]["height"])
    # 20 slices travel in 3 messages; the bulk worker's pool (COVIDSEG_WORKER_CONCURRENCY = 2 processes, each
    # with its own model) runs two of them at once, so the jobs name two different processes
    from sqlalchemy import select

    from shared.service import db
    with stack.Session() as session:
        workers = set(session.execute(select(db.Job.worker).where(db.Job.batch_id == body["batch_id"])).scalars())
    assert stack.settings.worker_concurrency == 2
    assert len(workers) == 2 and all(w.startswith(f"test-{stack.backend}-bulk@") for w in workers), workers


def _tiff_bytes(path) -> bytes:
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return cv2.imencode(".tiff", img)[1].tobytes()


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_tiff_and_dicom_slices(stack, slice_paths, make_dicom):
    import cv2
    stack.ensure_worker()
    src = slice_paths[0]
    r = stack.submit([("slice.tif", _tiff_bytes(src), "image/tiff"),
                      ("slice.dcm", make_dicom(cv2.imread(str(src), cv2.IMREAD_GRAYSCALE).astype(np.int16) * 6
                                               - 1000), "application/dicom")])
    assert r.status_code == 202, r.text
    size = _source_size(src)
    for j in r.json()["jobs"]:
        job = stack.wait_job(j["id"])
        assert job["status"] == "succeeded", job
        assert job["input"]["format"] in ("tiff", "dicom")
        assert _png_size(requests.get(job["results"]["mask"]["url"], timeout=30).content) == size
    assert {stack.get(f"/api/v1/jobs/{j['id']}").json()["input"]["format"] for j in r.json()["jobs"]} == \
        {"tiff", "dicom"}
