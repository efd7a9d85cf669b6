"""Placement search end to end on small inputs, and the deployment it writes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import yaml

from trt_disagg.config import SLO, dump_deployment, parse_deployment
from trt_disagg.errors import UserError
from trt_disagg.planner.deployment import placement_to_deployment
from trt_disagg.planner.fill import grow_unit
from trt_disagg.planner.goodput import SLOTarget, max_rate
from trt_disagg.planner.hardware import GPUS
from trt_disagg.planner.inputs import baseline_engine_models, latency_models, parse_cluster, parse_parallel
from trt_disagg.planner.models import MODELS
from trt_disagg.planner.placement import Cluster, ColocatedPlacement, ParallelConfig, Placement, Pool
from trt_disagg.planner.search import PlanInputs, plan
from trt_disagg.sim import ColocatedPolicy, SimWorkload
from trt_disagg.workload import make_arrivals


def inputs(model="opt-13b", pools=(Pool(GPUS["a100-80g"], 1, 4),), affinity="high", ttft=0.25, tpot=0.1,
           n=200) -> PlanInputs:
    rng = np.random.default_rng(0)
    lengths = SimWorkload.from_lengths(np.zeros(n), rng.integers(16, 600, n), rng.integers(2, 300, n))
    spec = MODELS[model]
    lm = latency_models(spec, [p.gpu.name for p in pools], "auto", None)
    return PlanInputs(spec, Cluster(tuple(pools)), lengths, make_arrivals("poisson", 1.0, 4000, seed=0),
                      SLOTarget(ttft, tpot, 0.9), lm, lm, affinity, top_k=2, colocated_policies=("prefill-first",))


def test_max_rate_brackets_and_bisects_a_monotone_curve():
    assert max_rate(lambda r: 1.0 if r <= 7.3 else 0.5, 0.9, guess=1.0, rel_tol=0.01) == pytest.approx(7.3, rel=0.01)
    assert max_rate(lambda r: 1.0 if r <= 0.2 else 0.0, 0.9, guess=50.0, rel_tol=0.01) == pytest.approx(0.2, rel=0.01)
    assert max_rate(lambda r: 0.0, 0.9, guess=1.0) == 0.0


def test_high_affinity_plan_returns_a_fitting_disaggregated_unit_and_a_colocated_baseline():
    inp = inputs()
    result = plan(inp)
    best = result.best_disagg
    assert isinstance(best.placement, Placement)
    assert best.goodput_rps > 0 and best.unit_gpus <= 4
    assert best.placement.replicas * best.unit_gpus <= 4
    assert isinstance(result.best_colocated.placement, ColocatedPlacement)
    assert result.best_colocated.goodput_rps > 0
    assert result.ratio == pytest.approx(best.per_gpu_goodput / result.best_colocated.per_gpu_goodput)
    assert all(a.per_cost_goodput >= b.per_cost_goodput for a, b in zip(result.disagg, result.disagg[1:], strict=False))
    assert result.num_simulations > 10 and "prefill a100-80g TP1xPP1" in result.phase_goodput


def test_the_deployed_placement_grows_the_best_unit_to_the_cluster():
    result = plan(inputs(pools=(Pool(GPUS["a100-80g"], 1, 8),)))
    unit, grown = result.best_disagg.placement, result.cluster.placement  # type: ignore[union-attr]
    assert isinstance(unit, Placement) and isinstance(grown, Placement)
    assert (grown.prefill, grown.decode) == (unit.prefill, unit.decode)
    assert grown.num_prefill >= unit.num_prefill and grown.num_decode >= unit.num_decode
    assert unit.unit_gpus <= grown.unit_gpus <= 8
    assert result.cluster.goodput_rps >= 0.9 * result.best_disagg.goodput_rps  # type: ignore[union-attr]


def test_two_node_plan_fills_the_cluster_and_counts_idle_gpus_against_it():
    result = plan(inputs(pools=(Pool(GPUS["a100-80g"], 2, 4),), n=120))
    dep = result.deployment
    assert dep is not None and dep.cluster_gpus == 8
    unit = result.best_disagg.placement
    assert isinstance(unit, Placement)
    # Nothing as big as one more instance of either phase is left, and what is left is explained.
    assert dep.idle_gpus < min(unit.prefill.num_gpus, unit.decode.num_gpus)
    assert (dep.idle_gpus == 0) == (dep.idle_reason == "")
    assert dep.per_gpu_goodput == pytest.approx(dep.goodput_rps / 8)  # per GPU of the cluster, idle ones counted


def test_grow_unit_fills_with_the_other_phase_when_the_bottleneck_no_longer_fits():
    pool = Pool(GPUS["a100-80g"], 2, 8)
    a100 = "a100-80g"
    unit = Placement(ParallelConfig(a100, 4, 1), ParallelConfig(a100, 1, 1), 1, 1)  # 5 GPUs, prefill-bound
    growth = grow_unit(unit, Cluster((pool,)), pool, pool, prefill_rps=1.0, decode_rps=10.0)
    # 3 whole units (15 GPUs), then no room for a 4-GPU prefill: the 16th GPU takes one more decode instance.
    assert (growth.num_prefill, growth.num_decode, growth.idle_gpus) == (3, 4, 0)
    whole = grow_unit(unit, Cluster((pool,)), pool, pool, None, None)  # Alg. 2: whole units only
    assert (whole.num_prefill, whole.num_decode, whole.idle_gpus) == (3, 3, 1)
    assert "fewer than one more unit" in whole.idle_reason


def test_max_pp_limits_the_pipeline_stages_searched():
    result = plan(replace(inputs(pools=(Pool(GPUS["a100-80g"], 1, 8),), n=80), max_pp=1))
    placements = [c.placement for c in result.disagg]
    assert all(isinstance(p, Placement) and p.prefill.pp == p.decode.pp == 1 for p in placements)
    assert all("PP1" in key for key in result.phase_goodput)
    with pytest.raises(UserError, match="--max-pp must be >= 1"):
        plan(replace(inputs(), max_pp=0))


def test_every_baseline_ratio_names_its_policy_and_engine():
    inp = inputs(n=120)
    vllm = baseline_engine_models(inp.model, ["a100-80g"], "vllm", inp.latency)
    result = plan(replace(inp, baseline_engine="vllm", baseline_latency=vllm,
                          other_baseline_latency={"same": inp.latency}, colocated_policies=tuple(ColocatedPolicy)))
    named = {(r.policy, r.engine) for r in result.baselines}
    assert named == {(p, e) for p in ColocatedPolicy for e in ("same", "vllm")}
    top = next(r for r in result.baselines if (r.policy, r.engine) == ("prefill-first", "vllm"))
    assert result.best_colocated == top.unit and result.ratio == pytest.approx(top.unit_ratio)
    assert all(r.unit.engine == r.engine and r.deployment.cluster_gpus == 4 for r in result.baselines)


def test_low_affinity_plan_keeps_each_unit_inside_nodes():
    result = plan(inputs(pools=(Pool(GPUS["a100-80g"], 2, 4),), affinity="low"))
    p = result.best_disagg.placement
    assert isinstance(p, Placement)

    def per_node(span: int) -> int:  # GPUs of the unit's stage segments on each of its `span` nodes
        return p.num_prefill * p.prefill.tp * (p.prefill.pp // span) + p.num_decode * p.decode.tp * (p.decode.pp // span)

    assert any(p.prefill.pp % s == 0 and p.decode.pp % s == 0 and per_node(s) <= 4 for s in (1, 2))


def test_mixed_pools_weigh_cost():
    pricey = (Pool(GPUS["h100-sxm"], 1, 2, cost=100.0), Pool(GPUS["a100-80g"], 1, 2, cost=1.0))
    result = plan(inputs(pools=pricey))
    best = result.best_disagg.placement
    assert isinstance(best, Placement)
    assert best.prefill.gpu == best.decode.gpu == "a100-80g"  # an H100 would cost 100x for ~3x the speed
    assert result.best_disagg.unit_cost == result.best_disagg.unit_gpus


def test_a_model_that_cannot_fit_is_a_user_error():
    with pytest.raises(UserError, match="does not fit on this cluster"):
        plan(inputs(model="opt-175b", pools=(Pool(GPUS["a100-40g"], 1, 2),)))


def test_planned_deployment_loads_unchanged_with_the_tensorrtllm_backend():
    placement = Placement(parse_parallel("2x1", "a100-80g", "--prefill"), parse_parallel("tp1xpp2", "a100-80g", "x"),
                          2, 1, replicas=2)
    dep = placement_to_deployment(placement, MODELS["opt-13b"], SLO(ttft_s=0.25, tpot_s=0.1), max_input_len=1024,
                                  max_seq_len=2048, prefill_max_num_tokens=2048, gpus_per_node={"a100-80g": 8})
    text = dump_deployment(dep)
    loaded = parse_deployment(yaml.safe_load(text))
    assert loaded == dep
    assert loaded.context_servers is not None and loaded.generation_servers is not None
    assert loaded.context_servers.backend == "tensorrtllm" and loaded.context_servers.num_instances == 4
    assert (loaded.generation_servers.tp, loaded.generation_servers.pp) == (1, 2)
    assert loaded.generation_servers.num_instances == 2 and loaded.model.hf_model_name == "facebook/opt-13b"


def test_cluster_and_parallel_parsing_errors_name_the_flag():
    cluster = parse_cluster("a100", 1, 8, ["h100-sxm:2x8@2.5", "a100-80g:1x4"], 200.0)
    assert [(p.gpu.name, p.num_gpus, p.cost) for p in cluster.pools] == [("h100-sxm", 16, 2.5), ("a100-80g", 4, 1.0)]
    with pytest.raises(UserError, match="--pool"):
        parse_cluster("a100", 1, 8, ["h100:two"], 200.0)
    with pytest.raises(UserError, match="--network-gbps"):
        parse_cluster("a100", 1, 8, None, 0.0)
    with pytest.raises(UserError, match="--prefill"):
        parse_parallel("two", "a100", "--prefill")
    with pytest.raises(UserError, match="--latency-source published"):
        latency_models(MODELS["llama-3-8b"], ["h100-sxm"], "published", None)
