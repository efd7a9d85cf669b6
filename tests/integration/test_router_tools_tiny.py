"""What clients send, against a real router and the real tiny engines (prefill TP2 → KV hand-off → decode
PP2, real tritonserver processes), with a Hermes-style chat template that renders tools (written for the
test, tests/unit/router/hermes_template.py: nothing is downloaded).

1. tool_choice auto / required, streamed and not, with the official `openai` client: the tools reach the
   prompt through the template; a call comes back as `tool_calls` (finish_reason "tool_calls") whose
   arguments follow the function's schema, its first token from the prefill instance's grammar matcher and
   the rest from the decode instance's; `auto` may also answer text;
2. a bounded schemathesis run (`--checks all`) over the router's own OpenAPI schema, every generated
   request served by the real engines: 0 failures, no 5xx.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from router.app import create_app
from tests.integration.router_helpers import REPO, router_settings, running_tiny, serve, within
from tests.unit.router.hermes_template import HERMES_TEMPLATE
from trt_disagg.contract import Role
from trt_disagg.engine_dir import TOKENIZER_DIR

pytestmark = pytest.mark.slow

PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]},
                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"], "additionalProperties": False}
WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                                 "parameters": PARAMS}}
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMATHESIS_BUDGET_S = 150  # the run takes ~40 s on 2 cores; the limit only turns a hang into a failure


@pytest.fixture(scope="module")
def tiny_tools(tmp_path_factory: pytest.TempPathFactory):
    """The tiny deployment whose router-side tokenizer (the colocated engine's) has a template with tools."""
    root = tmp_path_factory.mktemp("tiny-tools")
    with running_tiny(root, num_decode=1) as cluster:
        engine_dir = cluster.dep.engine_dir(Role.COLOCATED, root)
        (engine_dir / TOKENIZER_DIR / "chat_template.jinja").write_text(HERMES_TEMPLATE)
        yield cluster, root, engine_dir


async def chat(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> tuple[str | None, list[Any], str, int]:
    """(content, tool_calls as dicts, finish_reason, prompt tokens) of one answer, streamed or not."""
    if not stream:
        r = await client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)
        assert r.usage is not None
        m = r.choices[0].message
        return m.content, [c.model_dump() for c in m.tool_calls or []], str(r.choices[0].finish_reason), \
            r.usage.prompt_tokens
    text, calls, finish, prompt_tokens = [], [], "", 0
    async for ch in await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                         stream_options={"include_usage": True}, **kwargs):
        if ch.usage is not None:
            prompt_tokens = ch.usage.prompt_tokens
        if not ch.choices:
            continue
        delta = ch.choices[0].delta
        text.append(delta.content or "")
        calls.extend(c.model_dump() for c in delta.tool_calls or [])
        finish = ch.choices[0].finish_reason or finish
    return "".join(text) or None, calls, finish, prompt_tokens


def assert_weather_calls(calls: list[Any]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS)


async def test_auto_and_required_answer_in_the_template_syntax_across_the_hand_off(tiny_tools):
    cluster, root, engine_dir = tiny_tools
    app = create_app(router_settings(cluster, root, "tiny-tools", colocated_threshold_tokens=0))
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        try:
            _, _, _, plain_prompt = await within(60, chat(client, False, max_tokens=4, temperature=0), app)
            for stream in (False, True):
                content, calls, finish, prompt = await within(120, chat(
                    client, stream, tools=[WEATHER], tool_choice="required", max_tokens=160, temperature=0,
                    parallel_tool_calls=False), app)  # a random model would call again until max_tokens
                assert finish == "tool_calls", (content, finish)
                assert_weather_calls(calls)
                assert prompt > plain_prompt + 40  # the template wrote the tool into the prompt
                content, calls, finish, _ = await within(120, chat(
                    client, stream, tools=[WEATHER], tool_choice="auto", max_tokens=24, temperature=0), app)
                assert finish in ("stop", "length", "tool_calls")
                if finish == "tool_calls":
                    assert_weather_calls(calls)
                else:
                    assert not calls and content
        finally:
            await client.close()


async def test_schemathesis_finds_nothing_against_the_real_engines(tiny_tools):
    """`schemathesis run --checks all`, deterministic and bounded, every request served by the tiny engines."""
    cluster, root, engine_dir = tiny_tools
    # a short context bounds every answer (the random engine never stops by itself), so the run stays short
    settings = router_settings(cluster, root, "tiny-schemathesis", colocated_threshold_tokens=0, max_input_len=64,
                               max_seq_len=96)
    app = create_app(settings)
    cli = Path(sys.executable).parent / "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.unit.router.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TRTD_SCHEMATHESIS_MAX_INPUT_LEN": str(settings.max_input_len),
           "TRTD_SCHEMATHESIS_MAX_SEQ_LEN": str(settings.max_seq_len), "TRTD_SCHEMATHESIS_ENGINE_DIR": str(engine_dir)}
    async with serve(app) as url:
        proc = await asyncio.create_subprocess_exec(
            str(cli), "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "3",
            "--generation-deterministic", "--include-path-regex", "^/(v1|metrics|health)",
            "--phases", "examples,fuzzing",  # the coverage phase runs against fake instances (unit suite)
            "--output-sanitize", "false", "--no-color",
            # a chat request without max_tokens decodes up to the context limit: seconds on a busy machine
            "--request-timeout", "60", "--max-response-time", "60",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=REPO)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), SCHEMATHESIS_BUDGET_S)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, out.decode()[-6000:]
