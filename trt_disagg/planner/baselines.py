"""The baselines every ratio names: colocated serving with a policy and an engine's fits.

    policy   prefill-first   vLLM-style: a waiting prompt runs before the next decode step
             chunked         Sarathi-style chunked prefill
    engine   same            the disaggregated instances' own fits (the same engine on both sides)
             vllm            the published vLLM 0.2.3 fits of the DistServe artifact: the paper's baseline

A ratio is per-cost (per-GPU with unit costs) goodput, disaggregated over the baseline, twice:
  unit        the best unit of each (DistServe's definition: its 2.0x for OPT-13B is per GPU of a unit)
  deployment  everything placed on the cluster (`DeploymentGoodput`), idle GPUs counted on both sides

A colocated deployment is its best unit replicated over its pool; each replica serves a random share of a
Poisson stream, which is again Poisson, so its goodput scales with the replica count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trt_disagg.planner.placement import Candidate, Cluster, ColocatedPlacement, DeploymentGoodput
from trt_disagg.sim import ColocatedPolicy

ENGINE_LABELS = {
    "same": "same engine fits as disaggregated",
    "vllm": "published vLLM fits (DistServe artifact, vLLM 0.2.3)",
}
HEADLINE_POLICY = ColocatedPolicy.PREFILL_FIRST  # the paper compares with vLLM, which prioritises prefill


@dataclass(frozen=True)
class BaselineRatio:
    policy: ColocatedPolicy
    engine: str  # a key of ENGINE_LABELS
    unit: Candidate  # the best colocated unit of this policy on this engine
    deployment: DeploymentGoodput  # that unit replicated over the cluster
    unit_ratio: float  # best disaggregated unit / this unit, per cost
    deployment_ratio: float  # disaggregated deployment / this deployment, per cluster cost

    @property
    def label(self) -> str:
        return f"colocated {self.policy} ({ENGINE_LABELS.get(self.engine, self.engine)})"


def colocated_deployment(unit: Candidate, cluster: Cluster) -> DeploymentGoodput:
    """`unit` replicated over its pool of the cluster."""
    assert isinstance(unit.placement, ColocatedPlacement)
    cfg = unit.placement.config
    pool = next(p for p in cluster.pools if p.gpu.name == cfg.gpu)
    replicas = pool.num_gpus // cfg.num_gpus
    used = replicas * cfg.num_gpus
    deployed = Candidate(ColocatedPlacement(cfg, unit.placement.policy, replicas), unit.goodput_rps * replicas,
                         used, used * pool.cost, unit.engine)
    reasons = [f"pool {p.gpu.name} ({p.num_gpus} GPUs) is not used by a colocated {cfg.gpu} deployment"
               for p in cluster.pools if p is not pool]
    if pool.num_gpus > used:
        reasons.append(f"{pool.num_gpus - used} GPUs are fewer than one more instance ({cfg.num_gpus} GPUs)")
    return DeploymentGoodput(deployed, cluster.num_gpus, cluster.cost, cluster.num_gpus - used, "; ".join(reasons))


def baseline_ratios(best_unit: Candidate, deployment: DeploymentGoodput, colocated: list[Candidate],
                    cluster: Cluster) -> list[BaselineRatio]:
    """One ratio per (policy, engine) pair among `colocated` (best first), against its best unit."""
    out: list[BaselineRatio] = []
    seen: set[tuple[ColocatedPolicy, str]] = set()
    for cand in colocated:
        assert isinstance(cand.placement, ColocatedPlacement)
        key = (cand.placement.policy, cand.engine or "same")
        if key in seen:
            continue
        seen.add(key)
        dep = colocated_deployment(cand, cluster)
        out.append(BaselineRatio(key[0], key[1], cand, dep, _ratio(best_unit.per_cost_goodput, cand.per_cost_goodput),
                                 _ratio(deployment.per_cost_goodput, dep.per_cost_goodput)))
    return out


def headline(ratios: list[BaselineRatio], engine: str) -> BaselineRatio | None:
    """The paper's comparison: prefill-first colocated on `engine` (the plan's baseline engine)."""
    return next((r for r in ratios if r.policy == HEADLINE_POLICY and r.engine == engine), None)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf
