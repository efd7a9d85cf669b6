"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, streaming or not.

Structured output (`response_format`) and tool calls (`tools`, `tool_choice`) become a grammar the
engines decode under (router/structured.py); a tool-call answer is turned into `tool_calls`
(router/tools.py). Ids are `chatcmpl-…` (the X-Request-Id header keeps the request's record id). Without
max_tokens / max_completion_tokens the budget is what max_seq_len leaves after the prompt, as OpenAI's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from router.errors import BadRequest
from router.limits import encode_chat
from router.routes.common import (
    CLIENT_CLOSED_REQUEST,
    ERROR_RESPONSES,
    RouteCtx,
    begin,
    check_model,
    collect_unless_disconnected,
    stream_response,
)
from router.schemas import ChatRequest
from router.settings import RouterSettings
from router.streaming import usage
from router.structured import ToolPlan, guide_for, template_tools, tool_plan, with_tools_message
from router.tools import (
    BaseChunkFn,
    ChunkFn,
    answer_message,
    template_answer_message,
    template_call_chunks,
    tool_call_chunks,
)

router = APIRouter()


def prompt_messages(req: ChatRequest, plan: ToolPlan) -> list[dict[str, str]]:
    """The messages the chat template renders: `developer` as `system`; the called tools described up front
    unless the template renders them itself."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    return with_tools_message(messages, plan.calls) if plan.calls and plan.syntax is None else messages


def plan_tools(req: ChatRequest, tokenizer: object) -> ToolPlan:
    """The request's tool plan against the tokenizer's chat template (whether and how it renders tools)."""
    template = template_tools(getattr(tokenizer, "chat_template", None))
    return tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls, template)


def check_shadowed_max_tokens(req: ChatRequest, settings: RouterSettings) -> None:
    """`max_tokens` is refused over its limit even when `max_completion_tokens` takes its place: the schema
    states that limit per field, and a value this deployment can never serve is a client's mistake."""
    limit = settings.max_seq_len - 1
    if req.max_completion_tokens is not None and req.max_tokens is not None and req.max_tokens > limit:
        raise BadRequest(f"max_tokens={req.max_tokens} is too large: max_seq_len is {settings.max_seq_len}, so "
                         f"at most {limit} can ever be generated", param="max_tokens")


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def create_chat_completion(req: ChatRequest, ctx: RouteCtx, request: Request) -> Response:
    check_model(req.model, ctx.settings)
    check_shadowed_max_tokens(req, ctx.settings)
    plan = plan_tools(req, ctx.tokenizer)
    guide = guide_for(req.response_format, plan)
    prompt_ids = await encode_chat(ctx.tokenizer, prompt_messages(req, plan), ctx.settings,
                                   tools=plan.template_tools())
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    run = await begin(ctx, req, prompt_ids, req.requested_max_tokens, prompt_param="messages",
                      max_tokens_param=param, guide=guide, default_to_room=True)
    job = run.job
    chat_id = chat_completion_id(job.request_id)

    def base(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": chat_id, "object": "chat.completion.chunk", "created": run.created, "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        return base({"content": text} if text else {}, finish)

    if req.stream:
        opening = base({"role": "assistant", "content": ""}, None)
        return stream_response(job, run.primed, ctx.tokenizer, answer_chunks(plan, base, chunk),
                               req.include_usage, opening)
    text = await collect_unless_disconnected(request, run, ctx.tokenizer)
    if text is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finish = job.finish_reason or "stop"
    message, finish = final_message(plan, text, finish)
    body = {"id": chat_id, "object": "chat.completion", "created": run.created, "model": req.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage(job)}
    return JSONResponse(body, headers={"X-Request-Id": job.request_id})


def answer_chunks(plan: ToolPlan, base: BaseChunkFn, text_chunk: ChunkFn) -> ChunkFn:
    """The streaming chunk function of the plan: plain text, one JSON call, or the template's call syntax."""
    if not plan.calls:
        return text_chunk
    if plan.syntax is None:
        return tool_call_chunks(base, plan.names)
    return template_call_chunks(base, plan.syntax, plan.names)


def final_message(plan: ToolPlan, text: str, finish: str) -> tuple[dict[str, Any], str]:
    """(message, finish_reason) of a non-streamed answer under the plan."""
    if not plan.calls:
        return {"role": "assistant", "content": text}, finish
    if plan.syntax is None:
        return answer_message(text, finish, plan.names)
    return template_answer_message(text, finish, plan.syntax, plan.names)


def chat_completion_id(request_id: str) -> str:
    """OpenAI's `chatcmpl-` id for the request whose record id is `request_id` (`cmpl-<hex>`)."""
    return "chatcmpl-" + request_id.removeprefix("cmpl-")
