"""KV pulls over tcp, shm and the fake transport, with a fake prefill engine on the sending side.

Lifecycle walked in each test: (1) prefill a context_only request, (2) offer its KV, (3) pull it,
(4) the bytes equal the export and the prefill engine's blocks are free again, nothing left in /dev/shm.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch

from trt_disagg.contract import RequestType, Role, SamplingParams
from trt_disagg.kv import transport
from trt_disagg.kv.errors import (
    HandleExpiredError,
    HandleForgedError,
    KVNotFoundError,
    KVTransferError,
    LayoutMismatchError,
    SourceUnreachableError,
)
from trt_disagg.kv.fake import FakeFabric
from trt_disagg.kv.handle import encode_handle, new_secret
from trt_disagg.kv.release import ReleaseOutcome, release_remote
from trt_disagg.kv.shm import SEGMENT_PREFIX
from trt_disagg.triton.fake_engine import FakeEngine


class LockedSource:
    """The engine as the adapter hands it to a sender: calls serialised by one lock."""

    def __init__(self, eng: FakeEngine) -> None:
        self.eng = eng
        self.lock = threading.Lock()
        self.fail_next_export = False
        self.exporting = threading.Event()  # set when an export starts
        self.export_gate: threading.Event | None = None  # when set, exports wait for it

    def export_kv(self, request_id):
        self.exporting.set()
        if self.export_gate is not None:
            assert self.export_gate.wait(timeout=10)
        with self.lock:
            if self.fail_next_export:
                self.fail_next_export = False
                raise RuntimeError("rank 1 did not answer")
            return self.eng.export_kv(request_id)

    def release_kv(self, request_id):
        with self.lock:
            self.eng.release_kv(request_id)


TEST_PREFIX = f"{SEGMENT_PREFIX}unit{os.getpid()}_"  # only this test's segments (the machine is shared)


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(TEST_PREFIX)}


@pytest.fixture
def sender(prefill, secret):
    s = transport.make_sender("tcp", source=LockedSource(prefill), secret=secret, instance_id="prefill-0",
                              layout=prefill.config.kv_layout(), handle_ttl_s=30.0, max_pending_tokens=64,
                              shm_prefix=TEST_PREFIX)
    s.start()
    yield s
    s.close()


def started_sender(prefill, secret, source=None, **options):
    """A started TCP KV sender over `source` (a LockedSource of `prefill` by default)."""
    s = transport.make_sender("tcp", source=source or LockedSource(prefill), secret=secret,
                              instance_id="prefill-0", layout=prefill.config.kv_layout(), **options)
    s.start()
    return s


def prefill_one(eng: FakeEngine, sender, rid: str = "r1", n: int = 40):
    prompt = [(i * 13) % 997 + 1 for i in range(n)]
    eng.add_request(rid, prompt, SamplingParams(max_new_tokens=8), RequestType.CONTEXT_ONLY)
    (event,) = eng.step()
    return prompt, sender.offer(rid, num_tokens=n, first_token=event.token_id)


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_pull_moves_exact_bytes_and_frees_source_blocks(mode, prefill, sender, secret):
    before = shm_segments()
    prompt, handle = prefill_one(prefill, sender)
    expected = prefill.export_kv("r1")
    assert prefill.num_free_blocks < prefill.num_total_blocks  # (2) held while offered
    assert sender.pending_tokens() == len(prompt)

    kv = transport.make_receiver(mode, secret=secret).fetch(handle)  # (3)

    assert kv.num_tokens == len(prompt) and kv.layout == prefill.config.kv_layout()
    assert sorted(kv.shards) == [0, 1]
    for rank, t in expected.shards.items():
        assert torch.equal(kv.shards[rank], t)
    assert prefill.num_free_blocks == prefill.num_total_blocks  # (4) ACK released the blocks
    assert sender.num_pending() == 0
    assert len(shm_segments()) == (1 if mode == "shm" else 0)  # shm: the bytes went through one pooled segment
    sender.close()
    assert shm_segments() == before == set()  # pooled segments are unlinked with the sender


def test_segment_pool_reuses_and_bounds_idle_bytes():
    from trt_disagg.kv.shm import SegmentPool

    before = shm_segments()
    pool = SegmentPool(max_idle_bytes=3000, prefix=TEST_PREFIX)
    a = pool.acquire(1000)
    b = pool.acquire(1000)  # a is in use: a second segment
    assert {a.name, b.name} <= shm_segments()
    assert a.name != b.name
    pool.release(a)
    assert pool.acquire(500).name == a.name  # reused
    pool.release(a)
    pool.release(b)
    big = pool.acquire(5000)
    pool.release(big)  # over max_idle_bytes: unlinked at once
    assert big.name not in shm_segments()
    pool.close()
    assert shm_segments() == before


def test_decode_engine_of_other_layout_accepts_pulled_kv(prefill, sender, secret):
    prompt, handle = prefill_one(prefill, sender)
    kv = transport.make_receiver("tcp", secret=secret).fetch(handle)
    decode = FakeEngine(role=Role.DECODE, tp=1, pp=2)
    transport.check_layout(handle, decode.config.kv_layout())
    decode.add_decode_request("r1", prompt, handle.first_token, kv, SamplingParams(max_new_tokens=4))
    assert decode.num_free_blocks < decode.num_total_blocks


def test_second_pull_of_the_same_handle_is_refused(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)
    receiver = transport.make_receiver("tcp", secret=secret)
    receiver.fetch(handle)
    with pytest.raises(KVNotFoundError, match="not held"):
        receiver.fetch(handle)


def test_server_refuses_handle_signed_with_another_secret(prefill, sender):
    _, handle = prefill_one(prefill, sender)
    with pytest.raises(HandleForgedError):
        transport.make_receiver("tcp", secret=new_secret()).fetch(handle)
    assert sender.num_pending() == 1  # a forged pull does not release the real owner's KV


def test_expired_offer_is_released_and_then_refused(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)
    assert sender.reap_expired(now=time.time() + 3600) == ["r1"]
    assert prefill.num_free_blocks == prefill.num_total_blocks
    with pytest.raises(KVNotFoundError):
        transport.make_receiver("tcp", secret=secret).fetch(handle)


def test_server_refuses_expired_handle(prefill, secret):
    s = started_sender(prefill, secret, handle_ttl_s=1e-6)
    try:
        _, handle = prefill_one(prefill, s)
        with pytest.raises(HandleExpiredError):
            transport.make_receiver("tcp", secret=secret).fetch(handle)
    finally:
        s.close()
    assert prefill.num_free_blocks == prefill.num_total_blocks  # close() released the offer


def test_source_gone_is_a_clear_error(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)
    sender.close()
    with pytest.raises(SourceUnreachableError, match=r"prefill instance prefill-0 at tcp://127\.0\.0\.1:\d+ unreachable"):
        transport.make_receiver("tcp", secret=secret).fetch(handle)


def test_source_that_accepts_and_hangs_times_out(prefill, secret, sender):
    _, handle = prefill_one(prefill, sender)
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    from dataclasses import replace

    try:
        mute = replace(handle, kv_url=f"tcp://127.0.0.1:{port}")
        with pytest.raises(SourceUnreachableError, match="unreachable: it stopped answering"):
            transport.make_receiver("tcp", secret=secret, io_timeout_s=0.2).fetch(mute)
    finally:
        silent.close()


def test_failed_export_keeps_offer_for_a_retry(prefill, secret):
    source = LockedSource(prefill)
    s = started_sender(prefill, secret, source)
    try:
        _, handle = prefill_one(prefill, s)
        source.fail_next_export = True
        with pytest.raises(KVTransferError, match="rank 1 did not answer"):
            transport.make_receiver("shm", secret=secret).fetch(handle)
        assert s.num_pending() == 1
        kv = transport.make_receiver("shm", secret=secret).fetch(handle)
        assert kv.num_tokens == 40 and s.num_pending() == 0
    finally:
        s.close()


def test_pending_kv_counts_against_admission(prefill, sender):
    assert sender.can_admit(64)
    prefill_one(prefill, sender, n=40)
    assert not sender.can_admit(32)  # 40 pending + 32 > 64
    assert sender.can_admit(24)
    sender.release("r1")
    sender.release("r1")  # idempotent
    assert sender.can_admit(64) and prefill.num_free_blocks == prefill.num_total_blocks


def test_layout_mismatch_names_the_reason(prefill, sender):
    _, handle = prefill_one(prefill, sender)
    other = FakeEngine(role=Role.DECODE).config.kv_layout()
    from dataclasses import replace

    with pytest.raises(LayoutMismatchError, match="num_layers mismatch"):
        transport.check_layout(handle, replace(other, num_layers=8))
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        transport.check_layout(handle, replace(other, fingerprint="other"))


def test_fake_transport_follows_the_same_rules(prefill, secret):
    fabric = FakeFabric()
    s = transport.make_sender("fake", source=LockedSource(prefill), secret=secret, instance_id="p",
                              layout=prefill.config.kv_layout(), fabric=fabric)
    s.start()
    _, handle = prefill_one(prefill, s)
    receiver = transport.make_receiver("fake", secret=secret, fabric=fabric)
    assert receiver.fetch(handle).num_tokens == 40
    assert prefill.num_free_blocks == prefill.num_total_blocks
    with pytest.raises(KVNotFoundError):
        receiver.fetch(handle)
    _, handle2 = prefill_one(prefill, s, rid="r2")
    fabric.down("p")
    with pytest.raises(SourceUnreachableError, match="unreachable"):
        receiver.fetch(handle2)
    s.close()
    assert prefill.num_free_blocks == prefill.num_total_blocks


def test_auto_picks_shm_on_this_host_and_tcp_elsewhere(prefill, sender):
    from dataclasses import replace

    _, handle = prefill_one(prefill, sender)
    assert transport.resolve_receiver_name("auto", handle) == "shm"
    remote = replace(handle, source_host="elsewhere/1")
    assert transport.resolve_receiver_name("auto", remote) == "tcp"
    with pytest.raises(KVTransferError, match="same host|this host"):
        transport.resolve_receiver_name("shm", remote)
    with pytest.raises(KVTransferError, match="not a CPU transport"):
        transport.make_sender("UCX")


# ---- the release op: a request given up between its prefill and its decode ----

async def test_release_op_frees_an_unpulled_offer_once(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)  # (1) offered, (2) held
    blob = encode_handle(handle, secret)
    assert prefill.num_free_blocks < prefill.num_total_blocks

    assert await release_remote(sender.url, blob) is ReleaseOutcome.RELEASED  # (3) the router gives it up

    assert prefill.num_free_blocks == prefill.num_total_blocks and sender.num_pending() == 0  # (4) pool full
    assert await release_remote(sender.url, blob) is ReleaseOutcome.NOT_HELD  # idempotent
    with pytest.raises(KVNotFoundError):
        transport.make_receiver("tcp", secret=secret).fetch(handle)


async def test_release_after_the_pull_is_a_no_op(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)
    transport.make_receiver("tcp", secret=secret).fetch(handle)
    assert await release_remote(sender.url, encode_handle(handle, secret)) is ReleaseOutcome.NOT_HELD
    assert prefill.num_free_blocks == prefill.num_total_blocks and sender.num_pending() == 0


async def test_forged_or_foreign_release_is_refused_and_frees_nothing(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)
    with pytest.raises(HandleForgedError, match="signature"):
        await release_remote(sender.url, encode_handle(handle, new_secret()))
    with pytest.raises(HandleForgedError, match="names instance prefill-9"):  # signed, but not this instance's
        await release_remote(sender.url, encode_handle(replace(handle, source_instance="prefill-9"), secret))
    assert sender.num_pending() == 1 and prefill.num_free_blocks < prefill.num_total_blocks
    assert transport.make_receiver("tcp", secret=secret).fetch(handle).num_tokens == 40  # still pullable


async def test_stale_release_never_frees_a_newer_offer_of_the_same_request(prefill, sender, secret):
    _, old = prefill_one(prefill, sender)
    sender.release("r1")  # (the request was re-prefilled: a new offer under the same id)
    _, new = prefill_one(prefill, sender)
    assert await release_remote(sender.url, encode_handle(old, secret)) is ReleaseOutcome.NOT_HELD
    assert sender.num_pending() == 1
    assert await release_remote(sender.url, encode_handle(new, secret)) is ReleaseOutcome.RELEASED
    assert sender.num_pending() == 0


async def test_release_of_an_expired_handle_frees_at_once(prefill, secret):
    s = started_sender(prefill, secret, handle_ttl_s=1e-6, reap_interval_s=3600)
    try:
        _, handle = prefill_one(prefill, s)
        assert await release_remote(s.url, encode_handle(handle, secret)) is ReleaseOutcome.RELEASED
        assert prefill.num_free_blocks == prefill.num_total_blocks
    finally:
        s.close()


async def test_release_during_a_pull_frees_when_the_pull_fails(prefill, secret):
    source = LockedSource(prefill)
    s = started_sender(prefill, secret, source)
    try:
        _, handle = prefill_one(prefill, s)
        source.export_gate, source.fail_next_export = threading.Event(), True
        errors: list[Exception] = []

        def pull() -> None:
            try:
                transport.make_receiver("tcp", secret=secret).fetch(handle)
            except KVTransferError as exc:
                errors.append(exc)

        puller = threading.Thread(target=pull)
        puller.start()
        assert source.exporting.wait(timeout=10)  # (1) the pull is in flight
        assert await release_remote(s.url, encode_handle(handle, secret)) is ReleaseOutcome.RELEASED
        assert s.num_pending() == 1  # (2) not under the pull's feet
        source.export_gate.set()  # (3) the pull fails ...
        puller.join(timeout=10)
        assert errors and s.num_pending() == 0  # (4) ... and the KV goes back instead of waiting for the TTL
        assert prefill.num_free_blocks == prefill.num_total_blocks
    finally:
        s.close()


async def test_release_to_a_gone_source_is_a_clear_error(prefill, sender, secret):
    _, handle = prefill_one(prefill, sender)
    url = sender.url
    sender.close()
    with pytest.raises(SourceUnreachableError, match="unreachable for a release"):
        await release_remote(url, encode_handle(handle, secret))


def test_fake_sender_release_follows_the_same_rules(prefill, secret):
    s = transport.make_sender("fake", source=LockedSource(prefill), secret=secret, instance_id="p",
                              layout=prefill.config.kv_layout(), fabric=FakeFabric())
    s.start()
    _, handle = prefill_one(prefill, s)
    with pytest.raises(HandleForgedError):
        s.release_handle(encode_handle(handle, new_secret()))
    assert s.release_handle(encode_handle(handle, secret)) is True
    assert s.release_handle(encode_handle(handle, secret)) is False
    assert prefill.num_free_blocks == prefill.num_total_blocks
    s.close()


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_pull_reports_its_phases_on_both_sides(mode, prefill, secret):
    s = started_sender(prefill, secret, shm_prefix=TEST_PREFIX, prewarm_tokens=64)
    try:
        assert len(shm_segments()) == 1  # (1) a segment for 64 tokens' KV was created and faulted in at start
        _, handle = prefill_one(prefill, s)
        receiver = transport.make_receiver(mode, secret=secret)
        assert receiver.last_timing is None
        receiver.fetch(handle)  # (2) a 40-token pull fits the prewarmed segment: no second one
        timing = receiver.last_timing
        assert timing is not None and len(shm_segments()) == 1
        parts = (timing.connect_s, timing.meta_s, timing.data_s, timing.release_s)
        assert all(p >= 0 for p in parts) and timing.total_s == pytest.approx(sum(parts))
        assert timing.source_export_s >= 0 and timing.source_stage_s > 0  # (3) the source's own phases came back
    finally:
        s.close()
    assert shm_segments() == set()
