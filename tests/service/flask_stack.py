"""The Flask app (test client) over a freshly migrated SQLite database and the session's real Redis and
SeaweedFS, for service tests that need no gunicorn or worker."""
from __future__ import annotations


def flask_app(tmp_path_factory, redis_server, s3_server, name: str, redis_db: int, **settings):
    """A TESTING app with its own database, Redis database (flushed) and bucket `covidseg-<name>`; `settings`
    override the defaults."""
    import localstack
    import redis

    from api import create_app
    from shared.service.settings import Settings
    from shared.service.storage import Storage

    url = f"sqlite:///{tmp_path_factory.mktemp(name + 'db') / (name + '.db')}"
    localstack.migrate(url)
    broker = f"redis://127.0.0.1:{redis_server.port}/{redis_db}"
    redis.Redis.from_url(broker).flushdb()
    s = Settings.from_env({}, database_url=url, broker_url=broker, s3_endpoint=s3_server.endpoint,
                          s3_access_key="covidseg-test", s3_secret_key="covidseg-test-secret",
                          s3_bucket=f"covidseg-{name}", queue_interactive=f"{name}.interactive",
                          queue_bulk=f"{name}.bulk", **settings)
    Storage.from_settings(s).ensure_bucket()
    application = create_app(s)
    application.config["TESTING"] = True
    return application
