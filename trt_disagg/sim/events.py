"""The simulator's events and their order, defined once: heap key (time, kind.priority, seq).

At equal times, work that frees resources runs before work that claims them: a finished prefill batch
(PREFILL_DONE) frees its instance before an arrival (ARRIVAL) at the same instant is dispatched, so the
arrival sees the freed instance. `seq` (a global counter) keeps FCFS order among equal (time, priority) and
makes the order total, so a run is deterministic.

Each kind of event is a small frozen dataclass that carries its time and what the loop needs to handle it;
`Event` is their union, so the loop's `match` names every field it reads. The heap itself holds plain
tuples `(*event_key(...), event)`: comparing tuples of numbers keeps the heap fast, and `seq` is unique, so
the comparison never reaches the event.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass
from typing import ClassVar


class EventKind(enum.Enum):
    PREFILL_DONE = "prefill_done"  # a batch's first tokens exist; its KV starts moving to decode
    STAGE_FREE = "stage_free"  # a pipeline-parallel prefill instance can take its next batch
    KV_ARRIVED = "kv_arrived"  # a request's KV reached the decode side; dispatch it to a decode instance
    ARRIVAL = "arrival"  # a request arrives at the router

    @property
    def priority(self) -> int:
        return _PRIORITY[self]


_PRIORITY = {EventKind.PREFILL_DONE: 0, EventKind.STAGE_FREE: 1, EventKind.KV_ARRIVED: 2, EventKind.ARRIVAL: 3}


def event_key(time_s: float, kind: EventKind, seq: int) -> tuple[float, int, int]:
    """The one definition of event order."""
    return (time_s, kind.priority, seq)


@dataclass(frozen=True, slots=True)
class Arrival:
    kind: ClassVar[EventKind] = EventKind.ARRIVAL
    time_s: float
    request: int


@dataclass(frozen=True, slots=True)
class PrefillDone:
    kind: ClassVar[EventKind] = EventKind.PREFILL_DONE
    time_s: float
    instance: int  # index of the prefill instance that ran the batch
    batch: list[int]  # requests whose first token exists now
    frees_stage: bool  # the first stage is free only now (no earlier STAGE_FREE was scheduled for this batch)


@dataclass(frozen=True, slots=True)
class StageFree:
    kind: ClassVar[EventKind] = EventKind.STAGE_FREE
    time_s: float
    instance: int


@dataclass(frozen=True, slots=True)
class KVArrived:
    kind: ClassVar[EventKind] = EventKind.KV_ARRIVED
    time_s: float
    request: int


Event = Arrival | PrefillDone | StageFree | KVArrived


class EventQueue:
    """A heap of events ordered by `event_key`."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Event]] = []
        self._seq = itertools.count()

    def push(self, event: Event) -> None:
        heapq.heappush(self._heap, (*event_key(event.time_s, event.kind, next(self._seq)), event))

    def pop(self) -> Event:
        return heapq.heappop(self._heap)[3]

    def peek_time(self) -> float:
        """Time of the next event (the queue must not be empty)."""
        return self._heap[0][0]

    def __len__(self) -> int:
        return len(self._heap)
