"""Structured output and tool calls: OpenAI's `response_format`, `tools` and `tool_choice` as a grammar.

    response_format {"type": "json_object"}            → Guide(json_schema, {"type": "object"})
    response_format {"type": "json_schema", ...}       → Guide(json_schema, the schema)   (strict or not:
                                                          the grammar always enforces it)
    tools + tool_choice "required"                     → Guide(json_schema, one of {"name": <tool>,
                                                          "arguments": <its parameters>})
    tools + tool_choice {"type": "function", ...}      → the same, for that function only
    tools + tool_choice "auto" (OpenAI's default)      → only where the chat template renders tools; else 400
    tools + tool_choice "none"                         → plain text; the tools are not shown to the model

The guide travels to the instances as TensorRT-LLM's guided-decoding inputs, where the engine's sampler
masks every token the grammar forbids (trt_disagg.engine.grammar); `Guide.prompt_len` lets a decode leg
rebuild the grammar state from the tokens already generated. `router/tools.py` turns the constrained text
back into OpenAI `tool_calls`.

When the template cannot render tools, the tool list is described to the model in a system message: the
grammar alone guarantees the shape, the description makes the arguments worth reading.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from router.errors import BadRequest
from trt_disagg.contract import Guide, GuideType

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JSONSchemaFormat(BaseModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None  # JSON's true/false, as the schema says (lax bool would take 0 and "yes")

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDef(BaseModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def parameters_schema(fn: FunctionDef) -> dict[str, Any]:
    return fn.parameters if fn.parameters else {"type": "object", "properties": {}}


def called_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool]:
    """The tools the answer must call one of ([]: a plain answer). Raises BadRequest for what cannot be
    served: a choice without tools, an unknown function, `auto` (see `check_auto`)."""
    if not tools:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return []
    if choice == "none":
        return []
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise BadRequest(f"tool_choice names {choice.function.name!r}, which is not in tools",
                             param="tool_choice")
        return named
    if choice == "required":
        return list(tools)
    raise BadRequest("tool_choice 'auto' (the default when tools are given) needs a chat template that renders "
                     "tools, and this model's does not; send tool_choice 'required' or a named function",
                     param="tool_choice")


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """One call: {"name": one of the tools, "arguments": that tool's parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "arguments": parameters_schema(t.function)},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def guide_for(response_format: ResponseFormat | None, tools: list[Tool]) -> Guide | None:
    """The grammar of the answer, or None for free text."""
    if tools:
        if response_format is not None and response_format.type != "text":
            raise BadRequest("response_format cannot be combined with a tool call (tool_choice required or "
                             "named)", param="response_format")
        return Guide(GuideType.JSON_SCHEMA, json.dumps(tool_call_schema(tools)))
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Guide(GuideType.JSON_SCHEMA, json.dumps({"type": "object"}))
    if response_format.json_schema is None:
        raise BadRequest("response_format json_schema needs its json_schema object",
                         param="response_format.json_schema")
    return Guide(GuideType.JSON_SCHEMA, json.dumps(response_format.json_schema.schema_))


def tools_message(tools: list[Tool]) -> dict[str, str]:
    """A system message that shows the model the functions it must call, for templates without tools."""
    lines = ["You call one of these functions. Answer with one JSON object "
             '{"name": <function name>, "arguments": <its arguments>}.']
    for t in tools:
        fn = t.function
        lines.append(f"- {fn.name}: {fn.description or ''} parameters: {json.dumps(parameters_schema(fn))}")
    return {"role": "system", "content": "\n".join(lines)}


def with_tools_message(messages: list[dict[str, str]], tools: list[Tool]) -> list[dict[str, str]]:
    """`messages` with the tool description merged into (or put in front as) the system message."""
    note = tools_message(tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{note['content']}"}, *messages[1:]]
    return [note, *messages]
