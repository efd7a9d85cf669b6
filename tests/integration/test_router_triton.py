"""The router against real tritonserver instances (the bundled Triton, Python backend) and Valkey.

Two deployments of configs/tiny.yaml's shape:
- fake engines (ENGINE_DIR "fake:<role>", trt_disagg.triton.fake_engine): the tokens are a known function
  of the context, so 64 concurrent streams, two routers sharing one Redis, and a decode instance killed
  mid-stream are checked token by token, with a token-id "tokenizer" whose text spells the ids (<17><4>...);
- the real tiny engines (built into a temp dir): the official `openai` client, completions and chat,
  streaming and not, disaggregated text equal to the colocated text.
The router runs in this process (uvicorn on 127.0.0.1) with its real Triton gRPC client.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.integration.router_helpers import (
    DISAGG_WALK,
    IdTokenizer,
    assert_walk,
    expected,
    on_instance,
    serve,
    stream_completion,
    tiny,
    wait_idle,
    within,
)
from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.triton.cluster import LocalCluster

pytestmark = pytest.mark.slow


def router_settings(dep: Deployment, redis_url: str, **overrides: object) -> RouterSettings:
    values: dict[str, object] = {"port": 0, "refresh_interval_s": 0.2, "router_id": f"it-{id(overrides)}"}
    return RouterSettings.from_deployment(dep, redis_url, **{**values, **overrides})


@pytest.fixture(scope="module")
def fake_cluster():
    overrides = {Role.PREFILL: "fake:prefill:2:1", Role.DECODE: "fake:decode:1:2:2", Role.COLOCATED: "fake:colocated"}
    # decode steps take 2 ms (emulated), so a 400-token stream is in flight ~1 s: the kill test hits streams mid-way
    cluster = LocalCluster(tiny(num_decode=2), start_router=False, engine_overrides=overrides, ready_timeout_s=120)
    cluster.start()
    yield cluster
    cluster.stop()


def prompt_of(i: int) -> list[int]:
    return [1, 100 + i, 7, 300 + 3 * i, 42]


async def _stream_ids(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      started: asyncio.Event | None = None) -> tuple[str, list[int], str | None]:
    s = await stream_completion(http, url, prompt, max_tokens, started)
    return s.request_id, IdTokenizer().encode(s.text), s.error


async def test_64_concurrent_streams_through_prefill_and_decode(fake_cluster):
    app = create_app(router_settings(fake_cluster.dep, fake_cluster.redis_url), tokenizer=IdTokenizer())
    async with serve(app) as url:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            results = await asyncio.gather(*(_stream_ids(http, url, prompt_of(i), 24) for i in range(64)))
            for i, (rid, ids, error) in enumerate(results):
                assert error is None
                assert ids == expected(prompt_of(i), 24), f"stream {i}"
                assert_walk(await app.state.router.records.get(rid), DISAGG_WALK)
            metrics = (await http.get(f"{url}/metrics")).text
    assert 'trtd_router_requests_total{outcome="done",path="disaggregated"} 64.0' in metrics


async def test_two_routers_on_one_redis_serve_and_balance_one_deployment(fake_cluster):
    await wait_idle(str(fake_cluster.redis_url), Role.DECODE)  # the previous test's streams are still published
    apps = [create_app(router_settings(fake_cluster.dep, fake_cluster.redis_url, router_id=f"twin-{k}"),
                       tokenizer=IdTokenizer()) for k in range(2)]
    async with serve(apps[0]) as url_a, serve(apps[1]) as url_b:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            results = await asyncio.gather(*(_stream_ids(http, (url_a, url_b)[i % 2], prompt_of(i), 24)
                                             for i in range(32)))
            for i, (rid, ids, error) in enumerate(results):
                assert error is None and ids == expected(prompt_of(i), 24), f"stream {i}"
                rec = await apps[(i + 1) % 2].state.router.records.get(rid)  # read through the other router
                assert rec.state.value == "DONE" and rec.fields["router"] == f"twin-{i % 2}"
            decode_used = [(await apps[0].state.router.records.get(rid)).fields["decode_instance"]
                           for rid, _, _ in results]
    assert set(decode_used) == {"decode-0", "decode-1"}
    for k in range(2):  # each router placed work on both decode instances
        assert {decode_used[i] for i in range(k, 32, 2)} == {"decode-0", "decode-1"}


async def test_killing_a_decode_instance_mid_stream_loses_and_repeats_nothing(fake_cluster):
    app = create_app(router_settings(fake_cluster.dep, fake_cluster.redis_url, max_decode_retries=3),
                     tokenizer=IdTokenizer())
    victim = next(p for p in fake_cluster.processes if p.instance_id == "decode-0")
    n = 400
    await wait_idle(str(fake_cluster.redis_url), Role.DECODE)  # else a stale load can keep decode-0 out of it
    async with serve(app) as url:
        async with httpx.AsyncClient(timeout=120) as http:
            started = [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.create_task(_stream_ids(http, url, prompt_of(i), n, started[i])) for i in range(8)]
            await within(120, asyncio.gather(*(e.wait() for e in started)), app)
            assert on_instance(app, "decode-0"), "no stream on decode-0 when it is killed"
            victim.proc.kill()
            results = await within(120, asyncio.gather(*tasks), app)
        metrics = app.state.router.metrics.render().decode()
    for i, (_, ids, error) in enumerate(results):
        assert error is None, error
        assert ids == expected(prompt_of(i), n), f"stream {i}"
    retried = re.search(r'trtd_router_retries_total\{phase="decode"\} (\S+)', metrics)
    assert retried is not None and float(retried.group(1)) >= 1  # the kill hit streams in flight
