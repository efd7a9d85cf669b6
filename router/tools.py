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
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


def tool_call_chunks(base: Callable[[dict[str, Any], str | None], dict[str, Any]], names: set[str]) -> ChunkFn:
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
