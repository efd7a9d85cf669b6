"""Which node each instance of a planned deployment runs on (`ServerGroup.nodes`), for multi-node clusters.

The planner decides how many instances of what shape; this decides where, the way the plan was scored:

    NVLink only (DistServe Alg. 2, affinity "low"): a unit's pipelines span `s` nodes and on each of them
        every prefill and every decode instance of the unit has one segment, so the KV of stage k moves
        over NVLink. Replica r takes nodes r*s .. r*s+s-1; instance segment k runs on node r*s+k.
    fast cross-node links (Alg. 1, affinity "high"): instances are packed first-fit onto the nodes of
        their GPU type's pool (largest first); an instance wider than a node takes whole nodes.

Nodes are named `node-<i>` (`<gpu>-node-<i>` when the cluster mixes GPU types): logical names that an
operator maps onto real hosts (`render --k8s` pins them with node affinity on the label trt-disagg.io/node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trt_disagg.config import Deployment
from trt_disagg.errors import UserError


@dataclass(frozen=True)
class NodePool:
    """The nodes of one GPU type."""

    gpu: str
    nodes: int
    gpus_per_node: int


@dataclass(frozen=True)
class Shape:
    """What is placed: `count` instances of `num_gpus` GPUs each, `pp` pipeline stages, of one GPU type."""

    gpu: str
    num_gpus: int
    pp: int
    count: int


def _node_name(pool: NodePool, i: int, mixed: bool) -> str:
    return f"{pool.gpu}-node-{i}" if mixed else f"node-{i}"


def place_low_affinity(prefill: Shape, decode: Shape, pool: NodePool) -> tuple[list[list[str]], list[list[str]]]:
    """Alg. 2: the nodes of every prefill and decode instance; segment k of each shares node k of its unit.

    The search only scores units whose n:m is in lowest terms, so the deployment is gcd(counts) units."""
    replicas = math.gcd(prefill.count, decode.count)
    per_replica_p = prefill.count // replicas
    per_replica_d = decode.count // replicas
    span = _span(prefill, decode, per_replica_p, per_replica_d, pool.gpus_per_node)
    if replicas * span > pool.nodes:
        raise UserError(f"{replicas} units of {span} node(s) do not fit {pool.nodes} nodes")
    prefill_nodes, decode_nodes = [], []
    for r in range(replicas):
        segment_nodes = [_node_name(pool, r * span + k, False) for k in range(span)]
        prefill_nodes += [list(segment_nodes) for _ in range(per_replica_p)]
        decode_nodes += [list(segment_nodes) for _ in range(per_replica_d)]
    return prefill_nodes, decode_nodes


def _span(prefill: Shape, decode: Shape, n: int, m: int, gpus_per_node: int) -> int:
    """The fewest nodes a unit's pipelines can span with every segment of it on each node."""
    for span in range(1, max(prefill.pp, decode.pp) + 1):
        if prefill.pp % span or decode.pp % span:
            continue
        if n * prefill.num_gpus // span + m * decode.num_gpus // span <= gpus_per_node:
            return span
    raise UserError(f"a unit of {n} prefill x {prefill.num_gpus} + {m} decode x {decode.num_gpus} GPUs "
                    f"cannot be split into per-node segments of {gpus_per_node} GPUs")


def place_high_affinity(shapes: list[Shape], pools: list[NodePool]) -> list[list[list[str]]]:
    """Alg. 1: first-fit of each shape's instances onto its pool's nodes; returns the nodes per instance."""
    mixed = len(pools) > 1
    free = {p.gpu: [p.gpus_per_node] * p.nodes for p in pools}
    by_gpu = {p.gpu: p for p in pools}
    out: list[list[list[str]]] = [[] for _ in shapes]
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i].num_gpus)
    for i in order:
        shape = shapes[i]
        pool = by_gpu.get(shape.gpu)
        if pool is None:
            raise UserError(f"no node pool of GPU type {shape.gpu}")
        for _ in range(shape.count):
            out[i].append(_take(free[shape.gpu], shape.num_gpus, pool, mixed))
    return out


def _take(free: list[int], num_gpus: int, pool: NodePool, mixed: bool) -> list[str]:
    if num_gpus <= pool.gpus_per_node:
        for node, left in enumerate(free):
            if left >= num_gpus:
                free[node] -= num_gpus
                return [_node_name(pool, node, mixed)]
    else:
        span = math.ceil(num_gpus / pool.gpus_per_node)
        for start in range(len(free) - span + 1):
            if all(free[start + k] == pool.gpus_per_node for k in range(span)):
                for k in range(span):
                    free[start + k] = 0
                return [_node_name(pool, start + k, mixed) for k in range(span)]
    raise UserError(f"an instance of {num_gpus} GPUs does not fit the free GPUs of the {pool.gpu} nodes")


def with_node_placement(dep: Deployment, pools: list[NodePool], affinity: str) -> Deployment:
    """`dep` with `nodes` filled in for its prefill and decode groups (a no-op on a one-node cluster)."""
    p, d = dep.context_servers, dep.generation_servers
    if p is None or d is None or sum(pool.nodes for pool in pools) <= 1:
        return dep
    shapes = [Shape(p.gpu or pools[0].gpu, p.world_size, p.pp, p.num_instances),
              Shape(d.gpu or pools[0].gpu, d.world_size, d.pp, d.num_instances)]
    if affinity == "low":
        if len(pools) != 1:
            raise UserError("NVLink-only placement needs one GPU pool")
        p_nodes, d_nodes = place_low_affinity(shapes[0], shapes[1], pools[0])
    else:
        p_nodes, d_nodes = place_high_affinity(shapes, pools)
    return dep.model_copy(update={"context_servers": p.model_copy(update={"nodes": p_nodes}),
                                  "generation_servers": d.model_copy(update={"nodes": d_nodes})})
