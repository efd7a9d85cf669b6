"""Filling the cluster with the best unit, and saying what stays idle and why.

    1. replicate the unit whole as many times as the pools allow
    2. add one instance at a time of whichever phase is the bottleneck (n * prefill goodput vs
       m * decode goodput, from the per-phase simulations), while it fits: DistServe sizes n:m this way
    3. then add instances of the other phase while they fit: they do not raise goodput, but idle GPUs count
       against goodput per deployment GPU either way, and they absorb bursts
    4. whatever is left is smaller than one instance of either phase (or a pool neither phase uses): the
       reason is returned with the count

Units of Alg. 2 (NVLink only) are replicated whole and never grown: their segments share nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_disagg.planner.placement import Cluster, Placement, Pool


@dataclass(frozen=True)
class Growth:
    num_prefill: int
    num_decode: int
    idle_gpus: int
    idle_reason: str  # empty when no GPU is idle


def grow_unit(unit: Placement, cluster: Cluster, ppool: Pool, dpool: Pool, prefill_rps: float | None,
              decode_rps: float | None) -> Growth:
    """n:m instance counts for the whole cluster. prefill_rps / decode_rps: one instance's goodput on its own
    SLO; None for Alg. 2 units, which are only replicated."""
    replicas = replicas_that_fit(unit, ppool, dpool)
    n, m = unit.num_prefill * replicas, unit.num_decode * replicas
    g_p, g_d = unit.prefill.num_gpus, unit.decode.num_gpus
    if prefill_rps is not None and decode_rps is not None:
        while True:  # the bottleneck phase first
            add_prefill = n * prefill_rps <= m * decode_rps
            if add_prefill and fits(ppool, dpool, (n + 1) * g_p, m * g_d):
                n += 1
            elif not add_prefill and fits(ppool, dpool, n * g_p, (m + 1) * g_d):
                m += 1
            else:
                break
        while fits(ppool, dpool, (n + 1) * g_p, m * g_d):  # then whichever still fits
            n += 1
        while fits(ppool, dpool, n * g_p, (m + 1) * g_d):
            m += 1
    used = n * g_p + m * g_d
    idle = cluster.num_gpus - used
    return Growth(n, m, idle, _idle_reason(unit, cluster, ppool, dpool, n, m, prefill_rps is None) if idle else "")


def _idle_reason(unit: Placement, cluster: Cluster, ppool: Pool, dpool: Pool, n: int, m: int,
                 whole_units: bool) -> str:
    reasons = [f"pool {p.gpu.name} ({p.num_gpus} GPUs) is used by neither phase of the best unit"
               for p in cluster.pools if p is not ppool and p is not dpool]
    if ppool is dpool:
        left = ppool.num_gpus - n * unit.prefill.num_gpus - m * unit.decode.num_gpus
        if left and whole_units:
            reasons.append(f"{left} GPUs are fewer than one more unit ({unit.unit_gpus} GPUs; with --affinity "
                           "low units are only replicated whole, their segments share nodes)")
        elif left:
            reasons.append(f"{left} GPUs are fewer than one more prefill instance ({unit.prefill.num_gpus} GPUs) "
                           f"or decode instance ({unit.decode.num_gpus} GPUs)")
        return "; ".join(reasons)
    for pool, count, cfg, role in ((ppool, n, unit.prefill, "prefill"), (dpool, m, unit.decode, "decode")):
        left = pool.num_gpus - count * cfg.num_gpus
        if left:
            reasons.append(f"{left} GPUs of pool {pool.gpu.name} are fewer than one more {role} instance "
                           f"({cfg.num_gpus} GPUs)")
    return "; ".join(reasons)


def fits(ppool: Pool, dpool: Pool, prefill_gpus: int, decode_gpus: int) -> bool:
    if ppool is dpool:
        return prefill_gpus + decode_gpus <= ppool.num_gpus
    return prefill_gpus <= ppool.num_gpus and decode_gpus <= dpool.num_gpus


def replicas_that_fit(placement: Placement, ppool: Pool, dpool: Pool) -> int:
    p_gpus = placement.num_prefill * placement.prefill.num_gpus
    d_gpus = placement.num_decode * placement.decode.num_gpus
    if ppool is dpool:
        return max(1, ppool.num_gpus // (p_gpus + d_gpus))
    return max(1, min(ppool.num_gpus // p_gpus, dpool.num_gpus // d_gpus))
