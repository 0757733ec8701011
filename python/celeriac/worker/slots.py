"""A table in shared memory where each prefork child says what it is doing.

The supervisor creates it before forking (an anonymous shared ``mmap``, inherited by
every child); each child writes only its own slot, the supervisor reads them all. No
pipe and no message passes between them: the table is how the supervisor learns which
task a child was running when it died, when a hard time limit has passed, and when a
child is about to retire and needs a replacement.

Each slot is guarded by a sequence number (odd while being written), so a reader never
sees half of an update.
"""

from __future__ import annotations

import enum
import mmap
import struct
import time
from dataclasses import dataclass

from celeriac.worker.node_stats import NodeStats

#: pid, state, seq, flags, started, hard, task_id, delivery_tag, name, reply_to,
#: correlation_id
_FORMAT = struct.Struct("<iiIId d 64s 96s 160s 64s 64s")
SLOT_SIZE = _FORMAT.size
#: signal, task id
_TERMINATE = struct.Struct("<i64s")


class State(enum.IntEnum):
    FREE = 0
    #: Forked, connecting to the broker.
    STARTING = 1
    #: Waiting for messages.
    IDLE = 2
    #: Running a task (``task_id`` and friends are set).
    RUNNING = 3
    #: Will exit after its current (or last) task: start a replacement now.
    RETIRING = 4


class Flag(enum.IntFlag):
    NONE = 0
    ACKS_LATE = 1
    REJECT_ON_WORKER_LOST = 2
    IGNORE_RESULT = 4
    ACKS_ON_FAILURE = 8


@dataclass
class Slot:
    pid: int = 0
    state: State = State.FREE
    flags: Flag = Flag.NONE
    #: ``time.time()`` when the running task started.
    started: float = 0.0
    #: Hard time limit of the running task in seconds (0 = none).
    hard: float = 0.0
    task_id: str = ""
    delivery_tag: str = ""
    name: str = ""
    #: Where an ``rpc://`` result goes (the supervisor stores results of lost tasks).
    reply_to: str = ""
    correlation_id: str = ""


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _raw(text: str, size: int) -> bytes:
    data = text.encode("utf-8")
    return data if len(data) <= size else b""


class SlotTable:
    """``count`` slots in an anonymous shared mapping (create it before forking)."""

    def __init__(self, count: int) -> None:
        self.count = count
        # Slots (written by their child), then one byte per slot written only by the
        # supervisor: 1 once a retiring child's replacement is ready.
        self._map = mmap.mmap(-1, SLOT_SIZE * count + count)
        # Per slot, written by the supervisor: a terminate request (revoke with
        # terminate=True) as the signal number and the id of the task to stop.
        self._terminate = mmap.mmap(-1, _TERMINATE.size * count)
        #: Tasks started and running, counted by the children (heartbeats).
        self.stats = NodeStats(count)

    def read(self, index: int) -> Slot:
        offset = index * SLOT_SIZE
        for _ in range(1000):
            values = _FORMAT.unpack_from(self._map, offset)
            again = _FORMAT.unpack_from(self._map, offset)
            seq = values[2]
            if seq % 2 == 0 and again[2] == seq:
                break
            time.sleep(0)
        pid, state, _seq, flags, started, hard, task_id, tag, name, reply_to, correlation = values
        return Slot(
            pid=pid,
            state=State(state) if state in State._value2member_map_ else State.FREE,
            flags=Flag(flags),
            started=started,
            hard=hard,
            task_id=_text(task_id),
            delivery_tag=_text(tag),
            name=_text(name),
            reply_to=_text(reply_to),
            correlation_id=_text(correlation),
        )

    def write(self, index: int, slot: Slot) -> None:
        offset = index * SLOT_SIZE
        seq = struct.unpack_from("<I", self._map, offset + 8)[0]
        seq = (seq + 1) | 1  # odd: being written
        struct.pack_into("<I", self._map, offset + 8, seq & 0xFFFFFFFF)
        _FORMAT.pack_into(
            self._map,
            offset,
            slot.pid,
            int(slot.state),
            seq & 0xFFFFFFFF,
            int(slot.flags),
            slot.started,
            slot.hard,
            _raw(slot.task_id, 64),
            _raw(slot.delivery_tag, 96),
            _raw(slot.name, 160),
            _raw(slot.reply_to, 64),
            _raw(slot.correlation_id, 64),
        )
        struct.pack_into("<I", self._map, offset + 8, (seq + 1) & 0xFFFFFFFF)

    def set_replaced(self, index: int, value: bool = True) -> None:
        self._map[SLOT_SIZE * self.count + index] = 1 if value else 0

    def replaced(self, index: int) -> bool:
        return self._map[SLOT_SIZE * self.count + index] == 1

    def request_terminate(self, index: int, task_id: str, signum: int) -> None:
        """Ask the child of slot ``index`` to die by ``signum`` if it still runs
        ``task_id`` when the signal lands (set before the signal is sent)."""
        _TERMINATE.pack_into(self._terminate, index * _TERMINATE.size, signum, _raw(task_id, 64))

    def terminate_request(self, index: int) -> tuple[int, str]:
        """``(signal, task id)`` asked for slot ``index``; ``(0, "")`` when none."""
        signum, task_id = _TERMINATE.unpack_from(self._terminate, index * _TERMINATE.size)
        return int(signum), _text(task_id)

    def free(self) -> int | None:
        """The index of a free slot, or None."""
        for index in range(self.count):
            if self.read(index).state is State.FREE:
                return index
        return None

    def clear(self, index: int) -> None:
        self.write(index, Slot())
        self.set_replaced(index, False)
        self.request_terminate(index, "", 0)
        self.stats.clear(index)
