"""Least privilege and abuse limits: token scopes, expiry and revocation, per-token rate limits and daily quotas
(429 + Retry-After), the audit log of admin and token actions, and no secret in the logs.

Flask test client over a migrated SQLite database and the session's real Redis and SeaweedFS."""
from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "slices" / "covid_0300.png"
REDIS_DB = 9


@pytest.fixture(scope="module")
def app(tmp_path_factory, redis_server, s3_server):
    from tests.service.flask_stack import flask_app
    yield flask_app(tmp_path_factory, redis_server, s3_server, "lp", REDIS_DB, token_cache_seconds=0.0,
                    rate_limit_per_minute=0, daily_quota=0)


def _token(app, name, scopes="read submit", expires_in=None):
    from shared.service import db
    svc = app.extensions["covidseg"]
    with svc.Session() as session:
        row, plain = db.create_token(session, name, scopes=scopes,
                                     expires_at=db.utcnow() + expires_in if expires_in is not None else None)
        session.commit()
        return row.id, plain


def _bearer(plain):
    return {"Authorization": f"Bearer {plain}"}


def _submit(client, plain, n=1):
    data = {"file": [(open(FIXTURE, "rb"), f"s{i}.png") for i in range(n)]}
    return client.post("/api/v1/jobs", data=data, headers=_bearer(plain), content_type="multipart/form-data")


def _settings(app, **changes):
    svc = app.extensions["covidseg"]
    old = svc.settings
    svc.settings = old.replace(**changes)
    return old


def test_scopes_read_and_submit(app):
    client = app.test_client()
    _, reader = _token(app, "reader", "read")
    _, submitter = _token(app, "submitter", "submit")
    r = _submit(client, reader)
    assert r.status_code == 403 and r.get_json()["code"] == "insufficient_scope"
    assert "'submit' scope" in r.get_json()["error"]
    r = _submit(client, submitter)
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["jobs"][0]["id"]
    r = client.get(f"/api/v1/jobs/{job_id}", headers=_bearer(submitter))
    assert r.status_code == 403 and r.get_json()["code"] == "insufficient_scope"
    assert client.get("/api/v1/jobs", headers=_bearer(reader)).status_code == 200
    # cancelling changes work: submit, not read
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=_bearer(reader)).status_code == 403
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=_bearer(submitter)).status_code == 200
    # studies follow the same rule
    r = client.post("/api/v1/studies", headers=_bearer(reader), data={}, content_type="multipart/form-data")
    assert r.status_code == 403


def test_only_admin_scope_reaches_the_admin_api(app):
    client = app.test_client()
    _, user = _token(app, "user")
    _, ops = _token(app, "ops", "admin")
    r = client.get("/api/v1/admin/jobs", headers=_bearer(user))
    assert r.status_code == 403 and r.get_json()["code"] == "insufficient_scope"
    r = client.get("/api/v1/admin/jobs", headers=_bearer(ops))
    assert r.status_code == 200
    assert client.get("/api/v1/admin/me", headers=_bearer(ops)).get_json()["scopes"] == ["admin"]
    # an admin-only token cannot submit work of its own
    assert _submit(client, ops).status_code == 403


def test_expired_and_revoked_tokens_are_refused(app):
    from sqlalchemy import update

    from shared.service import db
    client = app.test_client()
    _, old = _token(app, "old", expires_in=timedelta(seconds=-1))
    r = client.get("/api/v1/jobs", headers=_bearer(old))
    assert r.status_code == 401 and r.get_json()["code"] == "token_expired"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    tid, live = _token(app, "live", expires_in=timedelta(days=1))
    assert client.get("/api/v1/jobs", headers=_bearer(live)).status_code == 200
    svc = app.extensions["covidseg"]
    with svc.Session() as session:
        session.execute(update(db.ApiToken).where(db.ApiToken.id == tid).values(revoked_at=db.utcnow()))
        session.commit()
    r = client.get("/api/v1/jobs", headers=_bearer(live))  # token_cache_seconds=0: at once
    assert r.status_code == 401 and r.get_json()["code"] == "invalid_token"


