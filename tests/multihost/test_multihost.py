"""A deployment across five test hosts (see conftest.py): answers equal the single-host colocated engine's
token for token, two routers on two hosts share one Redis, and what crosses the network is authenticated."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.multihost.conftest import GRPC_PORT, Deployed

pytestmark = pytest.mark.slow

N_TOKENS = 12


def prompts(n: int) -> list[list[int]]:
    return [[1, 100 + i, 200 + 3 * i, 300 + 7 * i, 42, 17 + i] for i in range(n)]


def reference(d: Deployed, tmp: Path, ps: list[list[int]], n_tokens: int = N_TOKENS) -> list[str]:
    """The colocated answers on this single host: the same seeded tiny model, one engine, no network."""
    from tests.conftest import build_engine
    from trt_disagg.contract import SamplingParams
    from trt_disagg.engine.llm_engine import LLMEngine
    from trt_disagg.engine_dir import tokenizer_dir

    engine_dir = build_engine(tmp, {"source": "tiny", "seed": 0})
    eng = LLMEngine.from_engine_dir(engine_dir)
    try:
        for i, p in enumerate(ps):
            eng.add_request(f"ref{i}", p, SamplingParams(max_new_tokens=n_tokens))
        out: dict[str, list[int]] = {f"ref{i}": [] for i in range(len(ps))}
        while eng.has_unfinished():
            for e in eng.step():
                out[e.request_id].append(e.token_id)
    finally:
        eng.shutdown()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(engine_dir)))
    return [tok.decode(out[f"ref{i}"], skip_special_tokens=True) for i in range(len(ps))]


async def stream(url: str, prompt: list[int], n_tokens: int = N_TOKENS) -> str:
    import httpx

    body = {"model": "tiny", "prompt": prompt, "max_tokens": n_tokens, "stream": True, "temperature": 0}
    text = []
    async with httpx.AsyncClient(timeout=120) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.append(chunk["choices"][0]["text"])
    return "".join(text)


def test_32_streams_through_two_routers_on_two_hosts_equal_the_colocated_answers(deployed: Deployed, tmp_path):
    ps = prompts(32)
    want = reference(deployed, tmp_path, ps)
    urls = deployed.router_urls
    t0 = time.monotonic()

    def run_on(host: str, idx: list[int]) -> list[str]:
        async def many() -> list[str]:
            return list(await asyncio.gather(*(stream(urls[host], ps[i]) for i in idx)))
        return asyncio.run(many())

    results: dict[int, str] = {}
    import threading

    halves = {"h4": list(range(0, 32, 2)), "h1": list(range(1, 32, 2))}
    errors: list[BaseException] = []

    def client(host: str) -> None:
        try:
            # the client of each router runs on another host than the router's (h4's from h3, h1's from h5)
            got = deployed.lab.call({"h4": "h3", "h1": "h5"}[host], lambda: run_on(host, halves[host]))
            results.update(zip(halves[host], got, strict=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [results[i] for i in range(32)] == want
    print(f"32 streams over 2 routers in {time.monotonic() - t0:.1f}s")
    records = routers_of_records(deployed)
    assert records == {"router-a", "router-b"}, records


def routers_of_records(d: Deployed) -> set[str]:
    import redis

    def read() -> set[str]:
        c = redis.Redis.from_url(d.redis_url)
        try:
            return {v.decode() for k in c.scan_iter("*", count=1000) if c.type(k) == b"hash"
                    for v in [c.hget(k, "router")] if v is not None}
        finally:
            c.close()

    return d.lab.call("h1", read)


def test_every_service_binds_its_hosts_address(deployed: Deployed):
    """Nothing listens on a wildcard address; the prefill instance's gRPC port is on h2's own address."""
    for host in ("h1", "h2", "h3", "h4", "h5"):
        listening = deployed.lab.exec(host, "ss", "-ltnH")
        wild = [ln for ln in listening.splitlines() if ln.split()[3].startswith(("0.0.0.0:", "*:", "[::]:"))]
        assert not wild, f"{host} listens on a wildcard address: {wild}"
    h2 = deployed.lab.hosts["h2"].address
    listening = deployed.lab.exec("h2", "ss", "-ltnH")
    assert f"{h2}:{GRPC_PORT}" in listening or f"[::ffff:{h2}]:{GRPC_PORT}" in listening, listening


def test_pulls_with_bad_handles_from_another_host_are_refused_and_logged(deployed: Deployed):
    from trt_disagg.contract import KVLayout, Role
    from trt_disagg.kv.errors import HandleExpiredError, HandleForgedError, KVNotFoundError
    from trt_disagg.kv.handle import KVHandle, new_secret
    from trt_disagg.kv.tcp import TcpKVReceiver
    from trt_disagg.registry_read import list_instances

    async def prefill_info():
        import redis.asyncio as aioredis

        c = aioredis.from_url(deployed.redis_url)
        try:
            (info,) = await list_instances(c, Role.PREFILL)
            return info
        finally:
            await c.aclose()

    info = deployed.lab.call("h1", lambda: asyncio.run(prefill_info()))
    secret = bytes.fromhex(deployed.kv_secret_file.read_text().strip())
    layout = KVLayout(fingerprint="any", num_layers=4, num_kv_heads=4, head_dim=32, dtype="float32",
                      tokens_per_block=16, tp=1, pp=1)  # refused before the layout is read
    base = KVHandle(request_id="not-a-request", source_instance=info.instance_id, kv_url=info.kv_url,
                    source_host="h2", layout=layout, num_tokens=6, first_token=5,
                    expires_at=time.time() + 60)
    cases = [
        (TcpKVReceiver(new_secret()), base, HandleForgedError),  # forged / another deployment's key
        (TcpKVReceiver(secret), KVHandle(**{**base.__dict__, "expires_at": time.time() - 5}), HandleExpiredError),
        (TcpKVReceiver(secret), base, KVNotFoundError),  # replayed: its KV was pulled (or never held)
    ]
    for receiver, handle, error in cases:
        with pytest.raises(error):
            deployed.lab.call("h4", lambda r=receiver, h=handle: r.fetch(h))
    log = (deployed.logs / "prefill-0" / "prefill-0.log").read_text(errors="replace")
    h4 = deployed.lab.hosts["h4"].address
    assert log.count("refused a KV") >= 3 and h4 in log


def test_serve_prints_no_password(deployed: Deployed):
    password = deployed.redis_url.split(":")[2].split("@")[0]
    for name in ("prefill-0.log", "decode-0.log", "router-a.log"):
        assert password not in (deployed.logs / name).read_text(errors="replace"), name


def test_redis_without_the_password_refuses_clients(deployed: Deployed):
    import redis

    h1 = deployed.lab.hosts["h1"].address

    def ping() -> object:
        return redis.Redis(host=h1, port=6379).ping()

    with pytest.raises(redis.AuthenticationError):
        deployed.lab.call("h4", ping)


def test_admin_endpoints_need_the_token_from_every_host(deployed: Deployed):
    import httpx

    for host, url in deployed.router_urls.items():
        def get(token: str | None, u: str = url) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.get(f"{u}/admin/instances", headers=headers, timeout=5).status_code

        assert deployed.lab.call("h3", lambda: get(None)) == 401, host
        assert deployed.lab.call("h3", lambda: get("wrong")) == 401, host
        assert deployed.lab.call("h3", lambda: get(deployed.admin_token)) == 200, host
