"""One configuration, simulated: SLO attainment at given rates, or the tightest SLO scale met at one rate.

    placement (flags or a deployment YAML) ─▶ unit_spec ─▶ sim.simulate at each rate ─▶ rows (what
    `trt-disagg simulate` prints)

The same `PlanInputs` as the placement search feed it (`planner.request.plan_inputs`), so a configuration
`plan` proposes and the one `simulate` checks see the same workload, arrivals and latency models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.planner.goodput import min_duration_for, workload_at
from trt_disagg.planner.placement import ColocatedPlacement, ParallelConfig, Placement
from trt_disagg.planner.search import PlanInputs, spec_for
from trt_disagg.sim import ColocatedPolicy, ColocatedSpec, DisaggSpec, SimResult, simulate

MAX_SLO_SCALE = 1e6
SLO_SCALE_BISECTIONS = 40


@dataclass(frozen=True)
class DeploymentPlacement:
    """A deployment YAML's instances as a placement, and the KV capacities its engines fix."""

    placement: Placement | ColocatedPlacement
    kv_capacity_by_role: dict[Role, int]  # roles whose kv_cache_config.max_tokens is set


def placement_from_deployment(path: Path, gpu: str, policy: ColocatedPolicy) -> DeploymentPlacement:
    """`gpu` for groups that name none; `policy` for a colocated deployment (the YAML does not say)."""
    dep = load_deployment(path)
    groups = dep.groups()
    capacities = {role: group.kv_cache_config.max_tokens for role, group in groups.items()
                  if group.kv_cache_config.max_tokens is not None}

    def cfg(group: Any) -> ParallelConfig:
        return ParallelConfig(group.gpu or gpu, group.tp, group.pp)

    if Role.PREFILL in groups and Role.DECODE in groups:
        p, d = groups[Role.PREFILL], groups[Role.DECODE]
        return DeploymentPlacement(Placement(cfg(p), cfg(d), p.num_instances, d.num_instances), capacities)
    c = groups[Role.COLOCATED]  # load_deployment checked that the roles come in one of these two shapes
    return DeploymentPlacement(ColocatedPlacement(cfg(c), policy, c.num_instances), capacities)


def unit_spec(inp: PlanInputs, placement: Placement | ColocatedPlacement) -> DisaggSpec | ColocatedSpec:
    """The simulator spec of the placement as given: a colocated placement keeps all its replicas (a
    disaggregated unit is simulated as one unit, as the search scores it)."""
    spec = spec_for(inp, placement)
    if isinstance(placement, ColocatedPlacement) and isinstance(spec, ColocatedSpec) and placement.replicas > 1:
        return ColocatedSpec(spec.instance, placement.replicas, placement.policy)
    return spec


def _duration_s(inp: PlanInputs) -> float:
    return min_duration_for(inp.slo, float(np.mean(inp.lengths.output_len)))


def attainment_rows(inp: PlanInputs, spec: DisaggSpec | ColocatedSpec, rates: list[float]) -> list[dict[str, Any]]:
    """Per rate: attainment of the request's SLO, requests simulated, TTFT/TPOT percentiles."""
    ttft_s, tpot_s, duration_s = inp.slo.ttft_s, inp.slo.tpot_s, _duration_s(inp)
    rows = []
    for rate in rates:
        result = simulate(spec, workload_at(inp.lengths, inp.unit_arrivals, rate, duration_s))
        rows.append({"rate_rps": rate, "attainment": result.attainment(ttft_s, tpot_s),
                     "num_requests": len(result.arrival_s), **result.percentiles()})
    return rows


def slo_scale_row(inp: PlanInputs, spec: DisaggSpec | ColocatedSpec, rate: float) -> dict[str, Any]:
    """At one rate: the tightest scale s at which (s x TTFT, s x TPOT) is met, the scaled SLOs, percentiles."""
    ttft_s, tpot_s = inp.slo.ttft_s, inp.slo.tpot_s
    assert ttft_s is not None and tpot_s is not None  # a PlanRequest always sets both
    result = simulate(spec, workload_at(inp.lengths, inp.unit_arrivals, rate, _duration_s(inp)))
    scale = tightest_slo_scale(result, ttft_s, tpot_s, inp.slo.attainment)
    return {"rate_rps": rate, "slo_scale": scale, "ttft_s": ttft_s * scale, "tpot_s": tpot_s * scale,
            **result.percentiles()}


def tightest_slo_scale(result: SimResult, ttft_s: float, tpot_s: float, target: float) -> float:
    """Smallest s with attainment(s*ttft, s*tpot) >= target, from one simulation (attainment grows with s)."""
    lo, hi = 0.0, 1.0
    while result.attainment(ttft_s * hi, tpot_s * hi) < target:
        hi *= 2
        if hi > MAX_SLO_SCALE:
            return float("inf")
    for _ in range(SLO_SCALE_BISECTIONS):
        mid = (lo + hi) / 2
        if result.attainment(ttft_s * mid, tpot_s * mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi
