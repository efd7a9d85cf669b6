"""RequestRecordWriter: the only writer of a request's state, in memory at once and in Redis in order."""

from __future__ import annotations

import pytest

from router.ending import Ending
from router.errors import InstanceUnavailable
from router.record_writer import RequestRecordWriter
from router.records import RecordStore
from router.states import RequestState
from trt_disagg.keys import record_key

S = RequestState


@pytest.fixture
async def store(redis):
    return RecordStore(redis, "router-w", retention_s=30, live_ttl_s=60, handle_ttl_s=5)


async def test_queued_writes_land_in_order_and_the_memory_state_leads(store):
    w = RequestRecordWriter(store, "w1", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    # (1) dispatch: memory says PREFILLING at once, Redis gets create → PREFILL_QUEUED → PREFILLING
    w.dispatch("disaggregated", prefill_instance="prefill-0")
    assert w.state is S.PREFILLING
    # (2) a retry is an event in the same state; the hand-off stores the handle
    w.dispatch("disaggregated", prefill_instance="prefill-1", prefilled_tokens=3)
    w.enter_with_handle(S.PREFILL_DONE, b"h", first_token=7)
    w.enter(S.DECODE_DISPATCHED, decode_instance="decode-0")
    w.enter(S.DECODE_DISPATCHED)  # no self-edge data: still an allowed attempt, recorded
    w.enter(S.DECODING)
    w.enter(S.DECODING)
    # (3) the end: terminal at once, written after everything queued before it
    written = w.settle(Ending.done("length"), output_tokens=4)
    assert w.state is S.DONE
    await written
    rec = await store.get("w1")
    states = [e["state"] for e in rec.events]
    assert states == ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILLING", "PREFILL_DONE",
                      "DECODE_DISPATCHED", "DECODE_DISPATCHED", "DECODING", "DECODING", "DONE"]
    assert rec.fields["prefill_instance"] == "prefill-1" and rec.fields["finish_reason"] == "length"
    # (4) once terminal, nothing moves it: a later end or transition is ignored
    w.enter(S.DECODING)
    await w.settle(Ending.cancelled("late"))
    assert w.state is S.DONE and (await store.get("w1")).state is S.DONE


async def test_a_request_ended_before_any_dispatch_gets_its_record_created_in_the_end_state(store):
    w = RequestRecordWriter(store, "w2", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    await w.settle(Ending.failed(InstanceUnavailable("none")))
    rec = await store.get("w2")
    assert rec.state is S.FAILED and rec.fields["error"] == "InstanceUnavailable: none"
    assert [e["state"] for e in rec.events] == ["RECEIVED", "FAILED"]


async def test_a_failed_creation_is_retried_by_the_end(store, redis):
    w = RequestRecordWriter(store, "w3", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    await redis.set(record_key("w3"), "not a hash")  # the creation's HSET fails (WRONGTYPE)
    w.dispatch("colocated", colocated_instance="c-0")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await w.flush()
    await redis.delete(record_key("w3"))
    await w.settle(Ending.cancelled("client disconnected"))
    assert (await store.get("w3")).state is S.CANCELLED


async def test_a_record_lost_with_a_restarted_redis_is_written_again_whole(store, redis):
    w = RequestRecordWriter(store, "w4", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    w.dispatch("disaggregated", prefill_instance="prefill-0")
    await w.flush()
    await redis.flushdb()  # Redis restarted without persistence
    w.enter_with_handle(S.PREFILL_DONE, b"h", first_token=7)
    await w.settle(Ending.done("length"), output_tokens=1)
    rec = await store.get("w4")
    assert rec.state is S.DONE and rec.fields["prefill_instance"] == "prefill-0"
    assert [e["state"] for e in rec.events] == ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILL_DONE", "DONE"]


async def test_transitions_queued_behind_a_write_in_flight_go_to_redis_together(store):
    batches: list[list[RequestState]] = []
    write_steps = store.transitions

    async def counted(request_id, steps):
        batches.append([step.to for step in steps])
        await write_steps(request_id, steps)

    store.transitions = counted
    w = RequestRecordWriter(store, "w5", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    w.dispatch("disaggregated", prefill_instance="prefill-0")  # (1) the creation is in flight ...
    w.enter_with_handle(S.PREFILL_DONE, b"h", first_token=7)  # ... these two wait for it, and go as one
    w.enter(S.DECODE_DISPATCHED, decode_instance="decode-0")
    await w.flush()
    assert batches == [[S.PREFILL_DONE, S.DECODE_DISPATCHED]]
    assert await store.get_handle("w5") == b"h"  # the hand-off's handle went along
    w.enter(S.DECODING)  # (2) nothing in flight: its write starts on the next turn of the loop, with the end
    await w.settle(Ending.done("length"), output_tokens=2)
    assert batches[1:] == [[S.DECODING, S.DONE]]
    rec = await store.get("w5")
    assert [e["state"] for e in rec.events] == ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILL_DONE",
                                                "DECODE_DISPATCHED", "DECODING", "DONE"]
    assert rec.state is S.DONE and rec.fields["decode_instance"] == "decode-0" and rec.fields["first_token"] == "7"


async def test_after_a_write_is_given_up_the_end_is_still_written(store, caplog):
    from redis.exceptions import ConnectionError as RedisConnectionError

    write_steps, calls = store.transitions, []

    async def first_one_lost(request_id, steps):
        calls.append([step.to for step in steps])
        if len(calls) == 1:
            raise RedisConnectionError("Redis unreachable past record_retry_s")
        await write_steps(request_id, steps)

    store.transitions = first_one_lost
    w = RequestRecordWriter(store, "w6", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    w.dispatch("disaggregated", prefill_instance="prefill-0")
    await w.flush()
    w.enter_with_handle(S.PREFILL_DONE, b"h", first_token=7)  # (1) its write is given up
    with pytest.raises(RedisConnectionError):
        await w.flush()
    w.enter(S.DECODE_DISPATCHED, decode_instance="decode-0")  # (2) queued behind the failed write: never sent
    await w.settle(Ending.cancelled("client disconnected"))  # (3) the end alone, from what Redis holds
    assert calls[1:] == [[S.CANCELLED]]
    rec = await store.get("w6")
    assert rec.state is S.CANCELLED
    assert [e["state"] for e in rec.events] == ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "CANCELLED"]


async def test_steps_that_end_a_request_another_party_settled_are_dropped_quietly(store, caplog):
    w = RequestRecordWriter(store, "w7", {"model": "m", "prompt_tokens": 3, "max_tokens": 4})
    w.dispatch("disaggregated", prefill_instance="prefill-0")
    await w.flush()
    assert await store.try_settle("w7", to=S.FAILED, error="router restarted")  # an orphan sweep
    w.enter_with_handle(S.PREFILL_DONE, b"h", first_token=7)  # goes with the end, in one batch
    await w.settle(Ending.done("length"), output_tokens=1)
    assert (await store.get("w7")).state is S.FAILED  # the sweep's end stands
    assert "failed" not in caplog.text
