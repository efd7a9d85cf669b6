"""Structured output and tool calls with the official `openai` client against the real SmolLM2, on the
disaggregated path (prefill instance → KV hand-off → decode instance, real tritonserver processes): the
first token comes from the prefill instance's grammar matcher, the rest from the decode instance's, which
rebuilt its state from that token. Streamed and not.

1. 20 prompts with response_format json_schema: every answer validates against the schema (jsonschema);
2. tool_choice required and a named function: tool_calls whose arguments validate against the tool's
   parameters.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.integration.router_helpers import REPO, serve, within
from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.triton.cluster import LocalCluster

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"enum": ["Paris", "London", "Tokyo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "the time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def smollm2_pd(tmp_path_factory: pytest.TempPathFactory, smollm2_model):
    """SmolLM2 on one prefill and one decode instance (TP1 each: the layouts' hand-off is tested elsewhere)."""
    from trt_disagg.engine_build.builder import build_deployment

    root = tmp_path_factory.mktemp("smollm2-structured")
    dep = load_deployment(REPO / "configs" / "smollm2.yaml")
    assert dep.context_servers is not None and dep.generation_servers is not None
    one = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_input_len": 512, "max_seq_len": 1024,
           "max_num_tokens": 2048}
    dep = dep.model_copy(update={"name": "smollm2-structured", "colocated_servers": None,
                                 "context_servers": dep.context_servers.model_copy(update=one),
                                 "generation_servers": dep.generation_servers.model_copy(update=one)})
    build_deployment(dep, engines_root=root, model=smollm2_model)
    cluster = LocalCluster(dep, engines_root=root, start_router=False, ready_timeout_s=300)
    cluster.start()
    yield cluster, root
    cluster.stop()


async def _chat(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> tuple[str | None, list[Any], str]:
    """(content, tool_calls as dicts, finish_reason) of one answer, streamed or not."""
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        m = r.choices[0].message
        assert r.id.startswith("chatcmpl-")
        return m.content, [c.model_dump() for c in m.tool_calls or []], str(r.choices[0].finish_reason)
    text, calls, finish = [], [], ""
    async for ch in await client.chat.completions.create(stream=True, **kwargs):
        if not ch.choices:
            continue
        delta = ch.choices[0].delta
        text.append(delta.content or "")
        calls.extend(c.model_dump() for c in delta.tool_calls or [])
        finish = ch.choices[0].finish_reason or finish
    return "".join(text), calls, finish


async def test_json_schema_and_tool_calls_across_the_hand_off(smollm2_pd) -> None:
    cluster, root = smollm2_pd  # no colocated instance: every request takes the disaggregated path
    settings = RouterSettings.from_deployment(cluster.dep, str(cluster.redis_url), port=0, router_id="structured",
                                              colocated_threshold_tokens=0,
                                              engine_dir=cluster.dep.engine_dir(Role.PREFILL, root))
    app = create_app(settings)
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        model = cluster.dep.name
        asks = [_chat(client, i % 2 == 1, model=model, max_tokens=60, temperature=0.7, seed=i, response_format=fmt,
                      messages=[{"role": "user", "content": f"Describe person number {i} as JSON."}])
                for i in range(20)]
        tools = [_chat(client, stream, model=model, max_tokens=60, temperature=0, tools=[WEATHER, TIME], tool_choice=choice,
                       messages=[{"role": "user", "content": "What is the weather in Paris?"}])
                 for stream in (False, True)
                 for choice in ("required", {"type": "function", "function": {"name": "get_time"}})]
        answers = await within(600, asyncio.gather(*asks, *tools), app)
        for content, calls, finish in answers[:20]:
            assert finish == "stop" and not calls
            jsonschema.validate(json.loads(content or ""), PERSON)
        for i, (content, calls, finish) in enumerate(answers[20:]):
            assert finish == "tool_calls" and not content and len(calls) == 1, (content, calls, finish)
            fn = calls[0]["function"]
            if i % 2 == 1:  # the named function
                assert fn["name"] == "get_time"
            jsonschema.validate(json.loads(fn["arguments"]), PARAMS[fn["name"]])
        await client.close()
