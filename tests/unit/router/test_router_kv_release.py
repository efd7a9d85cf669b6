"""KV a prefill instance offered goes back at once when no decode leg will take it: a request cancelled,
failed or finished between its prefill and its decode, or a decode leg lost before its first token.
The last test walks it with a real KV server (FakeEngine's block pool) behind the router's real releaser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterator

import httpx
import pytest

from router.instance_client import PrefillResult
from router.kv_release import OfferedKV, SocketKVReleaser
from router.states import RequestState as S
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    FakeTokenizer,
    RecordingKVReleaser,
    asgi_client,
    expected_tokens,
    make_router,
    records_of,
    register,
    register_pd,
    requests_of,
    serve,
)
from trt_disagg.contract import InstanceInfo, RequestType, Role, SamplingParams

TOK = FakeTokenizer()


async def first_token_then_hang_up(url: str, fake: FakeInstanceClient) -> str:
    """Stream a completion, read its first token (prefill done), wait until decode runs, hang up."""
    async with httpx.AsyncClient(base_url=url) as http:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            rid = resp.headers["x-request-id"]
            lines = resp.aiter_lines()  # kept: a dropped line iterator is finalized, which closes the response
            async for line in lines:
                if line.startswith("data: "):
                    break
            await asyncio.wait_for(fake.streams_started.wait(), timeout=10)
    return rid


async def test_client_gone_before_the_first_decode_token_releases_the_prefill_kv(valkey_url, redis):
    await register_pd(redis)
    fake = FakeInstanceClient(gates={"decode-0": asyncio.Event()})  # decode never gets to its first token
    releaser = RecordingKVReleaser()
    app = make_router(valkey_url, fake, releaser)
    async with serve(app) as url:
        rid = await first_token_then_hang_up(url, fake)  # (1) prefill done, decode dispatched, (2) hang up
        await asyncio.wait_for(requests_of(app).wait_settled(rid), timeout=10)
        await asyncio.wait_for(releaser.released.wait(), timeout=10)
        assert (await records_of(app).get(rid)).state is S.CANCELLED  # (3) cancelled ...
    assert [(r[0], r[1]) for r in releaser.releases] == [(rid, "prefill-0")]  # (4) ... and its KV given back
    assert b'"src": "prefill-0"' in releaser.releases[0][2]  # the handle prefill-0 issued


async def test_a_request_whose_decode_streamed_releases_nothing(valkey_url, redis):
    await register_pd(redis)
    releaser = RecordingKVReleaser()
    app = make_router(valkey_url, FakeInstanceClient(), releaser)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6})
        assert resp.json()["choices"][0]["text"] == TOK.decode(expected_tokens(TOK.encode("Hello"), 6))
    assert releaser.releases == []  # the decode instance pulled the KV: the sender freed it on the ACK


async def test_a_first_token_that_ends_the_request_releases_its_kv(valkey_url, redis):
    await register_pd(redis)
    releaser = RecordingKVReleaser()
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake, releaser)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 1})
        await asyncio.wait_for(releaser.released.wait(), timeout=10)
    assert resp.status_code == 200 and fake.decode_calls == []
    assert [r[:2] for r in releaser.releases] == [(resp.json()["id"], "prefill-0")]


async def test_a_deadline_before_the_first_decode_token_releases_the_prefill_kv(valkey_url, redis):
    await register_pd(redis)
    releaser = RecordingKVReleaser()
    app = make_router(valkey_url, FakeInstanceClient(gates={"decode-0": asyncio.Event()}), releaser,
                      request_timeout_s=0.2)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
        await asyncio.wait_for(releaser.released.wait(), timeout=10)
    assert resp.status_code == 504
    assert [r[1] for r in releaser.releases] == ["prefill-0"]


async def test_decode_lost_before_its_first_token_releases_then_reprefills(valkey_url, redis):
    await register_pd(redis, num_prefill=1, num_decode=2)
    fake = FakeInstanceClient(lose_decode_after={"decode-0": 0})
    releaser = RecordingKVReleaser()
    app = make_router(valkey_url, fake, releaser)
    async with asgi_client(app) as http:
        resp = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6})
    assert resp.json()["choices"][0]["text"] == TOK.decode(expected_tokens(TOK.encode("Hello"), 6))
    assert len(fake.prefill_calls) == 2  # the first handle was released, the second one pulled by decode-1
    assert [r[1] for r in releaser.releases] == ["prefill-0"]
    want = expected_tokens(TOK.encode("Hello"), 1)
    assert json.loads(releaser.releases[0][2])["ctx"] == TOK.encode("Hello") + want  # the first prefill's handle


# ---- with a real KV server on the prefill side ----

@pytest.fixture
def kv_server() -> Iterator[tuple]:
    from trt_disagg.kv import transport
    from trt_disagg.kv.handle import new_secret
    from trt_disagg.triton.fake_engine import FakeEngine

    engine = FakeEngine(role=Role.PREFILL, tp=2, pp=1)
    secret = new_secret()
    sender = transport.make_sender("tcp", source=engine, secret=secret, instance_id="prefill-0",
                                   layout=engine.config.kv_layout())
    sender.start()
    yield engine, sender, secret
    sender.close()


class SignallingReleaser(SocketKVReleaser):
    """The router's real releaser, telling the test when a release has been answered."""

    def __init__(self) -> None:
        super().__init__(timeout_s=5.0)
        self.answered = asyncio.Event()

    async def release(self, request_id: str, offered: OfferedKV) -> None:
        await super().release(request_id, offered)
        self.answered.set()


