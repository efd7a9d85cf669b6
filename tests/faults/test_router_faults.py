"""The router on the real stack (tiny engines in tritonserver, embedded Valkey) while things break:

1. a decode instance SIGSTOPped with streams in flight: every stream completes elsewhere with the reference
   text, after the leg inactivity timeout (not the 300 s request timeout);
2. Redis restarted empty: new requests succeed again within 10 s with no process restarted by hand (the
   instances re-register on their next heartbeat, the router reconnects and refuses nothing meanwhile
   for longer than the outage lasts);
3. an oversized body and an oversized prompt sent to the router process: 413 and 400, and the router
   keeps answering /health.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from router.app import create_app
from router.settings import RouterSettings
from tests.integration.router_helpers import (
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("router-faults")
    with running_tiny(root, num_decode=2) as c:
        yield c, root


def settings(cluster: LocalCluster, root: Path, **overrides: object) -> RouterSettings:
    return router_settings(cluster, root, f"faults-{time.monotonic_ns()}", **overrides)


def prompt_of(i: int) -> str:
    return f"Fault {i}: the number {11 * i + 5} is"


@pytest.mark.timeout(240)
async def test_a_sigstopped_decode_instances_streams_continue_elsewhere(cluster):
    c, root = cluster
    n, prompts = 48, [prompt_of(i) for i in range(6)]
    reference_app = create_app(settings(c, root, colocated_threshold_tokens=10_000))
    async with serve(reference_app) as url:
        async with httpx.AsyncClient(timeout=120) as http:
            reference = [s.text for s in await asyncio.gather(*(stream_completion(http, url, p, n) for p in prompts))]
    await wait_idle(str(c.redis_url), Role.DECODE)
    victim = next(p for p in c.processes if p.instance_id == "decode-0")
    assert victim.proc is not None
    app = create_app(settings(c, root, leg_inactivity_timeout_s=2.0, max_decode_retries=3))
    try:
        async with serve(app) as url:
            async with httpx.AsyncClient(timeout=120) as http:
                started = [asyncio.Event() for _ in prompts]
                tasks = [asyncio.create_task(stream_completion(http, url, p, n, started[i]))
                         for i, p in enumerate(prompts)]
                await within(120, asyncio.gather(*(e.wait() for e in started)), app)
                os.killpg(victim.proc.pid, signal.SIGSTOP)  # hung, not dead: its sockets stay open
                stopped_at = time.monotonic()
                results = await within(120, asyncio.gather(*tasks), app)
                took_s = time.monotonic() - stopped_at
            moved = [s for s in results
                     if (await app.state.router.records.get(s.request_id)).fields["decode_instance"] == "decode-1"]
    finally:
        os.killpg(victim.proc.pid, signal.SIGCONT)
    for i, s in enumerate(results):
        assert s.error is None, s.error
        assert s.text == reference[i], f"stream {i}"
    assert moved and took_s < 60  # continued after the 2 s inactivity timeout, not the request timeout


@pytest.mark.timeout(180)
async def test_after_a_redis_restart_new_requests_succeed_within_10s(cluster):
    c, root = cluster
    app = create_app(settings(c, root, refresh_interval_s=0.2))
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model": "tiny", "prompt": prompt_of(1), "max_tokens": 4, "temperature": 0}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            client = aioredis.from_url(str(c.redis_url))
            try:
                await client.shutdown(nosave=True)  # Valkey goes away (its data with it)
            except (aioredis.ConnectionError, OSError):
                pass  # the connection closes as the server exits
            finally:
                await client.aclose()
            c.restart("redis")  # back, empty, on the same port (what `serve` does)
            back_at = time.monotonic()
            async with asyncio.timeout(60):
                while (resp := await http.post("/v1/completions", json=body)).status_code != 200:
                    assert resp.status_code == 503, resp.text  # refused clearly while the registry refills
                    await asyncio.sleep(0.1)  # polling until the instances have beaten again
            recovered_s = time.monotonic() - back_at
            rid = resp.headers["x-request-id"]
            rec = await app.state.router.records.get(rid)
    assert rec is not None and rec.state.value == "DONE"
    assert recovered_s < 10, f"new requests failed for {recovered_s:.1f}s after the restart"


async def test_oversized_input_is_refused_and_the_router_keeps_answering(cluster):
    c, root = cluster
    app = create_app(settings(c, root, max_body_bytes=4 << 20))
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            status_line, body = await post_declaring(url, 100 << 20)
            assert status_line.startswith(b"HTTP/1.1 413") and b"request_too_large" in body
            long = await http.post("/v1/completions", json={"model": "tiny", "prompt": "y" * (3 << 20),
                                                             "max_tokens": 2})
            assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
            assert (await http.get("/health")).status_code == 200


async def post_declaring(url: str, content_length: int) -> tuple[bytes, bytes]:
    """Start a POST that declares a `content_length`-byte body, send its first MiB, and read the answer (a
    client library would try to send the whole body before reading; the router answers before that)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {content_length}\r\n\r\n".encode() + b"x" * (1 << 20))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout=30)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return status_line, rest
