"""The router in front of the real tiny engines (prefill TP2, two decode PP2 instances, colocated TP1) in
real tritonserver processes: real model weights (the seeded tiny Llama), real KV hand-off between
instances. The reference answer of every prompt is the colocated engine's greedy output, so a
disaggregated answer that repeats, drops or corrupts a token shows as a different text.

1. the official `openai` client: completions and chat, streaming and not, disaggregated == colocated;
2. 64 concurrent streams through prefill and decode, each equal to its reference, each record walking
   RECEIVED..DONE in order;
3. a decode instance SIGKILLed while streams are in flight: every stream still completes with its
   reference text (this test kills decode-0, so it runs last in the module).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.integration.router_helpers import (
    DISAGG_WALK,
    assert_walk,
    on_instance,
    router_settings,
    running_tiny,
    serve,
    stream_completion,
    wait_idle,
    within,
)
from trt_disagg.contract import Role
from trt_disagg.triton.cluster import LocalCluster

pytestmark = pytest.mark.slow

COLOCATED_ONLY = 10_000  # colocated_threshold_tokens above any prompt: every request takes the colocated path


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny-router")
    with running_tiny(root, num_decode=2) as cluster:
        yield cluster, root


def settings(cluster: LocalCluster, root: Path, threshold: int, **overrides: object) -> RouterSettings:
    return router_settings(cluster, root, f"tiny-{threshold}-{len(overrides)}", colocated_threshold_tokens=threshold,
                           **overrides)


def prompt_of(i: int) -> str:
    return f"Request {i}: the number {7 * i + 3} is"


async def reference_texts(cluster: LocalCluster, root: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of the colocated engine (one context_and_generation call per prompt)."""
    app = create_app(settings(cluster, root, threshold=COLOCATED_ONLY))
    async with serve(app) as url:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            done = await within(120, asyncio.gather(*(stream_completion(http, url, p, max_tokens) for p in prompts)),
                                app)
            for s in done:
                assert s.error is None, s.error
                assert (await app.state.router.records.get(s.request_id)).fields["path"] == "colocated"
    return [s.text for s in done]


async def ask_all(url: str) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    out: dict[str, str] = {}
    try:
        c = await client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                            temperature=0)
        assert c.usage is not None and c.usage.completion_tokens >= 1
        out["completion"] = c.choices[0].text
        out["completion_id"] = c.id
        stream = await client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                                 temperature=0, stream=True)
        out["completion_stream"] = "".join([ch.choices[0].text async for ch in stream if ch.choices])
        msgs: list[Any] = [{"role": "user", "content": "Say hello."}]
        chat = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        out["chat"] = chat.choices[0].message.content or ""
        chat_stream = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                                           temperature=0, stream=True)
        out["chat_stream"] = "".join([ch.choices[0].delta.content or "" async for ch in chat_stream if ch.choices])
    finally:
        await client.close()
    return out


async def test_openai_client_disaggregated_equals_colocated(tiny_cluster):
    cluster, root = tiny_cluster
    disagg_app = create_app(settings(cluster, root, threshold=0))
    async with serve(disagg_app) as url:
        disagg = await ask_all(url)
        rec = await disagg_app.state.router.records.get(disagg.pop("completion_id"))
        assert_walk(rec, DISAGG_WALK)
        assert rec.fields["prefill_instance"] == "prefill-0" and rec.fields["decode_instance"].startswith("decode-")
    colocated_app = create_app(settings(cluster, root, threshold=COLOCATED_ONLY))
    async with serve(colocated_app) as url:
        colocated = await ask_all(url)
        rec = await colocated_app.state.router.records.get(colocated.pop("completion_id"))
        assert rec.fields["path"] == "colocated"
    assert all(disagg.values()) and disagg == colocated
    assert disagg["completion"] == disagg["completion_stream"] and disagg["chat"] == disagg["chat_stream"]


