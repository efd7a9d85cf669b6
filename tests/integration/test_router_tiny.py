"""The router in front of the real tiny engines (prefill TP2, decode PP2, colocated TP1) in real
tritonserver processes, driven with the official `openai` client: completions and chat, streaming and
not; the disaggregated answer equals the colocated one (greedy), and each record walks its states."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.integration.router_helpers import serve, tiny
from trt_disagg.contract import Role
from trt_disagg.triton.cluster import LocalCluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DISAGG = ["RECEIVED", "PREFILL_QUEUED", "PREFILLING", "PREFILL_DONE", "DECODE_DISPATCHED", "DECODING", "DONE"]


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory: pytest.TempPathFactory):
    from trt_disagg.build.builder import build_deployment

    root = tmp_path_factory.mktemp("tiny-router")
    dep = tiny()
    build_deployment(dep, engines_root=root)
    cluster = LocalCluster(dep, engines_root=root, start_router=False, ready_timeout_s=240)
    cluster.start()
    yield cluster, root
    cluster.stop()


def settings(cluster: LocalCluster, root: Path, threshold: int) -> RouterSettings:
    return RouterSettings.from_deployment(cluster.dep, str(cluster.redis_url), port=0, router_id=f"tiny-{threshold}",
                                          colocated_threshold_tokens=threshold,
                                          engine_dir=cluster.dep.engine_dir(Role.COLOCATED, root))


async def ask_all(url: str) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    out: dict[str, str] = {}
    try:
        c = await client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                            temperature=0)
        assert c.usage.completion_tokens >= 1
        out["completion"] = c.choices[0].text
        out["completion_id"] = c.id
        stream = await client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                                 temperature=0, stream=True)
        out["completion_stream"] = "".join([ch.choices[0].text async for ch in stream if ch.choices])
        msgs = [{"role": "user", "content": "Say hello."}]
        chat = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        out["chat"] = chat.choices[0].message.content or ""
        stream = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                      stream=True)
        out["chat_stream"] = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    finally:
        await client.close()
    return out


async def test_openai_client_disaggregated_equals_colocated(tiny_cluster):
    cluster, root = tiny_cluster
    disagg_app = create_app(settings(cluster, root, threshold=0))
    async with serve(disagg_app) as url:
        disagg = await ask_all(url)
        rec = await disagg_app.state.router.records.get(disagg.pop("completion_id"))
        assert [e["state"] for e in rec.events] == DISAGG
        assert rec.fields["prefill_instance"] == "prefill-0" and rec.fields["decode_instance"] == "decode-0"
    colocated_app = create_app(settings(cluster, root, threshold=10_000))
    async with serve(colocated_app) as url:
        colocated = await ask_all(url)
        rec = await colocated_app.state.router.records.get(colocated.pop("completion_id"))
        assert rec.fields["path"] == "colocated"
    assert all(disagg.values()) and disagg == colocated
    assert disagg["completion"] == disagg["completion_stream"] and disagg["chat"] == disagg["chat_stream"]
