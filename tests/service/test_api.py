"""The API without a worker: idempotency, listing/pagination, OpenAPI, token CLI (run before any worker starts
for a stack; the listing test also stops one if it runs, so its jobs stay queued)."""
from __future__ import annotations

import requests


def test_token_cli_create_list_revoke(stack):
    import subprocess
    import sys
    import time

    import localstack
    env = localstack.service_env(stack.env)
    run = lambda *a: subprocess.run([sys.executable, "-m", "shared.cli", *a], env=env, cwd=localstack.REPO,  # noqa
                                    capture_output=True, text=True, timeout=120)
    made = run("token", "create", "--name", "revoke-me", "--quiet")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    h = {"Authorization": f"Bearer {token}"}
    assert requests.get(stack.url + "/api/v1/jobs", headers=h, timeout=30).status_code == 200
    listed = run("token", "list")
    assert "revoke-me" in listed.stdout and token not in listed.stdout      # only the prefix is shown
    assert run("token", "revoke", token[:10]).returncode == 0
    assert run("token", "revoke", token[:10]).returncode == 2                 # already revoked: an error
    time.sleep(stack.settings.token_cache_seconds + 0.5)
    r = requests.get(stack.url + "/api/v1/jobs", headers=h, timeout=30)
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"


def test_listing_filters_and_cursor_pagination(stack, slice_paths):
    stack.stop_worker()      # the jobs must stay queued (a running worker would race the cancel below)
    _listing(stack, slice_paths)


def _listing(stack, slice_paths):
    import time
    from datetime import datetime, timezone
    start = datetime.now(timezone.utc).isoformat()
    time.sleep(0.01)
    r = stack.submit(slice_paths[:5])
    assert r.status_code == 202
    ids = [j["id"] for j in r.json()["jobs"]]
    batch = r.json()["batch_id"]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"batch_id": batch, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = stack.get("/api/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == 3 and seen == list(reversed(ids))          # newest first, no gaps, no repeats
    recent = stack.get("/api/v1/jobs", params={"created_after": start, "limit": 200}).json()["jobs"]
    assert set(ids) <= {j["id"] for j in recent}
    assert stack.get("/api/v1/jobs", params={"created_before": start, "batch_id": batch}).json()["jobs"] == []
    stack.post(f"/api/v1/jobs/{ids[0]}/cancel")
    cancelled = stack.get("/api/v1/jobs", params={"batch_id": batch, "status": "cancelled"}).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    both = stack.get("/api/v1/jobs", params={"batch_id": batch, "status": "cancelled,queued,running,succeeded"})
    assert len(both.json()["jobs"]) == 5
    b = stack.get(f"/api/v1/batches/{batch}").json()
    assert b["total"] == 5 and sum(b["counts"].values()) == 5 and b["counts"]["cancelled"] >= 1


def test_openapi_served(stack):
    doc = stack.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/api/v1/jobs" in doc["paths"]


def test_concurrent_retries_with_one_idempotency_key_create_one_job_set(stack, slice_paths):
    from concurrent.futures import ThreadPoolExecutor
    key = f"concurrent-{stack.backend}"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: stack.submit(slice_paths[:3], headers={"Idempotency-Key": key}),
                                range(6)))
    assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
    id_sets = {tuple(j["id"] for j in a.json()["jobs"]) for a in answers}
    assert len(id_sets) == 1
    batch = answers[0].json()["batch_id"]
    assert len(stack.get("/api/v1/jobs", params={"batch_id": batch}).json()["jobs"]) == 3


def test_idempotency_key_never_duplicates_work(stack, slice_paths):
    key = "client-retry-" + stack.backend
    first = stack.submit(slice_paths[:2], headers={"Idempotency-Key": key})
    again = stack.submit(slice_paths[:2], headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert again.json()["idempotent_replay"] is True
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    batch = first.json()["batch_id"]
    listed = stack.get("/api/v1/jobs", params={"batch_id": batch}).json()["jobs"]
    assert len(listed) == 2
    other = stack.submit(slice_paths[2:4], headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
