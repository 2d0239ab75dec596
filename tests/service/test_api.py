"""The API without a worker: idempotency, listing/pagination, OpenAPI, token CLI (run before any worker starts
for a stack; the listing test also stops one if it runs, so its jobs stay queued)."""
from __future__ import annotations

import requests


def test_token_cli_create_list_revoke(stack, monkeypatch, capsys):
    """`covidseg token create|list|revoke` (cli.service, run in-process against the stack's database)."""
    import time

    from cli import CLIError
    from cli.service import main
    for k, v in stack.env.items():
        monkeypatch.setenv(k, v)
    assert main(["token", "create", "--name", "revoke-me", "--quiet"]) == 0
    token = capsys.readouterr().out.strip()
    h = {"Authorization": f"Bearer {token}"}
    assert requests.get(stack.url + "/api/v1/jobs", headers=h, timeout=30).status_code == 200
    assert main(["token", "list"]) == 0
    listed = capsys.readouterr().out
    assert "revoke-me" in listed and token not in listed and token[:10] in listed   # only the prefix is shown
    assert main(["token", "revoke", token[:10]]) == 0
    try:
        main(["token", "revoke", token[:10]])                                       # already revoked: an error
        raise AssertionError("revoking twice succeeded")
    except CLIError as exc:
        assert "no active token" in str(exc)
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
