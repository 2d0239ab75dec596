"""Flask app factory of the covidseg job service. Never imports TensorFlow (tests/service check it).

Production: `gunicorn -c api/gunicorn_conf.py 'api:create_app()'` (gthread workers; settings from the
environment, see shared/service/settings.py and docs/SERVICE.md).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from flask import Flask

from shared.service.settings import Settings, get_settings


@dataclass
class Services:
    """Per-process handles: DB engine + session factory (pooled), object storage, Celery producer."""
    settings: Settings
    engine: object = None
    Session: object = None
    storage: object = None
    celery: object = None
    token_cache: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings) -> "Services":
        from shared.service import db
        from shared.service.celery_app import make_celery
        from shared.service.storage import Storage

        engine = db.make_engine(settings)
        return cls(settings=settings, engine=engine, Session=db.make_sessionmaker(engine),
                   storage=Storage.from_settings(settings), celery=make_celery(settings))


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        MAX_FORM_PARTS=max(1000, 2 * settings.max_files_per_request + 10),
        JSON_SORT_KEYS=False,
    )
    logging.getLogger("covidseg").setLevel(settings.log_level.upper())
    app.extensions["covidseg"] = services or Services.create(settings)

    from api.errors import register_error_handlers
    from api.routes import bp_health, bp_predict, bp_v1

    register_error_handlers(app)
    app.register_blueprint(bp_health)
    app.register_blueprint(bp_v1)
    app.register_blueprint(bp_predict)
    from api.studies import bp_studies     # whole studies (issue 5)
    app.register_blueprint(bp_studies)

    from api.admin import bp_admin, bp_admin_api   # web interface + admin dashboard (issue 4, docs/WEB.md)
    from api.web import bp_web
    app.register_blueprint(bp_web)
    app.register_blueprint(bp_admin)
    app.register_blueprint(bp_admin_api)
    return app
