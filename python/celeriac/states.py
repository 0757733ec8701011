"""Task states, with Celery's names, sets and precedence.

A task starts ``PENDING`` (nothing is stored for it yet), may become ``STARTED``
(only with ``task_track_started``) or ``RETRY``, and ends in one of the
:data:`READY_STATES`: ``SUCCESS``, ``FAILURE`` or ``REVOKED``.
"""

from __future__ import annotations

__all__ = [
    "ALL_STATES",
    "EXCEPTION_STATES",
    "FAILURE",
    "IGNORED",
    "PENDING",
    "PRECEDENCE",
    "PROPAGATE_STATES",
    "READY_STATES",
    "RECEIVED",
    "REJECTED",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "UNREADY_STATES",
    "precedence",
    "state",
]

#: Unknown to the result store: waiting, or never sent, or expired from the store.
PENDING = "PENDING"
#: Received by a worker (event-derived; never written to the store).
RECEIVED = "RECEIVED"
#: Started by a worker (only stored with ``task_track_started``).
STARTED = "STARTED"
#: Returned a value.
SUCCESS = "SUCCESS"
#: Raised an exception.
FAILURE = "FAILURE"
#: Revoked, expired or terminated.
REVOKED = "REVOKED"
#: Rejected by a worker (event-derived).
REJECTED = "REJECTED"
#: Waiting to be retried.
RETRY = "RETRY"
#: The task raised ``Ignore``.
IGNORED = "IGNORED"

READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
ALL_STATES = frozenset(
    {PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED, REJECTED, IGNORED}
)

#: High to low; ``None`` stands for any custom state.
PRECEDENCE: list[str | None] = [
    SUCCESS,
    FAILURE,
    None,
    REVOKED,
    STARTED,
    RECEIVED,
    REJECTED,
    RETRY,
    PENDING,
]

_RANK = {name: index for index, name in enumerate(PRECEDENCE)}
_CUSTOM_RANK = _RANK[None]


def precedence(name: str | None) -> int:
    """The rank of a state: lower is more important; custom states rank after FAILURE."""
    return _RANK.get(name, _CUSTOM_RANK)


class state(str):
    """A state name that compares by precedence: ``state(SUCCESS) > state(PENDING)``."""

    __slots__ = ()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return precedence(self) < precedence(other)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return precedence(self) <= precedence(other)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return precedence(self) > precedence(other)

    def __le__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return precedence(self) >= precedence(other)

    __hash__ = str.__hash__
