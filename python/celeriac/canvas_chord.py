"""Chords: a group (the header) whose results go to one task (the body).

The client writes the header's size and sends the header as a group carrying the
body in ``embed.chord``; each header task's worker records its part of the join in
the result backend (``celeriac.worker.canvas_step.chord_part``: one script on Redis, one
transaction on SQLite, in the Rust core), and the one that records the last part sends
the body. A chord inside a chord's header is one part of the outer join: its body
carries the outer chord. ``rpc://`` refuses chords, as Celery does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from celeriac.canvas_signatures import (
    Signature,
    _Composite,
    as_signature,
    copy_options,
    group,
    maybe_signature,
)
from celeriac.result import AsyncResult as _AsyncResult
from celeriac.result import EagerResult

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["chord", "ensure_chords_allowed"]

#: Options of a chord's call that belong to its body (or to nobody), not its header.
_NOT_FOR_HEADER = ("chain", "chord", "task_id", "link", "link_error", "group_id", "group_index")


def ensure_chords_allowed(app: Celeriac) -> None:
    """Celery's refusal of chords on ``rpc://``, before anything is sent."""
    url = app.result_backend_url
    if url is not None and url.split(":", 1)[0].lower() == "rpc":
        raise NotImplementedError('The "rpc" result backend does not support chords!')


def outer_membership(options: Mapping[str, Any], group_id: str) -> dict[str, Any]:
    """The body's place: in an enclosing chord (a chord inside a chord's header, whose
    body is one part of the outer join: the outer ``chord``, ``group_id`` and
    ``group_index``), else in this chord's own group (``group_id``, no ``chord``)."""
    outer = options.get("chord")
    if outer is None:
        return {"group_id": group_id}
    return {
        "chord": outer,
        "group_id": options.get("group_id") or group_id,
        "group_index": options.get("group_index"),
    }


R = TypeVar("R")


def _header_list(header: Any, app: Celeriac | None) -> list[Signature[Any]]:
    """A chord header as Celery stores it: a list of signatures (a group's or a
    chain's tasks, one signature, or any iterable of them)."""
    if isinstance(header, Mapping):
        header = as_signature(header, app)
        if isinstance(header, _Composite):
            return list(header.tasks)
        return [header]
    return [as_signature(task, app) for task in header]


@Signature.register_type()
class chord(Signature[R]):
    """A group (the header) whose results, in header order, go to one task (the
    body) once every header task has ended: ``chord(header, body)()``.

    Joined on ``redis://`` in Celery's keys and steps (``sqlite://``: the same steps): the client
    writes the header's size, each header task's worker records its part in one
    atomic script, and the worker that records the last part sends the body, once.
    If a header task fails, the body does not run and its result is ``ChordError``.
    """

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celeriac | None = None) -> Signature[Any]:
        kwargs = d.get("kwargs")
        if not isinstance(kwargs, Mapping) or "header" not in kwargs:
            raise TypeError(
                f"a chord signature needs kwargs.header and kwargs.body, not {kwargs!r}"
            )
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise TypeError(f"chord options must be a mapping, not {options!r}")
        return cls(
            kwargs["header"], kwargs.get("body"), args=d.get("args"), kwargs=kwargs.get("kwargs"),
            app=app, **options,
        )  # fmt: skip

    def __init__(
        self,
        header: Any,
        body: Any = None,
        task: str = "celery.chord",
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        app: Celeriac | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            task,
            args or (),
            {
                "kwargs": dict(kwargs or {}),
                "header": _header_list(header, app),
                "body": maybe_signature(body, app),
            },
            app=app,
            **options,
        )
        self.subtask_type = "chord"

    @property
    def tasks(self) -> group:
        """The header, as a group (kept as Celery keeps it: a list of signatures)."""
        return group(self.kwargs["header"], app=self._app)

    @property
    def body(self) -> Signature[R] | None:
        return cast("Signature[R] | None", self.kwargs.get("body"))

    @property
    def app(self) -> Celeriac:
        if self._app is not None:
            return self._app
        body = self.body
        if body is not None and body._app is not None:
            return body._app
        return self.tasks.app

    def __call__(self, body: Any = None, **options: Any) -> Any:
        return self.apply_async((), {"body": body} if body else {}, **options)

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Signature[R]:
        body = self.body
        return cast(
            "Signature[R]",
            chord(
                self.tasks.clone(),
                body.clone() if body is not None else None,
                args=tuple(args or ()) + self.args,
                kwargs={**self.kwargs["kwargs"], **(kwargs or {})},
                app=self._app,
                **copy_options({**self.options, **opts}),
            ),
        )

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        route_name: str | None = None,
        **options: Any,
    ) -> _AsyncResult[R]:
        """Send the header (a group carrying the body) and return the body's result,
        whose ``parent`` is the header's :class:`GroupResult`."""
        kwargs = dict(kwargs or {})
        body = as_signature(kwargs.pop("body", None) or self.body, self._app)
        header = cast(group, self.tasks.clone())
        args = tuple(args or ()) + self.args
        app = self.app
        task_id = options.pop("task_id", None)
        merged = {**self.options, **options}
        merged.pop("add_to_parent", None)
        if not app.conf["task_always_eager"]:
            ensure_chords_allowed(app)
        if app.conf["task_always_eager"]:
            results = header.apply(args, **merged)
            values = results.get(disable_sync_subtasks=False)
            return cast("_AsyncResult[R]", body.apply((values,), task_id=task_id))
        # The body's parent is the header task that completes the join, not ours.
        body = body.clone(**{k: v for k, v in merged.items() if k not in ("task_id", "parent_id")})
        # A chord frozen by Celery (e.g. a step of its chain) keeps its id as the group's.
        group_id = header.options.get("task_id") or self.options.get("task_id") or str(uuid.uuid4())
        root_id = body.options.get("root_id")
        body_result = body.freeze(
            task_id or merged.get("task_id"), group_id=group_id, root_id=root_id
        )
        body.options.update(outer_membership(merged, group_id))
        if not header.tasks:  # Celery's rule: the body runs at once with no results
            body.delay([])
            return cast("_AsyncResult[R]", body_result)
        for key in _NOT_FOR_HEADER:
            merged.pop(key, None)
        header.options["task_id"] = group_id
        header_result = header.apply_async(args, None, chord=body, **merged)
        body_result.parent = cast("_AsyncResult[Any]", header_result)
        return cast("_AsyncResult[R]", body_result)

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult[R]:
        body = as_signature(dict(kwargs or {}).pop("body", None) or self.body, self._app)
        values = self.tasks.apply(args, **options).get(disable_sync_subtasks=False)
        return cast("EagerResult[R]", body.apply((values,)))

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        chord: Any = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> _AsyncResult[R]:
        """Give the header (its group id: this chord's id) and the body their ids now;
        returns the body's result, whose parent is the header's :class:`GroupResult`."""
        if group_index is not None:  # a member of an enclosing group (a chord's header)
            self.options["group_index"] = group_index
        header = self.tasks
        header.options["task_id"] = self.options.get("task_id") or str(uuid.uuid4())
        header_result = header.freeze(root_id=root_id, parent_id=parent_id)
        self.kwargs["header"] = header.tasks
        self.options["task_id"] = header_result.id
        body = as_signature(self.body, self._app)
        self.kwargs["body"] = body
        body_result = body.freeze(
            _id, group_id=header_result.id, chord=chord, root_id=root_id, group_index=group_index
        )
        body_result.parent = cast("_AsyncResult[Any]", header_result)
        return cast("_AsyncResult[R]", body_result)

    def __repr__(self) -> str:
        return f"chord({self.tasks!r}, {self.body!r})"
