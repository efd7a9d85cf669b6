"""Shared by the router integration tests: a token-id tokenizer for fake engines, the tiny deployment,
an SSE completion reader, the record-walk check, and (from the unit router testkit, so there is one copy)
uvicorn serving an app in the test's event loop."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

import httpx

from router.records import RequestRecord
from tests.unit.router.router_testkit import serve
from trt_disagg.config import Deployment, load_deployment
from trt_disagg.triton.fake_engine import FAKE_SHAPE, fake_next_token

__all__ = ["DISAGG_WALK", "EOS", "IdTokenizer", "Streamed", "assert_walk", "expected", "serve", "stream_completion",
           "tiny"]

REPO = Path(__file__).resolve().parents[2]
EOS = int(FAKE_SHAPE.eos_token_id or 2)
DISAGG_WALK = ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILL_DONE", "DECODE_DISPATCHED", "DECODING", "DONE"]


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


@dataclass(frozen=True)
class Streamed:
    """What a client read from one streaming completion."""

    request_id: str
    text: str
    num_chunks: int  # text chunks (one per detokenized delta)
    error: str | None  # the message of a final SSE error chunk


async def stream_completion(http: httpx.AsyncClient, url: str, prompt: str | list[int], max_tokens: int,
                            started: asyncio.Event | None = None) -> Streamed:
    """POST a streaming greedy /v1/completions and read it to [DONE]; sets `started` after two text chunks
    (the request is then past its prefill and streaming from a decode instance)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    text: list[str] = []
    error = None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        rid = resp.headers["x-request-id"]
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            if chunk["choices"][0]["text"]:
                text.append(chunk["choices"][0]["text"])
            if started is not None and len(text) >= 2:
                started.set()
    return Streamed(rid, "".join(text), len(text), error)


def assert_walk(rec: RequestRecord | None, states: list[str]) -> None:
    """The record walked exactly `states`, in order, each event stamped no earlier than the one before."""
    assert rec is not None
    walked = [e["state"] for e in rec.events]
    assert walked == states, walked
    stamps = [float(e["ts"]) for e in rec.events]
    assert stamps == sorted(stamps), stamps
