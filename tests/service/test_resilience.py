"""Nothing accepted is ever lost: worker kill -9, lost broker messages, Redis and S3 restarts."""
from __future__ import annotations

import hashlib
import time

import pytest
import requests
from sqlalchemy import select

from shared.service import db

pytestmark = pytest.mark.parametrize("stack", ["postgresql"], indirect=True)


def _statuses(stack, ids):
    with stack.Session() as s:
        return dict(s.execute(select(db.Job.id, db.Job.status).where(db.Job.id.in_(ids))).all())


def _wait_for(pred, timeout, what, stack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s\n{stack.tail_logs()}")


def _result_keys(stack, job_id):
    return sorted(stack.storage.list_keys(f"results/{job_id}/"))


def test_kill_9_worker_mid_job_lost_messages_cancel_and_retry(stack, slice_paths):
    """One worker restart covers: kill -9 mid-job, a message lost with Redis, cancel and retry of a queued job."""
    stack.ensure_worker()
    r = stack.submit([slice_paths[i % len(slice_paths)] for i in range(8)])   # one message, one model call
    assert r.status_code == 202
    ids = [j["id"] for j in r.json()["jobs"]]
    _wait_for(lambda: "running" in _statuses(stack, ids).values(), 120, "a job running", stack)
    stack.kill_worker()                                   # SIGKILL to the main process and the pool child
    at_kill = _statuses(stack, ids)
    assert "running" in at_kill.values(), at_kill         # killed mid-job: its claim is left behind

    # While no worker runs, a job is accepted and then its message is lost (Redis restarts without persistence).
    late = stack.submit([slice_paths[0]])
    assert late.status_code == 202
    late_id = late.json()["jobs"][0]["id"]
    # ... and another one is cancelled while still queued (no worker can race the cancel now).
    cancel_id = stack.submit([slice_paths[1]]).json()["jobs"][0]["id"]
    r = stack.post(f"/api/v1/jobs/{cancel_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert stack.post(f"/api/v1/jobs/{cancel_id}/cancel").status_code == 200     # idempotent
    stack.redis_server.restart()
    assert stack.redis_server.ping()

    stack.ensure_worker()                                 # a new worker: the sweep re-queues / re-publishes
    for jid in ids + [late_id]:
        job = stack.wait_job(jid, timeout=240)
        assert job["status"] == "succeeded", job
        assert _result_keys(stack, jid) == [f"results/{jid}/{k}.png" for k in ("mask", "overlay", "probability")]
    for jid, before in at_kill.items():
        if before == "running":
            assert stack.get(f"/api/v1/jobs/{jid}").json()["attempts"] >= 2
    # the cancelled job was never run (its message, if any, was a no-op) and can be retried
    assert stack.get(f"/api/v1/jobs/{cancel_id}").json()["status"] == "cancelled"
    assert _result_keys(stack, cancel_id) == []
    r = stack.post(f"/api/v1/jobs/{cancel_id}/retry")
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running", "succeeded")
    job = stack.wait_job(cancel_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert (job["retries"], job["previous_error"], job["error"]) == (1, "cancelled", None)
    assert stack.post(f"/api/v1/jobs/{cancel_id}/cancel").status_code == 409      # finished: no cancel


def test_kill_9_of_one_pool_process_the_worker_carries_on(stack, slice_paths):
    """The OOM killer's choice: SIGKILL to the one pool process (of COVIDSEG_WORKER_CONCURRENCY = 2) that runs a
    batch. The worker's main process survives and replaces it; the batch still succeeds, with one result set."""
    import os
    import signal

    stack.ensure_worker()
    r = stack.submit([slice_paths[i % len(slice_paths)] for i in range(8)])   # one message on the bulk queue
    assert r.status_code == 202
    ids = [j["id"] for j in r.json()["jobs"]]
    _wait_for(lambda: "running" in _statuses(stack, ids).values(), 120, "the batch running", stack)
    with stack.Session() as s:
        worker = s.execute(select(db.Job.worker).where(db.Job.id.in_(ids), db.Job.status == db.RUNNING)).scalar()
    pid = int(worker.rsplit(":", 1)[1])
    assert pid != stack.bulk_worker.pid       # a pool child, not the worker's main process
    os.kill(pid, signal.SIGKILL)
    for jid in ids:
        job = stack.wait_job(jid, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["attempts"] >= 2, job     # the killed claim counts
        assert _result_keys(stack, jid) == [f"results/{jid}/{k}.png" for k in ("mask", "overlay", "probability")]
    assert stack.bulk_worker.poll() is None, stack.tail_logs()   # the worker itself never went down
    with stack.Session() as s:
        workers = set(s.execute(select(db.Job.worker).where(db.Job.id.in_(ids))).scalars())
    assert worker not in workers, workers     # finished by another (or the replacement) pool process


def test_redis_and_s3_restart_between_submissions(stack, slice_paths):
    stack.ensure_worker()
    first = stack.submit([slice_paths[1]]).json()["jobs"][0]["id"]
    job1 = stack.wait_job(first)
    assert job1["status"] == "succeeded"
    overlay_sha = job1["results"]["overlay"]["sha256"]

    stack.redis_server.restart()
    stack.s3_server.restart()

    second = stack.submit([slice_paths[2]])
    assert second.status_code == 202, second.text
    job2 = stack.wait_job(second.json()["jobs"][0]["id"], timeout=180)
    assert job2["status"] == "succeeded", job2
    # earlier results intact after the restarts
    again = stack.get(f"/api/v1/jobs/{first}").json()
    assert again["status"] == "succeeded" and again["results"]["overlay"]["sha256"] == overlay_sha
    data = requests.get(again["results"]["overlay"]["url"], timeout=30).content
    assert hashlib.sha256(data).hexdigest() == overlay_sha
    assert stack.storage.exists(f"inputs/{first}")


def test_redis_down_submission_is_accepted_and_finishes_later(stack, slice_paths):
    stack.ensure_worker()
    stack.redis_server.stop()
    try:
        r = stack.submit([slice_paths[3]])
        assert r.status_code == 202, r.text                  # stored in S3 + DB; publishing waits for Redis
        jid = r.json()["jobs"][0]["id"]
        ready = requests.get(stack.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
        assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200
    finally:
        stack.redis_server.start()
    assert stack.wait_job(jid, timeout=180)["status"] == "succeeded"


def test_s3_down_submission_refused_cleanly(stack, slice_paths):
    stack.s3_server.stop()
    try:
        r = stack.submit([slice_paths[0]])
        assert r.status_code == 503 and r.json()["code"] == "storage_unavailable"
        ready = requests.get(stack.url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["storage"] != "ok"
        assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200
    finally:
        stack.s3_server.start()
    assert requests.get(stack.url + "/readyz", timeout=30).status_code == 200
    stack.ensure_worker()
    r = stack.submit([slice_paths[0]])
    assert r.status_code == 202
    assert stack.wait_job(r.json()["jobs"][0]["id"], timeout=180)["status"] == "succeeded"


def test_undecodable_upload_fails_its_job_only(stack, slice_paths):
    """Passes the API's structural checks (valid chunks and CRCs) but the pixel data is not zlib: the worker
    fails that job with an error and keeps serving."""
    import struct
    import zlib

    def _chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    poison = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"definitely not zlib" * 10) + \
        _chunk(b"IEND", b"")
    stack.ensure_worker()
    r = stack.submit([("poison.png", poison, "image/png")])
    assert r.status_code == 202, r.text
    bad = stack.wait_job(r.json()["jobs"][0]["id"])
    assert bad["status"] == "failed" and "decode" in bad["error"], bad
    assert bad["results"] is None
    good = stack.submit([slice_paths[0]]).json()["jobs"][0]["id"]
    assert stack.wait_job(good)["status"] == "succeeded"
    assert stack.worker.poll() is None
