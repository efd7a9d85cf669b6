"""`tool_choice` auto and a chat template's own call syntax: which templates render tools, the 400 for the
others, the structural tag sent to the engines, and the answer read back into `tool_calls`, whole and
streamed (the trigger split across chunks, a call cut off by the budget, text around calls)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import BadRequest
from router.structured import (
    NO_TEMPLATE_TOOLS,
    CallSyntax,
    TemplateTools,
    Tool,
    guide_for,
    template_tools,
    tool_plan,
)
from router.tools import parse_template_calls, template_answer_message, template_call_chunks
from tests.unit.router.hermes_template import CHATML_TEMPLATE, HERMES_TEMPLATE, LLAMA_TEMPLATE
from trt_disagg.contract import GuideType

WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
TIME = Tool.model_validate({"type": "function", "function": {"name": "get_time"}})
NAMES = {"get_weather", "get_time"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_templates_that_render_tools_are_told_apart_by_their_call_syntax() -> None:
    assert template_tools(HERMES_TEMPLATE) == TemplateTools(True, CallSyntax.HERMES)
    assert template_tools(LLAMA_TEMPLATE) == TemplateTools(True, CallSyntax.LLAMA)
    assert template_tools({"default": CHATML_TEMPLATE, "tool_use": HERMES_TEMPLATE}).syntax is CallSyntax.HERMES
    assert template_tools(CHATML_TEMPLATE) == NO_TEMPLATE_TOOLS
    assert template_tools(None) == NO_TEMPLATE_TOOLS
    assert template_tools("{% for tool in tools %}{{ tool.name }}{% endfor %}") == TemplateTools(True, None)


def test_auto_is_refused_with_a_reason_where_the_template_cannot_serve_it() -> None:
    with pytest.raises(BadRequest, match="renders tools, and this model's does not") as no_tools:
        tool_plan([WEATHER], "auto", None, template_tools(CHATML_TEMPLATE))
    assert no_tools.value.param == "tool_choice"
    with pytest.raises(BadRequest, match="teaches another one"):
        tool_plan([WEATHER], None, None, TemplateTools(True, None))  # no tool_choice: OpenAI's default is auto


def test_auto_with_a_hermes_template_sends_a_structural_tag_and_renders_every_tool() -> None:
    plan = tool_plan([WEATHER, TIME], "auto", False, template_tools(HERMES_TEMPLATE))
    assert plan.mode == "auto" and plan.names == NAMES
    assert [t["function"]["name"] for t in plan.template_tools() or []] == ["get_weather", "get_time"]
    guide = guide_for(None, plan)
    assert guide is not None and guide.type is GuideType.STRUCTURAL_TAG
    fmt = json.loads(guide.text)["format"]
    assert fmt["type"] == "triggered_tags" and fmt["triggers"] == ["<tool_call>"]
    assert not fmt["at_least_one"] and fmt["stop_after_first"]  # parallel_tool_calls false: one call at most
    assert fmt["tags"][1]["content"]["json_schema"] == {"type": "object", "properties": {}}  # no parameters
    required = tool_plan([WEATHER], "required", None, template_tools(HERMES_TEMPLATE))
    assert required.mode == "required"
    required_guide = guide_for(None, required)
    assert required_guide is not None
    calls_only = json.loads(required_guide.text)["format"]  # no free text a model could ramble in
    assert calls_only["type"] == "tags_with_separator" and calls_only["at_least_one"]
    with pytest.raises(BadRequest, match="response_format"):
        guide_for(json_format(), plan)
    assert tool_plan([WEATHER], "none", None, template_tools(HERMES_TEMPLATE)).template_tools() is None


def json_format() -> Any:
    from router.structured import ResponseFormat

    return ResponseFormat(type="json_object")


def test_calls_and_the_text_around_them_are_parsed_and_a_cut_off_call_stays_text() -> None:
    two = f"Checking both.\n{CALL}\n{CALL.replace('get_weather', 'get_time').replace('city', 'zone')}"
    parsed = parse_template_calls(two, CallSyntax.HERMES, NAMES)
    assert parsed.content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", {"city": "Paris"}),
                                                                      ("get_time", {"zone": "Paris"})]
    cut = "Sure. " + CALL[:30]
    assert template_answer_message(cut, "length", CallSyntax.HERMES, NAMES) == (
        {"role": "assistant", "content": cut}, "length")
    unknown = CALL.replace("get_weather", "get_stock")
    assert parse_template_calls(unknown, CallSyntax.HERMES, NAMES).calls == []
    message, finish = template_answer_message(CALL, "stop", CallSyntax.HERMES, NAMES)
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    llama = 'Here: {"name": "get_time", "parameters": {}}'
    assert [c.name for c in parse_template_calls(llama, CallSyntax.LLAMA, NAMES).calls] == ["get_time"]


def base(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"delta": delta, "finish_reason": finish}


def test_streamed_text_goes_out_until_the_trigger_and_the_calls_in_the_last_chunk() -> None:
    chunk = template_call_chunks(base, CallSyntax.HERMES, NAMES)
    pieces = ["Let me", " look <tool", "_ca", "ll>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": ",
              "\"Paris\"}}\n</tool_call>"]
    out = [chunk(p, None) for p in pieces] + [chunk(None, "stop")]
    contents = [c["delta"].get("content", "") for c in out[:-1]]
    assert "".join(contents) == "Let me look "  # the "<tool" that might open a call waited, then was held
    last = out[-1]
    assert last["finish_reason"] == "tool_calls" and "content" not in last["delta"]
    assert [(c["index"], c["function"]["name"]) for c in last["delta"]["tool_calls"]] == [(0, "get_weather")]

    plain = template_call_chunks(base, CallSyntax.HERMES, NAMES)
    sent = [plain(p, None) for p in ["a <", "b"]] + [plain(None, "stop")]
    assert "".join(c["delta"].get("content", "") for c in sent) == "a <b"  # "<" was not a trigger after all
    assert sent[-1]["finish_reason"] == "stop"
