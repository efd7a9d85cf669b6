"""From the grammar-constrained text of a tool-call answer to OpenAI's `tool_calls`.

    '{"name":"get_weather","arguments":{"city":"Paris"}}'
        → message {"role": "assistant", "content": null,
                   "tool_calls": [{"id": "call_…", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}
          finish_reason "tool_calls"

The grammar (router/structured.py) makes the text a complete call unless the token budget ran out first;
then the answer stays text with finish_reason "length", as OpenAI does with a cut-off answer. Streaming:
the text is held back (empty deltas keep the stream alive) and the call goes out whole in the last chunk,
because a half-written argument object is of no use to a client.

With a chat template that renders tools, the text is in the template's call syntax (router/structured.py,
MARKERS) and may hold free text around the calls (`tool_choice` auto):

    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        → content "Let me check.", tool_calls [get_weather {"city": "Paris"}], finish_reason "tool_calls"

Streamed, the free text goes out as it comes until the trigger appears (the tail that could be the start
of a trigger waits for the next token); from the trigger on the text is held and the calls go out in the
last chunk.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.structured import MARKERS, CallMarkers, CallSyntax


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_dict(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def parse_tool_call(text: str, names: set[str]) -> ToolCall | None:
    """The call in `text`, or None when it is not a whole call of one of `names` (cut off by the budget)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments"), dict):
        return None
    return ToolCall(str(obj["name"]), json.dumps(obj["arguments"]))


def answer_message(text: str, finish_reason: str, names: set[str]) -> tuple[dict[str, Any], str]:
    """(message, finish_reason) of a non-streamed tool-call answer."""
    call = parse_tool_call(text, names)
    if call is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": [call.to_dict()]}, "tool_calls"


ChunkFn = Callable[[str | None, str | None], dict[str, Any]]
BaseChunkFn = Callable[[dict[str, Any], str | None], dict[str, Any]]  # one chunk around a delta


def tool_call_chunks(base: BaseChunkFn, names: set[str]) -> ChunkFn:
    """A streaming chunk function that holds the text back and sends the call in the finishing chunk.

    `base(delta, finish_reason)` builds one chat.completion.chunk around a delta."""
    held: list[str] = []

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        if text:
            held.append(text)
        if finish is None:
            return base({}, None)
        whole = "".join(held)
        call = parse_tool_call(whole, names)
        if call is None:
            return base({"content": whole} if whole else {}, finish)
        return base({"tool_calls": [call.to_dict(index=0)]}, "tool_calls")

    return chunk


@dataclass(frozen=True)
class ParsedAnswer:
    """A template-syntax answer split into its free text and its calls."""

    content: str | None  # the text outside the calls (None when there is none but whitespace)
    calls: list[ToolCall]


def parse_template_calls(text: str, syntax: CallSyntax, names: set[str]) -> ParsedAnswer:
    """The calls in `text` written in `syntax`, and the text around them. A trigger that does not open a whole
    call of one of `names` (the budget cut it) stays text."""
    markers = MARKERS[syntax]
    calls: list[ToolCall] = []
    outside: list[str] = []
    pos = 0
    while (start := text.find(markers.trigger, pos)) >= 0:
        found = _call_at(text, start, markers, names)
        if found is None:
            outside.append(text[pos:start + len(markers.trigger)])
            pos = start + len(markers.trigger)
            continue
        call, end = found
        outside.append(text[pos:start])
        calls.append(call)
        pos = end
    outside.append(text[pos:])
    content = "".join(outside).strip()
    return ParsedAnswer(content or None, calls)


_JSON = json.JSONDecoder()


def _call_at(text: str, start: int, markers: CallMarkers, names: set[str]) -> tuple[ToolCall, int] | None:
    """The call whose text starts at `start` and the index after it, or None."""
    opening = markers.opening.split("{", 1)[0]  # what precedes the JSON object ("<tool_call>\n" or "")
    if not text.startswith(opening.strip(), start):
        return None
    at = start + len(opening.strip())
    at += len(text[at:]) - len(text[at:].lstrip())
    try:
        obj, end = _JSON.raw_decode(text, at)
    except ValueError:
        return None
    args = obj.get(markers.arguments_key) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(args, dict):
        return None
    closing = markers.closing[1:].strip()  # after the object's own "}": "</tool_call>" or ""
    rest = text[end:]
    if closing:
        if not rest.lstrip().startswith(closing):
            return None
        end += len(rest) - len(rest.lstrip()) + len(closing)
    return ToolCall(str(obj["name"]), json.dumps(args)), end


def template_answer_message(text: str, finish_reason: str, syntax: CallSyntax,
                            names: set[str]) -> tuple[dict[str, Any], str]:
    """(message, finish_reason) of a non-streamed answer in a template's call syntax."""
    parsed = parse_template_calls(text, syntax, names)
    if not parsed.calls:
        return {"role": "assistant", "content": text}, finish_reason
    message = {"role": "assistant", "content": parsed.content,
               "tool_calls": [c.to_dict() for c in parsed.calls]}
    return message, "length" if finish_reason == "length" else "tool_calls"


def template_call_chunks(base: BaseChunkFn, syntax: CallSyntax, names: set[str]) -> ChunkFn:
    """A streaming chunk function for a template's call syntax: free text streams until the trigger, the
    calls go out whole in the finishing chunk."""
    trigger = MARKERS[syntax].trigger
    text: list[str] = []
    sent = 0  # characters of the text already sent as content
    held = False  # the trigger appeared: nothing more is sent before the end

    def chunk(piece: str | None, finish: str | None) -> dict[str, Any]:
        nonlocal sent, held
        if piece:
            text.append(piece)
        whole = "".join(text)
        if finish is None:
            if held:
                return base({}, None)
            at = whole.find(trigger, sent)
            held = at >= 0
            upto = at if held else len(whole) - _trigger_overlap(whole, trigger)
            out, sent = whole[sent:upto], max(sent, upto)
            return base({"content": out} if out else {}, None)
        parsed = parse_template_calls(whole[sent:], syntax, names)
        if not parsed.calls:
            rest = whole[sent:]
            return base({"content": rest} if rest else {}, finish)
        delta: dict[str, Any] = {"tool_calls": [c.to_dict(index=i) for i, c in enumerate(parsed.calls)]}
        if parsed.content:
            delta["content"] = parsed.content
        return base(delta, "length" if finish == "length" else "tool_calls")

    return chunk


def _trigger_overlap(text: str, trigger: str) -> int:
    """The length of the longest end of `text` that is a start of `trigger` (it may become the trigger)."""
    for n in range(min(len(text), len(trigger) - 1), 0, -1):
        if trigger.startswith(text[-n:]):
            return n
    return 0
