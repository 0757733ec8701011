from __future__ import annotations

from typing import Any

from celeriac import AsyncResult
from flask import Blueprint, request

from shopfront import tasks

bp = Blueprint("tasks", __name__, url_prefix="/tasks")


@bp.post("/add")
def start_add() -> dict[str, Any]:
    a = request.form.get("a", 0, type=int)
    b = request.form.get("b", 0, type=int)
    result = tasks.add_together.delay(a, b)
    return {"result_id": result.id}


@bp.post("/greet")
def start_greeting() -> dict[str, Any]:
    result = tasks.greeting.delay(request.form["name"])
    return {"result_id": result.id}


@bp.get("/result/<id>")
def task_result(id: str) -> dict[str, Any]:
    result: AsyncResult[Any] = AsyncResult(id)
    ready = result.ready()
    return {
        "ready": ready,
        "successful": result.successful() if ready else None,
        "value": result.get() if ready else result.result,
    }
