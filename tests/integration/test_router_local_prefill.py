"""Conditional disaggregation by overlap, end to end: a second chat turn is prefilled on the decode instance
that holds the first turn, with no prefill leg and no KV transfer, and answers exactly as the usual path does.

Real tiny engines (one prefill, one decode instance, block reuse on, KV events published) in tritonserver,
two real routers in this event loop on the same Redis: `kv_aware` with `max_local_prefill_length`, and a
`least_loaded` one (the usual disaggregated path, the reference answer).

1. turn 1 (chat: one user message) on the kv_aware router: disaggregated, prefill then decode instance;
2. the decode instance's KV events reach the router's block index (its prompt + answer blocks);
3. turn 2 = turn 1's messages + the answer returned + a short user message: path LOCAL on that decode
   instance, the record shows the matched tokens and walks no PREFILL_DONE / DECODE_DISPATCHED (no handle,
   no pull), and the prefix-hit counters of the LOCAL pool moved;
4. the same turn-2 messages through the least_loaded router (disaggregated): the same greedy text.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.integration.router_helpers import serve, within
from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.triton.cluster import LocalCluster

pytestmark = pytest.mark.slow

TPB = 16
LOCAL_WALK = ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "DECODING", "DONE"]
DISAGG_WALK = ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILL_DONE", "DECODE_DISPATCHED", "DECODING", "DONE"]
USER_1 = "Tell me about the number seven, its history, its uses in games, and why people like it so much."
USER_2 = "And eight?"


def one_by_one() -> Deployment:
    """The tiny model as one prefill and one decode instance, one rank each (the fastest real pair)."""
    from tests.integration.router_helpers import tiny

    dep = tiny(1)
    assert dep.context_servers is not None and dep.generation_servers is not None
    return dep.model_copy(update={
        "name": "tiny-local", "colocated_servers": None,
        "context_servers": dep.context_servers.model_copy(update={"tensor_parallel_size": 1}),
        "generation_servers": dep.generation_servers.model_copy(update={"pipeline_parallel_size": 1})})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    from trt_disagg.engine_build.builder import build_deployment

    root = tmp_path_factory.mktemp("tiny-local")
    dep = one_by_one()
    build_deployment(dep, engines_root=root)
    cluster = LocalCluster(dep, engines_root=root, start_router=False, ready_timeout_s=240)
    cluster.start()
    try:
        yield cluster, root
    finally:
        cluster.stop()


def settings(cluster: LocalCluster, root: Path, policy: str) -> RouterSettings:
    """A router on the pair; its tokenizer from the decode engine (this deployment has no colocated one)."""
    return RouterSettings.from_deployment(cluster.dep, str(cluster.redis_url), port=0, router_id=f"local-{policy}",
                                          engine_dir=cluster.dep.engine_dir(Role.DECODE, root), policy=policy,
                                          max_local_prefill_length=64)


async def chat(http: httpx.AsyncClient, url: str, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
    """One greedy chat completion: (the router's request id, the response body)."""
    resp = await http.post(f"{url}/v1/chat/completions", json={
        "model": "tiny-local", "messages": messages, "max_tokens": 12, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-request-id"], resp.json()


async def record(http: httpx.AsyncClient, url: str, request_id: str) -> dict[str, Any]:
    """GET /v1/requests/{id}, polled until the record is terminal (its last write lands after the response)."""
    while True:
        body = (await http.get(f"{url}/v1/requests/{request_id}")).json()
        if body.get("state") in ("DONE", "FAILED", "CANCELLED"):
            return body
        await asyncio.sleep(0.05)  # polling another task's write


async def index_blocks(http: httpx.AsyncClient, url: str, instance_id: str, at_least: int) -> int:
    """Poll the router's /metrics until its block index holds `at_least` blocks of `instance_id`."""
    pattern = re.compile(rf'trtd_router_kv_index_blocks\{{instance="{re.escape(instance_id)}"\}} (\S+)')
    while True:
        found = pattern.search((await http.get(f"{url}/metrics")).text)
        if found and float(found.group(1)) >= at_least:
            return int(float(found.group(1)))
        await asyncio.sleep(0.1)  # the instance publishes its KV events on its own schedule


def local_matched(metrics_text: str) -> float:
    found = re.search(r'trtd_router_prefix_matched_tokens_total\{pool="local"\} (\S+)', metrics_text)
    return float(found.group(1)) if found else 0.0


async def test_second_turn_is_prefilled_where_the_first_turn_is_cached(pair):
    cluster, root = pair
    kv_app = create_app(settings(cluster, root, "kv_aware"))
    ref_app = create_app(settings(cluster, root, "least_loaded"))
    async with serve(kv_app) as url, serve(ref_app) as ref_url, httpx.AsyncClient(timeout=60) as http:
        # (1) turn 1: the usual disaggregated path
        turn1 = [{"role": "user", "content": USER_1}]
        rid1, body1 = await within(30, chat(http, url, turn1), kv_app)
        rec1 = await record(http, url, rid1)
        assert_walk_of(rec1, DISAGG_WALK)
        decode_id = rec1["fields"]["decode_instance"]
        usage1 = body1["usage"]
        # (2) the decode instance's cache (prompt + answer, less the last token) is in the router's index
        held = (usage1["prompt_tokens"] + usage1["completion_tokens"] - 1) // TPB
        await within(10, index_blocks(http, url, decode_id, held), kv_app)
        # (3) turn 2: history + the answer returned + a short message, prefilled on the decode instance
        turn2 = [*turn1, {"role": "assistant", "content": body1["choices"][0]["message"]["content"]},
                 {"role": "user", "content": USER_2}]
        rid2, body2 = await within(30, chat(http, url, turn2), kv_app)
        rec2 = await record(http, url, rid2)
        assert_walk_of(rec2, LOCAL_WALK)
        fields = rec2["fields"]
        assert fields["path"] == "local" and fields["local_instance"] == decode_id, fields
        assert fields["matched_instance"] == decode_id
        prompt2 = body2["usage"]["prompt_tokens"]
        matched = int(fields["matched_tokens"])
        assert usage1["prompt_tokens"] // TPB * TPB <= matched < prompt2, (matched, usage1, prompt2)
        assert prompt2 - matched <= 64
        assert "prefill_instance" not in fields and "decode_instance" not in fields, fields
        assert local_matched((await http.get(f"{url}/metrics")).text) >= matched
        # (4) the same messages the usual way give the same greedy answer
        rid3, body3 = await within(30, chat(http, ref_url, turn2), ref_app)
        assert_walk_of(await record(http, ref_url, rid3), DISAGG_WALK)
        assert body3["choices"][0]["message"]["content"] == body2["choices"][0]["message"]["content"]
        assert body3["usage"] == body2["usage"]


def assert_walk_of(rec: dict[str, Any], states: list[str]) -> None:
    walked = [e["state"] for e in rec["events"]]
    assert walked == states, (walked, rec["fields"])
