"""A fake OpenAI-compatible streaming completions server: the load generator's test double.

It ships with the benchmark (as the fake KV transport ships with the real ones) so that tests, and
`benchmarks/loadgen_accuracy.py`, can measure the load generator against a server whose timing is known.
It behaves like a router streaming tokens, with delays the caller controls and failures chosen by the prompt:

    prompt contains    behaviour
    "fail-http"        HTTP 500 with an OpenAI-style error body
    "fail-stream"      two tokens, then an SSE error chunk (a 200 has already gone out)
    "drop"             two tokens, then the stream closes without `data: [DONE]`
    "multi"            two tokens per chunk (the count comes from `usage`)
    anything else      `max_tokens` tokens, one per chunk, then a usage chunk and [DONE]

Chat completions (`POST /v1/chat/completions`, streaming) answer `max_tokens` words; `usage.prompt_tokens`
counts the words of every message. Like the router, each chat request gets a record id (`X-Request-Id`)
whose `GET /v1/requests/{id}` shows `matched_tokens`: the longest word prefix the prompt shares with an
earlier chat prompt + its answer (one infinite prefix cache).

and, set on `FakeBehaviour`: every `refuse_every`-th request is refused with HTTP 400 (a prompt the server
does not take), and `GET /v1/models/{id}` states `max_input_len` / `max_model_len` when they are set.
`usage.prompt_tokens` counts token ids, or the words of a text prompt.

Runs in a thread on a socket bound (and listening) before the thread starts, so clients never race the
start-up; stopped with `should_exit` and joined.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"


@dataclass
class FakeBehaviour:
    ttft_delay_s: float = 0.0
    tpot_delay_s: float = 0.0
    serve_models: bool = True  # False: GET /v1/models is 404, only /health answers
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every completion request received
    refuse_every: int = 0  # > 0: every n-th completion request is refused with 400
    max_input_len: int | None = None  # stated in the model card when set
    max_model_len: int | None = None
    chat_contexts: list[list[str]] = field(default_factory=list)  # every chat prompt + answer, as words
    chat_matched: dict[str, int] = field(default_factory=dict)  # chat record id -> matched prompt words


def _chunk(text: str, finish: str | None) -> str:
    body = {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def create_app(behaviour: FakeBehaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        if not behaviour.serve_models:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    @app.get("/v1/models/{model_id}")
    async def model_card(model_id: str) -> JSONResponse:
        if not behaviour.serve_models or model_id != MODEL:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        card: dict[str, Any] = {"id": MODEL, "object": "model"}
        for key in ("max_input_len", "max_model_len"):
            if getattr(behaviour, key) is not None:
                card[key] = getattr(behaviour, key)
        return JSONResponse(card)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        behaviour.bodies.append(body)
        prompt = body["prompt"]
        text = prompt if isinstance(prompt, str) else ""
        if "fail-http" in text:
            return JSONResponse({"error": {"message": "engine exploded", "type": "server_error",
                                           "param": None, "code": 500}}, status_code=500)
        if behaviour.refuse_every and len(behaviour.bodies) % behaviour.refuse_every == 0:
            return JSONResponse({"error": {"message": "prompt: too many tokens", "type": "invalid_request_error",
                                           "param": "prompt", "code": "context_length_exceeded"}}, status_code=400)
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(text.split())
        return StreamingResponse(_stream(behaviour, text, int(body["max_tokens"]), prompt_tokens),
                                 media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        behaviour.bodies.append(body)
        words = [w for m in body["messages"] for w in str(m["content"]).split()]
        record_id = f"cmpl-{len(behaviour.bodies)}"
        behaviour.chat_matched[record_id] = max((_common(words, c) for c in behaviour.chat_contexts), default=0)
        answer = ["tok"] * int(body["max_tokens"])
        behaviour.chat_contexts.append(words + answer)
        return StreamingResponse(_chat_stream(behaviour, answer, len(words)), media_type="text/event-stream",
                                 headers={"x-request-id": record_id})

    @app.get("/v1/requests/{record_id}")
    async def request_record(record_id: str) -> JSONResponse:
        if record_id not in behaviour.chat_matched:
            return JSONResponse({"error": {"message": "unknown request"}}, status_code=404)
        return JSONResponse({"id": record_id, "state": "DONE",
                             "fields": {"matched_tokens": behaviour.chat_matched[record_id]}})

    return app


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _chat_stream(behaviour: FakeBehaviour, answer: list[str], prompt_tokens: int) -> AsyncIterator[str]:
    await asyncio.sleep(behaviour.ttft_delay_s)
    for k, word in enumerate(answer):
        if k:
            await asyncio.sleep(behaviour.tpot_delay_s)
        delta = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": f"{word} "}, "finish_reason": None}]}
        yield f"data: {json.dumps(delta)}\n\n"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer),
             "total_tokens": prompt_tokens + len(answer)}
    yield f"data: {json.dumps({'id': 'chatcmpl-1', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


async def _stream(behaviour: FakeBehaviour, text: str, max_tokens: int, prompt_tokens: int) -> AsyncIterator[str]:
    await asyncio.sleep(behaviour.ttft_delay_s)  # simulated prefill time
    per_chunk = 2 if "multi" in text else 1
    sent = 0
    while sent < max_tokens:
        if sent > 0:
            await asyncio.sleep(behaviour.tpot_delay_s * per_chunk)  # simulated decode steps
        n = min(per_chunk, max_tokens - sent)
        sent += n
        yield _chunk("tok" * n, "length" if sent == max_tokens else None)
        if sent == 2 and "fail-stream" in text:
            yield f"data: {json.dumps({'error': {'message': 'decode instance lost', 'code': 502}})}\n\n"
            return
        if sent == 2 and "drop" in text:
            return
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sent, "total_tokens": sent + prompt_tokens}
    yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


class FakeServer:
    """The fake server on 127.0.0.1, an ephemeral port; use as a context manager (stops and joins on exit)."""

    def __init__(self) -> None:
        self.behaviour = FakeBehaviour()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(512)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.behaviour), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("fake OpenAI server did not stop")

    def serve_foreground(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM, then close the socket."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._sock.close()

    def reset(self) -> None:
        self.behaviour.ttft_delay_s = 0.0
        self.behaviour.tpot_delay_s = 0.0
        self.behaviour.serve_models = True
        self.behaviour.bodies.clear()
        self.behaviour.refuse_every = 0
        self.behaviour.max_input_len = self.behaviour.max_model_len = None
        self.behaviour.chat_contexts.clear()
        self.behaviour.chat_matched.clear()


def main() -> None:
    """`python -m trt_disagg.bench.fake_openai [TTFT_DELAY_S TPOT_DELAY_S]`: serve in the foreground.

    Prints the URL on the first line of stdout; stops on SIGINT/SIGTERM (uvicorn's handlers). Used by
    benchmarks/loadgen_accuracy.py, so that the server does not share the load generator's GIL.
    """
    import sys

    server = FakeServer()
    if len(sys.argv) > 1:
        server.behaviour.ttft_delay_s = float(sys.argv[1])
    if len(sys.argv) > 2:
        server.behaviour.tpot_delay_s = float(sys.argv[2])
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()
    server.serve_foreground()


if __name__ == "__main__":
    main()
