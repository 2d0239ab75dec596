"""The task's error handling in-process (no broker): transient storage errors are retried with the job released
in between and end as a failed job with the reason, never as a stuck `running` job; bad images fail their job."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from shared import db
from shared.storage import StorageError


class _FakeStorage:
    def __init__(self, fail=True, data=b""):
        self.fail, self.data, self.gets = fail, data, 0

    def get_bytes(self, key, expect_sha256=None):
        self.gets += 1
        if self.fail:
            raise StorageError("connection refused (test)")
        return self.data


class _FakeResources:
    def __init__(self, Session, storage):
        self.Session, self.storage = Session, storage

    def get_segmenter(self):
        raise AssertionError("the model must not be needed here")


@pytest.fixture
def session_factory(tmp_path):
    import localstack
    url = f"sqlite:///{tmp_path / 'w.db'}"
    localstack.migrate(url)
    engine = db.make_engine(url)
    yield db.make_sessionmaker(engine)
    engine.dispose()


def _queued_job(Session) -> str:
    with Session() as s:
        tok, _ = db.create_token(s, "t")
        jid = db.new_id()
        s.add(db.Job(id=jid, token_id=tok.id, queue="q", input_key=f"inputs/{jid}", input_sha256="0" * 64,
                     input_size=1, input_format="png", width=8, height=8))
        s.commit()
    return jid


def _job(Session, jid):
    with Session() as s:
        return s.execute(select(db.Job).where(db.Job.id == jid)).scalar_one()


def test_transient_storage_errors_are_retried_then_fail_the_job(session_factory, monkeypatch):
    import worker.tasks as tasks
    storage = _FakeStorage(fail=True)
    monkeypatch.setattr(tasks, "resources", lambda: _FakeResources(session_factory, storage))
    jid = _queued_job(session_factory)
    result = tasks.process_jobs.apply(kwargs={"job_ids": [jid]})   # eager: retries run at once, no back-off
    job = _job(session_factory, jid)
    assert job.status == "failed", (job.status, job.error)
    assert "gave up" in job.error and job.claim_token is not None
    assert storage.gets >= 2                                        # it was retried
    assert result.state in ("SUCCESS", "FAILURE", "RETRY")


def test_undecodable_bytes_fail_only_that_job(session_factory, monkeypatch):
    import worker.tasks as tasks
    storage = _FakeStorage(fail=False, data=b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    monkeypatch.setattr(tasks, "resources", lambda: _FakeResources(session_factory, storage))
    jid = _queued_job(session_factory)
    out = tasks.process_jobs.apply(kwargs={"job_ids": [jid]}).get()
    job = _job(session_factory, jid)
    assert job.status == "failed" and job.error.startswith("cannot decode image"), job.error
    assert out == {"claimed": 1, "done": 1}


def test_duplicate_message_for_a_finished_job_is_a_no_op(session_factory, monkeypatch):
    import worker.tasks as tasks
    storage = _FakeStorage(fail=True)
    monkeypatch.setattr(tasks, "resources", lambda: _FakeResources(session_factory, storage))
    jid = _queued_job(session_factory)
    with session_factory() as s:
        db.claim_jobs(s, [jid], "lease", "w", 60)
        db.finish_success(s, jid, "lease", 0.5, "{}")
    assert tasks.process_jobs.apply(kwargs={"job_ids": [jid]}).get() == {"claimed": 0}
    assert storage.gets == 0 and _job(session_factory, jid).status == "succeeded"
