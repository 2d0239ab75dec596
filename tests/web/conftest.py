"""Fixtures of the web/admin tests: the Flask app (test client) over a freshly migrated SQLite database and the
session's real Redis and SeaweedFS (tests/conftest.py), with one administrator."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest

ADMIN = ("alice", "correct horse battery staple")


@pytest.fixture(scope="module")
def web_settings(tmp_path_factory, redis_server, s3_server):
    import localstack
    from shared.service.settings import Settings
    from shared.service.storage import Storage

    url = f"sqlite:///{tmp_path_factory.mktemp('webdb') / 'web.db'}"
    localstack.migrate(url)
    s = Settings.from_env({}, database_url=url, broker_url=f"redis://127.0.0.1:{redis_server.port}/6",
                          s3_endpoint=s3_server.endpoint, s3_access_key="covidseg-test",
                          s3_secret_key="covidseg-test-secret", s3_bucket="covidseg-web-unit",
                          queue_interactive="web.interactive", queue_bulk="web.bulk",
                          flower_url="http://flower.internal:5555/")
    Storage.from_settings(s).ensure_bucket()
    return s


@pytest.fixture(scope="module")
def app(web_settings):
    from api import create_app
    from shared.service import admin_users
    application = create_app(web_settings)
    application.config["TESTING"] = True
    svc = application.extensions["covidseg"]
    with svc.Session() as session:
        admin_users.create_admin(session, *ADMIN)
        session.commit()
    yield application
    svc.engine.dispose()


@pytest.fixture
def svc(app):
    return app.extensions["covidseg"]


@pytest.fixture
def client(app):
    from api.admin import auth
    auth.throttle.failures.clear()
    return app.test_client()


def login_csrf(client) -> str:
    r = client.get("/admin/login")
    assert r.status_code == 200
    return re.search(r'name="csrf_token" value="([^"]+)"', r.get_data(as_text=True)).group(1)


def login(client, username=ADMIN[0], password=ADMIN[1]):
    return client.post("/admin/login", data={"username": username, "password": password,
                                             "csrf_token": login_csrf(client)})


@pytest.fixture
def admin_client(client):
    r = login(client)
    assert r.status_code == 303, r.get_data(as_text=True)
    page = client.get("/admin").get_data(as_text=True)
    client.csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page).group(1)
    return client


@pytest.fixture
def make_job(svc):
    """Insert a job row directly (the API's own submission path is tested in tests/service)."""
    from shared.service import db

    with svc.Session() as session:
        token_row, _ = db.create_token(session, "web-tests")
        session.commit()
        token_id = token_row.id

    def make(status="queued", created_ago=timedelta(minutes=5), run=timedelta(seconds=3), batch_id=None,
             error=None, name="slice.png", worker="celery@w1", attempts=None):
        now = db.utcnow()
        jid = db.new_id()
        created = now - created_ago
        started = created + timedelta(seconds=1) if status != "queued" else None
        finished = started + run if status in db.TERMINAL and started else (
            created if status == "cancelled" else None)
        with svc.Session() as session:
            if batch_id and session.get(db.Batch, batch_id) is None:
                session.add(db.Batch(id=batch_id, token_id=token_id, created_at=created, total=1,
                                     queue="web.bulk"))
                session.flush()
            session.add(db.Job(id=jid, token_id=token_id, batch_id=batch_id, position=0, status=status,
                               queue="web.interactive", progress=100 if status == "succeeded" else 0,
                               attempts=attempts if attempts is not None else (0 if status == "queued" else 1),
                               error=error, created_at=created, updated_at=finished or created,
                               started_at=started, finished_at=finished, heartbeat_at=started,
                               worker=worker if started else None, input_key=f"inputs/{jid}",
                               input_sha256="0" * 64, input_size=1234, input_format="png", width=512,
                               height=512, original_name=name,
                               infected_fraction=0.1 if status == "succeeded" else None))
            session.commit()
        return jid
    return make
