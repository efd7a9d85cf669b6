"""POST /v1/completions: OpenAI's legacy completion API, streaming (SSE) or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from router.deps import get_runner, get_settings, get_tokenizer
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
from router.schemas import CompletionRequest
from router.settings import RouterSettings
from router.streaming import collect, usage
from router.tokenizer import TextTokenizer

router = APIRouter()


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def create_completion(req: CompletionRequest, runner: RequestRunner = Depends(get_runner),
                            settings: RouterSettings = Depends(get_settings),
                            tokenizer: TextTokenizer = Depends(get_tokenizer)) -> Response:
    check_model(req.model, settings)
    if isinstance(req.prompt, str):
        prompt_ids = tokenizer.encode(req.prompt)
    elif isinstance(req.prompt[0], str):
        prompt_ids = tokenizer.encode(str(req.prompt[0]))
    else:
        prompt_ids = [int(t) for t in req.prompt]
    check_prompt(prompt_ids, settings, tokenizer, "prompt")
    max_tokens = resolve_max_tokens(req.max_tokens, len(prompt_ids), settings, "max_tokens")
    job, primed = await start(runner, req, prompt_ids, max_tokens, settings, tokenizer)
    created = created_now()

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        return {"id": job.request_id, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

    if req.stream:
        return stream_response(job, primed, tokenizer, chunk, req.include_usage)
    text = await collect(job, primed, tokenizer)
    body = chunk(text, job.finish_reason or "stop")
    body["usage"] = usage(job)
    return JSONResponse(body, headers={"X-Request-Id": job.request_id})
