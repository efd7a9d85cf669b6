"""records.transition: the only writer of a request's state; atomic, ordered, never backwards."""

from __future__ import annotations

import asyncio

import pytest

from router.records import RecordStore, TransitionRefused
from router.states import ALLOWED, TERMINAL, RequestState, sources_of
from trt_disagg.keys import active_key, handle_key, record_key

S = RequestState
PHASE_ORDER = [S.RECEIVED, S.PREFILL_QUEUED, S.PREFILLING, S.PREFILL_DONE, S.DECODE_DISPATCHED, S.DECODING, S.DONE]


def test_transition_table_is_complete_and_never_goes_back():
    assert set(ALLOWED) == set(RequestState)
    assert all(not ALLOWED[t] for t in TERMINAL)
    for src, targets in ALLOWED.items():
        for dst in targets:
            if dst in (S.FAILED, S.CANCELLED) or src in (S.FAILED, S.CANCELLED):
                continue
            assert PHASE_ORDER.index(dst) >= PHASE_ORDER.index(src), f"{src} -> {dst} goes back"
    assert sources_of(S.DONE) == {S.PREFILL_DONE, S.DECODE_DISPATCHED, S.DECODING}
    assert all(t in ALLOWED[s] for s in set(RequestState) - TERMINAL for t in (S.FAILED, S.CANCELLED))


@pytest.fixture
async def store(redis):
    return RecordStore(redis, "router-t", retention_s=30, live_ttl_s=60, handle_ttl_s=5)


async def test_walk_with_timestamps_fields_and_handle(store, redis):
    # (1) submit
    await store.create("r1", model="m", prompt_tokens=5)
    assert (await store.get("r1")).state is S.RECEIVED
    assert await store.active_ids() == ["r1"]
    # (2) through prefill; the handle is stored with its own TTL
    for to in (S.PREFILL_QUEUED, S.PREFILLING):
        await store.transition("r1", to=to)
    await store.transition("r1", to=S.PREFILL_DONE, handle=b"\x00\x01opaque", first_token=7)
    assert await store.get_handle("r1") == b"\x00\x01opaque"
    assert 0 < await redis.pttl(handle_key("r1")) <= 5000
    # (3) decode, with a continuation recorded as a self-edge event
    await store.transition("r1", to=S.DECODE_DISPATCHED, decode_instance="d0")
    await store.transition("r1", to=S.DECODING)
    await store.transition("r1", to=S.DECODING, decode_instance="d1", resumed_after_tokens=4)
    # (4) done: out of the active set, retention TTL set, handle gone
    prev = await store.transition("r1", to=S.DONE, output_tokens=9)
    assert prev is S.DECODING
    rec = await store.get("r1")
    assert rec.state is S.DONE
    assert [e["state"] for e in rec.events] == [s.value for s in PHASE_ORDER[:6]] + ["DECODING", "DONE"]
    ts = [e["ts"] for e in rec.events]
    assert ts == sorted(ts)
    stamps = rec.to_json()["timestamps"]
    assert set(stamps) == {s.value for s in PHASE_ORDER}
    assert stamps["DECODING"] == rec.events[5]["ts"]  # first entry, not the continuation
    assert rec.fields["decode_instance"] == "d1" and rec.fields["output_tokens"] == "9"
    assert await store.active_ids() == []
    assert 0 < await redis.pttl(record_key("r1")) <= 30000
    assert await store.get_handle("r1") is None


async def test_backward_and_unknown_edges_are_refused(store):
    await store.create("r2")
    await store.transition("r2", to=S.PREFILL_QUEUED)
    await store.transition("r2", to=S.PREFILLING)
    with pytest.raises(TransitionRefused):
        await store.transition("r2", to=S.PREFILL_QUEUED)
    with pytest.raises(TransitionRefused):
        await store.transition("r2", to=S.DECODE_DISPATCHED)
    with pytest.raises(TransitionRefused):
        await store.transition("missing", to=S.PREFILL_QUEUED)
    await store.transition("r2", to=S.CANCELLED)
    with pytest.raises(TransitionRefused):
        await store.transition("r2", to=S.FAILED)
    assert (await store.get("r2")).state is S.CANCELLED


async def test_racing_terminal_transitions_have_one_winner(store, redis):
    other = RecordStore(redis, "router-t", retention_s=30, live_ttl_s=60, handle_ttl_s=5)
    for i in range(20):
        rid = f"race-{i}"
        await store.create(rid)
        won = await asyncio.gather(store.try_settle(rid, to=S.FAILED, error="x"),
                                   other.try_settle(rid, to=S.CANCELLED, error="y"))
        assert sorted(won) == [False, True]
        rec = await store.get(rid)
        assert [e["state"] for e in rec.events][-1] == rec.state.value
        assert len(rec.events) == 2


async def test_settle_orphans_fails_only_this_routers_unfinished_requests(store, redis):
    await store.create("a")
    await store.create("b")
    await store.transition("b", to=S.CANCELLED)
    mine_later = RecordStore(redis, "router-t", retention_s=30, live_ttl_s=60, handle_ttl_s=5)
    someone_else = RecordStore(redis, "router-x", retention_s=30, live_ttl_s=60, handle_ttl_s=5)
    await someone_else.create("c")
    assert await mine_later.settle_orphans("restarted") == ["a"]
    assert (await store.get("a")).fields["error"] == "restarted"
    assert (await store.get("c")).state is S.RECEIVED
    assert await redis.zcard(active_key("router-t")) == 0
