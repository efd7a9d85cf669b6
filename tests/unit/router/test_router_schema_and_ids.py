"""What a client reads about the router: chat ids, model cards, chat's default budget, the OpenAPI schema,
and tool-call answers built from constrained text."""

from __future__ import annotations

import json

import openai
import pytest

from router.tools import answer_message, parse_tool_call, tool_call_chunks
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    asgi_client,
    make_router,
    redis,  # noqa: F401  (fixture)
    register_pd,
    serve,
    valkey_url,  # noqa: F401  (fixture)
)


async def test_chat_ids_model_cards_and_the_default_budget(valkey_url, redis) -> None:  # noqa: F811
    await register_pd(redis)
    async with serve(make_router(valkey_url, FakeInstanceClient(), max_input_len=64, max_seq_len=100)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert chat.id.startswith("chatcmpl-")
        # no max_tokens: everything max_seq_len leaves after the prompt (the fake never emits EOS)
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 100 - chat.usage.prompt_tokens
        streamed = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)]
        assert {c.id for c in streamed} == {streamed[0].id} and streamed[0].id.startswith("chatcmpl-")
        card = await client.models.retrieve(MODEL)
        assert card.id == MODEL
        # the limits requests are checked against, so that a benchmark can size its workload to them
        assert (card.model_extra or {}) == {"max_model_len": 100, "max_input_len": 64}
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4")
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


async def test_the_openapi_schema_says_what_this_deployment_accepts(valkey_url, redis) -> None:  # noqa: F811
    app = make_router(valkey_url, FakeInstanceClient(), max_seq_len=128)
    async with asgi_client(app) as http:
        schema = (await http.get("/openapi.json")).json()
        metrics = await http.get("/metrics")
    props = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert props["model"]["enum"] == [MODEL]
    assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == [MODEL]
    assert any(o.get("maximum") == 127 for o in props["max_tokens"]["anyOf"])
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics.headers["content-type"].startswith("text/plain")


def test_tool_call_text_becomes_tool_calls() -> None:
    text = '{"name":"get_weather","arguments":{"city":"Paris"}}'
    call = parse_tool_call(text, {"get_weather"})
    assert call is not None and json.loads(call.arguments) == {"city": "Paris"}
    message, finish = answer_message(text, "stop", {"get_weather"})
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    # cut off by the budget: the text stays text, finish_reason length
    assert answer_message(text[:20], "length", {"get_weather"}) == ({"role": "assistant", "content": text[:20]},
                                                                    "length")

    def base(delta, finish):  # type: ignore[no-untyped-def]
        return {"delta": delta, "finish_reason": finish}

    chunk = tool_call_chunks(base, {"get_weather"})
    assert chunk(text[:10], None) == {"delta": {}, "finish_reason": None}  # held back
    last = chunk(text[10:], "stop")
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"][0]["index"] == 0
