"""The graph of results a task left behind: ``AsyncResult.iterdeps``/``collect``/``get_leaf``.

A node's edges are the ``children`` of its stored meta: the tasks it sent while running,
the next step of its chain and its callbacks (the worker sends those before storing the
result), and a group it sent as one :class:`~celeriac.result.GroupResult` node whose
members follow it. The walk is Celery's: first in, first out from the starting result, so
a node's children come after every node found before them. A node is handed out before it
is looked at; if it is still not ready then, the walk ends with
:class:`~celeriac.exceptions.IncompleteStream`, unless ``intermediate``, which skips its
(not yet known) children and goes on. ``collect`` waits for each node (``get``) before the
walk looks at it, so it only meets a node that is not ready when waiting did not make it so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from celeriac.exceptions import IncompleteStream

__all__ = ["ResultNode", "collect", "get_leaf", "iterdeps"]


class ResultNode(Protocol):
    """What the walk needs of a node: an ``AsyncResult`` or a ``GroupResult``."""

    id: Any

    def ready(self) -> bool: ...

    @property
    def children(self) -> Sequence[Any] | None: ...

    def get(self, *args: Any, **kwargs: Any) -> Any: ...


def iterdeps(
    root: ResultNode, intermediate: bool = False
) -> Iterator[tuple[ResultNode | None, ResultNode]]:
    """``(parent, node)`` for ``root`` (parent ``None``) and every result under it."""
    pending: deque[tuple[ResultNode | None, ResultNode]] = deque([(None, root)])
    while pending:
        parent, node = pending.popleft()
        yield parent, node
        if node.ready():
            pending.extend((node, child) for child in node.children or ())
        elif not intermediate:
            raise IncompleteStream(
                f"result {node.id} is not ready, so the results under it are not known yet "
                "(intermediate=True skips it)"
            )


def collect(
    root: ResultNode, intermediate: bool = False, **get_options: Any
) -> Iterator[tuple[ResultNode, Any]]:
    """``(result, value)`` for every node of the walk, each value from ``get(**get_options)``."""
    for _, node in iterdeps(root, intermediate=intermediate):
        yield node, node.get(**get_options)


def get_leaf(root: ResultNode) -> Any:
    """The value of the last node of the walk, waiting for each node in turn."""
    value = None
    for _, node in iterdeps(root):
        value = node.get()
    return value
