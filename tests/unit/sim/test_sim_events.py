"""The one event order: time, then kind priority (resources freed before claimed), then FCFS sequence."""

from __future__ import annotations

from trt_disagg.sim.events import EventKind, EventQueue, event_key


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
    q.push(2.0, EventKind.ARRIVAL, "late")
    q.push(1.0, EventKind.ARRIVAL, "a1")
    q.push(1.0, EventKind.PREFILL_DONE, "done")
    q.push(1.0, EventKind.ARRIVAL, "a2")
    popped = [q.pop()[2] for _ in range(len(q))]
    assert popped == ["done", "a1", "a2", "late"]
