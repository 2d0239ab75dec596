"""The task's error handling in-process (no broker): transient storage errors are retried with the job released
in between and end as a failed job with the reason, never as a stuck `running` job; bad images fail their job."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from shared.service import db
from shared.service.storage import StorageError


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


# --- gathering waiting interactive singles into one model call -------------------------------------------------
class _MemStorage:
    def __init__(self):
        self.objects = {}

    def get_bytes(self, key, expect_sha256=None):
        return self.objects[key]

    def put_bytes(self, key, data, content_type, sha256=None, metadata=None):
        import hashlib
        self.objects[key] = data
        return hashlib.sha256(data).hexdigest()

    def delete_prefix(self, prefix):
        for k in [k for k in self.objects if k.startswith(prefix)]:
            del self.objects[k]


class _SpySegmenter:
    """Records each model call's batch; probabilities are a constant 0.75 (the model itself is not under test)."""

    def __init__(self):
        self.calls = []

    def predict(self, images, batch_size=8):
        import numpy as np
        self.calls.append(len(images))
        return [np.full(np.asarray(im).shape[:2], 0.75, np.float32) for im in images]


class _GatherResources:
    def __init__(self, Session, storage, segmenter):
        self.Session, self.storage, self.segmenter = Session, storage, segmenter

    def get_segmenter(self):
        return self.segmenter


def _real_slice_jobs(Session, storage, n, queue, batch=False):
    import hashlib
    from pathlib import Path
    data = (Path(__file__).resolve().parents[1] / "fixtures" / "slices" / "covid_0300.png").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    ids = []
    with Session() as s:
        tok, _ = db.create_token(s, "t")
        batch_id = db.new_id() if batch else None
        if batch:
            s.add(db.Batch(id=batch_id, token_id=tok.id, total=n, queue=queue))
        for i in range(n):
            jid = db.new_id()
            storage.objects[f"inputs/{jid}"] = data
            s.add(db.Job(id=jid, token_id=tok.id, queue=queue, batch_id=batch_id, position=i,
                         input_key=f"inputs/{jid}", input_sha256=sha, input_size=len(data), input_format="png",
                         width=256, height=256))
            s.commit()   # one by one: distinct `seq`, oldest first
            ids.append(jid)
    return ids


def test_waiting_interactive_singles_share_one_model_call(session_factory, monkeypatch):
    import worker.tasks as tasks
    s = tasks.settings()
    storage, seg = _MemStorage(), _SpySegmenter()
    monkeypatch.setattr(tasks, "resources", lambda: _GatherResources(session_factory, storage, seg))
    ids = _real_slice_jobs(session_factory, storage, s.infer_batch_size + 2, s.queue_interactive)
    out = tasks.process_jobs.apply(kwargs={"job_ids": [ids[0]]}).get()
    assert seg.calls == [s.infer_batch_size]                       # one model call, a full batch
    assert out == {"claimed": s.infer_batch_size, "done": s.infer_batch_size}
    gathered, left = ids[:s.infer_batch_size], ids[s.infer_batch_size:]
    for jid in gathered:
        job = _job(session_factory, jid)
        assert job.status == "succeeded" and job.attempts == 1 and job.infected_fraction == 1.0
        assert {f"results/{jid}/{k}.png" for k in ("mask", "probability", "overlay")} <= set(storage.objects)
    assert all(_job(session_factory, jid).status == "queued" for jid in left)   # the oldest were taken first
    # the gathered jobs' own messages arrive later: no-ops
    assert tasks.process_jobs.apply(kwargs={"job_ids": [ids[1]]}).get() == {"claimed": 0}
    # the rest: one call for both
    assert tasks.process_jobs.apply(kwargs={"job_ids": [left[0]]}).get() == {"claimed": 2, "done": 2}
    assert seg.calls == [s.infer_batch_size, 2]


def test_batches_and_bulk_work_do_not_gather(session_factory, monkeypatch):
    import worker.tasks as tasks
    s = tasks.settings()
    storage, seg = _MemStorage(), _SpySegmenter()
    monkeypatch.setattr(tasks, "resources", lambda: _GatherResources(session_factory, storage, seg))
    singles = _real_slice_jobs(session_factory, storage, 3, s.queue_interactive)
    batch = _real_slice_jobs(session_factory, storage, 2, s.queue_bulk, batch=True)
    assert tasks.process_jobs.apply(kwargs={"job_ids": batch}).get() == {"claimed": 2, "done": 2}
    assert seg.calls == [2]
    assert all(_job(session_factory, jid).status == "queued" for jid in singles)
