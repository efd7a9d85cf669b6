"""Structured output and tool calls: OpenAI's `response_format`, `tools` and `tool_choice` as a grammar.

    response_format {"type": "json_object"}            → Guide(json_schema, {"type": "object"})
    response_format {"type": "json_schema", ...}       → Guide(json_schema, the schema)   (strict or not:
                                                          the grammar always enforces it)
    tools + tool_choice "required"                     → Guide(json_schema, one of {"name": <tool>,
                                                          "arguments": <its parameters>})
    tools + tool_choice {"type": "function", ...}      → the same, for that function only
    tools + tool_choice "auto" (OpenAI's default)      → only where the chat template renders tools: text or
                                                          calls in the template's syntax (below); else 400
    tools + tool_choice "none"                         → plain text; the tools are not shown to the model

The guide travels to the instances as TensorRT-LLM's guided-decoding inputs, where the engine's sampler
masks every token the grammar forbids (trt_disagg.engine.grammar); `Guide.prompt_len` lets a decode leg
rebuild the grammar state from the tokens already generated. `router/tools.py` turns the constrained text
back into OpenAI `tool_calls`.

When the template renders tools (its Jinja source uses `tools`, as Hermes, Qwen and Llama 3.1 templates do)
the tools go into the prompt through the template, and the answer is constrained to the template's own
call syntax with an xgrammar structural tag: free text until the trigger, then one function's arguments
under its schema, as vLLM and SGLang do it:

    Hermes / Qwen   <tool_call>\n{"name": "get_weather", "arguments": {...}}\n</tool_call>   trigger <tool_call>
    Llama 3.1       {"name": "get_weather", "parameters": {...}}                            trigger {"name":

`auto` lets the model answer text or call; `required` needs at least one call; a named function forces
that one. A template that renders tools in a call syntax not listed here is refused for `auto` (400): the
router could not tell a call from text. When the template cannot render tools, the tool list is described
to the model in a system message: the grammar alone guarantees the shape, the description makes the
arguments worth reading.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
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


class CallSyntax(enum.StrEnum):
    """The tool-call syntaxes of the chat templates this router constrains and parses."""

    HERMES = "hermes"  # Hermes 2 Pro, Qwen 2.5 / 3: <tool_call> JSON </tool_call>
    LLAMA = "llama"  # Llama 3.1 / 3.2: a bare JSON object with "parameters"


@dataclass(frozen=True)
class CallMarkers:
    """Where a call starts and ends in the text of a syntax (router/tools.py parses with the same markers)."""

    trigger: str  # free text ends where this appears
    opening: str  # a call's text up to its function name
    arguments_key: str  # the key of the arguments object
    closing: str  # after the arguments object

    def begin(self, name: str) -> str:
        return f'{self.opening}{name}", "{self.arguments_key}": '


MARKERS = {
    CallSyntax.HERMES: CallMarkers("<tool_call>", '<tool_call>\n{"name": "', "arguments", "}\n</tool_call>"),
    CallSyntax.LLAMA: CallMarkers('{"name": ', '{"name": "', "parameters", "}"),
}

# Whitespace a call's arguments may hold in a row: a model's natural `{"city": "Paris"}` fits, a small model
# cannot wander into whitespace until its budget is spent (the JSON guides go further: none at all).
ARGUMENT_WHITESPACE = 1


@dataclass(frozen=True)
class TemplateTools:
    """What a chat template does with `tools`, read from its Jinja source."""

    renders_tools: bool  # the template uses a `tools` variable (transformers passes apply_chat_template's tools=)
    syntax: CallSyntax | None  # the call syntax it teaches the model, when it is one of CallSyntax


NO_TEMPLATE_TOOLS = TemplateTools(False, None)


def template_tools(template: Any) -> TemplateTools:
    """Read a tokenizer's `chat_template` (a string, a dict of named templates, or None)."""
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    if not isinstance(template, str) or not re.search(r"\btools\b", template):
        return NO_TEMPLATE_TOOLS
    if "<tool_call>" in template:
        return TemplateTools(True, CallSyntax.HERMES)
    if '"parameters"' in template:
        return TemplateTools(True, CallSyntax.LLAMA)
    return TemplateTools(True, None)


