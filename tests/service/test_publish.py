"""The API's background publisher (api/publish.py) on a real Redis and a real SQLite job table: messages reach
the broker after flush, waiting single-slice jobs share messages of up to infer_batch_size ids while batches
keep their own, and with the broker down the jobs are handed to the sweep (dispatched_at cleared), never lost."""
from __future__ import annotations

import redis as redis_lib
import pytest
from sqlalchemy import select

from api.publish import Publisher
from shared.service import db
from shared.service.celery_app import make_celery
from shared.service.settings import Settings
from worker.sweep import _job_ids_of_message


@pytest.fixture
def session_factory(tmp_path):
    import localstack
    url = f"sqlite:///{tmp_path / 'p.db'}"
    localstack.migrate(url)
    engine = db.make_engine(url)
    yield db.make_sessionmaker(engine)
    engine.dispose()


def _settings(broker_url: str, tag: str) -> Settings:
    return Settings.from_env({}, broker_url=broker_url, queue_interactive=f"{tag}.interactive",
                             queue_bulk=f"{tag}.bulk", infer_batch_size=8)


def _jobs(Session, n: int, queue: str, batch: bool = False) -> list[tuple[str, str, str | None]]:
    with Session() as s:
        tok, _ = db.create_token(s, "t")
        batch_id = db.new_id() if batch else None
        if batch:
            s.add(db.Batch(id=batch_id, token_id=tok.id, total=n, queue=queue))
        out = []
        for i in range(n):
            jid = db.new_id()
            s.add(db.Job(id=jid, token_id=tok.id, queue=queue, batch_id=batch_id, position=i,
                         input_key=f"inputs/{jid}", input_sha256="0" * 64, input_size=1, input_format="png",
                         width=8, height=8, dispatched_at=db.utcnow()))
            out.append((jid, queue, batch_id))
        s.commit()
    return out


def _messages(client, queue: str) -> list[set[str]]:
    return [_job_ids_of_message(raw) for raw in client.lrange(queue, 0, -1)]


def test_waiting_singles_share_messages_and_batches_keep_theirs(redis_server, session_factory):
    s = _settings(redis_server.url, "pub1")
    pub = Publisher(make_celery(s), session_factory, s)
    singles = _jobs(session_factory, 10, s.queue_interactive)
    batch = _jobs(session_factory, 3, s.queue_bulk, batch=True)
    with pub._cond:            # hold the thread back so that all submissions are waiting together
        for job in singles[:6]:
            pub.publish([job])
        pub.publish(batch)
        for job in singles[6:]:
            pub.publish([job])
    assert pub.flush(30)
    client = redis_lib.Redis.from_url(redis_server.url)
    interactive = _messages(client, s.queue_interactive)
    assert sorted(len(m) for m in interactive) == [2, 8]
    assert set().union(*interactive) == {j[0] for j in singles}
    assert _messages(client, s.queue_bulk) == [{j[0] for j in batch}]


def test_one_submission_is_published_alone(redis_server, session_factory):
    s = _settings(redis_server.url, "pub2")
    pub = Publisher(make_celery(s), session_factory, s)
    (job,) = _jobs(session_factory, 1, s.queue_interactive)
    pub.publish([job])
    assert pub.flush(30)
    assert _messages(redis_lib.Redis.from_url(redis_server.url), s.queue_interactive) == [{job[0]}]


def test_broker_down_hands_the_jobs_to_the_sweep(session_factory):
    import localstack
    s = _settings(f"redis://127.0.0.1:{localstack.free_port()}/0", "pub3")   # nothing listens there
    pub = Publisher(make_celery(s), session_factory, s)
    jobs = _jobs(session_factory, 2, s.queue_interactive)
    pub.publish(jobs)
    assert pub.flush(60)
    with session_factory() as session:
        rows = session.execute(select(db.Job.status, db.Job.dispatched_at)
                               .where(db.Job.id.in_([j[0] for j in jobs]))).all()
    assert rows and all(st == db.QUEUED and at is None for st, at in rows)   # the sweep's step 2 publishes them
