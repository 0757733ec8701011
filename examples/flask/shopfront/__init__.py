"""A Flask app with celeriac, as in Flask's "Background Tasks with Celery" (import swapped).

``celery_init_app`` makes the app's celeriac app, whose tasks run inside the Flask
app's context, so a task can use ``flask.current_app`` (its config, extensions...).
Settings come from ``app.config["CELERY"]``, and from the environment through
``from_prefixed_env``: ``FLASK_CELERY__broker_url=redis://...``.
"""

from __future__ import annotations

from typing import Any

from celeriac import Celery, Task
from flask import Flask


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task[Any, Any]):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY={
            "broker_url": "redis://localhost:6379/0",
            "result_backend": "redis://localhost:6379/0",
            "task_ignore_result": True,
        },
        GREETING="Hello from the shop front",
    )
    app.config.from_prefixed_env()
    celery_init_app(app)

    from shopfront import views

    app.register_blueprint(views.bp)
    return app
