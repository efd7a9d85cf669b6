"""Every OpenAI completions and chat parameter, sent with the official `openai` client: an honoured one
changes what reaches the instances (or the answer), a refused one is a 400 naming it, and the ones
accepted without effect by design are 200. No parameter returns 200 with its effect silently dropped.

The cases below must cover router/openai_params.py's tables exactly (the first test checks that), so a
parameter added to the tables without a case here fails the suite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from router.openai_params import CHAT, COMPLETIONS, Disposition
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    make_router,
    redis,  # noqa: F401  (fixture)
    register_pd,
    serve,
    valkey_url,  # noqa: F401  (fixture)
)
from trt_disagg.contract import GuideType, SamplingParams

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


@dataclass
class RecordingClient(FakeInstanceClient):
    """The fake instances, remembering the sampling each prefill was sent."""

    sent: list[SamplingParams] = field(default_factory=list)

    async def prefill(self, instance, request_id, prompt_ids, sampling):  # type: ignore[no-untyped-def]
        self.sent.append(sampling)
        return await super().prefill(instance, request_id, prompt_ids, sampling)


Check = Callable[[Any, SamplingParams], bool]


def sent(attr: str, value: Any) -> Check:
    return lambda _resp, s: getattr(s, attr) == value


def guided(kind: GuideType, contains: str = "") -> Check:
    return lambda _resp, s: s.guide is not None and s.guide.type is kind and contains in s.guide.text


def tokens(n: int) -> Check:
    return lambda resp, _s: resp.usage.completion_tokens == n


OK: Check = lambda _resp, _s: True  # noqa: E731  (NO_EFFECT: only the 200 is asserted)

# parameter -> (extra body, check of an honoured / no-effect answer)
CHAT_CASES: dict[str, tuple[dict[str, Any], Check]] = {
    "model": ({}, OK), "messages": ({}, OK), "user": ({"user": "u-1"}, OK),
    "max_tokens": ({"max_tokens": 5}, tokens(5)), "max_completion_tokens": ({"max_completion_tokens": 4}, tokens(4)),
    "temperature": ({"temperature": 0.5}, sent("temperature", 0.5)), "top_p": ({"top_p": 0.5}, sent("top_p", 0.5)),
    "seed": ({"seed": 42}, sent("seed", 42)), "n": ({"n": 1}, OK),
    "stop": ({"stop": ["zzz"]}, OK),  # the text cut is tests/unit/router/test_router_text.py's
    "stream": ({"stream": True}, OK), "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, OK),
    "response_format": ({"response_format": {"type": "json_object"}}, guided(GuideType.JSON_SCHEMA, "object")),
    "tools": ({"tools": [TOOL], "tool_choice": "required"}, guided(GuideType.JSON_SCHEMA, "get_weather")),
    "tool_choice": ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                    guided(GuideType.JSON_SCHEMA, '"const": "get_weather"')),
    "parallel_tool_calls": ({"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
                            guided(GuideType.JSON_SCHEMA, "get_weather")),
    "metadata": ({"metadata": {"k": "v"}}, OK), "service_tier": ({"service_tier": "auto"}, OK),
    "safety_identifier": ({"safety_identifier": "s"}, OK), "prompt_cache_key": ({"prompt_cache_key": "k"}, OK),
    "prompt_cache_retention": ({"prompt_cache_retention": "24h"}, OK),
}
CHAT_REFUSED: dict[str, Any] = {
    "frequency_penalty": 0.5, "presence_penalty": -1.0, "logit_bias": {"50": 10}, "logprobs": True,
    "top_logprobs": 2, "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "functions": [TOOL["function"]],
    "function_call": "auto", "reasoning_effort": "low", "verbosity": "low", "store": True,
}
COMPLETION_CASES: dict[str, tuple[dict[str, Any], Check]] = {
    "model": ({}, OK), "prompt": ({}, OK), "user": ({"user": "u"}, OK), "max_tokens": ({"max_tokens": 3}, tokens(3)),
    "temperature": ({"temperature": 1.5}, sent("temperature", 1.5)), "top_p": ({"top_p": 0.3}, sent("top_p", 0.3)),
    "seed": ({"seed": 7}, sent("seed", 7)), "n": ({"n": 1}, OK), "stop": ({"stop": "zzz"}, OK),
    "stream": ({"stream": True}, OK), "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, OK),
}
COMPLETION_REFUSED: dict[str, Any] = {
    "frequency_penalty": 1.0, "presence_penalty": 1.0, "logit_bias": {"1": -100}, "suffix": "tail", "echo": True,
    "logprobs": 2, "best_of": 2,
}


def test_the_walk_covers_every_parameter_of_the_tables() -> None:
    for table, cases, refused in ((CHAT, CHAT_CASES, CHAT_REFUSED), (COMPLETIONS, COMPLETION_CASES, COMPLETION_REFUSED)):
        assert set(cases) | set(refused) == set(table)
        assert {n for n, p in table.items() if p.disposition is Disposition.REFUSED} == set(refused)


def test_the_readme_table_lists_every_parameter() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for name in set(CHAT) | set(COMPLETIONS):
        assert f"| `{name}` |" in readme, name


async def _answer(client: openai.AsyncOpenAI, chat: bool, body: dict[str, Any]) -> Any:
    stream = bool(body.pop("stream", False))
    if chat:
        kwargs: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        call = client.chat.completions.create
    else:
        kwargs = {"model": MODEL, "prompt": "hello", "max_tokens": 6}
        call = client.completions.create
    max_tokens = {k: body.pop(k) for k in ("max_tokens", "max_completion_tokens") if k in body}
    if "max_completion_tokens" in max_tokens:
        kwargs.pop("max_tokens")
    kwargs.update(max_tokens)
    if not stream:
        return await call(**kwargs, extra_body=body)
    chunks = [c async for c in await call(**kwargs, stream=True, extra_body=body)]
    assert chunks and chunks[-1].choices == [] if "stream_options" in body else chunks
    return chunks


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
async def test_every_parameter_is_honoured_or_refused(valkey_url, redis, chat: bool) -> None:  # noqa: F811
    await register_pd(redis)
    recorder = RecordingClient()
    cases, refused = (CHAT_CASES, CHAT_REFUSED) if chat else (COMPLETION_CASES, COMPLETION_REFUSED)
    async with serve(make_router(valkey_url, recorder, max_input_len=1024, max_seq_len=2048)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for name, (body, check) in cases.items():
            before = len(recorder.sent)
            resp = await _answer(client, chat, json.loads(json.dumps(body)))
            assert len(recorder.sent) == before + 1, name
            assert check(resp, recorder.sent[-1]), f"{name}: its effect is missing"
        for name, value in refused.items():
            with pytest.raises(openai.BadRequestError) as err:
                await _answer(client, chat, {name: value})
            assert err.value.status_code == 400
            assert name in str(err.value.body), f"{name}: the 400 does not name it ({err.value.body})"
