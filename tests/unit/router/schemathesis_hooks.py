"""schemathesis hooks of the router's bounded run (`SCHEMATHESIS_HOOKS=tests.unit.router.schemathesis_hooks`).

The OpenAPI schema states every per-field limit the router checks (router/openapi.py). Three documented
rules compare fields with each other or with the tokenized prompt, which JSON Schema cannot say:

    min_tokens > 0                 needs max_tokens (max_completion_tokens) <= min_tokens
    prompt tokens                  <= max_input_len
    prompt tokens + max_tokens     <= max_seq_len

Tightening the per-field maxima until every combination fits (max_tokens <= max_seq_len - max_input_len,
min_tokens 0 only) would make the schema refuse requests the router rightly serves, and schemathesis'
negative checks would then fail on those instead. So the schema stays exact per field, and this hook
skips the *positive* cases that break one of these rules: nothing claims they are valid. The prompt is
counted exactly as the route counts it (the route's own message rendering, the router's tokenizer: the
fake one, or the real engines' from TRTD_SCHEMATHESIS_ENGINE_DIR);
negative cases are left alone: the router must refuse them whichever rule they break.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import schemathesis
from pydantic import ValidationError
from schemathesis import GenerationMode

from router.errors import BadRequest
from router.routes.chat import plan_tools, prompt_messages
from router.schemas import ChatRequest, CompletionRequest
from router.structured import guide_for
from router.tokenizer import HFTokenizer, TextTokenizer
from tests.unit.router.router_testkit import FakeTokenizer

MAX_INPUT_LEN = int(os.environ.get("TRTD_SCHEMATHESIS_MAX_INPUT_LEN", "256"))
MAX_SEQ_LEN = int(os.environ.get("TRTD_SCHEMATHESIS_MAX_SEQ_LEN", "512"))
# The router's tokenizer when it serves real engines (their engine dir); unset: the fake instances' tokenizer.
ENGINE_DIR = os.environ.get("TRTD_SCHEMATHESIS_ENGINE_DIR")


@functools.cache
def router_tokenizer() -> TextTokenizer:
    """The tokenizer the router under test counts and renders prompts with (its chat template included)."""
    return HFTokenizer.from_engine_dir(Path(ENGINE_DIR)) if ENGINE_DIR else FakeTokenizer()


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Keep every case but a positive one that breaks a cross-field rule."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return True
    body = case.body
    if not isinstance(body, dict) or case.path not in ("/v1/completions", "/v1/chat/completions"):
        return True
    return within_cross_field_rules(case.path, body)


def within_cross_field_rules(path: str, body: dict[str, Any]) -> bool:
    requested = as_int(body.get("max_completion_tokens")) if path.endswith("chat/completions") else None
    requested = requested if requested is not None else as_int(body.get("max_tokens"))
    min_tokens = as_int(body.get("min_tokens"))
    if min_tokens is not None and min_tokens > 0 and (requested is None or requested > min_tokens):
        return False
    try:
        req = (ChatRequest if path.endswith("chat/completions") else CompletionRequest).model_validate(body)
    except ValidationError:
        return True  # invalid on its own, per field: what the router answers is schemathesis' to judge
    if isinstance(req, ChatRequest) and not tool_rules_hold(req):
        return False
    num_prompt = prompt_tokens(req)
    return num_prompt <= MAX_INPUT_LEN and num_prompt + (requested or 1) <= MAX_SEQ_LEN


def tool_rules_hold(req: ChatRequest) -> bool:
    """Chat's tool rules compare fields too: tool_choice against tools, response_format against a tool
    call, and `auto` is refused while the model's chat template renders no tools (the router's tokenizer's)."""
    try:
        guide_for(req.response_format, plan_tools(req, router_tokenizer()))
    except BadRequest:
        return False
    return True


def as_int(value: Any) -> int | None:
    """A JSON integer (7 or 7.0), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if float(value).is_integer() else None


def prompt_tokens(req: ChatRequest | CompletionRequest) -> int:
    """The prompt's token count as the route computes it (its message rendering, the test router's tokenizer)."""
    tokenizer = router_tokenizer()
    if isinstance(req, ChatRequest):
        plan = plan_tools(req, tokenizer)
        return len(tokenizer.chat_prompt_ids(prompt_messages(req, plan), **tools_kwarg(plan.template_tools())))
    prompt = req.prompt
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt))
    if prompt and isinstance(prompt[0], str):
        return len(tokenizer.encode(str(prompt[0])))
    return len(prompt)


def tools_kwarg(tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """`tools=` only for a template that renders them (the fake tokenizer takes no such argument)."""
    return {} if tools is None else {"tools": tools}
