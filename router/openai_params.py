"""Every parameter of OpenAI's completions and chat completions APIs, and what this router does with it.

    HONOURED   it changes the answer as OpenAI documents (within the ranges the schema gives)
    REFUSED    400 naming the parameter whenever it is set to anything but its no-op value
    NO_EFFECT  accepted and, by design, changes nothing here (billing, storage, abuse and cache hints
               that belong to OpenAI's service, not to a model server)

Nothing is silently dropped: a parameter missing from this table is unknown to the router (ignored, as
OpenAI ignores unknown fields), and tests/unit/router/test_router_parameters.py walks the whole table
with the `openai` client. The README's parameter table is this one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Disposition(enum.StrEnum):
    HONOURED = "honoured"
    REFUSED = "refused"
    NO_EFFECT = "accepted, no effect by design"


@dataclass(frozen=True)
class Param:
    disposition: Disposition
    note: str
    # REFUSED parameters: the values that ask for nothing (accepted); anything else is a 400
    no_op: tuple[Any, ...] = (None,)
    # ...or, where they are not a short list, the test of one (a list that only repeats an accepted item)
    is_no_op: Callable[[Any], bool] | None = None


H, R, N = Disposition.HONOURED, Disposition.REFUSED, Disposition.NO_EFFECT


def _only_text(value: Any) -> bool:
    """["text", "text"] asks for text as ["text"] does: the schema (a list of "text") lets it through."""
    return isinstance(value, list) and all(v == "text" for v in value)

_SHARED: dict[str, Param] = {
    "model": Param(H, "must be the served model (an enum in the OpenAPI schema); else 404"),
    "max_tokens": Param(H, "≤ what is left of max_seq_len after the prompt"),
    "temperature": Param(H, "0–2, finite; below 1e-5 it is greedy"),
    "top_p": Param(H, "(0, 1]"),
    "seed": Param(H, "per-request generator: same seed, same tokens whatever the batch"),
    "stop": Param(H, "up to 4 strings, applied to the text"),
    "stream": Param(H, "server-sent events"),
    "stream_options": Param(H, "include_usage"),
    "n": Param(H, "1 only; more is a 400 (schema maximum 1)"),
    "frequency_penalty": Param(R, "not implemented by the engines; 0 accepted", (None, 0, 0.0)),
    "presence_penalty": Param(R, "not implemented by the engines; 0 accepted", (None, 0, 0.0)),
    "logit_bias": Param(R, "not implemented by the engines; {} accepted", (None, {})),
    "user": Param(N, "an end-user id for OpenAI's abuse monitoring"),
}

COMPLETIONS: dict[str, Param] = {
    **_SHARED,
    "prompt": Param(H, "text, token ids, or a list of one text"),
    "suffix": Param(R, "insertion (fill-in-the-middle) is not served", (None,)),
    "echo": Param(R, "the prompt is not echoed; false accepted", (None, False)),
    "logprobs": Param(R, "log probabilities are not returned; null accepted", (None,)),
    "best_of": Param(R, "one candidate per request; 1 accepted", (None, 1)),
}

CHAT: dict[str, Param] = {
    **_SHARED,
    "messages": Param(H, "rendered with the model's chat template"),
    "max_completion_tokens": Param(H, "as max_tokens; default: what is left of max_seq_len"),
    "response_format": Param(H, "text, json_object, json_schema (strict or not: always enforced by the "
                                "grammar)"),
    "tools": Param(H, "functions; answered as tool_calls"),
    "tool_choice": Param(H, "auto, required, a named function, none; auto needs a chat template that renders "
                            "tools in a known call syntax (Hermes <tool_call>, Llama 3.1 JSON), else 400"),
    "parallel_tool_calls": Param(H, "false: at most one call; true/absent: several in a template's call syntax "
                                    "(one JSON call where the template renders no tools)"),
    "logprobs": Param(R, "log probabilities are not returned; false accepted", (None, False)),
    "top_logprobs": Param(R, "log probabilities are not returned", (None, 0)),
    "audio": Param(R, "text only"),
    "modalities": Param(R, 'text only; ["text"] accepted', (None, [], ["text"]), _only_text),
    "prediction": Param(R, "predicted outputs are not served"),
    "web_search_options": Param(R, "no web search"),
    "functions": Param(R, "deprecated by OpenAI: use tools"),
    "function_call": Param(R, "deprecated by OpenAI: use tool_choice"),
    "reasoning_effort": Param(R, "not a reasoning model"),
    "verbosity": Param(R, "not a reasoning model"),
    "store": Param(R, "completions are not stored; false accepted", (None, False)),
    "metadata": Param(N, "tags for stored completions (none are stored)"),
    "service_tier": Param(N, "OpenAI's processing tiers"),
    "safety_identifier": Param(N, "an end-user id for OpenAI's abuse monitoring"),
    "prompt_cache_key": Param(N, "OpenAI's cache routing hint; prefix reuse here needs no key"),
    "prompt_cache_retention": Param(N, "OpenAI's cache retention"),
}


def refuse_unless_no_op(table: dict[str, Param], name: str, value: Any) -> Any:
    """For a pydantic before-validator: `value` when it asks for nothing, else the reason as ValueError
    (pydantic puts the field name in the error's location: the 400 names the parameter)."""
    param = table[name]
    accepted = any(_same(value, v) for v in param.no_op) or (param.is_no_op is not None and param.is_no_op(value))
    if param.disposition is Disposition.REFUSED and not accepted:
        raise ValueError(f"{name} is not supported by this deployment: {param.note}")
    return value


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but 0 is not `false` (Python says 0 == False)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def refused(table: dict[str, Param]) -> list[str]:
    return [name for name, p in table.items() if p.disposition is Disposition.REFUSED]
