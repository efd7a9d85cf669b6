"""The Redis registry against the embedded Valkey: register, heartbeat, load, expiry, deregister
(the instance side's Registrar, read back with the router side's registry_read)."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from trt_disagg import keys, registry_read
from trt_disagg.contract import (
    InstanceInfo,
    InstanceLoad,
    Role,
    decode_info,
    decode_load,
    encode_info,
    encode_load,
)
from trt_disagg.triton import registry
from trt_disagg.triton.redis_server import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_url():
    server = EmbeddedRedis()
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    c.flushdb()
    yield c
    c.close()


def make_info(instance_id: str = "prefill-0", role: Role = Role.PREFILL) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, role=role, host="127.0.0.1", grpc_url="127.0.0.1:1",
                        http_url="127.0.0.1:2", kv_url="tcp://127.0.0.1:3", tp=2, pp=1,
                        kv_capacity_tokens=8192, fingerprint="abc", model_name="prefill")


def test_key_names_are_distinct_and_prefixed():
    names = {keys.instance_key("a"), keys.load_key("a"), keys.role_set_key(Role.PREFILL),
             keys.role_set_key("decode"), keys.KV_SECRET_KEY}
    assert len(names) == 5
    assert all(k.startswith(keys.KEY_PREFIX) for k in names)


def test_info_and_load_round_trip():
    info = make_info()
    assert decode_info(encode_info(info)) == info
    load = InstanceLoad(queued_prompt_tokens=3, running_sequences=2, free_kv_blocks=7, total_kv_blocks=9)
    assert decode_load(encode_load(load)) == load


async def test_register_list_load_deregister(client, redis_url):
    load = InstanceLoad(free_kv_blocks=10, total_kv_blocks=10)
    reg = registry.Registrar(client, make_info(), lambda: load, ttl_s=5.0, interval_s=0.5)
    reg.start()
    aio = aioredis.from_url(redis_url)
    try:
        found = await registry_read.list_instances(aio, Role.PREFILL)
        assert [i.instance_id for i in found] == ["prefill-0"]
        assert found[0].role is Role.PREFILL
        assert await registry_read.list_instances(aio, Role.DECODE) == []
        assert await registry_read.get_load(aio, "prefill-0") == load
        assert client.pttl(keys.instance_key("prefill-0")) > 0  # heartbeat keys carry a TTL
        reg.stop()
        assert await registry_read.list_instances(aio, Role.PREFILL) == []
        assert await registry_read.get_load(aio, "prefill-0") is None
    finally:
        reg.stop()
        await aio.aclose()


async def test_expired_instance_is_pruned_from_role_set(client, redis_url):
    client.sadd(keys.role_set_key(Role.DECODE), "decode-9")  # member without a live instance key
    aio = aioredis.from_url(redis_url)
    try:
        assert await registry_read.list_instances(aio, Role.DECODE) == []
        assert client.scard(keys.role_set_key(Role.DECODE)) == 0
    finally:
        await aio.aclose()


def test_secret_first_writer_wins(client):
    assert registry.get_or_create_secret(client, "aa") == "aa"
    assert registry.get_or_create_secret(client, "bb") == "aa"


def test_interval_must_be_shorter_than_ttl(client):
    with pytest.raises(ValueError, match="interval_s"):
        registry.Registrar(client, make_info(), InstanceLoad, ttl_s=1.0, interval_s=1.0)


def test_removal_mark_has_its_own_key():
    assert keys.removed_key("decode-0").startswith(keys.KEY_PREFIX)
    assert keys.removed_key("decode-0") not in {keys.instance_key("decode-0"), keys.drain_key("decode-0")}


async def test_a_beat_after_the_prune_rejoins_the_role_set(client, redis_url):
    """(1) registered, (2) the TTL passes (keys gone) and a reader prunes it, (3) one beat: whole again."""
    load = InstanceLoad(free_kv_blocks=4, total_kv_blocks=4)
    reg = registry.Registrar(client, make_info(), lambda: load, ttl_s=120.0, interval_s=60.0)  # beats only when told
    reg.start()
    aio = aioredis.from_url(redis_url)
    try:
        client.delete(keys.instance_key("prefill-0"), keys.load_key("prefill-0"))  # what expiry does
        assert await registry_read.list_instances(aio, Role.PREFILL) == []
        assert client.scard(keys.role_set_key(Role.PREFILL)) == 0  # pruned
        assert reg.beat() is True
        assert [i.instance_id for i in await registry_read.list_instances(aio, Role.PREFILL)] == ["prefill-0"]
        assert await registry_read.get_load(aio, "prefill-0") == load
    finally:
        reg.stop()
        await aio.aclose()


def test_a_beat_repopulates_an_empty_redis_with_the_instances_secret(client):
    reg = registry.Registrar(client, make_info(), InstanceLoad, ttl_s=120.0, interval_s=60.0, secret_hex="ab" * 16)
    reg.start()
    try:
        client.flushdb()  # a Redis restarted without persistence
        assert reg.beat() is True
        assert client.sismember(keys.role_set_key(Role.PREFILL), "prefill-0")
        assert client.get(keys.instance_key("prefill-0")) is not None
        assert client.get(keys.KV_SECRET_KEY).decode() == "ab" * 16  # a later instance adopts this one
        client.set(keys.KV_SECRET_KEY, "cd" * 16)
        assert reg.beat() is True and client.get(keys.KV_SECRET_KEY).decode() == "cd" * 16  # never overwritten
    finally:
        reg.stop()


def test_removal_keeps_a_running_instance_out_until_it_restarts(client):
    """What DELETE /admin/instances/{id} writes; the beat respects it; a (re)start clears it."""
    reg = registry.Registrar(client, make_info(), InstanceLoad, ttl_s=120.0, interval_s=60.0)
    reg.start()
    try:
        pipe = client.pipeline(transaction=True)
        pipe.set(keys.removed_key("prefill-0"), "1")
        pipe.srem(keys.role_set_key(Role.PREFILL), "prefill-0")
        pipe.delete(keys.instance_key("prefill-0"), keys.load_key("prefill-0"))
        pipe.execute()
        assert reg.beat() is False
        assert not client.sismember(keys.role_set_key(Role.PREFILL), "prefill-0")
        assert client.get(keys.instance_key("prefill-0")) is None
    finally:
        reg.stop()
    again = registry.Registrar(client, make_info(), InstanceLoad, ttl_s=120.0, interval_s=60.0)  # the restarted instance
    again.start()
    try:
        assert client.get(keys.removed_key("prefill-0")) is None
        assert client.sismember(keys.role_set_key(Role.PREFILL), "prefill-0")
    finally:
        again.stop()


async def test_prune_spares_a_member_that_beat_again_meanwhile(client, redis_url):
    """The reader prunes only while the instance key is still missing (checked atomically in Redis)."""
    reg = registry.Registrar(client, make_info(), InstanceLoad, ttl_s=120.0, interval_s=60.0)
    reg.start()
    aio = aioredis.from_url(redis_url)
    try:
        real_mget = aio.mget

        async def mget_then_beat(names):  # the read sees the key missing, then the instance beats
            raws = await real_mget(names)
            reg.beat()
            return [None] * len(raws)

        aio.mget = mget_then_beat  # type: ignore[method-assign]
        assert await registry_read.list_instances(aio, Role.PREFILL) == []
        assert client.sismember(keys.role_set_key(Role.PREFILL), "prefill-0")  # not pruned
    finally:
        reg.stop()
        await aio.aclose()
