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
