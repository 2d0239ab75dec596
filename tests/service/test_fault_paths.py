"""What the soak (scripts/soak.py) found, pinned down: a submission that fails half-way leaves no stored input
behind, and a run handed back after a storage or database outage does not use up the job's crash budget."""
from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy.exc

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "slices" / "covid_0300.png"


@pytest.fixture(scope="module")
def app(tmp_path_factory, redis_server, s3_server):
    from tests.service.flask_stack import flask_app
    yield flask_app(tmp_path_factory, redis_server, s3_server, "faults", 10, token_cache_seconds=60.0)


@pytest.fixture(scope="module")
def token(app):
    from shared.service import db
    with app.extensions["covidseg"].Session() as session:
        _, plain = db.create_token(session, "faults")
        session.commit()
    return plain


def _inputs(app) -> list[str]:
    st = app.extensions["covidseg"].storage
    return sorted(o.object_name for o in st.client.list_objects(st.bucket, prefix="inputs/", recursive=True))


def _post(client, token, n):
    data = {"file": [(open(FIXTURE, "rb"), f"s{i}.png") for i in range(n)]}
    return client.post("/api/v1/jobs", data=data, headers={"Authorization": f"Bearer {token}"},
                       content_type="multipart/form-data")


@pytest.mark.parametrize("n", [1, 3])
def test_a_failed_insert_leaves_no_input(app, token, monkeypatch, n):
    client = app.test_client()
    assert _post(client, token, 1).status_code == 202     # the token is cached; the database is asked no more
    before = _inputs(app)
    svc = app.extensions["covidseg"]
    real_begin = svc.engine.begin

    def failing_begin():
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(svc.engine, "begin", failing_begin)
    r = _post(client, token, n)
    assert r.status_code == 503 and r.get_json()["code"] == "database_unavailable"
    monkeypatch.setattr(svc.engine, "begin", real_begin)
    assert _inputs(app) == before   # the uploads of the refused submission are gone


def test_a_failed_upload_half_way_leaves_no_input(app, token, monkeypatch):
    from shared.service.storage import StorageError
    client = app.test_client()
    before = _inputs(app)
    st = app.extensions["covidseg"].storage
    real_put, calls = st.put_bytes, []

    def put_then_fail(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise StorageError("connection reset")
        return real_put(*a, **k)

    monkeypatch.setattr(st, "put_bytes", put_then_fail)
    r = _post(client, token, 3)
    assert r.status_code == 503 and len(calls) == 2
    monkeypatch.setattr(st, "put_bytes", real_put)
    assert _inputs(app) == before


def test_a_hand_back_after_an_outage_is_an_attempt_but_not_a_crash(app, token):
    from sqlalchemy import select

    from shared.service import db
    client = app.test_client()
    job_id = _post(client, token, 1).get_json()["jobs"][0]["id"]
    svc = app.extensions["covidseg"]

    def row():
        return session.execute(select(db.Job).where(db.Job.id == job_id)).scalar_one()

    with svc.Session() as session:
        for _ in range(5):       # five storage outages in a row
            assert db.claim_jobs(session, [job_id], "lease-x", "w", stale_after=45.0)
            session.commit()
            assert db.release(session, [job_id], "lease-x", count_attempt=False) == [job_id]
        session.expire_all()
        assert (row().attempts, row().handbacks, db.crashed_runs(row())) == (5, 5, 0)
        # a time limit counts against the crash budget
        assert db.claim_jobs(session, [job_id], "lease-y", "w", stale_after=45.0)
        session.commit()
        assert db.release(session, [job_id], "lease-y") == [job_id]
        session.expire_all()
        assert (row().attempts, row().handbacks, db.crashed_runs(row())) == (6, 5, 1)
        # only the lease holder can hand a run back
        assert db.claim_jobs(session, [job_id], "lease-z", "w", stale_after=45.0)
        session.commit()
        assert db.release(session, [job_id], "someone-else", count_attempt=False) == []
        session.expire_all()
        assert (row().attempts, row().handbacks) == (7, 5)
    r = client.get(f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert (r["attempts"], r["handbacks"]) == (7, 5)
