"""The simulator's event order, defined once: heap key (time, kind.priority, seq).

At equal times, work that frees resources runs before work that claims them: a finished prefill batch
(PREFILL_DONE) frees its instance before an arrival (ARRIVAL) at the same instant is dispatched, so the
arrival sees the freed instance. `seq` (a global counter) keeps FCFS order among equal (time, priority) and
makes the order total, so a run is deterministic.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import Any


class EventKind(enum.Enum):
    PREFILL_DONE = "prefill_done"  # a batch's first tokens exist; its KV starts moving to decode
    STAGE_FREE = "stage_free"  # a pipeline-parallel prefill instance can take its next batch
    KV_ARRIVED = "kv_arrived"  # a request's KV reached the decode side; dispatch it to a decode instance
    ARRIVAL = "arrival"  # a request arrives at the router

    @property
    def priority(self) -> int:
        return _PRIORITY[self]


_PRIORITY = {EventKind.PREFILL_DONE: 0, EventKind.STAGE_FREE: 1, EventKind.KV_ARRIVED: 2, EventKind.ARRIVAL: 3}

Event = tuple[float, int, int, EventKind, Any]


def event_key(time_s: float, kind: EventKind, seq: int) -> tuple[float, int, int]:
    """The one definition of event order."""
    return (time_s, kind.priority, seq)


class EventQueue:
    """A heap of events ordered by `event_key`; `pop` returns (time, kind, payload)."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = itertools.count()

    def push(self, time_s: float, kind: EventKind, payload: Any) -> None:
        heapq.heappush(self._heap, (*event_key(time_s, kind, next(self._seq)), kind, payload))

    def pop(self) -> tuple[float, EventKind, Any]:
        time_s, _, _, kind, payload = heapq.heappop(self._heap)
        return time_s, kind, payload

    def __len__(self) -> int:
        return len(self._heap)
