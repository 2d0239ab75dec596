"""Admin dashboard back end through the Flask test client: login, sessions, CSRF, admin API, CLI."""
from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from .conftest import ADMIN, login, login_csrf


def _csrf_headers(client, **extra):
    return {"X-CSRF-Token": client.csrf, **extra}


# --- login --------------------------------------------------------------------------------------------------------
def test_password_is_stored_as_scrypt_hash_only(svc):
    from shared.service.admin_users import AdminUser
    with svc.Session() as session:
        user = session.scalar(select(AdminUser).where(AdminUser.username == ADMIN[0]))
    assert user.password_hash.startswith("scrypt:")
    assert ADMIN[1] not in user.password_hash


def test_pages_need_login(client):
    r = client.get("/admin")
    assert r.status_code == 302 and r.headers["Location"].startswith("/admin/login")
    r = client.get("/admin/jobs/" + "a" * 32)
    assert r.status_code == 302
    for path in ("/api/v1/admin/jobs", "/api/v1/admin/stats", "/api/v1/admin/workers", "/api/v1/admin/me"):
        r = client.get(path)
        assert r.status_code == 401, path
        assert r.json["code"] == "not_logged_in"


def test_wrong_password_is_refused_without_session(client):
    r = login(client, password="wrong password!")
    assert r.status_code == 401
    assert "Wrong user name or password." in r.get_data(as_text=True)
    assert not any(c.startswith("covidseg_admin=") for c in r.headers.getlist("Set-Cookie"))
    assert client.get("/api/v1/admin/me").status_code == 401
    # an unknown user gets the same answer
    r = login(client, username="mallory", password="whatever123456")
    assert r.status_code == 401 and "Wrong user name or password." in r.get_data(as_text=True)


def test_login_sets_httponly_samesite_cookie_and_ends_on_logout(client, svc):
    r = login(client)
    assert r.status_code == 303 and r.headers["Location"] == "/admin/"
    cookie = next(c for c in r.headers.getlist("Set-Cookie") if c.startswith("covidseg_admin="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    sid = cookie.split(";")[0].split("=", 1)[1]
    # only the hash of the session id is stored
    from shared.service.admin_users import AdminSession
    with svc.Session() as session:
        hashes = session.scalars(select(AdminSession.session_hash)).all()
    assert sid not in hashes and len(hashes) >= 1
    assert client.get("/api/v1/admin/me").json["username"] == ADMIN[0]
    page = client.get("/admin").get_data(as_text=True)
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page).group(1)
    # logout needs the CSRF token
    r = client.post("/admin/logout", data={})
    assert r.status_code == 403
    r = client.post("/admin/logout", data={"csrf_token": csrf})
    assert r.status_code == 303
    # the old cookie value no longer works even if replayed
    client.set_cookie("covidseg_admin", sid, path="/")
    assert client.get("/api/v1/admin/me").status_code == 401


def test_login_form_needs_its_csrf_token(client):
    client.get("/admin/login")
    r = client.post("/admin/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": "forged"})
    assert r.status_code == 400
    assert not any(c.startswith("covidseg_admin=") for c in r.headers.getlist("Set-Cookie"))
    r = client.post("/admin/login", data={"username": ADMIN[0], "password": ADMIN[1],
                                          "csrf_token": login_csrf(client)},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 400


def test_failed_logins_are_throttled(client, svc):
    from shared.service import admin_users
    with svc.Session() as session:
        if admin_users.get_user(session, "frank") is None:
            admin_users.create_admin(session, "frank", "franks long password")
            session.commit()
    for _ in range(5):
        assert login(client, password="not the password").status_code == 401
    r = login(client)   # even the right password, for a while
    assert r.status_code == 429
    assert "Too many failed logins" in r.get_data(as_text=True)
    # another admin behind the same address (a hospital proxy) can still log in ...
    assert login(client, "frank", "franks long password").status_code == 303
    # ... until the address itself has failed 4x as often
    other = client.application.test_client()
    for i in range(15):
        assert login(other, f"guess{i}", "not the password").status_code == 401
    assert login(other, "frank", "franks long password").status_code == 429


def test_next_parameter_is_not_an_open_redirect(client):
    token = login_csrf(client)
    r = client.post("/admin/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token,
                                          "next": "//evil.example/admin"})
    assert r.status_code == 303 and r.headers["Location"] == "/admin/"


