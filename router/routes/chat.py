"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, streaming or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from router.errors import BadRequest
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
from router.streaming import usage

router = APIRouter()


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def create_chat_completion(req: ChatRequest, ctx: RouteCtx, request: Request) -> Response:
    check_model(req.model, ctx.settings)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    try:
        prompt_ids = ctx.tokenizer.chat_prompt_ids(messages)
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise BadRequest(f"messages cannot be rendered with the chat template: {exc}", param="messages") from None
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    run = await begin(ctx, req, prompt_ids, req.requested_max_tokens, prompt_param="messages",
                      max_tokens_param=param)
    job = run.job

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"id": job.request_id, "object": "chat.completion.chunk", "created": run.created, "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    if req.stream:
        opening = chunk(None, None)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return stream_response(job, run.primed, ctx.tokenizer, chunk, req.include_usage, opening)
    text = await collect_unless_disconnected(request, run, ctx.tokenizer)
    if text is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = {"id": job.request_id, "object": "chat.completion", "created": run.created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": job.finish_reason or "stop", "logprobs": None}],
            "usage": usage(job)}
    return JSONResponse(body, headers={"X-Request-Id": job.request_id})
