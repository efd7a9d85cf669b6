"""The OpenAI API through the official `openai` client against the router served by uvicorn, with fake
instances and the embedded Valkey: completions and chat, streaming and not, and the Redis record of each
request walking its states in order."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from router.states import RequestState as S
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    FakeTokenizer,
    RecordingKVReleaser,
    asgi_client,
    expected_tokens,
    make_router,
    records_of,
    register,
    register_pd,
    requests_of,
    serve,
)
from trt_disagg.contract import Role

DISAGG_STATES = ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILL_DONE", "DECODE_DISPATCHED", "DECODING",
                 "DONE"]
TOK = FakeTokenizer()


def text_of(prompt: str, n: int) -> str:
    return TOK.decode(expected_tokens(TOK.encode(prompt), n))


def assert_walk(record: dict, states: list[str]) -> None:
    """The event log is exactly `states` in order, with non-decreasing timestamps, one per state."""
    walked = [e["state"] for e in record["events"]]
    assert walked == states
    ts = [e["ts"] for e in record["events"]]
    assert ts == sorted(ts)
    assert record["state"] == states[-1]
    assert set(record["timestamps"]) == set(states)


async def test_completion_not_streaming_through_prefill_and_decode(valkey_url, redis):
    await register_pd(redis)
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        out = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
        assert out.choices[0].text == text_of("Hello", 8)
        assert out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 8)
        rec = await records_of(app).get(out.id)
        assert_walk(rec.to_json(), DISAGG_STATES)
        assert rec.fields["prefill_instance"] == "prefill-0" and rec.fields["decode_instance"] == "decode-0"
        assert rec.fields["output_tokens"] == "8"
        # the same record over HTTP
        async with httpx.AsyncClient(base_url=url) as http:
            got = (await http.get(f"/v1/requests/{out.id}")).json()
        assert got["state"] == "DONE" and [e["state"] for e in got["events"]] == DISAGG_STATES
        await client.close()
    assert fake.closed


async def test_completion_streaming_sends_each_token_once(valkey_url, redis):
    await register_pd(redis)
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        stream = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        pieces, finish, usage, ids = [], None, None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.text)
                finish = c.finish_reason or finish
        assert "".join(pieces) == text_of("Hello", 12)
        assert finish == "length" and usage.completion_tokens == 12
        (request_id,) = ids
        rec = await records_of(app).get(request_id)
        assert_walk(rec.to_json(), DISAGG_STATES)
        await client.close()
    # decode was asked to continue from the prefill's first token, which it does not emit again
    (decode_call,) = fake.decode_calls
    assert decode_call[2] == expected_tokens(TOK.encode("Hello"), 1)[0]


async def test_first_token_is_streamed_before_decode_runs(valkey_url, redis):
    """TTFT: the prefill's token reaches the client while the decode instance has produced nothing."""
    await register_pd(redis)
    gate = asyncio.Event()
    fake = FakeInstanceClient(gates={"decode-0": gate})
    app = make_router(valkey_url, fake)
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.aiter_lines()
                first_chunk = ""
                async for line in lines:
                    if line.startswith("data:"):
                        first_chunk = line
                        break
                assert text_of("Hi", 1) in first_chunk
                rid = resp.headers["x-request-id"]
                await requests_of(app).active[rid].record.flush()  # record writes are queued off the token path
                rec = await records_of(app).get(rid)
                assert rec.state in (S.PREFILLING, S.PREFILL_DONE, S.DECODE_DISPATCHED)  # no decode token yet
                gate.set()
                rest = [line async for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        texts = [first_chunk] + rest[:-1]
        assert "".join(json.loads(t[5:])["choices"][0]["text"] for t in texts) == text_of("Hi", 4)


async def test_chat_streaming_and_not_use_the_chat_template(valkey_url, redis):
    await register_pd(redis)
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt_ids = TOK.chat_prompt_ids(messages)
    want = TOK.decode(expected_tokens(prompt_ids, 6))
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        out = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        assert out.choices[0].message.content == want
        assert out.choices[0].message.role == "assistant"
        assert out.usage.prompt_tokens == len(prompt_ids)
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
        roles, content = [], []
        async for chunk in stream:
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                if c.delta.content:
                    content.append(c.delta.content)
        assert roles == ["assistant"] and "".join(content) == want
        await client.close()
    assert fake.prefill_calls[0][1] == prompt_ids


async def test_colocated_path_and_conditional_disaggregation(valkey_url, redis):
    """Short prompts go to the colocated instance, long ones to prefill+decode; states documented in ALLOWED."""
    await register_pd(redis)
    await register(redis, "colocated-0", Role.COLOCATED)
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake, colocated_threshold_tokens=4)
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        short = await client.completions.create(model=MODEL, prompt="abc", max_tokens=5)
        long = await client.completions.create(model=MODEL, prompt="abcdefgh", max_tokens=5)
        assert short.choices[0].text == text_of("abc", 5) and long.choices[0].text == text_of("abcdefgh", 5)
        rec = (await records_of(app).get(short.id)).to_json()
        assert_walk(rec, ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "DECODING", "DONE"])
        assert rec["fields"]["path"] == "colocated"
        assert_walk((await records_of(app).get(long.id)).to_json(), DISAGG_STATES)
        await client.close()
    assert fake.colocated_calls == ["colocated-0"]


