"""Schema (Alembic only) and job state transitions on SQLite AND PostgreSQL."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import inspect, select, update

from shared.service import db


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """A freshly migrated, empty database per test (SQLite file / new PostgreSQL database)."""
    import localstack
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 't.db'}"
    else:
        pg = request.getfixturevalue("postgres_server")
        url = pg.create_database(f"t_{tmp_path.name.lower().replace('-', '_')[:40]}")
    localstack.migrate(url)
    eng = db.make_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def Session(engine):
    return db.make_sessionmaker(engine)


def _job(session, token_id, **kw):
    jid = db.new_id()
    values = dict(id=jid, token_id=token_id, queue="q", input_key=f"inputs/{jid}", input_sha256="0" * 64,
                  input_size=1, input_format="png", width=8, height=8)
    values.update(kw)
    session.add(db.Job(**values))
    session.commit()
    return jid


@pytest.fixture
def token_id(Session):
    with Session() as s:
        row, _ = db.create_token(s, "t")
        s.commit()
        return row.id


def test_alembic_schema_matches_models_and_downgrades(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import MetaData

    ours = MetaData()
    for name in ("api_tokens", "batches", "jobs", "idempotency_keys", "studies", "audit_events"):
        db.Base.metadata.tables[name].to_metadata(ours)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(ctx, ours)
                if not (d[0].startswith("remove_") and _other_table(d))]
    assert diff == [], diff
    insp = inspect(engine)
    assert {"ix_jobs_status_created", "ix_jobs_token_seq", "ix_jobs_batch_status", "ix_jobs_status_heartbeat"} <= \
        {ix["name"] for ix in insp.get_indexes("jobs")}
    import localstack
    url = engine.url.render_as_string(hide_password=False)
    engine.dispose()
    localstack.migrate(url, "base", downgrade=True)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    localstack.migrate(url)
    assert {"jobs", "batches", "api_tokens", "idempotency_keys"} <= set(inspect(engine).get_table_names())


def _other_table(d) -> bool:
    """Tables/indexes owned by other modules' migrations (e.g. admin dashboard) are not this test's business."""
    obj = d[1] if len(d) > 1 else None
    name = getattr(obj, "name", "") or ""
    table = getattr(getattr(obj, "table", None), "name", name)
    return table not in ("api_tokens", "batches", "jobs", "idempotency_keys", "studies")


def test_tokens_are_stored_hashed(Session):
    with Session() as s:
        row, plain = db.create_token(s, "client")
        s.commit()
        stored = s.execute(select(db.ApiToken)).scalars().all()
    assert plain.startswith("cs_") and len(plain) > 40
    assert all(plain not in (r.token_hash, r.prefix, r.name) for r in stored)
    assert row.token_hash == db.hash_token(plain)


def test_claim_finish_never_moves_backwards(Session, token_id):
    with Session() as s:
        jid = _job(s, token_id)
        claimed = db.claim_jobs(s, [jid], "lease1", "w1", stale_after=60)
        assert [j.id for j in claimed] == [jid] and claimed[0].attempts == 1
        assert db.claim_jobs(s, [jid], "lease2", "w2", stale_after=60) == []      # live claim: not stolen
        assert db.finish_success(s, jid, "lease1", 0.25, "{}")
        # a late/duplicate worker cannot touch a finished job
        assert db.claim_jobs(s, [jid], "lease3", "w3", stale_after=0) == []
        assert not db.finish_failure(s, jid, "lease1", "late failure")
        assert not db.cancel_job(s, jid)
        assert db.release(s, [jid], "lease1") == []
        job = s.execute(select(db.Job).where(db.Job.id == jid)).scalar_one()
        s.refresh(job)
        assert (job.status, job.progress, job.infected_fraction, job.error) == ("succeeded", 100, 0.25, None)


def test_stale_claim_is_taken_over_and_old_lease_cannot_finish(Session, token_id):
    with Session() as s:
        jid = _job(s, token_id)
        db.claim_jobs(s, [jid], "old", "w1", stale_after=60)
        s.execute(update(db.Job).where(db.Job.id == jid).values(heartbeat_at=db.utcnow() - timedelta(seconds=120)))
        s.commit()
        assert [j.id for j in db.claim_jobs(s, [jid], "new", "w2", stale_after=60)] == [jid]
        assert not db.finish_success(s, jid, "old", 0.1, "{}")
        assert db.finish_success(s, jid, "new", 0.2, "{}")
        job = s.execute(select(db.Job).where(db.Job.id == jid)).scalar_one()
        s.refresh(job)
        assert job.attempts == 2 and job.infected_fraction == 0.2


def test_sweep_requeues_stale_jobs_and_gives_up_after_max_attempts(Session, token_id):
    with Session() as s:
        a, b, fresh = _job(s, token_id), _job(s, token_id), _job(s, token_id)
        db.claim_jobs(s, [a, b, fresh], "l", "w", stale_after=60)
        s.execute(update(db.Job).where(db.Job.id == b).values(attempts=3))
        s.execute(update(db.Job).where(db.Job.id.in_([a, b]))
                  .values(heartbeat_at=db.utcnow() - timedelta(seconds=100)))
        s.commit()
        requeued, failed = db.requeue_stale(s, stale_after=30, max_attempts=3)
        assert requeued == [a] and failed == [b]
        rows = dict(s.execute(select(db.Job.id, db.Job.status).where(db.Job.id.in_([a, b, fresh]))).all())
        assert rows == {a: "queued", b: "failed", fresh: "running"}


def test_cancel_and_retry_transitions(Session, token_id):
    with Session() as s:
        jid = _job(s, token_id)
        assert not db.retry_job(s, jid)                  # queued: nothing to retry
        assert db.cancel_job(s, jid)
        assert not db.cancel_job(s, jid)
        assert db.claim_jobs(s, [jid], "l", "w", 60) == []   # a cancelled job's message is a no-op
        assert db.retry_job(s, jid)
        job = s.execute(select(db.Job).where(db.Job.id == jid)).scalar_one()
        s.refresh(job)
        assert (job.retries, job.previous_error) == (1, "cancelled")
        assert [j.id for j in db.claim_jobs(s, [jid], "l", "w", 60)] == [jid]
        assert db.finish_failure(s, jid, "l", "boom")
        assert db.retry_job(s, jid)
        job = s.execute(select(db.Job).where(db.Job.id == jid)).scalar_one()
        s.refresh(job)
        assert (job.status, job.attempts, job.error) == ("queued", 0, None)
        # the history survives the retries: two retries, the last run ended with "boom"
        assert (job.retries, job.previous_error) == (2, "boom")


def test_concurrent_claims_have_one_winner(Session, token_id):
    with Session() as s:
        jid = _job(s, token_id)
    wins, errors = [], []

    def claim(i):
        try:
            with Session() as s:
                if db.claim_jobs(s, [jid], f"lease{i}", f"w{i}", 60):
                    wins.append(i)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(wins) == 1


def test_status_check_constraint(Session, token_id):
    import sqlalchemy.exc
    with Session() as s:
        jid = _job(s, token_id)
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            s.execute(update(db.Job).where(db.Job.id == jid).values(status="done"))
            s.commit()
