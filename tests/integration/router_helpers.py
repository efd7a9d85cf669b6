"""Shared by the router integration tests: a token-id tokenizer for fake engines, the tiny deployment,
and uvicorn serving an app inside the test's event loop."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from trt_disagg.config import Deployment, load_deployment
from trt_disagg.triton.fake_engine import FAKE_SHAPE, fake_next_token

REPO = Path(__file__).resolve().parents[2]
EOS = int(FAKE_SHAPE.eos_token_id or 2)


class IdTokenizer:
    """Text is the ids spelled out, so the client's text gives back the exact token list."""

    eos_token_id = EOS
    vocab_size = FAKE_SHAPE.vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in re.findall(r"<(\d+)>", text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids if t != EOS)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return [1] + [t for m in messages for t in self.encode(m["content"])]


def expected(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = fake_next_token(seq)
        if t == EOS:
            break
        out.append(t)
        seq.append(t)
    return out


def tiny(num_decode: int = 1) -> Deployment:
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    assert dep.generation_servers is not None
    return dep.model_copy(update={"generation_servers": dep.generation_servers.model_copy(
        update={"num_instances": num_decode})})


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """uvicorn on 127.0.0.1 (a free port) in this event loop."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=10)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        await server.startup(sockets=[sock])
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            await server.shutdown(sockets=[sock])
    finally:
        sock.close()
