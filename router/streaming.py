"""From a token stream to what the client reads: OpenAI SSE chunks, or one JSON body.

    first = await prime(tokens)          errors before the first token become a real HTTP status (429/503/…)
    SSEResponse(sse_events(...))          data: {chunk}\n\n ... data: [DONE]\n\n
                                          an error after the first byte: a final `data: {"error": ...}` chunk

`SSEResponse` always listens for the client's disconnect while streaming (whatever ASGI version the
server speaks) and closes the body iterator when the response ends, so the request generator's cleanup —
CANCELLED record, both legs cancelled — runs at once instead of whenever the generator is collected.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router.errors import RouterError, error_body
from router.job import Job
from router.text import TextStream
from router.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

DONE_LINE = b"data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()  # cancels the streaming below too: it runs in the same scope

                tg.start_soon(watch)
                # The stream runs in this task, not a new one: the first token (already there, see `prime`)
                # goes out now, not after the loop has got round to starting another task.
                await self.stream_response(send)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


@dataclass
class Primed:
    """A token stream whose first token (if any) has already been produced."""

    head: list[int]
    rest: AsyncGenerator[int, None]
    stop_at_string: Callable[[], Awaitable[None]]  # ends the request normally here (the text hit a stop string)

    async def __aiter__(self) -> AsyncIterator[int]:
        for t in self.head:
            yield t
        async for t in self.rest:
            yield t


async def prime(tokens: AsyncGenerator[int, None], stop_at_string: Callable[[], Awaitable[None]]) -> Primed:
    """Run the request until its first token, so admission and dispatch errors are still HTTP errors."""
    try:
        first = await anext(tokens)
    except StopAsyncIteration:
        return Primed([], tokens, stop_at_string)
    except BaseException:
        await tokens.aclose()
        raise
    return Primed([first], tokens, stop_at_string)


def _line(obj: dict[str, Any]) -> bytes:
    # orjson: compact like json.dumps(separators=(",", ":")), UTF-8 rather than \u escapes, ~10x faster
    # (one call per streamed token)
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(job: Job) -> dict[str, int]:
    n_in, n_out = len(job.prompt_ids), len(job.generated)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


ChunkFn = Callable[[str | None, str | None], dict[str, Any]]


async def sse_events(job: Job, primed: Primed, tokenizer: TextTokenizer, chunk: ChunkFn, *,
                     include_usage: bool, opening: dict[str, Any] | None = None) -> AsyncGenerator[bytes, None]:
    """SSE lines: optional opening chunk, one chunk per text delta, the finish chunk, usage, [DONE]."""
    text = TextStream(tokenizer, job.stop)
    stream = aiter(primed)
    try:
        if opening is not None:
            yield _line(opening)
        async for token in stream:
            delta = text.add(token)
            if delta:
                yield _line(chunk(delta, None))
            if text.stopped:
                await primed.stop_at_string()
                break
        tail = text.flush()
        yield _line(chunk(tail, job.finish_reason or "stop"))
        if include_usage:
            body = chunk(None, None)
            body["choices"] = []
            body["usage"] = usage(job)
            yield _line(body)
    except RouterError as exc:
        yield _line(exc.body())
    except Exception:
        log.exception("stream of %s failed", job.request_id)
        yield _line(error_body("internal error", "server_error"))
    finally:
        await primed.rest.aclose()
    yield DONE_LINE


async def collect(job: Job, primed: Primed, tokenizer: TextTokenizer) -> str:
    """All tokens of a non-streaming request, as text (up to its first stop string)."""
    text = TextStream(tokenizer, job.stop)
    parts = []
    async for token in primed:
        parts.append(text.add(token))
        if text.stopped:
            await primed.stop_at_string()
            await primed.rest.aclose()  # its instance calls cancelled
            break
    parts.append(text.flush())
    return "".join(parts)
