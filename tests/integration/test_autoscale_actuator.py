"""The autoscaler's actuator on a real deployment (tiny engines, 1 prefill + 2 decode, the router, Valkey):
a decode -> prefill role switch while greedy requests stream.

(1) reference: every prompt answered once on the deployment as started (temperature 0);
(2) clients stream the same prompts without pause; the actuator drains decode-1 (no new work, in-flight
    streams finish), deregisters and stops it, and starts prefill-1 on the prefill engine;
(3) every request completed with the reference's exact text, and its record ended DONE; requests after the
    switch were served by the new shape (prefill-1 among the prefill instances used);
(4) the registry and the supervisor's view are 2 prefill + 1 decode; no drain or removal mark is left;
(5) after stop: no process of the run and no shared-memory region of any instance (the retired one included).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from trt_disagg.bench.loadgen import DONE, sse_data
from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.controller.local_actuator import ActuatorSettings, LocalClusterActuator
from trt_disagg.controller.policy import Action
from trt_disagg.keys import drain_key, record_key, removed_key
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.triton.launch import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [f"Scaling {i}: the number {11 * i + 3} is" for i in range(4)]
MAX_TOKENS = 16
NUM_CLIENTS = 3


def config(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data.pop("colocated_servers")
    data["context_servers"].update(tensor_parallel_size=1)
    data["generation_servers"].update(num_instances=2, pipeline_parallel_size=1)
    data["engines_dir"] = str(tmp_path / "engines")
    data["router"]["port"] = free_port()
    # The router gives up on a decode leg silent for 50 x tpot_s; on a busy CI core, with a new instance
    # loading next to the serving ones, a step can stall for seconds: this test is about not losing
    # requests, not about latency.
    data["slo"]["tpot_s"] = 0.5
    path = tmp_path / "tiny-1p2d.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def stream(http: httpx.AsyncClient, url: str, prompt: str) -> tuple[str | None, str, str | None]:
    """(request id, text, error) of one greedy streaming completion."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    rid, text, done = None, [], False
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return None, "", f"HTTP {resp.status_code}"
        async for data in sse_data(resp):
            if data == DONE:
                done = True
            else:
                chunk = json.loads(data)
                if "error" in chunk:
                    return rid, "".join(text), str(chunk["error"])
                rid = rid or chunk.get("id")
                text.extend(c["text"] for c in chunk["choices"])
    return rid, "".join(text), None if done else "stream cut before [DONE]"


async def load_during(url: str, switch: asyncio.Future) -> list[tuple[str, str | None, str, str | None]]:
    """Clients stream prompts back to back until the switch is over (and one more round after it)."""
    results: list[tuple[str, str | None, str, str | None]] = []

    async def client(i: int) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http:
            n = i
            while not switch.done():
                results.append((PROMPTS[n % len(PROMPTS)], *await stream(http, url, PROMPTS[n % len(PROMPTS)])))
                n += 1
            for k in range(len(PROMPTS)):  # the new shape serves every prompt once more
                prompt = PROMPTS[(n + k) % len(PROMPTS)]
                results.append((prompt, *await stream(http, url, prompt)))

    await asyncio.gather(*(client(i) for i in range(NUM_CLIENTS)))
    return results


def test_decode_to_prefill_switch_while_requests_stream(tmp_path: Path) -> None:
    from trt_disagg.engine_build.builder import build_deployment

    cfg = config(tmp_path)
    dep = load_deployment(cfg)
    build_deployment(dep)
    cluster = LocalCluster(dep, config_path=cfg, run_dir=tmp_path / "run")
    shm_prefixes: set[str] = set()
    t0 = time.monotonic()
    try:
        cluster.start()
        t1 = time.monotonic()
        assert cluster.router_url is not None
        shm_prefixes |= {q for p in cluster.processes for q in (p.shm_prefix, p.kv_shm_prefix)}
        reference, outcome, results = asyncio.run(_switch(cluster, cluster.router_url))
        shm_prefixes |= {q for p in cluster.processes for q in (p.shm_prefix, p.kv_shm_prefix)}
        assert outcome.ok, outcome.detail
        assert "retired decode-1" in outcome.detail and "started prefill-1" in outcome.detail
        print(f"started in {t1 - t0:.1f}s; {len(results)} requests streamed across the switch ({outcome.detail})")
        _check_results(cluster, reference, results)
        assert cluster.serving(Role.PREFILL) == ["prefill-0", "prefill-1"]  # (4)
        assert cluster.serving(Role.DECODE) == ["decode-0"]
        assert set(cluster.supervised()) >= {"prefill-0", "prefill-1", "decode-0"}
        assert "decode-1" not in cluster.supervised()
        client = redis.Redis.from_url(str(cluster.redis_url))
        assert {m.decode() for m in client.smembers("trtd:role:decode")} == {"decode-0"}
        assert not client.exists(drain_key("decode-1"), removed_key("decode-1"))
        client.close()
    finally:
        cluster.stop()
    run_dir = str(tmp_path / "run")
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and run_dir in _cmdline(int(pid))]  # (5)
    assert not [f for f in os.listdir("/dev/shm") if any(f.startswith(p) for p in shm_prefixes)]


async def _switch(cluster: LocalCluster, url: str):
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http:
        reference = {p: (await stream(http, url, p))[1] for p in PROMPTS}  # (1)
    assert all(reference.values()), reference
    actuator = LocalClusterActuator(cluster, ActuatorSettings(drain_timeout_s=30.0, startup_timeout_s=60.0))
    switch: asyncio.Future = asyncio.get_running_loop().create_future()

    async def act() -> None:
        await asyncio.sleep(0.5)  # let the clients' first streams reach both decode instances
        actuator.apply(Action.DECODE_TO_PREFILL, time.time())  # (2)
        deadline = time.monotonic() + 90
        while actuator.busy(time.time()):
            assert time.monotonic() < deadline, "the switch did not end"
            await asyncio.sleep(0.1)  # polling the actuator's worker thread
        switch.set_result(actuator.take_outcomes()[0])

    results, _ = await asyncio.gather(load_during(url, switch), act())
    return reference, switch.result(), results


def _check_results(cluster: LocalCluster, reference: dict[str, str], results: list) -> None:
    assert len(results) > NUM_CLIENTS * len(PROMPTS)
    client = redis.Redis.from_url(str(cluster.redis_url), decode_responses=True)
    try:
        prefill_used = set()
        for prompt, rid, text, error in results:  # (3)
            assert error is None, (prompt, rid, error, client.lrange(f"{record_key(rid)}:events", 0, -1))
            assert text == reference[prompt], (prompt, text, reference[prompt])
            record = client.hgetall(record_key(rid))
            assert record.get("state") == "DONE", (rid, record)
            prefill_used.add(record.get("prefill_instance"))
        assert "prefill-1" in prefill_used, prefill_used
    finally:
        client.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
