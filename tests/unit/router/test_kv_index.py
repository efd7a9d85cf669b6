"""The router's block index against real engines publishing real events through the embedded Valkey:
after a scripted sequence of requests, evictions, a lost stretch of the stream, an instance restart and an
instance kill, the index equals the union of what the instances hold; a router started late rebuilds it
from the snapshots; malformed and forged events are counted and change nothing."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from router.kv_index import KVEventFollower, KVIndex
from tests.conftest import run_to_completion
from trt_disagg.contract import InstanceInfo, Role, SamplingParams, encode_info
from trt_disagg.engine.llm_engine import LLMEngine
from trt_disagg.engine.runner import make_runner
from trt_disagg.engine_dir import EngineConfig
from trt_disagg.keys import instance_key, kv_events_key, role_set_key
from trt_disagg.kv_events import KVEvent, KVEventKind
from trt_disagg.registry_read import list_instances
from trt_disagg.triton.kv_event_publisher import KVEventPublisher

GEN = SamplingParams(max_new_tokens=3, ignore_eos=True)


def small_engine(engine_dir, pool_tokens: int = 512) -> LLMEngine:
    """The tiny engine with a 32-block pool, so a few prompts force evictions."""
    cfg = EngineConfig.load(engine_dir)
    small = dataclasses.replace(cfg, kv_cache=dataclasses.replace(cfg.kv_cache, max_tokens=pool_tokens))
    return LLMEngine(small, make_runner(cfg, engine_dir, 1), block_reuse=True)


def info_of(instance_id: str, engine: LLMEngine) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, role=Role.DECODE, host="127.0.0.1", grpc_url="", http_url="",
                        kv_url="", tp=1, pp=1, kv_capacity_tokens=engine.kv_capacity_tokens,
                        fingerprint=engine.config.fingerprint, model_name="decode")


class Instance:
    """An engine, its registry entry and its event publisher (what RunningInstance wires together)."""

    def __init__(self, instance_id: str, engine: LLMEngine, client: sync_redis.Redis) -> None:
        self.id, self.engine, self.client = instance_id, engine, client
        self.publisher = KVEventPublisher(client, instance_id, engine, max_stream_len=10_000)
        client.set(instance_key(instance_id), encode_info(info_of(instance_id, engine)))
        client.sadd(role_set_key(Role.DECODE), instance_id)
        self.publisher.announce()

    def run(self, prompts: list[list[int]]) -> None:
        for i, p in enumerate(prompts):
            self.engine.add_request(f"{self.id}-{i}-{random.random()}", p, GEN)
        run_to_completion(self.engine)
        self.publisher.publish_once()

    def cached(self) -> frozenset[int]:
        return frozenset(self.engine.cached_block_hashes()[0])

    def kill(self) -> None:
        self.client.srem(role_set_key(Role.DECODE), self.id)
        self.client.delete(instance_key(self.id))


async def follow(redis: aioredis.Redis, follower: KVEventFollower) -> None:
    """One router refresh: the registry, then every event published so far."""
    await follower.sync(await list_instances(redis, Role.DECODE))
    while await follower.poll():
        pass
    await follower.sync(await list_instances(redis, Role.DECODE))  # snapshots that a gap asked for


def prompts(rng: random.Random, n: int, shared: list[int] | None = None) -> list[list[int]]:
    return [(shared or []) + [rng.randrange(1, 900) for _ in range(40)] for _ in range(n)]


async def test_the_index_equals_what_the_instances_hold(tiny_engines, valkey_url, redis) -> None:
    rng = random.Random(3)
    client = sync_redis.Redis.from_url(valkey_url)
    a = Instance("decode-a", small_engine(tiny_engines[(1, 1)]), client)
    b = Instance("decode-b", small_engine(tiny_engines[(1, 1)]), client)
    index = KVIndex()
    follower = KVEventFollower(redis, index)
    try:
        # (1) requests on both; a shared system-prompt-like prefix on a
        system = [rng.randrange(1, 900) for _ in range(32)]
        a.run(prompts(rng, 3, system))
        b.run(prompts(rng, 2))
        await follow(redis, follower)
        assert index.hashes_of(a.id) == a.cached() and index.hashes_of(b.id) == b.cached()
        assert a.cached() and b.cached()
        # (2) a flood on a: its pool (32 blocks) evicts; removed events reach the index
        a.run(prompts(rng, 12))
        await follow(redis, follower)
        assert index.counts["applied"] > 0 and index.hashes_of(a.id) == a.cached()
        # (3) events lost (the bounded stream trimmed past them): the gap is filled from the snapshot
        await redis.xtrim(kv_events_key(), maxlen=0)
        b.run(prompts(rng, 2))
        b.run(prompts(rng, 2))
        await redis.xtrim(kv_events_key(), maxlen=1)
        b.publisher.publish_once(force_snapshot=True)
        await follow(redis, follower)
        assert index.hashes_of(b.id) == b.cached()
        # (4) a late router, a snapshot interval later: the snapshots + whatever the stream still holds
        a.publisher.publish_once(force_snapshot=True)
        late = KVIndex()
        await follow(redis, KVEventFollower(redis, late))
        assert late.hashes_of(a.id) == a.cached() and late.hashes_of(b.id) == b.cached()
        # (5) a restarts under the same id (new epoch, empty), then b is killed (leaves the registry)
        a.engine.shutdown()
        a = Instance("decode-a", small_engine(tiny_engines[(1, 1)]), client)
        a.run(prompts(rng, 1))
        b.kill()
        await follow(redis, follower)
        assert index.hashes_of(a.id) == a.cached() and len(a.cached()) > 0
        assert index.instances() == [a.id] and index.hashes_of(b.id) == frozenset()
    finally:
        a.engine.shutdown()
        b.engine.shutdown()
        client.close()


def stored(instance: str, seq: int, blocks: list[int], epoch: int = 1, tpb: int = 16) -> KVEvent:
    return KVEvent(instance, seq, KVEventKind.STORED, tuple(blocks), None, tpb, epoch=epoch)


def cleared(instance: str, epoch: int = 1) -> KVEvent:
    return KVEvent(instance, 1, KVEventKind.CLEARED, epoch=epoch)


@pytest.mark.parametrize("raw", [
    b"not json", b"[]", b"{}", b'{"instance": "", "seq": 1, "kind": "cleared"}',
    b'{"instance": "x", "seq": 0, "kind": "cleared"}', b'{"instance": "x", "seq": 2, "kind": "exploded"}',
    b'{"instance": "x", "seq": 2, "kind": "stored", "blocks": [-1], "tokens_per_block": 16}',
    b'{"instance": "x", "seq": 2, "kind": "stored", "blocks": "abc", "tokens_per_block": 16}',
    b'{"instance": "x", "seq": 2, "kind": "stored", "blocks": [1], "tokens_per_block": 0}',
    json.dumps({"instance": "x", "seq": 2, "kind": "removed", "blocks": [1 << 64]}).encode(),
])
def test_malformed_events_are_counted_and_skipped(raw: bytes) -> None:
    index = KVIndex()
    index.set_members({"x": 4096})
    index.apply(cleared("x"))
    index.apply(stored("x", 2, [7]))
    assert index.apply_raw(raw) == "malformed"
    assert index.counts["malformed"] == 1 and index.hashes_of("x") == {7}


def test_forged_events_never_grow_the_index_past_an_instance_capacity_nor_name_strangers() -> None:
    index = KVIndex()
    index.set_members({"x": 64})  # 4 blocks of 16
    index.apply(cleared("x"))
    assert index.apply(stored("x", 2, [1, 2])) == "applied"
    assert index.apply(stored("x", 3, list(range(100, 200)))) == "over_capacity"
    assert index.hashes_of("x") == {1, 2}
    assert index.apply(stored("x", 3, [3], tpb=8)) in ("out_of_step", "forged")
    for i in range(1000):  # a flood naming instances that are not registered
        index.apply(cleared(f"ghost-{i}"))
    assert index.set_members({"x": 64}) == ["x"]  # x is out of step (re-read from its snapshot)
    assert index.counts["unknown_instance"] >= 256 and index.instances() == ["x"]
    assert index.load_snapshot(stored("x", 3, [1, 2, 3]))
    assert index.hashes_of("x") == {1, 2, 3}


def test_epochs_and_seqs_order_events_and_a_gap_waits_for_the_snapshot() -> None:
    index = KVIndex()
    index.set_members({"x": 4096})
    index.apply(cleared("x", epoch=5))
    index.apply(stored("x", 2, [1], epoch=5))
    assert index.apply(stored("x", 2, [9], epoch=5)) == "stale"  # a duplicate
    assert index.apply(stored("x", 3, [9], epoch=4)) == "stale"  # an older run
    assert index.apply(stored("x", 4, [3], epoch=5)) == "gap"  # seq 3 was lost
    assert index.hashes_of("x") == {1}
    assert index.load_snapshot(stored("x", 3, [1, 2], epoch=5))  # covers the gap; then seq 4 applies
    assert index.hashes_of("x") == {1, 2, 3}
    assert index.apply(cleared("x", epoch=6)) == "applied"  # a restart empties it
    assert index.hashes_of("x") == frozenset()