async def test_models_health_and_metrics(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient())
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
        await client.close()
        async with httpx.AsyncClient(base_url=url) as http:
            health = await http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ready"
            text = (await http.get("/metrics")).text
    for name in ("trtd_router_ttft_seconds_count", "trtd_router_tpot_seconds_count",
                 "trtd_router_request_duration_seconds_count", "trtd_router_prefill_seconds_count",
                 "trtd_router_kv_handoff_seconds_count", "trtd_router_inter_token_latency_seconds_count"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert float(line.split()[-1]) >= 1, line
    assert 'trtd_router_requests_total{outcome="done",path="disaggregated"} 1.0' in text
    assert 'trtd_router_instances{pool="prefill"} 1.0' in text


@pytest.mark.parametrize("roles, ready", [((), False), ((Role.PREFILL,), False),
                                          ((Role.PREFILL, Role.DECODE), True), ((Role.COLOCATED,), True)])
async def test_health_is_ready_only_with_a_pair_or_a_colocated_instance(valkey_url, redis, roles, ready):
    for role in roles:
        await register(redis, f"{role.value}-0", role)
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        resp = await http.get("/health")
    assert resp.status_code == (200 if ready else 503)


async def test_shutdown_is_bounded_when_a_background_task_ignores_its_cancellation(valkey_url, redis, caplog):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient(), shutdown_timeout_s=0.2)
    started, release = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # swallows its cancellation (a bug the router must survive, and show)

    async with app.router.lifespan_context(app):
        app.state.router.spawn(stubborn())
        await started.wait()
    assert "still running 0.2s after its cancellation" in caplog.text and "stubborn" in caplog.text
    assert app.state.router.client.closed  # shutdown went on past it
    release.set()


async def test_metrics_count_requests_waiting_for_their_first_token(valkey_url, redis):
    await register(redis, "colocated-0", Role.COLOCATED)
    fake = FakeInstanceClient()
    gate = fake.gates["colocated-0"] = asyncio.Event()  # holds every token, the first included
    app = make_router(valkey_url, fake)

    def queued(text: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith('trtd_router_queued{pool="colocated"}'))
        return float(line.split()[-1])

    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        pending = asyncio.create_task(http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                                          "max_tokens": 3}))
        await fake.streams_started.wait()
        assert queued((await http.get("/metrics")).text) == 1.0
        gate.set()
        assert (await pending).status_code == 200
        assert queued((await http.get("/metrics")).text) == 0.0


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings_end_the_text_before_them_and_the_request_normally(valkey_url, redis, stream):
    await register_pd(redis)
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake)
    full = text_of("Hello", 40)
    stop = full[9:11]  # two characters first generated at position 9 or before
    want = full[:full.index(stop)]
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        if stream:
            chunks = [c async for c in await client.completions.create(
                model=MODEL, prompt="Hello", max_tokens=40, stop=["zzz", stop], stream=True)]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
            request_id = chunks[0].id
        else:
            out = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=40, stop=stop)
            text, finish, request_id = out.choices[0].text, out.choices[0].finish_reason, out.id
            assert out.usage.completion_tokens < 40
        await client.close()
        rec = await records_of(app).get(request_id)  # settled before the client had the whole answer
    assert text == want and finish == "stop"
    assert rec.state is S.DONE and rec.fields["finish_reason"] == "stop"
    assert fake.open_streams == 0  # the decode leg was closed at the stop string, not run to max_tokens


async def test_unsupported_sampling_fields_are_refused_not_ignored(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        for extra, param in (({"presence_penalty": 0.5}, "presence_penalty"),
                             ({"logit_bias": {"42": 10}}, "logit_bias"),
                             ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop")):
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **extra})
            assert r.status_code == 400, extra
            assert r.json()["error"]["type"] == "invalid_request_error" and param in r.json()["error"]["message"]


async def test_a_stop_string_in_the_first_token_ends_the_request_before_decode_and_frees_its_kv(valkey_url, redis):
    await register_pd(redis)
    fake, releaser = FakeInstanceClient(), RecordingKVReleaser()
    app = make_router(valkey_url, fake, releaser)
    first = text_of("Hello", 1)
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x")
        out = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, stop=first)
        await client.close()
        rec = await records_of(app).get(out.id)
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "stop"
    assert fake.decode_calls == []  # no decode leg for an answer that is already over
    assert [r[0] for r in releaser.releases] == [out.id]  # the prefill KV nobody will pull goes back at once
    assert rec.state is S.DONE
