"""What a pull reuses: receive buffers (given back once the engine wrote the KV) and shm mappings.

Each test walks: (1) a first pull allocates (or maps), (2) the consumer gives the bytes back, (3) the next
pull lands in the same memory with the exact bytes, (4) what is not given back is never overwritten, and
nothing is left in /dev/shm once the sender closes.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.conftest import run_to_completion
from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.exported_kv import ExportedKV
from trt_disagg.kv import transport
from trt_disagg.kv.buffers import RECEIVE_BUFFERS, ReceiveBuffers, ShardSpec
from trt_disagg.kv.shm import SEGMENT_MAPS, SEGMENT_PREFIX

TEST_PREFIX = f"{SEGMENT_PREFIX}reuse{os.getpid()}_"  # only this test's segments (the machine is shared)


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(TEST_PREFIX)}


class _Source:
    def __init__(self, eng) -> None:
        self.eng = eng

    def export_kv(self, request_id):
        return self.eng.export_kv(request_id)

    def release_kv(self, request_id):
        self.eng.release_kv(request_id)


@pytest.fixture
def sender(prefill, secret):
    s = transport.make_sender("tcp", source=_Source(prefill), secret=secret, instance_id="prefill-0",
                              layout=prefill.config.kv_layout(), shm_prefix=TEST_PREFIX)
    s.start()
    yield s
    s.close()
    assert shm_segments() == set()


def offer(eng, sender, rid: str, n: int = 40):
    prompt = [(i * 13 + len(rid)) % 997 + 1 for i in range(n)]
    eng.add_request(rid, prompt, SamplingParams(max_new_tokens=8), RequestType.CONTEXT_ONLY)
    (event,) = eng.step()
    return prompt, event.token_id, sender.offer(rid, num_tokens=n, first_token=event.token_id)


def data_ptrs(kv: ExportedKV) -> set[int]:
    return {t.data_ptr() for t in kv.shards.values()}


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_a_consumed_buffer_is_reused_and_a_held_one_never_is(mode, prefill, sender, secret):
    RECEIVE_BUFFERS.clear()  # the process's pool: only this test's buffers from here on
    _, _, h1 = offer(prefill, sender, "r1")
    expected1 = {r: t.clone() for r, t in prefill.export_kv("r1").shards.items()}
    receiver = transport.make_receiver(mode, secret=secret)
    kv1 = receiver.fetch(h1)  # (1)
    _, _, h2 = offer(prefill, sender, "r2")
    kv2 = receiver.fetch(h2)  # kv1 not consumed yet: its memory must not be touched
    assert not data_ptrs(kv1) & data_ptrs(kv2)
    for rank, t in expected1.items():  # (4)
        assert torch.equal(kv1.shards[rank], t)

    kv1.consumed()  # (2)
    kv1.consumed()  # idempotent: one buffer, given back once
    allocated = RECEIVE_BUFFERS.num_allocated
    _, _, h3 = offer(prefill, sender, "r3")
    expected3 = {r: t.clone() for r, t in prefill.export_kv("r3").shards.items()}
    kv3 = receiver.fetch(h3)
    assert RECEIVE_BUFFERS.num_allocated == allocated  # (3) no new buffer: kv1's memory...
    assert data_ptrs(kv3) == data_ptrs(kv1)
    for rank, t in expected3.items():  # ...and the bytes are the new request's
        assert torch.equal(kv3.shards[rank], t)
    kv2.consumed()
    kv3.consumed()


def test_without_reuse_every_pull_allocates_and_maps(prefill, sender, secret):
    receiver = transport.make_receiver("shm", secret=secret, reuse_buffers=False)
    allocated, mapped = RECEIVE_BUFFERS.num_allocated, SEGMENT_MAPS.num_mapped
    for rid in ("a", "b"):
        _, _, handle = offer(prefill, sender, rid)
        receiver.fetch(handle).consumed()
    assert RECEIVE_BUFFERS.num_allocated == allocated + 2
    assert SEGMENT_MAPS.num_mapped == mapped + 2


def test_a_segment_is_mapped_once_and_unmapped_once_unlinked(prefill, secret):
    s = transport.make_sender("tcp", source=_Source(prefill), secret=secret, instance_id="prefill-0",
                              layout=prefill.config.kv_layout(), shm_prefix=TEST_PREFIX,
                              eager_stage=False)  # every pull through the one pooled segment
    s.start()
    receiver = transport.make_receiver("shm", secret=secret)
    try:
        mapped = SEGMENT_MAPS.num_mapped
        for rid in ("a", "b", "c"):  # one pooled segment on the sender, so one mapping here
            _, _, handle = offer(prefill, s, rid)
            receiver.fetch(handle).consumed()
        assert SEGMENT_MAPS.num_mapped == mapped + 1
        (name,) = shm_segments()
        assert name in SEGMENT_MAPS
    finally:
        s.close()
    assert shm_segments() == set()  # unlinked by the sender...
    other = transport.make_sender("tcp", source=_Source(prefill), secret=secret, instance_id="prefill-0",
                                  layout=prefill.config.kv_layout(), shm_prefix=TEST_PREFIX)
    other.start()
    try:
        _, _, handle = offer(prefill, other, "d")
        receiver.fetch(handle).consumed()
        assert name not in SEGMENT_MAPS  # ...and its mapping closed at the next pull
    finally:
        other.close()
    SEGMENT_MAPS.clear()
    assert len(SEGMENT_MAPS) == 0


def test_a_stopping_decode_instance_frees_what_pulls_kept(prefill, sender, secret):
    _, _, handle = offer(prefill, sender, "r1")
    transport.make_receiver("shm", secret=secret).fetch(handle).consumed()
    assert RECEIVE_BUFFERS.idle_bytes() > 0 and len(SEGMENT_MAPS) > 0
    transport.drop_receive_caches()
    assert RECEIVE_BUFFERS.idle_bytes() == 0 and len(SEGMENT_MAPS) == 0


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize("mode", ["shm", "tcp"])
def test_offers_are_staged_ahead_once_shm_pulls_come_and_go_back_with_their_offer(mode, prefill, sender, secret):
    receiver = transport.make_receiver(mode, secret=secret)
    _, _, h1 = offer(prefill, sender, "r1")
    transport.make_receiver("shm", secret=secret).fetch(h1).consumed()  # (1) this sender's peers pull over shm
    assert sender.staged_bytes() == 0  # r1 was written at pull time
    _, _, h2 = offer(prefill, sender, "r2")
    expected = {r: t.clone() for r, t in prefill.export_kv("r2").shards.items()}
    wait_until(lambda: sender.staged_bytes() > 0)  # (2) r2's bytes are copied into a segment ahead
    kv = receiver.fetch(h2)
    for rank, t in expected.items():  # (3) from the staged copy (shm) or the held KV (tcp): the same bytes
        assert torch.equal(kv.shards[rank], t)
    kv.consumed()
    assert sender.staged_bytes() == 0 and sender.num_pending() == 0  # (4) its segment went back with it
    _, _, h3 = offer(prefill, sender, "r3")
    wait_until(lambda: sender.staged_bytes() > 0)
    sender.release("r3")  # released (or expired) un-pulled: the staged segment goes back too
    assert sender.staged_bytes() == 0
    assert len(shm_segments()) <= 2  # pooled for reuse, unlinked when the sender closes (fixture)


def test_staging_ahead_stays_within_its_cap(prefill, secret):
    s = transport.make_sender("tcp", source=_Source(prefill), secret=secret, instance_id="prefill-0",
                              layout=prefill.config.kv_layout(), shm_prefix=TEST_PREFIX, max_staged_bytes=0)
    s.start()
    try:
        receiver = transport.make_receiver("shm", secret=secret)
        for rid in ("a", "b"):
            prompt, _, handle = offer(prefill, s, rid)
            expected = {r: t.clone() for r, t in prefill.export_kv(rid).shards.items()}
            kv = receiver.fetch(handle)
            assert s.staged_bytes() == 0 and all(torch.equal(kv.shards[r], t) for r, t in expected.items())
    finally:
        s.close()
    assert shm_segments() == set()


def test_idle_buffers_are_bounded_in_bytes():
    pool = ReceiveBuffers(max_idle_bytes=3000)
    spec = [ShardSpec(0, (250,), torch.float32)]  # 1000 bytes
    leases = [pool.take(spec) for _ in range(4)]
    for lease in leases:
        lease.give_back()
    assert pool.idle_bytes() == 3000  # the fourth did not fit
    big = pool.take([ShardSpec(0, (500,), torch.float32)])  # 2000 bytes: none idle fits, a new one
    assert pool.num_allocated == 5
    big.give_back()  # larger than the idle ones: it evicts two of them
    assert pool.idle_bytes() == 3000
    assert pool.take([ShardSpec(0, (400,), torch.float32)]).shards[0].data_ptr() == big.shards[0].data_ptr()
    pool.clear()
    assert pool.idle_bytes() == 0


def test_shards_are_aligned_views_of_one_buffer():
    lease = ReceiveBuffers().take([ShardSpec(0, (3, 5), torch.bfloat16), ShardSpec(1, (7,), torch.float32)])
    assert lease.shards[0].shape == (3, 5) and lease.shards[0].dtype == torch.bfloat16
    assert lease.shards[1].data_ptr() % 64 == 0 and lease.shards[1].is_contiguous()


PROMPTS = [[1, 5, 9, 33, 2, 77, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [4, 8, 15, 16, 23, 42, 300, 301], [9, 2]]


@pytest.mark.slow
def test_handoffs_through_reused_buffers_give_the_colocated_tokens(tiny_engines, secret):
    """Greedy tokens through shm pulls, where later pulls land in buffers earlier imports gave back."""
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    tiny_tp1 = tiny_engines[(1, 1)]  # the session's tiny engines (built once for every test that uses them)
    with LLMEngine.from_engine_dir(tiny_tp1) as colocated:
        for i, prompt in enumerate(PROMPTS):
            colocated.add_request(str(i), prompt, greedy)
        expected = run_to_completion(colocated)
    with LLMEngine.from_engine_dir(tiny_tp1) as prefill, LLMEngine.from_engine_dir(tiny_tp1) as decode:
        s = transport.make_sender("tcp", source=_Source(prefill), secret=secret, instance_id="prefill-0",
                                  layout=prefill.config.kv_layout(), shm_prefix=TEST_PREFIX)
        s.start()
        try:
            receiver = transport.make_receiver("shm", secret=secret)
            for round_ in range(2):  # round 1 reuses what round 0's imports gave back
                allocated = RECEIVE_BUFFERS.num_allocated
                first = {}
                for i, prompt in enumerate(PROMPTS):
                    rid = f"{round_}-{i}"
                    prefill.add_request(rid, prompt, greedy, RequestType.CONTEXT_ONLY)
                    (event,) = prefill.step()
                    first[rid] = event.token_id
                    kv = receiver.fetch(s.offer(rid, num_tokens=len(prompt), first_token=event.token_id))
                    decode.add_decode_request(rid, prompt, event.token_id, kv, greedy)
                out = run_to_completion(decode)  # imports all three first: three buffers in use at once
                for i in range(len(PROMPTS)):
                    rid = f"{round_}-{i}"
                    assert [first[rid]] + out[rid] == expected[str(i)]
                if round_:
                    assert RECEIVE_BUFFERS.num_allocated == allocated
        finally:
            s.close()
    assert shm_segments() == set()
