"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, streaming or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from router.deps import get_runner, get_settings, get_tokenizer
from router.errors import BadRequest
from router.pipeline import RequestRunner
from router.routes.common import (
    ERROR_RESPONSES,
    check_model,
    check_prompt,
    created_now,
    resolve_max_tokens,
    start,
    stream_response,
)
from router.schemas import ChatRequest
from router.settings import RouterSettings
from router.streaming import collect, usage
from router.tokenizer import TextTokenizer

router = APIRouter()


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def create_chat_completion(req: ChatRequest, runner: RequestRunner = Depends(get_runner),
                                 settings: RouterSettings = Depends(get_settings),
                                 tokenizer: TextTokenizer = Depends(get_tokenizer)) -> Response:
    check_model(req.model, settings)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    try:
        prompt_ids = tokenizer.chat_prompt_ids(messages)
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise BadRequest(f"messages cannot be rendered with the chat template: {exc}", param="messages") from None
    check_prompt(prompt_ids, settings, tokenizer, "messages")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(req.requested_max_tokens, len(prompt_ids), settings, param)
    job, primed = await start(runner, req, prompt_ids, max_tokens, settings, tokenizer)
    created = created_now()

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"id": job.request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    if req.stream:
        opening = chunk(None, None)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return stream_response(job, primed, tokenizer, chunk, req.include_usage, opening)
    text = await collect(job, primed, tokenizer)
    body = {"id": job.request_id, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": job.finish_reason or "stop", "logprobs": None}],
            "usage": usage(job)}
    return JSONResponse(body, headers={"X-Request-Id": job.request_id})