def test_disabled_admin_loses_session(admin_client, svc):
    from shared.service import admin_users
    with svc.Session() as session:
        admin_users.create_admin(session, "bob", "another long password")
        session.commit()
    c2 = admin_client.application.test_client()
    assert login(c2, "bob", "another long password").status_code == 303
    assert c2.get("/api/v1/admin/me").status_code == 200
    with svc.Session() as session:
        assert admin_users.disable_admin(session, "bob")
        session.commit()
    assert c2.get("/api/v1/admin/me").status_code == 401
    assert login(c2, "bob", "another long password").status_code == 401


# --- CSRF on state-changing admin API calls ---------------------------------------------------------------------
def test_retry_requires_csrf_token_and_same_origin(admin_client, make_job, svc):
    from shared.service import db
    jid = make_job("failed", error="input missing")
    url = f"/api/v1/admin/jobs/{jid}/retry"
    assert admin_client.post(url).status_code == 403
    assert admin_client.post(url, headers={"X-CSRF-Token": "x" * 43}).status_code == 403
    r = admin_client.post(url, headers=_csrf_headers(admin_client, Origin="https://evil.example"))
    assert r.status_code == 403 and r.json["code"] == "csrf_failed"
    with svc.Session() as session:
        assert session.scalar(select(db.Job.status).where(db.Job.id == jid)) == "failed"
    r = admin_client.post(url, headers=_csrf_headers(admin_client, Origin="http://localhost"))
    assert r.status_code == 202, r.json
    assert r.json["status"] == "queued" and r.json["attempts"] == 0 and r.json["error"] is None
    # the audit trail keeps who retried it and what it was before
    actions = admin_client.get(f"/api/v1/admin/jobs/{jid}").json["admin_actions"]
    assert len(actions) == 1
    a = actions[0]
    assert (a["action"], a["by"], a["from_status"], a["previous_error"], a["previous_attempts"]) == \
        ("retry", "alice", "failed", "input missing", 1)


def test_retry_publishes_a_message(admin_client, make_job, svc, redis_server):
    import redis
    client = redis.Redis(port=redis_server.port, db=6)
    before = client.llen("web.interactive")
    jid = make_job("cancelled")
    r = admin_client.post(f"/api/v1/admin/jobs/{jid}/retry", headers=_csrf_headers(admin_client))
    assert r.status_code == 202
    assert client.llen("web.interactive") == before + 1
    assert r.json["dispatched_at"] is not None
    # a queued job can not be retried
    r = admin_client.post(f"/api/v1/admin/jobs/{jid}/retry", headers=_csrf_headers(admin_client))
    assert r.status_code == 409 and "only failed or cancelled" in r.json["error"]


def test_cancel(admin_client, make_job):
    jid = make_job("queued")
    r = admin_client.post(f"/api/v1/admin/jobs/{jid}/cancel", headers=_csrf_headers(admin_client))
    assert r.status_code == 200 and r.json["status"] == "cancelled"
    r = admin_client.post(f"/api/v1/admin/jobs/{jid}/cancel", headers=_csrf_headers(admin_client))
    assert r.status_code == 200                                   # cancelling twice is harmless ...
    actions = admin_client.get(f"/api/v1/admin/jobs/{jid}").json["admin_actions"]
    assert [(a["action"], a["from_status"]) for a in actions] == [("cancel", "queued")]   # ... and logged once
    done = make_job("succeeded")
    r = admin_client.post(f"/api/v1/admin/jobs/{done}/cancel", headers=_csrf_headers(admin_client))
    assert r.status_code == 409
    r = admin_client.post("/api/v1/admin/jobs/" + "f" * 32 + "/cancel", headers=_csrf_headers(admin_client))
    assert r.status_code == 404


