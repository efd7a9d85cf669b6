"""Whole-host failures across test hosts: Redis cut off, a partitioned prefill host, a decode host removed.

    h1  Redis (alone: cutting it cuts nothing else)     h4  router A        h6  router B
    h2  serve --instance prefill:0 (KV handle TTL 3 s)  h3  decode:0        h5  decode:1

The tests run in this order on one deployment; the last one removes h5 for good. Answers are compared with
the single-host colocated engine's, token for token, so a token lost or repeated by a failover shows.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.multihost.conftest import GRPC_PORT, Deployed, Layout, deploy, wait_for
from tests.multihost.test_multihost import prompts, reference

pytestmark = pytest.mark.slow

HANDLE_TTL_S = 3.0
LAYOUT = Layout(num_hosts=6, redis="h1", prefill="h2", decode=("h3", "h5"), routers={"h4": "a", "h6": "b"},
                handle_ttl_s=HANDLE_TTL_S, router_env={"TRT_DISAGG_ROUTER_LEG_INACTIVITY_TIMEOUT_S": "4"})
CLIENT_OF = {"h4": "h3", "h6": "h2"}  # each router's clients run on another host (never h1 or h5)


@pytest.fixture(scope="module")
def failing(tmp_path_factory) -> Iterator[Deployed]:
    with deploy(tmp_path_factory.mktemp("host-failures"), LAYOUT) as d:
        yield d


@dataclass
class Streams:
    """Streams through the routers in background threads: text so far, first-token events, errors."""

    started: list[threading.Event]
    texts: list[str]
    errors: list[str | None]
    threads: list[threading.Thread] = field(default_factory=list)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        assert not alive, f"{alive} stream(s) still running after {timeout_s:.0f}s"


async def _stream_into(url: str, prompt: list[int], n_tokens: int, s: Streams, i: int) -> None:
    import httpx

    body = {"model": "tiny", "prompt": prompt, "max_tokens": n_tokens, "stream": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=90) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            s.errors[i] = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                s.errors[i] = str(chunk["error"])
                return
            s.texts[i] += chunk["choices"][0]["text"]
            s.started[i].set()


def start_streams(d: Deployed, ps: list[list[int]], n_tokens: int) -> Streams:
    """Stream ps[i] through the routers in turn, from their client hosts; returns at once."""
    s = Streams([threading.Event() for _ in ps], ["" for _ in ps], [None for _ in ps])
    routers = list(d.router_urls)
    for i, p in enumerate(ps):
        router = routers[i % len(routers)]

        def run(i: int = i, p: list[int] = p, router: str = router) -> None:
            try:
                d.lab.call(CLIENT_OF[router],
                           lambda: asyncio.run(_stream_into(d.router_urls[router], p, n_tokens, s, i)), 120)
            except BaseException as exc:
                s.errors[i] = f"client failed: {exc!r}"
            finally:
                s.started[i].set()

        s.threads.append(threading.Thread(target=run, daemon=True))
        s.threads[-1].start()
    return s


def wait_all_started(s: Streams, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for ev in s.started:
        assert ev.wait(max(0.0, deadline - time.monotonic())), "a stream sent no token in time"
    assert not any(s.errors), s.errors


def post_status(d: Deployed, router: str, prompt: list[int]) -> int:
    """A new short request to `router` from its client host: the HTTP status (a 200 is read to the end)."""
    import httpx

    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    return d.lab.call(CLIENT_OF[router], lambda: httpx.post(f"{d.router_urls[router]}/v1/completions", json=body,
                                                           timeout=20).status_code, 30)


def read_load(d: Deployed, role: str, index: int) -> dict:
    """The load the instance `role`-`index` last published to Redis ({} when its key is absent)."""
    import redis

    from trt_disagg.keys import load_key

    def get() -> dict:
        c = redis.Redis.from_url(d.redis_url, socket_timeout=2)
        try:
            for key in c.scan_iter(load_key("*")):
                raw = c.get(key)
                if raw is not None and key.decode().endswith(f"{role}-{index}"):
                    return json.loads(raw)  # type: ignore[no-any-return]
            return {}
        finally:
            c.close()

    return d.lab.call(d.redis_host, get, 10)


def test_redis_unreachable_for_10s_in_flight_streams_finish_new_work_gets_503_then_recovers(failing, tmp_path):
    d = failing
    ps = prompts(8)
    want = reference(d, tmp_path, ps, n_tokens=48)
    s = start_streams(d, ps, 48)
    wait_all_started(s, 60)
    d.lab.cut(d.redis_host)
    cut_at = time.monotonic()
    try:
        # (1) new work is refused with 503 once a router sees Redis gone (its socket timeout is 5 s)
        for router in d.router_urls:
            wait_for(f"503 from router on {router}", lambda r=router: post_status(d, r, [1, 2, 3]) == 503, 9.5)
        # (2) what was in flight streams to the end, token for token
        s.join(60)
        assert s.errors == [None] * len(ps), s.errors
        assert s.texts == want
        outage_s = time.monotonic() - cut_at
        assert outage_s < 10.0 + 5.0, f"the streams took {outage_s:.0f}s to finish"
        # (3) the outage lasts 10 s in all
        while time.monotonic() - cut_at < 10.0:
            time.sleep(0.2)
    finally:
        d.lab.restore(d.redis_host)
    # (4) both routers take new work again by themselves
    for router in d.router_urls:
        wait_for(f"router on {router} serving again", lambda r=router: post_status(d, r, [1, 2, 3]) == 200, 40)


PREFILL_ONLY = """
import json, sys
import tritonclient.grpc as grpcclient
from trt_disagg.triton.tensors import client_inputs
url, prompts = sys.argv[1], json.loads(sys.argv[2])
client = grpcclient.InferenceServerClient(url)
try:
    for prompt in prompts:
        r = client.infer("prefill", client_inputs(grpcclient, prompt, 4, None, streaming=False),
                         parameters={"request_type": "context_only"})
        print(r.as_numpy("context_phase_params").tobytes().hex())
