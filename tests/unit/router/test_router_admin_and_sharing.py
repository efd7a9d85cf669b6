"""Admin endpoints behind a bearer token, and two routers on one Redis sharing one deployment."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from router.states import RequestState as S
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    asgi_client,
    make_router,
    records_of,
    register_pd,
    requests_of,
    serve,
)

AUTH = {"Authorization": "Bearer sekret"}
BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}


async def test_admin_needs_the_token(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient())
    async with asgi_client(app) as http:
        assert (await http.get("/admin/instances")).status_code == 401
        wrong = await http.get("/admin/instances", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        listed = await http.get("/admin/instances", headers=AUTH)
    assert listed.status_code == 200
    assert sorted(i["id"] for i in listed.json()["instances"]) == ["decode-0", "prefill-0"]


async def test_admin_disabled_without_a_token(valkey_url, redis):
    app = make_router(valkey_url, FakeInstanceClient(), admin_token=None)
    async with asgi_client(app) as http:
        assert (await http.get("/admin/instances", headers=AUTH)).status_code == 401


async def test_drain_and_remove(valkey_url, redis):
    await register_pd(redis, num_prefill=2)
    fake = FakeInstanceClient()
    app = make_router(valkey_url, fake)
    async with asgi_client(app) as http:
        assert (await http.post("/admin/instances/prefill-0/drain", headers=AUTH)).json()["draining"] is True
        for _ in range(3):
            assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        assert {c[0] for c in fake.prefill_calls} == {"prefill-1"}
        assert (await http.post("/admin/instances/nope/drain", headers=AUTH)).status_code == 404
        assert (await http.delete("/admin/instances/decode-0", headers=AUTH)).json()["removed"] is True
        health = await http.get("/health")
        assert health.status_code == 503
        assert (await http.post("/v1/completions", json=BODY)).status_code == 503
        ids = [i["id"] for i in (await http.get("/admin/instances", headers=AUTH)).json()["instances"]]
        assert sorted(ids) == ["prefill-0", "prefill-1"]


async def test_two_routers_share_redis_records_and_balance_decode(valkey_url, redis):
    await register_pd(redis, num_prefill=1, num_decode=2)
    gates = {"decode-0": asyncio.Event(), "decode-1": asyncio.Event()}
    fake_a, fake_b = FakeInstanceClient(gates=gates), FakeInstanceClient(gates=gates)
    app_a = make_router(valkey_url, fake_a, router_id="router-a")
    app_b = make_router(valkey_url, fake_b, router_id="router-b")
    body = {**BODY, "stream": True}
    async with serve(app_a) as url_a, serve(app_b) as url_b:
        async with httpx.AsyncClient() as http:
            # each stream holds its decode instance (gated) while the routers exchange load through Redis
            async with http.stream("POST", f"{url_a}/v1/completions", json=body) as first:
                await fake_a.streams_started.wait()
                await app_a.state.router.dispatcher.refresh()
                await app_b.state.router.dispatcher.refresh()
                async with http.stream("POST", f"{url_b}/v1/completions", json=body) as second:
                    await fake_b.streams_started.wait()
                    for gate in gates.values():
                        gate.set()
                    done = [[x async for x in r.aiter_lines() if x.startswith("data: ")][-1]
                            for r in (first, second)]
                    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
        assert done == ["data: [DONE]", "data: [DONE]"]
        used = Counter(c[0] for c in fake_a.decode_calls + fake_b.decode_calls)
        assert used == {"decode-0": 1, "decode-1": 1}
        # either router reads the other's records from the shared Redis
        rec_b_from_a = await records_of(app_a).get(ids[1])
        assert rec_b_from_a.state is S.DONE and rec_b_from_a.fields["router"] == "router-b"
        assert requests_of(app_a).active == {} and requests_of(app_b).active == {}