# --- listing, filters, pagination ---------------------------------------------------------------------------------
def test_list_filters_search_and_pagination(admin_client, make_job):
    from shared.service import db
    batch = db.new_id()
    old_failed = make_job("failed", created_ago=timedelta(days=3), error="old")
    failed = [make_job("failed", error=f"boom {i}") for i in range(3)]
    in_batch = make_job("succeeded", batch_id=batch)

    r = admin_client.get("/api/v1/admin/jobs?status=failed&limit=200")
    ids = [j["id"] for j in r.json["jobs"]]
    assert set(failed) | {old_failed} <= set(ids)
    assert all(j["status"] == "failed" for j in r.json["jobs"])
    assert ids.index(failed[2]) < ids.index(failed[0])           # newest first

    r = admin_client.get(f"/api/v1/admin/jobs?batch_id={batch}")
    assert [j["id"] for j in r.json["jobs"]] == [in_batch]
    r = admin_client.get(f"/api/v1/admin/jobs?q={batch}")        # a full batch id also finds its jobs
    assert [j["id"] for j in r.json["jobs"]] == [in_batch]
    r = admin_client.get(f"/api/v1/admin/jobs?q={failed[1][:10]}")
    assert failed[1] in [j["id"] for j in r.json["jobs"]]
    assert all(j["id"].startswith(failed[1][:10]) for j in r.json["jobs"])

    since = (db.utcnow() - timedelta(days=1)).isoformat()
    r = admin_client.get("/api/v1/admin/jobs", query_string={"status": "failed", "created_after": since,
                                                             "limit": 200})
    got = {j["id"] for j in r.json["jobs"]}
    assert set(failed) <= got and old_failed not in got
    r = admin_client.get("/api/v1/admin/jobs", query_string={"status": "failed", "created_before": since})
    assert old_failed in {j["id"] for j in r.json["jobs"]}

    # pagination: pages of 2 cover the failed jobs exactly once
    seen, cursor = [], None
    for _ in range(20):
        r = admin_client.get("/api/v1/admin/jobs", query_string={"status": "failed", "limit": 2,
                                                                 **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200
        seen += [j["id"] for j in r.json["jobs"]]
        cursor = r.json["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) and set(failed) | {old_failed} <= set(seen)


@pytest.mark.parametrize("query, code", [("status=broken", "invalid_status"), ("q=xyz!", "invalid_search"),
                                         ("batch_id=123", "invalid_batch_id"), ("limit=0", "invalid_limit"),
                                         ("cursor=%%%", "invalid_cursor"),
                                         ("created_after=yesterday", "invalid_time")])
def test_list_rejects_bad_filters_with_sentences(admin_client, query, code):
    r = admin_client.get("/api/v1/admin/jobs?" + query)
    assert r.status_code == 400 and r.json["code"] == code
    assert isinstance(r.json["error"], str) and len(r.json["error"]) > 10


def test_job_detail_has_timeline_fields(admin_client, make_job):
    jid = make_job("failed", run=timedelta(seconds=7), error="decoder exploded", worker="celery@gpu-1", attempts=2)
    r = admin_client.get(f"/api/v1/admin/jobs/{jid}")
    j = r.json
    assert j["status"] == "failed" and j["attempts"] == 2 and j["worker"] == "celery@gpu-1"
    assert j["error"] == "decoder exploded" and j["token"] == "web-tests"
    assert j["durations"]["running_s"] == pytest.approx(7.0) and j["durations"]["waiting_s"] == pytest.approx(1.0)
    assert j["durations"]["total_s"] == pytest.approx(8.0)
    assert j["created_at"] < j["started_at"] < j["finished_at"]
    assert admin_client.get("/admin/jobs/" + jid).status_code == 200
    assert admin_client.get("/api/v1/admin/jobs/" + "0" * 32).status_code == 404


# --- figures ------------------------------------------------------------------------------------------------------
def _clear_of_an_hour_boundary(margin_s: int = 10) -> None:
    """Sleep until the clock is at least margin_s past the hour and margin_s before the next, so that jobs that
    finished 2 s ago did so in the current hour and the 24-hour window does not move between two requests."""
    import time

    from shared.service import db

    now = db.utcnow()
    into = now.minute * 60 + now.second
    if into < margin_s:
        time.sleep(margin_s - into)
    elif into > 3600 - margin_s:
        time.sleep(3600 - into + margin_s)


def test_stats_counters_and_throughput(admin_client, make_job):
    _clear_of_an_hour_boundary()  # this run failed once at 21:00 UTC: the jobs below finished in the hour before
    before = admin_client.get("/api/v1/admin/stats").json
    make_job("queued")
    make_job("failed")
    make_job("failed", created_ago=timedelta(hours=30))          # failed more than 24 h ago: not counted
    # both finish 2 s ago (created + 1 s waiting + run): in this hour once 10 s into it
    make_job("succeeded", run=timedelta(seconds=2), created_ago=timedelta(seconds=5))
    make_job("succeeded", run=timedelta(seconds=10), created_ago=timedelta(seconds=13))
    after = admin_client.get("/api/v1/admin/stats").json
    c0, c1 = before["counters"], after["counters"]
    assert c1["queued"] == c0["queued"] + 1
    assert c1["failed_24h"] == c0["failed_24h"] + 1
    assert c1["succeeded_24h"] == c0["succeeded_24h"] + 2
    tp = after["throughput"]
    assert len(tp) == 24 and tp[0]["hour"] < tp[-1]["hour"]
    assert sum(p["finished"] for p in tp) == sum(p["finished"] for p in before["throughput"]) + 3
    # latency = submission to result: 1 s waiting + run time -> this hour's median includes 3 s and 11 s
    assert tp[-1]["median_latency_s"] is not None and tp[-1]["median_latency_s"] > 0


def test_workers_and_queue_depth(admin_client, svc, web_settings):
    r = admin_client.get("/api/v1/admin/workers")
    assert r.status_code == 200
    names = [q["name"] for q in r.json["queues"]]
    assert "web.interactive" in names and "web.bulk" in names
    assert all(isinstance(q["depth"], int) for q in r.json["queues"])
    assert r.json["workers"] == []          # no worker consumes these test queues
    assert r.json["flower_url"] == "http://flower.internal:5555/"
    page = admin_client.get("/admin/").get_data(as_text=True)
    assert 'href="http://flower.internal:5555/"' in page


# --- pages --------------------------------------------------------------------------------------------------------
def test_pages_send_security_headers(admin_client):
    anonymous = admin_client.application.test_client()
    for c, path in ((anonymous, "/"), (anonymous, "/admin/login"), (admin_client, "/admin/"),
                    (admin_client, "/admin/jobs/" + "a" * 32)):
        r = c.get(path)
        assert r.status_code == 200, path
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
        html = r.get_data(as_text=True)
        assert "<script>" not in html                                               # CSP: no inline script
        assert not re.search(r'(src|href)="(https?:)?//[^"]*\.(js|css)', html)    # no CDN
    assert admin_client.get("/admin/").headers["Cache-Control"] == "no-store"


def test_upload_page_has_labels_for_every_control(client):
    html = client.get("/").get_data(as_text=True)
    for control in re.findall(r'<(?:input|select)\b[^>]*>', html):
        if 'type="hidden"' in control:
            continue
        cid = re.search(r'id="([^"]+)"', control).group(1)
        assert f'for="{cid}"' in html or "aria-label=" in control, control


# --- CLI ----------------------------------------------------------------------------------------------------------
def _cli(argv, stdin_text, monkeypatch, capsys):
    """`covidseg ...` in-process: the console script's own entry point and error handling."""
    from cli import main
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_cli_admin_create_list_reset(web_settings, svc, monkeypatch, capsys):
    from shared.service import admin_users
    url = ["--database-url", web_settings.database_url]
    rc, out = _cli(["admin", *url, "create", "carol", "--password-stdin"], "a password long enough\n",
                   monkeypatch, capsys)
    assert rc == 0 and "created" in out
    rc, out = _cli(["admin", *url, "create", "carol", "--password-stdin"], "a password long enough\n",
                   monkeypatch, capsys)
    assert rc == 2 and "error: admin 'carol' already exists" in out
    rc, out = _cli(["admin", *url, "create", "dave", "--password-stdin"], "short\n", monkeypatch, capsys)
    assert rc == 2 and "at least 12 characters" in out and "Traceback" not in out
    rc, out = _cli(["admin", *url, "list"], "", monkeypatch, capsys)
    assert "carol\tactive" in out and "dave" not in out
    rc, out = _cli(["admin", *url, "reset-password", "carol", "--password-stdin"], "the new password 42\n",
                   monkeypatch, capsys)
    assert rc == 0
    with svc.Session() as session:
        assert admin_users.authenticate(session, "carol", "the new password 42") is not None
        assert admin_users.authenticate(session, "carol", "a password long enough") is None
    rc, out = _cli(["admin", *url, "disable", "carol"], "", monkeypatch, capsys)
    assert rc == 0
    rc, out = _cli(["admin", *url, "disable", "nobody"], "", monkeypatch, capsys)
    assert rc == 2 and "no admin 'nobody'" in out
    rc, out = _cli(["admin", *url, "create", "erin"], "", monkeypatch, capsys)   # no terminal, no --password-stdin
    assert rc == 2 and "--password-stdin" in out
    rc, out = _cli(["admin", *url, "list"], "", monkeypatch, capsys)
    assert "carol\tdisabled" in out
