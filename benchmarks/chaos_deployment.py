"""The tiny deployment the overload benchmarks run (benchmarks/chaos.py, benchmarks/admission_routers.py): two
decode instances, the router admitting against the TTFT SLO, built under a scratch directory."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis
import yaml

from trt_disagg.config import load_deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.registry_read import get_load, list_instances
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.triton.launch import free_port

REPO = Path(__file__).resolve().parents[1]


def write_config(root: Path, router_port: int, ttft_slo_s: float) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["name"] = "chaos"
    raw["generation_servers"]["num_instances"] = 2
    raw["engines_dir"] = str(root)
    raw["slo"]["ttft_s"] = ttft_slo_s
    raw["router"].update(port=router_port, admission="ttft")
    path = root / "chaos.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    parse_deployment(raw)  # fail here, not in the router process, if the YAML is wrong
    return path


def tiny_cluster(root: Path, ttft_slo_s: float) -> tuple[LocalCluster, Path]:
    """The tiny deployment (2 decode instances, admission against the TTFT SLO) built under `root`, not
    started; with its config's path."""
    from trt_disagg.engine_build.builder import build_deployment

    config = write_config(root, free_port(), ttft_slo_s)
    dep = load_deployment(config)
    print("building the tiny engines ...", flush=True)
    build_deployment(dep, engines_root=root)
    return LocalCluster(dep, config_path=config, engines_root=root, start_router=True, ready_timeout_s=300), config


async def idle(cluster: LocalCluster) -> bool:
    """No instance runs a sequence or holds un-pulled KV (what a leak would leave)."""
    client = aioredis.from_url(str(cluster.redis_url))
    try:
        for role in Role:
            for info in await list_instances(client, role):
                load = await get_load(client, info.instance_id)
                if load is None or load.running_sequences or load.pending_kv_handoffs:
                    return False
        return True
    finally:
        await client.aclose()
