"""What the completion and chat routes share: deployment limits, admission, streaming or not."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from router.admission import retry_count
from router.deps import get_runner, get_settings, get_tokenizer
from router.errors import BadRequest, ModelNotFound, PromptTooLong, RouterError
from router.job import Job
from router.pipeline import RequestRunner
from router.received import received_s
from router.schemas import _Sampling
from router.settings import RouterSettings
from router.streaming import ChunkFn, Primed, SSEResponse, collect, prime, sse_events
from router.tokenizer import TextTokenizer
from trt_disagg.contract import Guide

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request (OpenAI error body)"},
    404: {"description": "unknown model"},
    429: {"description": "queues full; see Retry-After"},
    502: {"description": "an instance failed"},
    503: {"description": "no instance available"},
    504: {"description": "deadline exceeded"},
}


def check_model(model: str, settings: RouterSettings) -> None:
    if model != settings.served_model_name:
        raise ModelNotFound(f"model {model!r} is not served here; available: {settings.served_model_name!r}",
                            param="model")


def check_prompt(prompt_ids: list[int], settings: RouterSettings, tokenizer: TextTokenizer, param: str) -> None:
    if not prompt_ids:
        raise BadRequest(f"{param}: the prompt is empty after tokenization", param=param)
    if len(prompt_ids) > settings.max_input_len:
        raise PromptTooLong(f"{param}: the prompt has {len(prompt_ids)} tokens; this deployment takes at most "
                            f"{settings.max_input_len} (max_input_len)", param=param)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and any(t >= vocab for t in prompt_ids):
        raise BadRequest(f"{param}: token ids must be < {vocab} (the vocabulary size)", param=param)


def resolve_max_tokens(requested: int | None, prompt_len: int, settings: RouterSettings, param: str,
                       default_to_room: bool = False) -> int:
    """The token budget: as requested (≤ what max_seq_len leaves after the prompt), else max_tokens_default
    (completions) or all that is left (chat, as OpenAI: "up to the context length")."""
    room = settings.max_seq_len - prompt_len
    if requested is None:
        return max(1, room if default_to_room else min(settings.max_tokens_default, room))
    if requested > room:
        raise BadRequest(f"{param}={requested} is too large: the prompt has {prompt_len} tokens and "
                         f"max_seq_len is {settings.max_seq_len}, so at most {room} can be generated",
                         param=param)
    return requested


def end_id(settings: RouterSettings, tokenizer: TextTokenizer) -> int | None:
    return settings.end_id if settings.end_id is not None else tokenizer.eos_token_id


async def start(ctx: RouteContext, req: _Sampling, prompt_ids: list[int], max_tokens: int,
                guide: Guide | None = None) -> tuple[Job, Primed]:
    """Admit the request and run it to its first token (errors until then are plain HTTP errors)."""
    runner = ctx.runner
    sampling = req.sampling(max_tokens, end_id(ctx.settings, ctx.tokenizer), guide)
    job = runner.requests.admit(prompt_ids, sampling, req.model, stop=req.stop_strings, received_s=ctx.received_s,
                                retry_count=ctx.retry_count)
    return job, await prime(runner.tokens(job), lambda: runner.stop_at_string(job))


def stream_response(job: Job, primed: Primed, tokenizer: TextTokenizer, chunk: ChunkFn, include_usage: bool,
                    opening: dict[str, Any] | None = None) -> Response:
    body = sse_events(job, primed, tokenizer, chunk, include_usage=include_usage, opening=opening)
    return SSEResponse(body, headers={"X-Request-Id": job.request_id, "Cache-Control": "no-cache"})


def created_now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class RouteContext:
    """The three dependencies every generation route takes, resolved once through `Depends`."""

    runner: RequestRunner
    settings: RouterSettings
    tokenizer: TextTokenizer
    received_s: float  # monotonic: when the router first saw the request (router/received.py)
    retry_count: int | None = None  # what the client says (admission.RETRY_COUNT_HEADER); None: nothing


async def route_context(request: Request, runner: RequestRunner = Depends(get_runner),
                        settings: RouterSettings = Depends(get_settings),
                        tokenizer: TextTokenizer = Depends(get_tokenizer)) -> RouteContext:
    return RouteContext(runner, settings, tokenizer, received_s(request),
                        retry_count(request.headers))


RouteCtx = Annotated[RouteContext, Depends(route_context)]


@dataclass(frozen=True)
class Started:
    job: Job
    primed: Primed
    created: int


async def begin(ctx: RouteContext, req: _Sampling, prompt_ids: list[int], requested_max_tokens: int | None, *,
                prompt_param: str, max_tokens_param: str, guide: Guide | None = None,
                default_to_room: bool = False) -> Started:
    """The part of a generation route after the prompt is tokenized: limits, admission, first token.

    `prompt_param`/`max_tokens_param` name the request fields that errors point at; `guide` constrains the
    answer (its prompt_len is set here: the grammar starts after this prompt)."""
    check_prompt(prompt_ids, ctx.settings, ctx.tokenizer, prompt_param)
    max_tokens = resolve_max_tokens(requested_max_tokens, len(prompt_ids), ctx.settings, max_tokens_param,
                                    default_to_room)
    if guide is not None:
        guide = dataclasses.replace(guide, prompt_len=len(prompt_ids))
    job, primed = await start(ctx, req, prompt_ids, max_tokens, guide)
    return Started(job, primed, created_now())


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up; nobody reads it, logs do


async def collect_unless_disconnected(request: Request, run: Started, tokenizer: TextTokenizer) -> str | None:
    """All tokens of a non-streaming request as text, or None when the client hung up first.

    A client that hangs up cancels the collection: the request's generator unwinds as for a streaming
    client that went away (CANCELLED record, both legs cancelled, un-pulled KV released). The disconnect
    is the ASGI `http.disconnect` message, awaited (not polled) once the body has been read."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting = asyncio.ensure_future(collect(run.job, run.primed, tokenizer))
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (collecting, watching):
            task.cancel()  # no-op for the one that finished
        await asyncio.wait({collecting, watching})  # both unwound (the request's generator included)
    if collecting.cancelled():
        await run.primed.rest.aclose()
        return None
    return collecting.result()


__all__ = ["CLIENT_CLOSED_REQUEST", "ERROR_RESPONSES", "RouteContext", "RouteCtx", "RouterError", "Started", "begin",
           "check_model", "check_prompt", "collect_unless_disconnected", "created_now", "end_id",
           "resolve_max_tokens", "route_context", "start", "stream_response"]
