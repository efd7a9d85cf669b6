"""Failures: prefill retried elsewhere, a decode leg lost mid-stream continued on another instance with no
token repeated or lost, no instance left, client disconnect, full queues, deadlines, router restart."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from router.app import create_app
from router.records import RecordStore
from router.settings import RouterSettings
from router.states import RequestState as S
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    FakeTokenizer,
    asgi_client,
    expected_tokens,
    make_router,
    records_of,
    register_pd,
    requests_of,
    serve,
)
from trt_disagg.keys import events_key

TOK = FakeTokenizer()


def data_lines(lines: list[str]) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


async def test_prefill_error_is_retried_on_another_prefill_instance(valkey_url, redis):
    await register_pd(redis, num_prefill=2)
    fake = FakeInstanceClient(fail_prefill={"prefill-0"})
    app = make_router(valkey_url, fake)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6})
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["text"] == TOK.decode(expected_tokens(TOK.encode("Hello"), 6))
    assert [c[0] for c in fake.prefill_calls] == ["prefill-0", "prefill-1"]
    rec = (await records_of(app).get(resp.json()["id"])).to_json()
    prefilling = [e for e in rec["events"] if e["state"] == "PREFILLING"]
    assert [e.get("prefill_instance") for e in prefilling] == [None, "prefill-1"]
    assert rec["fields"]["prefill_instance"] == "prefill-1" and rec["state"] == "DONE"


async def test_prefill_failing_everywhere_is_a_502_and_a_failed_record(valkey_url, redis):
    await register_pd(redis, num_prefill=2)
    fake = FakeInstanceClient(fail_prefill={"prefill-0", "prefill-1"})
    app = make_router(valkey_url, fake, max_prefill_retries=5)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6})
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "instance_failed"
        assert len(fake.prefill_calls) == 2  # each instance once, then no instance is left to try
        (rid,) = [k.decode().split(":")[2] for k in await redis.keys(events_key("*"))]
        rec = await records_of(app).get(rid)
    assert rec.state is S.FAILED and "prefill failed" in rec.fields["error"]


@pytest.mark.parametrize("lost_after", [0, 1, 5])
async def test_decode_lost_mid_stream_continues_elsewhere_without_repeat_or_loss(valkey_url, redis, lost_after):
    await register_pd(redis, num_prefill=1, num_decode=2)
    fake = FakeInstanceClient(lose_decode_after={"decode-0": lost_after})
    app = make_router(valkey_url, fake)
    prompt = "Hello there"
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True)
        pieces, rid = [], None
        async for chunk in stream:
            rid = chunk.id
            pieces.extend(c.text for c in chunk.choices)
        await client.close()
    want = expected_tokens(TOK.encode(prompt), 12)
    assert "".join(pieces) == TOK.decode(want)
    assert [c[0] for c in fake.decode_calls] == ["decode-0", "decode-1"]
    # the re-prefill carried prompt + every token the client had (first token + lost_after decode tokens)
    assert fake.prefill_calls[1][1] == TOK.encode(prompt) + want[: 1 + lost_after]
    rec = (await records_of(app).get(rid)).to_json()
    assert rec["state"] == "DONE" and rec["fields"]["decode_instance"] == "decode-1"
    assert any(e.get("resumed_after_tokens") == 2 + lost_after for e in rec["events"])


async def test_a_kv_pull_failing_on_every_decode_instance_is_a_502_kv_transfer_failed(valkey_url, redis):
    await register_pd(redis, num_prefill=1, num_decode=2)
    fake = FakeInstanceClient(fail_kv_pull={"decode-0", "decode-1"})
    app = make_router(valkey_url, fake, max_decode_retries=1)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6,
                                                         "stream": True})
    lines = data_lines(resp.text.splitlines())
    assert json.loads(lines[-2])["error"]["code"] == "kv_transfer_failed" and lines[-1] == "[DONE]"
    assert sorted(c[0] for c in fake.decode_calls) == ["decode-0", "decode-1"]  # tried each, then gave up


async def test_decode_lost_with_no_decode_instance_left_ends_with_a_clear_error(valkey_url, redis):
    await register_pd(redis, num_prefill=1, num_decode=1)
    fake = FakeInstanceClient(lose_decode_after={"decode-0": 2})
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                rid = resp.headers["x-request-id"]
                lines = data_lines([line async for line in resp.aiter_lines()])
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "instance_unavailable" and "decode" in error["message"]
    text = "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-2])
    assert text == TOK.decode(expected_tokens(TOK.encode("Hello"), 3))  # what was generated, once
    rec = await records_of(app).get(rid)
    assert rec.state is S.FAILED and "InstanceUnavailable" in rec.fields["error"]


async def test_client_disconnect_cancels_both_legs(valkey_url, redis):
    await register_pd(redis)
    gate = asyncio.Event()  # never set: decode hangs until cancelled
    fake = FakeInstanceClient(gates={"decode-0": gate})
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                rid = resp.headers["x-request-id"]
                lines = resp.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break  # got the first token; hang up once decode runs
                try:
                    await asyncio.wait_for(fake.streams_started.wait(), timeout=10)
                except TimeoutError:
                    raise AssertionError(f"decode never started; the stream went on with {[x async for x in lines]}"
                                         f" and the record is {await records_of(app).get(rid)}") from None
        await asyncio.wait_for(requests_of(app).wait_settled(rid), timeout=10)
        rec = await records_of(app).get(rid)
        assert rec.state is S.CANCELLED
        assert rec.fields["error"] == "client disconnected"
        assert fake.open_streams == 0  # the decode stream was closed
        assert {("prefill-0", rid), ("decode-0", rid)} <= set(fake.cancels)
        assert rid not in await records_of(app).active_ids()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_client_disconnect_cancels_a_non_streaming_request(valkey_url, redis, path):
    await register_pd(redis)
    fake = FakeInstanceClient(gates={"decode-0": asyncio.Event()})  # decode hangs until cancelled
    app = make_router(valkey_url, fake)
    body: dict = {"model": MODEL, "max_tokens": 10}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            post = asyncio.create_task(http.post(path, json=body))
            await asyncio.wait_for(fake.streams_started.wait(), timeout=10)  # (1) prefilled, decoding
            (rid,) = requests_of(app).active
            post.cancel()  # (2) the client hangs up: httpx drops the connection
            with pytest.raises(asyncio.CancelledError):
                await post
        await asyncio.wait_for(requests_of(app).wait_settled(rid), timeout=10)
        rec = await records_of(app).get(rid)
    assert rec.state is S.CANCELLED and rec.fields["error"] == "client disconnected"  # (3) not the deadline
    assert fake.open_streams == 0  # (4) the decode stream was closed and both legs cancelled
    assert {("prefill-0", rid), ("decode-0", rid)} <= set(fake.cancels)


async def test_full_queue_answers_429_with_retry_after(valkey_url, redis):
    await register_pd(redis)
    gate = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": gate})
    app = make_router(valkey_url, fake, max_queued_requests=1, retry_after_s=3)
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as first:
                assert first.status_code == 200
                second = await http.post("/v1/completions", json={**body, "stream": False})
                assert second.status_code == 429
                assert second.headers["retry-after"] == "3"
                assert second.json()["error"]["type"] == "rate_limit_error"
                gate.set()
                assert data_lines([line async for line in first.aiter_lines()])[-1] == "[DONE]"


async def test_deadline_fails_the_request_with_504(valkey_url, redis):
    await register_pd(redis)
    fake = FakeInstanceClient(gates={"decode-0": asyncio.Event()})
    app = make_router(valkey_url, fake, request_timeout_s=0.2)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "deadline_exceeded"
    assert fake.open_streams == 0


async def test_restarted_router_settles_its_unfinished_requests(valkey_url, redis):
    await register_pd(redis)
    old = RecordStore(redis, "router-a", retention_s=60, live_ttl_s=60, handle_ttl_s=10)
    await old.create("req-1", model=MODEL, prompt_tokens=3)
    await old.transition("req-1", to=S.PREFILL_QUEUED)
    await old.create("req-other-router", model=MODEL, prompt_tokens=3)
    other = RecordStore(redis, "router-b", retention_s=60, live_ttl_s=60, handle_ttl_s=10)
    await other.create("req-2", model=MODEL, prompt_tokens=3)
    await old.transition("req-other-router", to=S.CANCELLED)
    app = make_router(valkey_url, FakeInstanceClient(), router_id="router-a")
    async with asgi_client(app):
        rec = await records_of(app).get("req-1")
        assert rec.state is S.FAILED and "restarted" in rec.fields["error"]
        assert await records_of(app).active_ids() == []
        assert (await other.get("req-2")).state is S.RECEIVED  # another router's request is not ours to settle


def settings_without_id(valkey_url: str, port: int) -> RouterSettings:
    return RouterSettings(redis_url=valkey_url, served_model_name=MODEL, max_input_len=64, max_seq_len=128,
                          refresh_interval_s=30.0, port=port)


async def test_a_stable_router_id_lets_a_router_restarted_on_another_port_settle_its_requests(
        valkey_url, redis, monkeypatch):
    assert settings_without_id(valkey_url, 8101).router_id == f"{socket.gethostname()}:8101"  # default
    monkeypatch.setenv("TRT_DISAGG_ROUTER_ROUTER_ID", "edge-1")  # what an operator sets
    await register_pd(redis)
    gate = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": gate})
    before = create_app(settings_without_id(valkey_url, 8101), instance_client=fake, tokenizer=TOK)
    async with serve(before) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                rid = resp.headers["x-request-id"]
                await asyncio.wait_for(fake.streams_started.wait(), timeout=10)  # (1) in flight, on "edge-1"
                await requests_of(before).active[rid].record.flush()  # record writes trail the token path
                assert await records_of(before).active_ids("edge-1") == [rid]
                # (2) the router "crashes" and comes back on another port with the same id
                after = create_app(settings_without_id(valkey_url, 8102), instance_client=FakeInstanceClient(),
                                   tokenizer=TOK)
                async with asgi_client(after):
                    rec = await records_of(after).get(rid)
                    assert rec.state is S.FAILED and "restarted" in rec.fields["error"]  # (3) settled
                    assert rec.fields["router"] == "edge-1" and await records_of(after).active_ids() == []
                gate.set()


async def test_reaper_fails_an_overdue_request_whose_stream_is_stuck(valkey_url, redis):
    await register_pd(redis)
    gate = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": gate})
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                rid = resp.headers["x-request-id"]
                lines = resp.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break
                await fake.streams_started.wait()
                runner = requests_of(app)
                runner.active[rid].deadline_s = 0.0  # as if request_timeout_s had passed
                assert await runner.reap_overdue() == [rid]
                rec = await records_of(app).get(rid)
                assert rec.state is S.FAILED and "reaped" in rec.fields["error"]
                assert ("decode-0", rid) in fake.cancels
                gate.set()  # the stuck leg wakes up: the generator must stop, not continue elsewhere
                rest = data_lines([line async for line in lines])
    assert json.loads(rest[-2])["error"]["code"] == "deadline_exceeded" and rest[-1] == "[DONE]"
    assert len(fake.prefill_calls) == 1 and fake.open_streams == 0
    assert (await records_of(app).get(rid)).state is S.FAILED