async def test_a_stop_string_cuts_the_disaggregated_answer_where_the_colocated_text_has_it(tiny_cluster):
    cluster, root = tiny_cluster
    (reference,) = await reference_texts(cluster, root, [prompt_of(3)], max_tokens=24)
    stop = reference[10:13]
    app = create_app(settings(cluster, root, threshold=0))
    async with serve(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        try:
            out = await client.completions.create(model="tiny", prompt=prompt_of(3), max_tokens=24, temperature=0,
                                                  stop=[stop])
            chunks = [c async for c in await client.completions.create(
                model="tiny", prompt=prompt_of(3), max_tokens=24, temperature=0, stop=stop, stream=True)]
        finally:
            await client.close()
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert out.choices[0].text == streamed == reference[:reference.index(stop)]
    assert out.choices[0].finish_reason == "stop"


async def test_64_concurrent_streams_equal_the_colocated_answers(tiny_cluster):
    cluster, root = tiny_cluster
    prompts = [prompt_of(i) for i in range(64)]
    reference = await reference_texts(cluster, root, prompts, max_tokens=16)
    app = create_app(settings(cluster, root, threshold=0))
    async with serve(app) as url:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            results = await asyncio.gather(*(stream_completion(http, url, p, 16) for p in prompts))
        records = app.state.router.records
        for i, s in enumerate(results):
            assert s.error is None, s.error
            assert s.text == reference[i], f"stream {i}"
            assert_walk(await records.get(s.request_id), DISAGG_WALK)
        decode_used = {(await records.get(s.request_id)).fields["decode_instance"] for s in results}
    assert decode_used == {"decode-0", "decode-1"}
    assert len(set(reference)) > 10  # the prompts lead to different answers (18 distinct with seed 0)


@pytest.mark.timeout(240)
async def test_killing_a_decode_instance_mid_stream_loses_and_repeats_nothing(tiny_cluster):
    cluster, root = tiny_cluster
    n, num_streams = 160, 8
    prompts = [prompt_of(i) for i in range(num_streams)]
    reference = await reference_texts(cluster, root, prompts, max_tokens=n)
    victim = next(p for p in cluster.processes if p.instance_id == "decode-0")
    await wait_idle(str(cluster.redis_url), Role.DECODE)  # else a stale load can keep decode-0 out of it
    app = create_app(settings(cluster, root, threshold=0, max_decode_retries=3))
    async with serve(app) as url:
        async with httpx.AsyncClient(timeout=120) as http:
            started = [asyncio.Event() for _ in prompts]
            tasks = [asyncio.create_task(stream_completion(http, url, p, n, started[i]))
                     for i, p in enumerate(prompts)]
            await within(120, asyncio.gather(*(e.wait() for e in started)), app)
            assert on_instance(app, "decode-0"), "no stream on decode-0 when it is killed"
            assert victim.proc is not None
            os.killpg(victim.proc.pid, signal.SIGKILL)  # the server, its Python stubs and its rank processes
            results = await within(120, asyncio.gather(*tasks), app)
        metrics = app.state.router.metrics.render().decode()
        resumed = 0
        for i, s in enumerate(results):
            assert s.error is None, s.error
            assert s.text == reference[i], f"stream {i}"
            rec = await app.state.router.records.get(s.request_id)
            assert rec.state.value == "DONE" and int(rec.fields["output_tokens"]) == n
            resumed += assert_resumed_exactly(rec.events, prompt_tokens=int(rec.fields["prompt_tokens"]))
    assert resumed >= 1  # at least one stream was continued on decode-1 after a re-prefill
    retried = re.search(r'trtd_router_retries_total\{phase="decode"\} (\S+)', metrics)
    assert retried is not None and float(retried.group(1)) >= 1  # the kill hit streams in flight


def assert_resumed_exactly(events: list[dict], prompt_tokens: int) -> int:
    """Each continuation re-prefilled the prompt + exactly the k tokens the client had, and the next decode
    leg resumed after k + 1 (the re-prefill's first token). The tiny model's greedy output repeats one token
    for long runs, so the text alone could hide a token repeated and another dropped; this cannot.
    Returns how many continuations the record shows."""
    reprefills = [i for i, e in enumerate(events) if "prefilled_tokens" in e]
    for i in reprefills:
        k = int(events[i]["prefilled_tokens"]) - prompt_tokens
        after = next(e for e in events[i + 1:] if "resumed_after_tokens" in e)
        assert int(after["resumed_after_tokens"]) == k + 1, events
    return len(reprefills)
