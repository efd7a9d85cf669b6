"""POST /v1/completions: OpenAI's legacy completion API, streaming (SSE) or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from router.limits import encode_text
from router.routes.common import (
    CLIENT_CLOSED_REQUEST,
    ERROR_RESPONSES,
    RouteCtx,
    begin,
    check_model,
    collect_unless_disconnected,
    stream_response,
)
from router.schemas import CompletionRequest
from router.streaming import usage

router = APIRouter()


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def create_completion(req: CompletionRequest, ctx: RouteCtx, request: Request) -> Response:
    check_model(req.model, ctx.settings)
    if isinstance(req.prompt, str):
        prompt_ids = await encode_text(ctx.tokenizer, req.prompt, ctx.settings, "prompt")
    elif isinstance(req.prompt[0], str):
        prompt_ids = await encode_text(ctx.tokenizer, str(req.prompt[0]), ctx.settings, "prompt")
    else:
        prompt_ids = [int(t) for t in req.prompt]
    run = await begin(ctx, req, prompt_ids, req.max_tokens, prompt_param="prompt", max_tokens_param="max_tokens")
    job = run.job

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        return {"id": job.request_id, "object": "text_completion", "created": run.created, "model": req.model,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

    if req.stream:
        return stream_response(job, run.primed, ctx.tokenizer, chunk, req.include_usage)
    text = await collect_unless_disconnected(request, run, ctx.tokenizer)
    if text is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = chunk(text, job.finish_reason or "stop")
    body["usage"] = usage(job)
    return JSONResponse(body, headers={"X-Request-Id": job.request_id})
