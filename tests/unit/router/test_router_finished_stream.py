"""A terminal transition appends one summary to the bounded `trtd:finished` stream (the autoscaler's input)."""

from __future__ import annotations

from router.records import RecordStore
from router.states import RequestState
from trt_disagg.controller.live import read_finished
from trt_disagg.keys import finished_key

S = RequestState


async def test_done_and_failed_requests_are_summarised_once(redis):
    store = RecordStore(redis, "router-f", retention_s=30, live_ttl_s=60, handle_ttl_s=5)
    # (1) a disaggregated request walks to DONE: one entry with its first-token time and lengths
    await store.create("a", model="m", prompt_tokens=7)
    for to in (S.PREFILL_QUEUED, S.PREFILLING, S.PREFILL_DONE, S.DECODE_DISPATCHED, S.DECODING):
        await store.transition("a", to=to)
        assert await redis.xlen(finished_key()) == 0  # nothing before the end
    await store.transition("a", to=S.DONE, output_tokens=5)
    # (2) a request failed before its first token: an entry without one
    await store.create("b", model="m", prompt_tokens=3)
    await store.transition("b", to=S.FAILED, error="x")
    got = await read_finished(redis, 0.0)
    assert len(got) == 2
    done, failed = got
    assert (done.prompt_tokens, done.output_tokens, done.done) == (7, 5, True)
    assert done.first_token_s is not None and done.received_s <= done.first_token_s <= done.end_s
    assert (failed.prompt_tokens, failed.first_token_s, failed.done) == (3, None, False)
