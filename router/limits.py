"""Input limits applied before the router does any work on a request.

    RequestBodyLimit    ASGI middleware: a body over max_body_bytes is refused with 413 — at once when
                        Content-Length says so, else as soon as the bytes read pass the limit — so a 100 MB
                        upload is never held in memory and never stalls the event loop
    encode_text /       prompt text → token ids: refused with 400 when it has more characters than
    encode_chat         max_input_len tokens could ever take (max_chars_per_token each), before tokenizing;
                        long texts are tokenized in a worker thread so /health and every stream keep going

The character cap is what makes the tokenizer's cost bounded: a prompt that cannot fit is refused for the
price of `len()`, whatever its size.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import BadRequest, PromptTooLong, error_body
from router.settings import RouterSettings
from router.tokenizer import TextTokenizer

# Below this many characters tokenizing costs less than handing the text to a thread (~0.1 ms).
INLINE_TOKENIZE_CHARS = 4096


class RequestBodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self._app = app
        self._max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            await self._too_large()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max:  # a body without Content-Length (chunked) that grew past the limit
                    raise HTTPException(413, self._message())
            return message

        await self._app(scope, counted, send)

    def _message(self) -> str:
        return f"request body exceeds {self._max} bytes (max_body_bytes)"

    def _too_large(self) -> JSONResponse:
        return JSONResponse(error_body(self._message(), "invalid_request_error", None, "request_too_large"),
                            status_code=413, headers={"Connection": "close"})


def check_chars(num_chars: int, settings: RouterSettings, param: str) -> None:
    limit = settings.max_input_len * settings.max_chars_per_token
    if num_chars > limit:
        raise PromptTooLong(f"{param}: {num_chars} characters cannot fit in max_input_len={settings.max_input_len} "
                            f"tokens (at most {limit} characters are tokenized)", param=param)


async def encode_text(tokenizer: TextTokenizer, text: str, settings: RouterSettings, param: str) -> list[int]:
    check_chars(len(text), settings, param)
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return tokenizer.encode(text)
    return await asyncio.to_thread(tokenizer.encode, text)


async def encode_chat(tokenizer: TextTokenizer, messages: list[dict[str, Any]], settings: RouterSettings,
                      param: str = "messages", tools: list[dict[str, Any]] | None = None) -> list[int]:
    """`tools` go to a template that renders them (HFTokenizer's `tools=`); None for any other tokenizer."""
    num_chars = sum(len(str(m.get("content") or "")) for m in messages)
    num_chars += len(json.dumps(tools)) if tools else 0  # the template writes them into the prompt
    check_chars(num_chars, settings, param)
    render = partial(tokenizer.chat_prompt_ids, tools=tools) if tools is not None else tokenizer.chat_prompt_ids
    try:
        if num_chars <= INLINE_TOKENIZE_CHARS:
            return render(messages)
        return await asyncio.to_thread(render, messages)
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise BadRequest(f"messages cannot be rendered with the chat template: {exc}", param=param) from None
