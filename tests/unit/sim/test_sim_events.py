"""The one event order: time, then kind priority (resources freed before claimed), then FCFS sequence."""

from __future__ import annotations

from trt_disagg.sim.events import (
    Arrival,
    EventKind,
    EventQueue,
    KVArrived,
    PrefillDone,
    StageFree,
    event_key,
)


def test_key_orders_by_time_then_priority_then_sequence():
    assert event_key(1.0, EventKind.ARRIVAL, 0) < event_key(2.0, EventKind.PREFILL_DONE, 0)
    assert event_key(1.0, EventKind.PREFILL_DONE, 9) < event_key(1.0, EventKind.ARRIVAL, 0)
    assert event_key(1.0, EventKind.ARRIVAL, 1) < event_key(1.0, EventKind.ARRIVAL, 2)


def test_completions_before_arrivals_at_the_same_instant():
    priorities = [k.priority for k in (EventKind.PREFILL_DONE, EventKind.STAGE_FREE, EventKind.KV_ARRIVED,
                                       EventKind.ARRIVAL)]
    assert priorities == sorted(priorities) and len(set(priorities)) == 4


def test_queue_pops_in_key_order_and_fcfs_among_equals():
    q = EventQueue()
    late, a1, done, a2 = Arrival(2.0, 0), Arrival(1.0, 1), PrefillDone(1.0, 0, [7], True), Arrival(1.0, 2)
    for event in (late, a1, done, a2):
        q.push(event)
    popped = [q.pop() for _ in range(len(q))]
    assert popped == [done, a1, a2, late]


def test_each_event_carries_its_kind():
    events = (PrefillDone(0.0, 0, [], True), StageFree(0.0, 0), KVArrived(0.0, 0), Arrival(0.0, 0))
    assert [e.kind for e in events] == [EventKind.PREFILL_DONE, EventKind.STAGE_FREE, EventKind.KV_ARRIVED,
                                        EventKind.ARRIVAL]