finally:
    client.close()
"""


def test_partitioned_prefill_hosts_unpulled_kv_expires_and_is_freed(failing):
    d = failing
    prefill_url = f"{d.lab.hosts[LAYOUT.prefill].address}:{GRPC_PORT}"
    # What a router does first: context_only requests whose handles are then never pulled. gRPC connects from
    # its own threads, which a `lab.call` thread cannot place in the host, so the client is a process there.
    out = d.lab.exec("h4", sys.executable, "-c", PREFILL_ONLY, prefill_url, json.dumps(prompts(3)))
    handles = out.split()
    assert len(handles) == 3, out
    assert all(handles)
    # (1) the prefill instance holds the three un-pulled KVs and says so in Redis
    wait_for("3 pending hand-offs published", lambda: read_load(d, "prefill", 0).get("pending_kv_handoffs") == 3, 10)
    # (2) its host is partitioned for longer than the handle TTL
    d.lab.cut(LAYOUT.prefill)
    cut_at = time.monotonic()
    try:
        while time.monotonic() - cut_at < HANDLE_TTL_S + 2.0:
            time.sleep(0.2)
    finally:
        d.lab.restore(LAYOUT.prefill)
    # (3) back on the network, it publishes that nothing is held: the KV expired and was freed
    wait_for("pending hand-offs back to 0", lambda: read_load(d, "prefill", 0).get("pending_kv_handoffs") == 0, 20)
    log = (d.logs / "prefill-0" / "prefill-0.log").read_text(errors="replace")
    assert log.count("expired un-pulled; released") >= 3, log[-2000:]


def test_decode_host_removed_with_streams_in_flight_they_finish_on_the_other(failing, tmp_path):
    d = failing
    ps = [[p[0], 7 + i, *p[1:]] for i, p in enumerate(prompts(8))]
    n_tokens = 96
    want = reference(d, tmp_path, ps, n_tokens=n_tokens)
    s = start_streams(d, ps, n_tokens)
    wait_all_started(s, 60)
    # (1) decode:1 (h5) is serving some of them right now
    wait_for("decode-1 running streams", lambda: read_load(d, "decode", 1).get("running_sequences", 0) > 0, 10)
    assert not all(len(t) >= len(w) for t, w in zip(s.texts, want, strict=True)), "streams ended too soon"
    # (2) its host goes away (namespace deleted: no RST, no FIN, its packets just stop)
    d.lab.delete(LAYOUT.decode[1])
    removed_at = time.monotonic()
    # (3) every stream completes, token for token, on decode:0 (or would say why)
    s.join(90)
    assert s.errors == [None] * len(ps), s.errors
    assert s.texts == want
    print(f"streams finished {time.monotonic() - removed_at:.1f}s after h5 was removed")
    # (4) they did fail over: the routers moved legs off decode:1 (not streams that happened to end first)
    moved = sum(f.read_text(errors="replace").count("lost on decode-1") for f in d.logs.glob("router-*.log"))
    assert moved > 0, "no decode leg was moved off decode-1"
