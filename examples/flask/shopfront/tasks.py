"""The app's tasks: ``@shared_task`` binds them to the app ``celery_init_app`` made."""

from __future__ import annotations

from celeriac import shared_task
from flask import current_app


@shared_task(ignore_result=False)
def add_together(a: int, b: int) -> int:
    return a + b


@shared_task(ignore_result=False)
def greeting(name: str) -> str:
    """Reads the Flask app's config: only works inside its app context."""
    return f"{current_app.config['GREETING']}, {name} ({current_app.name})"
