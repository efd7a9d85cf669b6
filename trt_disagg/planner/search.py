"""Placement search (DistServe §4.1–4.2 and beyond): maximise goodput per GPU (or per unit of cost).

high node-affinity (fast cross-node links) — DistServe Alg. 1:
    1. For every instance config (GPU type, TP, PP that fits), the goodput of ONE prefill instance on TTFT
       alone and of ONE decode instance on TPOT alone (simulated, `phases=`).
    2. Every prefill config x decode config x instance ratio n:m (not fixed 1:1) is scored by
       min(n * prefill goodput, m * decode goodput) / cost, within each pool's GPUs.
    3. The best few units are simulated end to end on the joint SLO; the best one wins and is grown to
       fill the cluster (`fill.py`: whole units, then the bottleneck phase, then the other phase), which is
       simulated whole; what stays idle is counted against it and explained.
low node-affinity (NVLink only inside a node) — DistServe Alg. 2:
    the pipeline spans `s` nodes; on every node, each of the n prefill and m decode instances has one
    segment of tp x pp_intra GPUs, so the KV moves stage by stage over NVLink. Enumerate s, the segments and
    n:m that fit a node; score and verify as above.
Colocated baselines (`baselines.py`): every TP config within a node (PP only up to `colocated_max_pp`), one
instance, end-to-end simulated with the same workload and SLO, for each policy and each engine's fits (the
same engine as disaggregated, and the published vLLM fits where they exist: the paper's baseline).
PP is searched up to `max_pp` stages (1, 2, 4, 8).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from trt_disagg.contract import Role
from trt_disagg.errors import UserError
from trt_disagg.planner.baselines import BaselineRatio, baseline_ratios, headline
from trt_disagg.planner.fill import fits, grow_unit, replicas_that_fit
from trt_disagg.planner.goodput import SLOTarget, goodput_search, min_duration_for
from trt_disagg.planner.latency_model import InstanceTiming, LatencyModel
from trt_disagg.planner.memory import kv_capacity_tokens
from trt_disagg.planner.models import ModelSpec
from trt_disagg.planner.placement import (
    Candidate,
    Cluster,
    ColocatedPlacement,
    DeploymentGoodput,
    ParallelConfig,
    Placement,
    Pool,
)
from trt_disagg.sim import ColocatedPolicy, ColocatedSpec, DisaggSpec, InstanceSpec, SimWorkload
from trt_disagg.sim.loop import Phases
from trt_disagg.workload import WorkloadReport

log = logging.getLogger(__name__)

PP_CHOICES = (1, 2, 4, 8)
MAX_INSTANCES_PER_PHASE = 8
PREFILL_MAX_BATCH = 64
DECODE_MAX_BATCH = 512
Affinity = Literal["high", "low"]


@dataclass(frozen=True)
class PlanInputs:
    model: ModelSpec
    cluster: Cluster
    lengths: SimWorkload  # request lengths; arrival times are replaced per rate
    unit_arrivals: np.ndarray  # arrival times at 1 request/s (Poisson or Gamma); longer than lengths: the
    # simulations of high rates run this many requests at most (see goodput.workload_at)
    slo: SLOTarget
    latency: dict[str, LatencyModel]  # GPU name -> model for disaggregated instances
    baseline_latency: dict[str, LatencyModel]  # GPU name -> model for the headline colocated baseline
    affinity: Affinity = "high"
    prefill_max_num_tokens: int = 2048
    top_k: int = 3
    colocated_policies: tuple[ColocatedPolicy, ...] = tuple(ColocatedPolicy)
    # The colocated baseline is TP-only by default, like DistServe's vLLM baseline (vLLM had no PP then), and
    # because the simulator's PP lanes would hide how a prefill micro-batch stalls every other micro-batch
    # passing through the same stages, overstating a colocated PP engine.
    colocated_max_pp: int = 1
    # Fixed KV capacity per instance by role, e.g. from a deployment's kv_cache_config.max_tokens (CPU engines
    # allocate it up front); otherwise memory.py computes it.
    kv_capacity_by_role: dict[Role, int] = field(default_factory=dict)
    baseline_engine: str = "same"  # what baseline_latency is: a key of baselines.ENGINE_LABELS
    # Further engines the colocated baselines are also simulated with: engine -> GPU name -> model.
    other_baseline_latency: dict[str, dict[str, LatencyModel]] = field(default_factory=dict)
    max_pp: int = PP_CHOICES[-1]  # pipeline stages searched at most, for either phase
    workload: WorkloadReport | None = None  # how the lengths were made (for the plan's report)

    def colocated_engines(self) -> dict[str, dict[str, LatencyModel]]:
        return {self.baseline_engine: self.baseline_latency, **self.other_baseline_latency}


@dataclass
class PlanResult:
    best_disagg: Candidate
    best_colocated: Candidate
    disagg: list[Candidate] = field(default_factory=list)  # verified units, best first
    colocated: list[Candidate] = field(default_factory=list)  # best first
    phase_goodput: dict[str, float] = field(default_factory=dict)  # "prefill gpu TPxPP" -> req/s
    elapsed_s: float = 0.0
    num_simulations: int = 0
    cluster: Candidate | None = None  # the best unit grown to fill the cluster (what the deployment gets)
    deployment: DeploymentGoodput | None = None  # that, per GPU of the whole cluster (idle ones counted)
    baselines: list[BaselineRatio] = field(default_factory=list)  # one per (policy, engine)

    @property
    def ratio(self) -> float:
        """Per-cost (per-GPU with unit costs) goodput of the best disaggregated unit over `best_colocated` (the
        headline baseline: prefill-first on the plan's baseline engine)."""
        base = self.best_colocated.per_cost_goodput
        return self.best_disagg.per_cost_goodput / base if base > 0 else math.inf


@dataclass(frozen=True)
class _Unit:
    """A scored, not yet verified, disaggregated unit."""

    estimate: float  # min(n * prefill goodput, m * decode goodput) / cost, from the per-phase simulations
    placement: Placement
    prefill_pool: Pool
    decode_pool: Pool
    cross_node_pp: bool | None  # Alg. 2 knows whether the pipeline spans nodes; None: by GPU count
    kv_link_bytes_per_s: float


class _Searcher:
    def __init__(self, inp: PlanInputs) -> None:
        self.inp = inp
        self.num_simulations = 0
        self.phase_cache: dict[tuple[Role, ParallelConfig, bool | None], float] = {}
        mean_in = float(np.mean(inp.lengths.input_len))
        self.mean_in = mean_in
        self.mean_out = float(np.mean(inp.lengths.output_len))

    # ---- instance specs -------------------------------------------------------------------------------
    def instance_spec(self, cfg: ParallelConfig, pool: Pool, role: Role, engine: str | None = None,
                      cross_node_pp: bool | None = None) -> InstanceSpec | None:
        """engine None: the disaggregated instances' fits; else a colocated baseline engine's."""
        models = self.inp.latency if engine is None else self.inp.colocated_engines()[engine]
        lm = models.get(cfg.gpu)
        if lm is None or cfg.tp not in lm.by_tp:
            return None
        capacity = self.inp.kv_capacity_by_role.get(role) or kv_capacity_tokens(self.inp.model, pool.gpu, cfg.tp,
                                                                                  cfg.pp)
        if capacity is None:
            return None
        spans_nodes = cfg.num_gpus > pool.gpus_per_node if cross_node_pp is None else cross_node_pp
        link = self.inp.cluster.network_bytes_per_s if spans_nodes else pool.gpu.nvlink_bytes_per_s
        timing = InstanceTiming(lm.for_tp(cfg.tp), cfg.pp, self.inp.model.shape.hidden_size, link,
                                self.inp.model.dtype_bytes, lm.overheads)
        max_batch = PREFILL_MAX_BATCH if role == Role.PREFILL else DECODE_MAX_BATCH * cfg.pp
        return InstanceSpec(timing, capacity, max_batch, self.inp.prefill_max_num_tokens)

    def configs(self, pool: Pool, max_gpus: int | None = None) -> Iterator[ParallelConfig]:
        limit = pool.num_gpus if max_gpus is None else max_gpus
        models = [self.inp.latency, *self.inp.colocated_engines().values()]
        tps = sorted({tp for m in models if (lm := m.get(pool.gpu.name)) is not None for tp in lm.tps()})
        for tp in tps:
            if tp > pool.gpus_per_node:  # TP across nodes is never worth it
                continue
            for pp in PP_CHOICES:
                if pp <= self.inp.max_pp and tp * pp <= limit and kv_capacity_tokens(self.inp.model, pool.gpu, tp, pp) is not None:
                    yield ParallelConfig(pool.gpu.name, tp, pp)

    # ---- goodput of things ------------------------------------------------------------------------------
    def _goodput(self, spec: DisaggSpec | ColocatedSpec, slo: SLOTarget, guess: float,
                 phases: Phases = "both") -> float:
        found = goodput_search(spec, self.inp.lengths, self.inp.unit_arrivals, slo, guess, phases,
                               min_duration_s=min_duration_for(slo, self.mean_out))
        self.num_simulations += found.num_simulations
        return found.rate_rps

    def _guess(self, spec: InstanceSpec) -> float:
        _, latency = spec.timing.prefill_s(self.mean_in, self.mean_in ** 2)
        return max(0.05, spec.pp / latency)

    def phase_goodput(self, role: Role, cfg: ParallelConfig, pool: Pool, cross_node_pp: bool | None = None) -> float:
        key = (role, cfg, cross_node_pp)
        if key in self.phase_cache:
            return self.phase_cache[key]
        spec = self.instance_spec(cfg, pool, role, cross_node_pp=cross_node_pp)
        assert spec is not None  # configs() only yields configs that fit
        slo = self.inp.slo
        dspec = DisaggSpec(spec, spec, 1, 1, self.inp.model.kv_bytes_per_token, self.inp.cluster.network_bytes_per_s)
        if role == Role.PREFILL:
            rate = self._goodput(dspec, SLOTarget(slo.ttft_s, None, slo.attainment), self._guess(spec), Role.PREFILL)
        else:
            rate = self._goodput(dspec, SLOTarget(None, slo.tpot_s, slo.attainment), self._guess(spec), Role.DECODE)
        self.phase_cache[key] = rate
        return rate

    # ---- high node-affinity (Alg. 1) --------------------------------------------------------------------
    def high_affinity_units(self) -> list[_Unit]:
        scored = []
        pools = self.inp.cluster.pools
        prefill = [(c, p, self.phase_goodput(Role.PREFILL, c, p)) for p in pools for c in self.configs(p)
                   if self.instance_spec(c, p, Role.PREFILL) is not None]
        decode = [(c, p, self.phase_goodput(Role.DECODE, c, p)) for p in pools for c in self.configs(p)
                  if self.instance_spec(c, p, Role.DECODE) is not None]
        for pc, ppool, gp_p in prefill:
            for dc, dpool, gp_d in decode:
                if gp_p <= 0 or gp_d <= 0:
                    continue
                for n in range(1, MAX_INSTANCES_PER_PHASE + 1):
                    for m in range(1, MAX_INSTANCES_PER_PHASE + 1):
                        if math.gcd(n, m) != 1 or not fits(ppool, dpool, n * pc.num_gpus, m * dc.num_gpus):
                            continue
                        cost = n * pc.num_gpus * ppool.cost + m * dc.num_gpus * dpool.cost
                        scored.append(_Unit(min(n * gp_p, m * gp_d) / cost, Placement(pc, dc, n, m), ppool,
                                            dpool, None, self.inp.cluster.network_bytes_per_s))
        scored.sort(key=lambda u: -u.estimate)
        return scored

    # ---- low node-affinity (Alg. 2) ---------------------------------------------------------------------
    def low_affinity_units(self) -> list[_Unit]:
        if len(self.inp.cluster.pools) != 1:
            raise UserError("--affinity low (NVLink only) needs one GPU pool: mixed pools need cross-node links")
        pool = self.inp.cluster.pools[0]
        node = Pool(pool.gpu, 1, pool.gpus_per_node, pool.cost)
        segments = [c for c in self.configs(node, pool.gpus_per_node)]
        seg_shapes = sorted({(c.tp, c.pp) for c in segments} | {(tp, pp) for tp in {c.tp for c in segments}
                                                               for pp in PP_CHOICES
                                                               if tp * pp <= pool.gpus_per_node})
        seg_shapes = [(tp, pp) for tp, pp in seg_shapes if pp <= self.inp.max_pp]
        scored = []
        for span in range(1, pool.nodes + 1):
            for tp_p, ppi_p in seg_shapes:
                for tp_d, ppi_d in seg_shapes:
                    if max(ppi_p, ppi_d) * span > self.inp.max_pp:
                        continue
                    pc = ParallelConfig(pool.gpu.name, tp_p, ppi_p * span)
                    dc = ParallelConfig(pool.gpu.name, tp_d, ppi_d * span)
                    if any(self.instance_spec(c, pool, r, cross_node_pp=span > 1) is None
                           for c, r in ((pc, Role.PREFILL), (dc, Role.DECODE))):
                        continue
                    gp_p = self.phase_goodput(Role.PREFILL, pc, pool, cross_node_pp=span > 1)
                    gp_d = self.phase_goodput(Role.DECODE, dc, pool, cross_node_pp=span > 1)
                    if gp_p <= 0 or gp_d <= 0:
                        continue
                    for n in range(1, pool.gpus_per_node + 1):
                        for m in range(1, pool.gpus_per_node + 1):
                            per_node = n * tp_p * ppi_p + m * tp_d * ppi_d
                            if math.gcd(n, m) != 1 or per_node > pool.gpus_per_node:
                                continue
                            cost = span * per_node * pool.cost
                            scored.append(_Unit(min(n * gp_p, m * gp_d) / cost, Placement(pc, dc, n, m), pool,
                                                pool, span > 1, pool.gpu.nvlink_bytes_per_s))
        scored.sort(key=lambda u: -u.estimate)
        return scored

    def verify(self, unit: _Unit) -> Candidate:
        placement = unit.placement
        p_spec = self.instance_spec(placement.prefill, unit.prefill_pool, Role.PREFILL, cross_node_pp=unit.cross_node_pp)
        d_spec = self.instance_spec(placement.decode, unit.decode_pool, Role.DECODE, cross_node_pp=unit.cross_node_pp)
        assert p_spec is not None and d_spec is not None  # scored units were built from fitting configs
        spec = DisaggSpec(p_spec, d_spec, placement.num_prefill, placement.num_decode,
                          self.inp.model.kv_bytes_per_token, unit.kv_link_bytes_per_s)
        cost = (placement.num_prefill * placement.prefill.num_gpus * unit.prefill_pool.cost
                + placement.num_decode * placement.decode.num_gpus * unit.decode_pool.cost)
        rate = self._goodput(spec, self.inp.slo, max(0.05, unit.estimate * cost))
        replicas = replicas_that_fit(placement, unit.prefill_pool, unit.decode_pool)
        placed = Placement(placement.prefill, placement.decode, placement.num_prefill, placement.num_decode, replicas)
        return Candidate(placed, rate, placement.unit_gpus, cost)

    def fill_cluster(self, best: Candidate) -> DeploymentGoodput:
        """The best unit grown to the cluster (`fill.grow_unit`), simulated whole, per GPU of the cluster."""
        unit = best.placement
        assert isinstance(unit, Placement)
        pools = {p.gpu.name: p for p in self.inp.cluster.pools}
        ppool, dpool = pools[unit.prefill.gpu], pools[unit.decode.gpu]
        growth = grow_unit(unit, self.inp.cluster, ppool, dpool,
                           self.phase_cache.get((Role.PREFILL, unit.prefill, None)),
                           self.phase_cache.get((Role.DECODE, unit.decode, None)))
        n, m = growth.num_prefill, growth.num_decode
        grown = Placement(unit.prefill, unit.decode, n, m)
        cost = n * unit.prefill.num_gpus * ppool.cost + m * unit.decode.num_gpus * dpool.cost
        if (n, m) == (unit.num_prefill, unit.num_decode):
            deployed = Candidate(grown, best.goodput_rps, best.unit_gpus, best.unit_cost)
        else:
            spec = spec_for(self.inp, grown)
            rate = self._goodput(spec, self.inp.slo, best.goodput_rps * n / max(1, unit.num_prefill))
            deployed = Candidate(grown, rate, grown.unit_gpus, cost)
        cluster = self.inp.cluster
        return DeploymentGoodput(deployed, cluster.num_gpus, cluster.cost, growth.idle_gpus, growth.idle_reason)

    def colocated(self) -> list[Candidate]:
        """Every colocated config within a node, for each policy and each baseline engine, best first."""
        out = []
        for engine in self.inp.colocated_engines():
            for pool in self.inp.cluster.pools:
                for cfg in self.configs(pool, pool.gpus_per_node):
                    spec = self.instance_spec(cfg, pool, Role.COLOCATED, engine=engine)
                    if spec is None or cfg.pp > self.inp.colocated_max_pp:
                        continue
                    for policy in self.inp.colocated_policies:
                        rate = self._goodput(ColocatedSpec(spec, 1, policy), self.inp.slo, self._guess(spec))
                        replicas = max(1, pool.num_gpus // cfg.num_gpus)
                        out.append(Candidate(ColocatedPlacement(cfg, policy, replicas), rate, cfg.num_gpus,
                                             cfg.num_gpus * pool.cost, engine))
        out.sort(key=lambda c: -c.per_cost_goodput)
        return out


def check_fits(model: ModelSpec, cluster: Cluster) -> None:
    """UserError unless some TP x PP (TP within a node) of some pool holds the weights and a useful KV cache."""
    for pool in cluster.pools:
        for tp in (1, 2, 4, 8, 16):
            for pp in PP_CHOICES:
                if tp <= pool.gpus_per_node and tp * pp <= pool.num_gpus and kv_capacity_tokens(
                        model, pool.gpu, tp, pp) is not None:
                    return
    raise UserError(f"{model.name} does not fit on this cluster: no TP x PP of "
                    f"{', '.join(f'{p.nodes}x{p.gpus_per_node} {p.gpu.name}' for p in cluster.pools)} leaves room "
                    f"for its KV cache (weights {model.weight_bytes / 1e9:.0f} GB)")


def plan(inp: PlanInputs, fill: bool = True) -> PlanResult:
    """Search placements; the best disaggregated unit and the colocated baselines, all simulated; with
    `fill`, also the best unit grown to the whole cluster (simulated too) and every baseline's ratio."""
    started = time.perf_counter()
    if inp.max_pp < 1:
        raise UserError(f"--max-pp must be >= 1, got {inp.max_pp}")
    check_fits(inp.model, inp.cluster)
    searcher = _Searcher(inp)
    units = searcher.high_affinity_units() if inp.affinity == "high" else searcher.low_affinity_units()
    if not units:
        raise UserError("no disaggregated placement meets the SLO at any rate on this cluster: relax --ttft/--tpot")
    verified: list[Candidate] = []
    seen: set[Placement] = set()
    for unit in units:
        if unit.placement in seen:
            continue
        seen.add(unit.placement)
        verified.append(searcher.verify(unit))
        if len(verified) >= inp.top_k:
            break
    verified.sort(key=lambda c: -c.per_cost_goodput)
    colocated = searcher.colocated()
    if not colocated:
        raise UserError("no colocated configuration fits on one node of this cluster")
    deployment = searcher.fill_cluster(verified[0]) if fill else None
    ratios = baseline_ratios(verified[0], deployment or _unit_deployment(verified[0], inp), colocated, inp.cluster)
    top = headline(ratios, inp.baseline_engine)
    phase = {f"{role} {cfg}": rate for (role, cfg, _), rate in searcher.phase_cache.items()}
    return PlanResult(verified[0], top.unit if top is not None else colocated[0], verified, colocated, phase,
                      time.perf_counter() - started, searcher.num_simulations,
                      deployment.deployed if deployment else None, deployment, ratios)


def _unit_deployment(unit: Candidate, inp: PlanInputs) -> DeploymentGoodput:
    """Without filling: the unit alone on the cluster (everything else idle)."""
    idle = inp.cluster.num_gpus - unit.unit_gpus
    return DeploymentGoodput(unit, inp.cluster.num_gpus, inp.cluster.cost, idle,
                             "the cluster was not filled (plan(fill=False))" if idle else "")


def spec_for(inp: PlanInputs, placement: Placement | ColocatedPlacement,
             engine: str | None = None) -> DisaggSpec | ColocatedSpec:
    """The simulator spec of one unit of a placement (for curves and `simulate`); `engine`: a colocated
    baseline's engine (default: the plan's baseline engine)."""
    searcher = _Searcher(inp)
    pools = {p.gpu.name: p for p in inp.cluster.pools}
    if isinstance(placement, ColocatedPlacement):
        cfg = placement.config
        spec = searcher.instance_spec(cfg, _pool(pools, cfg), Role.COLOCATED, engine=engine or inp.baseline_engine)
        if spec is None:
            raise UserError(f"colocated {cfg}: does not fit or has no latency coefficients")
        return ColocatedSpec(spec, 1, placement.policy)
    p_spec = searcher.instance_spec(placement.prefill, _pool(pools, placement.prefill), Role.PREFILL)
    d_spec = searcher.instance_spec(placement.decode, _pool(pools, placement.decode), Role.DECODE)
    for cfg, spec in ((placement.prefill, p_spec), (placement.decode, d_spec)):
        if spec is None:
            raise UserError(f"{cfg}: {inp.model.name} does not fit, or there are no latency coefficients for TP {cfg.tp}")
    assert p_spec is not None and d_spec is not None
    same_node = inp.affinity == "low"
    link = _pool(pools, placement.prefill).gpu.nvlink_bytes_per_s if same_node else inp.cluster.network_bytes_per_s
    return DisaggSpec(p_spec, d_spec, placement.num_prefill, placement.num_decode, inp.model.kv_bytes_per_token, link)


def _pool(pools: dict[str, Pool], cfg: ParallelConfig) -> Pool:
    if cfg.gpu not in pools:
        raise UserError(f"GPU {cfg.gpu} is not in the cluster ({', '.join(pools)})")
    return pools[cfg.gpu]