def test_rate_limit_answers_429_with_retry_after(app):
    client = app.test_client()
    old = _settings(app, rate_limit_per_minute=3)
    try:
        _, plain = _token(app, "busy")
        codes = [_submit(client, plain).status_code for _ in range(3)]
        r = _submit(client, plain)
        assert codes == [202, 202, 202]
        # unless the minute turned over between the requests, the 4th is refused
        if r.status_code != 202:
            assert r.status_code == 429 and r.get_json()["code"] == "rate_limited"
            assert 1 <= int(r.headers["Retry-After"]) <= 61
        else:
            assert _submit(client, plain).status_code in (202, 429)
        # another token has its own budget; reading is not limited
        _, other = _token(app, "other")
        assert _submit(client, other).status_code == 202
        assert all(client.get("/api/v1/jobs", headers=_bearer(plain)).status_code == 200 for _ in range(5))
    finally:
        _settings(app, **{"rate_limit_per_minute": old.rate_limit_per_minute})


def test_daily_quota_counts_slices_and_refunds_refusals(app):
    client = app.test_client()
    old = _settings(app, daily_quota=3)
    try:
        _, plain = _token(app, "quota")
        assert _submit(client, plain, n=2).status_code == 202        # 2 of 3
        r = _submit(client, plain, n=2)                               # would be 4: refused, not charged
        assert r.status_code == 429 and r.get_json()["code"] == "rate_limited"
        assert "quota" in r.get_json()["error"] and int(r.headers["Retry-After"]) <= 86401
        assert _submit(client, plain, n=1).status_code == 202        # 3 of 3: the refusal cost nothing
        assert _submit(client, plain, n=1).status_code == 429
    finally:
        _settings(app, **{"daily_quota": old.daily_quota})


def test_admin_actions_and_token_management_are_audited(app, tmp_path, monkeypatch, capsys):
    import cli
    client = app.test_client()
    _, user = _token(app, "worker-of-the-day")
    _, ops = _token(app, "ops-audit", "admin")
    job_id = _submit(client, user).get_json()["jobs"][0]["id"]
    assert client.post(f"/api/v1/admin/jobs/{job_id}/cancel", headers=_bearer(ops)).status_code == 200
    r = client.post(f"/api/v1/admin/jobs/{job_id}/retry", headers=_bearer(ops))
    assert r.status_code == 202
    # the CLI's token commands write to the same log
    monkeypatch.setenv("COVIDSEG_DATABASE_URL", app.extensions["covidseg"].settings.database_url)
    assert cli.main(["token", "create", "--name", "nightly", "--scopes", "read", "--expires-in-days", "7",
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["token", "create", "--name", "x", "--scopes", "root"]) == 2
    assert "unknown scope root" in capsys.readouterr().err
    events = client.get("/api/v1/admin/audit?limit=10", headers=_bearer(ops)).get_json()["events"]
    got = [(e["action"], e["target"]) for e in events]
    assert ("job.cancel", f"job:{job_id}") in got and ("job.retry", f"job:{job_id}") in got
    cancel = next(e for e in events if e["action"] == "job.cancel")
    assert cancel["actor"].startswith("token:") and cancel["actor"].endswith(":ops-audit")
    assert cancel["detail"] == {"from_status": "queued"}
    create = next(e for e in events if e["action"] == "token.create")
    assert create["actor"].startswith("cli") and create["detail"]["scopes"] == "read"
    assert [e["action"] for e in client.get("/api/v1/admin/audit?action=job.", headers=_bearer(ops))
            .get_json()["events"]][:2] == ["job.retry", "job.cancel"]
    assert client.get("/api/v1/admin/audit?limit=0", headers=_bearer(ops)).status_code == 400
    assert client.get("/api/v1/admin/audit", headers=_bearer(user)).status_code == 403


def test_no_token_or_secret_in_the_logs(app, caplog):
    client = app.test_client()
    _, plain = _token(app, "secretive")
    with caplog.at_level(logging.DEBUG):
        _submit(client, plain)
        client.get("/api/v1/jobs", headers=_bearer(plain + "x"))   # a wrong token is logged by no one either
        client.get("/api/v1/admin/jobs", headers=_bearer(plain))
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    secret = app.extensions["covidseg"].settings.s3_secret_key
    assert plain not in text and plain[10:] not in text and secret not in text
