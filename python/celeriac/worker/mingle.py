"""Mingle: what a worker learns from the others as it starts (Celery's ``Mingle`` step).

The node that speaks for the worker (a solo/threads worker; the supervisor in prefork,
once for the node) broadcasts remote control's ``hello`` with its name and revoked ids
(``from_node``, ``revoked``) once its mailbox is up, and again each time the mailbox's
connection comes back after the broker dropped it (as Celery's consumer mingles again when
it restarts after a connection loss: what was broadcast meanwhile was missed), unless
``--without-mingle``. Every other worker, celeriac's or Celery's, answers with its own
revoked ids and logical clock; the ids are merged into this worker's ``RevokedSet`` (in
prefork the supervisor passes them on to every child as a Celery worker's ``hello`` is
passed on, and children forked later inherit them) and the clock is moved past theirs.
So a task revoked before this worker started (or while it was cut off) is not run by it
either.

Celery waits for the replies (1 s) before it reports ``ready.``; celeriac does not
delay its start: a short-lived thread gathers them for that second while the worker
already serves. A task with a revoked id that arrives within that second still runs.
A reply that is not what ``hello`` answers is logged and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.worker.pidbox import Pidbox

__all__ = ["REPLY_WAIT", "start", "sync"]

logger = logging.getLogger("celeriac.worker.mingle")

#: How long the replies are waited for (Celery's: 1 s).
REPLY_WAIT = 1.0


def start(box: Pidbox) -> threading.Thread:
    """Say hello to the other workers from a thread; their replies are merged when
    they came (``REPLY_WAIT``). Returns the thread (it ends by itself)."""
    logger.info("mingle: searching for neighbors")
    thread = threading.Thread(target=_hello, args=(box,), name="mingle", daemon=True)
    thread.start()
    return thread


def _hello(box: Pidbox) -> None:
    from celeriac.control import broadcast

    worker = box.worker
    ours = list(worker.revoked)  # oldest first, as Celery sends them
    try:
        replies = broadcast(
            worker.app,
            "hello",
            {"from_node": box.nodename, "revoked": ours},
            timeout=REPLY_WAIT,
            keep=False,
        )
    except Exception as exc:
        logger.warning("mingle: cannot reach the other workers: %s", exc)
        return
    try:
        sync(box, replies)
    except Exception:  # never let a neighbour's reply take the worker down
        logger.exception("mingle: sync failed")


def sync(box: Pidbox, replies: Iterable[Any]) -> int:
    """Merge the replies to our ``hello`` (``[{nodename: reply}, ...]``, as
    ``broadcast`` returns them): the nodes' revoked ids and clocks. Our own reply is
    ignored; a malformed one is logged and skipped. Returns the number of nodes
    synced with."""
    by_node: dict[str, Any] = {}
    for reply in replies:
        if not isinstance(reply, dict):
            logger.error("mingle: skipped a reply that is not a mapping: %r", reply)
            continue
        for nodename, answer in reply.items():
            if nodename != box.nodename:
                by_node[str(nodename)] = answer
    if not by_node:
        logger.info("mingle: all alone")
        return 0
    logger.info("mingle: sync with %s nodes", sum(1 for answer in by_node.values() if answer))
    synced = 0
    for nodename, answer in by_node.items():
        if not answer:
            continue  # a node that had nothing to say (Celery's own reply is None)
        logger.debug("mingle: processing reply from %s", nodename)
        problem = _sync_with(box, nodename, answer)
        if problem is None:
            synced += 1
        else:
            logger.error("mingle: sync with %s failed: %s", nodename, problem)
    logger.info("mingle: sync complete")
    return synced


def _sync_with(box: Pidbox, nodename: str, answer: Any) -> str | None:
    """Take one node's reply; what is wrong with it (nothing is taken then), or None."""
    from celeriac.control import node_clock
    from celeriac.worker.control import revoked_ids

    if not isinstance(answer, dict):
        return f"the reply is not a mapping: {_short(answer)}"
    clock = answer.get("clock")
    if clock is not None and (not isinstance(clock, int) or isinstance(clock, bool) or clock < 0):
        return f"clock is not a count: {_short(clock)}"
    raw = answer.get("revoked")
    found = revoked_ids(raw) if raw is not None else ([], 0)
    if found is None:
        return f"revoked is not a list of task ids: {_short(raw)}"
    ids, bad = found
    if bad:
        return f"revoked holds {bad} entries that are not task ids: {_short(raw)}"
    if clock:
        node_clock.adjust(clock)
    else:
        next(node_clock)
    if not ids:
        return None
    worker = box.worker
    worker.revoked.merge(ids)
    links = box.links
    if links is not None:
        # prefork: every child takes them, as a Celery worker's hello reaches them
        links.ask("hello", {"from_node": nodename, "revoked": ids})
    logger.debug("mingle: %d revoked ids from %s", len(ids), nodename)
    return None


def _short(value: Any, most: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= most else text[:most] + "..."