class OfferingClient(FakeInstanceClient):
    """The fake client, with prefill KV really computed and offered by a KV server (decode never pulls)."""

    def __init__(self, engine, sender, secret, **kwargs) -> None:
        super().__init__(**kwargs)
        self.engine, self.sender, self.secret = engine, sender, secret

    async def prefill(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int],
                      sampling: SamplingParams) -> PrefillResult:
        from trt_disagg.kv.handle import encode_handle

        result = await super().prefill(instance, request_id, prompt_ids, sampling)
        self.engine.add_request(request_id, prompt_ids, SamplingParams(max_new_tokens=8), RequestType.CONTEXT_ONLY)
        self.engine.step()
        handle = self.sender.offer(request_id, num_tokens=len(prompt_ids), first_token=result.first_token)
        return PrefillResult(first_token=result.first_token, handle=encode_handle(handle, self.secret))

    def decode_stream(self, instance: InstanceInfo, request_id: str, prompt_ids: list[int], first_token: int,
                      handle: bytes, sampling: SamplingParams) -> AsyncGenerator[int, None]:
        self.decode_calls.append((instance.instance_id, list(prompt_ids), first_token))
        return self._tokens(instance, list(prompt_ids) + [first_token], sampling.max_new_tokens - 1)


async def test_cancel_between_prefill_and_decode_gives_the_blocks_back_to_the_prefill_pool(valkey_url, redis,
                                                                                         kv_server):
    engine, sender, secret = kv_server
    await register(redis, "prefill-0", Role.PREFILL, kv_url=sender.url)
    await register(redis, "decode-0", Role.DECODE)
    fake = OfferingClient(engine, sender, secret, gates={"decode-0": asyncio.Event()})
    releaser = SignallingReleaser()
    app = make_router(valkey_url, fake, releaser, handle_ttl_s=3600)
    async with serve(app) as url:
        rid = await first_token_then_hang_up(url, fake)  # (1) prefilled and offered, (2) the client hangs up
        await asyncio.wait_for(requests_of(app).wait_settled(rid), timeout=10)
        await asyncio.wait_for(releaser.answered.wait(), timeout=10)
    assert sender.num_pending() == 0  # (3) released long before its TTL
    assert engine.num_free_blocks == engine.num_total_blocks  # (4) the prefill pool is full again
