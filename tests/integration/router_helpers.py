"""Shared by the router integration tests: a token-id tokenizer for fake engines, the tiny deployment,
an SSE completion reader, the record-walk check, and (from the unit router testkit, so there is one copy)
uvicorn serving an app in the test's event loop."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI

from router.records import RequestRecord
from router.settings import RouterSettings
from tests.unit.router.router_testkit import serve
from trt_disagg.config import Deployment, load_deployment
from trt_disagg.contract import Role
from trt_disagg.registry_read import get_load, list_instances
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.triton.fake_engine import FAKE_SHAPE, fake_next_token

__all__ = ["DISAGG_WALK", "EOS", "IdTokenizer", "Streamed", "assert_walk", "expected", "serve", "stream_completion",
           "on_instance", "tiny", "wait_idle", "within"]

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


@contextmanager
def running_tiny(root: Path, num_decode: int) -> Iterator[LocalCluster]:
    """The tiny deployment with `num_decode` decode instances, built into `root` and served (no router
    process: tests run the router app in their own event loop)."""
    from trt_disagg.engine_build.builder import build_deployment

    dep = tiny(num_decode)
    build_deployment(dep, engines_root=root)
    cluster = LocalCluster(dep, engines_root=root, start_router=False, ready_timeout_s=240)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def router_settings(cluster: LocalCluster, root: Path, router_id: str, **overrides: object) -> RouterSettings:
    """Settings of a router for `cluster` (its tokenizer from the colocated engine in `root`)."""
    return RouterSettings.from_deployment(cluster.dep, str(cluster.redis_url), port=0, router_id=router_id,
                                          engine_dir=cluster.dep.engine_dir(Role.COLOCATED, root), **overrides)


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


T = TypeVar("T")


async def within(timeout_s: float, awaitable: Awaitable[T], app: FastAPI) -> T:
    """`await awaitable`, failing after `timeout_s` with what the router still holds (each unfinished job's
    state, legs and token count) and every task's stack: a hang becomes a failure that says where."""
    try:
        async with asyncio.timeout(timeout_s):
            return await awaitable
    except TimeoutError:
        out = io.StringIO()
        runner = app.state.router.runner
        for job in list(runner.requests.active.values()) if runner is not None else []:
            legs = {k.value: v.instance_id for k, v in job.legs.open.items()}
            print(f"job {job.request_id}: {job.state} legs={legs} generated={len(job.generated)} "
                  f"remaining={job.remaining} unpulled_kv={job.legs.unpulled}", file=out)
        for task in asyncio.all_tasks():
            print(f"--- task {task.get_name()}: {task.get_coro()}", file=out)
            task.print_stack(limit=25, file=out)
        raise AssertionError(f"not done within {timeout_s}s; the router holds:\n{out.getvalue()}") from None


async def wait_idle(redis_url: str, role: Role, timeout_s: float = 30.0) -> None:
    """Until every `role` instance publishes no running sequence: a test that checks how work is spread must
    not start while the previous test's load is still what the instances last published (every 0.5 s)."""
    client = aioredis.from_url(redis_url)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                loads = [await get_load(client, i.instance_id) for i in await list_instances(client, role)]
                if loads and all(load is not None and load.running_sequences == 0 for load in loads):
                    return
                await asyncio.sleep(0.1)  # polling what another process publishes
    finally:
        await client.aclose()


def on_instance(app: FastAPI, instance_id: str) -> list[str]:
    """The requests `app` has in flight with a leg on `instance_id`."""
    requests = app.state.router.runner.requests
    return [job.request_id for job in list(requests.active.values())
            if any(leg.instance_id == instance_id for leg in job.legs.open.values())]
