"""``app.set_default()``: the app used when no app was made current (Flask's factory calls it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celeriac import Celery, local


@pytest.fixture
def no_current_app() -> Iterator[None]:
    saved = local._current_app, local._default_app
    local._current_app = None
    yield
    local._current_app, local._default_app = saved


@pytest.mark.usefixtures("no_current_app")
def test_set_default_is_the_app_when_none_is_current() -> None:
    app = Celery("factory-made", set_as_current=False)
    app.set_default()
    assert local.get_current_app() is app
    current = Celery("current")  # a current app still wins, as in Celery
    assert local.get_current_app() is current