CallMode = Literal["auto", "required", "forced"]


@dataclass(frozen=True)
class ToolPlan:
    """The tools an answer may call, how, and in which syntax."""

    calls: list[Tool]  # the tools the grammar lets the answer call ([]: plain text)
    mode: CallMode
    syntax: CallSyntax | None  # the template's syntax (tools rendered by the template); None: one JSON call
    rendered: list[Tool]  # the tools the template renders into the prompt ([] when syntax is None)
    single: bool = False  # parallel_tool_calls false: at most one call

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.calls}

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The `tools=` argument of apply_chat_template, or None when the template does not render them."""
        if self.syntax is None or not self.calls:
            return None
        return [t.model_dump(exclude_none=True) for t in self.rendered]


def tool_plan(tools: list[Tool] | None, choice: ToolChoice | None, parallel_tool_calls: bool | None = None,
              template: TemplateTools = NO_TEMPLATE_TOOLS) -> ToolPlan:
    """The plan of one request. Raises BadRequest for what cannot be served: a choice without tools, an
    unknown function, `auto` without a template whose call syntax this router parses."""
    calls = called_tools(tools, choice, template)
    mode: CallMode = "forced" if isinstance(choice, NamedToolChoice) else "required" if choice == "required" \
        else "auto"
    syntax = template.syntax if calls else None
    return ToolPlan(calls, mode, syntax, list(tools or []) if syntax else [], parallel_tool_calls is False)


def called_tools(tools: list[Tool] | None, choice: ToolChoice | None,
                 template: TemplateTools = NO_TEMPLATE_TOOLS) -> list[Tool]:
    """The tools the answer may call ([]: a plain answer); see `tool_plan` for what raises."""
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
    if choice == "required" or template.syntax is not None:
        return list(tools)
    if template.renders_tools:
        raise BadRequest("tool_choice 'auto' (the default when tools are given) needs a tool-call syntax the router "
                         "can tell from text, and this model's chat template teaches another one (known: Hermes "
                         "<tool_call>, Llama 3.1 JSON); send tool_choice 'required' or a named function",
                         param="tool_choice")
    raise BadRequest("tool_choice 'auto' (the default when tools are given) needs a chat template that renders "
                     "tools, and this model's does not; send tool_choice 'required' or a named function",
                     param="tool_choice")


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """One call: {"name": one of the tools, "arguments": that tool's parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "arguments": parameters_schema(t.function)},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def structural_tag(plan: ToolPlan) -> dict[str, Any]:
    """xgrammar's structural tag for the plan's calls in its template's syntax."""
    assert plan.syntax is not None, "a structural tag needs the template's call syntax"
    markers = MARKERS[plan.syntax]
    tags = [{"type": "tag", "begin": markers.begin(t.function.name), "end": markers.closing,
             "content": {"type": "json_schema", "json_schema": parameters_schema(t.function),
                         "max_whitespace_cnt": ARGUMENT_WHITESPACE}} for t in plan.calls]
    if plan.mode == "forced":
        return {"type": "structural_tag", "format": tags[0]}
    if plan.mode == "required":  # calls only, no text around them: a model that never reaches the trigger
        return {"type": "structural_tag", "format": {  # must not be able to talk until max_tokens
            "type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
            "stop_after_first": plan.single}}
    return {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": [markers.trigger], "tags": tags,
        "at_least_one": plan.mode == "required", "stop_after_first": plan.single}}


def guide_for(response_format: ResponseFormat | None, plan: ToolPlan) -> Guide | None:
    """The grammar of the answer, or None for free text."""
    if plan.calls:
        if response_format is not None and response_format.type != "text":
            raise BadRequest("response_format cannot be combined with tools the answer may call (tool_choice "
                             "auto, required or named)", param="response_format")
        if plan.syntax is not None:
            return Guide(GuideType.STRUCTURAL_TAG, json.dumps(structural_tag(plan)))
        return Guide(GuideType.JSON_SCHEMA, json.dumps(tool_call_schema(plan.calls)))
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
