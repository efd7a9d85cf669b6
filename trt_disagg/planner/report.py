"""What a plan says, as plain data (printed by `trt-disagg plan`, written next to its deployment YAML).

Every ratio names its baseline (policy and engine fits) and its scope:
    unit        per-GPU goodput of the best disaggregated unit over the best colocated unit (DistServe's
                definition; the headline, against prefill-first on the plan's baseline engine)
    deployment  goodput per GPU of the cluster, idle GPUs counted, of what is deployed on each side
The workload section says where the token counts come from and what the limits dropped or truncated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trt_disagg.planner.baselines import ENGINE_LABELS, BaselineRatio, headline
from trt_disagg.planner.placement import Candidate, DeploymentGoodput
from trt_disagg.planner.search import PlanInputs, PlanResult

HEADLINE_DEFINITION = ("per-GPU goodput of the best disaggregated unit over the best colocated prefill-first "
                       "unit (DistServe's definition)")


def candidate_row(cand: Candidate) -> dict[str, Any]:
    return {"placement": str(cand.placement), "unit_gpus": cand.unit_gpus, "goodput_rps": round(cand.goodput_rps, 4),
            "per_gpu_goodput_rps": round(cand.per_gpu_goodput, 4),
            "per_cost_goodput_rps": round(cand.per_cost_goodput, 4),
            "replicas": cand.placement.replicas}


def deployment_row(dep: DeploymentGoodput) -> dict[str, Any]:
    return {"placement": str(dep.deployed.placement), "goodput_rps": round(dep.goodput_rps, 4),
            "gpus_used": dep.deployed.unit_gpus, "cluster_gpus": dep.cluster_gpus, "idle_gpus": dep.idle_gpus,
            "idle_reason": dep.idle_reason or None,
            "per_gpu_goodput_rps": round(dep.per_gpu_goodput, 4),
            "per_cost_goodput_rps": round(dep.per_cost_goodput, 4)}


def baseline_row(inp: PlanInputs, r: BaselineRatio) -> dict[str, Any]:
    models = inp.colocated_engines().get(r.engine, {})
    return {"baseline": r.label, "policy": str(r.policy), "engine": r.engine,
            "engine_fits": ENGINE_LABELS.get(r.engine, r.engine),
            "latency": {g: lm.source for g, lm in models.items()},
            "unit": candidate_row(r.unit), "deployment": deployment_row(r.deployment),
            "unit_ratio": round(r.unit_ratio, 4), "deployment_ratio": round(r.deployment_ratio, 4)}


def token_counts_text(inp: PlanInputs) -> str:
    report = inp.workload
    if report is None:
        return "unknown"
    if report.token_counts == "estimate":
        return (f"estimate (~4 characters per token): {inp.model.name}'s tokenizer is not available offline, "
                "so lengths are good to about +-20%")
    if report.token_counts == "given":
        return "given (exact lengths from the workload definition or file)"
    return f"{inp.model.name}'s own tokenizer ({report.token_counts.removeprefix('tokenizer:')})"


def workload_section(inp: PlanInputs) -> dict[str, Any]:
    out: dict[str, Any] = {"num_requests": len(inp.lengths),
                           "mean_input_len": round(float(np.mean(inp.lengths.input_len)), 1),
                           "mean_output_len": round(float(np.mean(inp.lengths.output_len)), 1),
                           "max_input_len": int(np.max(inp.lengths.input_len)),
                           "token_counts": token_counts_text(inp)}
    if inp.workload is not None:
        w = inp.workload
        out.update(source=w.source, examined=w.num_examined, distinct_kept=w.num_kept, dropped=w.dropped,
                   truncated=w.truncated, long_prompts=w.long_prompts)
    return out


def plan_summary(inp: PlanInputs, result: PlanResult) -> dict[str, Any]:
    top = headline(result.baselines, inp.baseline_engine)
    dep = result.deployment
    return {
        "model": inp.model.name,
        "cluster": [f"{p.gpu.name}:{p.nodes}x{p.gpus_per_node}@{p.cost:g}" for p in inp.cluster.pools],
        "slo": {"ttft_s": inp.slo.ttft_s, "tpot_s": inp.slo.tpot_s, "attainment": inp.slo.attainment},
        "latency": {g: lm.source for g, lm in inp.latency.items()},
        "engine_overheads": {g: lm.overheads.to_dict() for g, lm in inp.latency.items()},
        "workload": workload_section(inp),
        "affinity": inp.affinity,
        "max_pp": inp.max_pp,
        "best_disaggregated": candidate_row(result.best_disagg),
        "deployment": deployment_row(dep) if dep is not None else None,
        "goodput_per_gpu_rps": round(dep.per_gpu_goodput, 4) if dep is not None else None,
        "headline": None if top is None else {
            "definition": HEADLINE_DEFINITION, "baseline": top.label, "engine": top.engine,
            "unit_ratio": round(top.unit_ratio, 4), "deployment_ratio": round(top.deployment_ratio, 4)},
        "baselines": [baseline_row(inp, r) for r in result.baselines],
        "disaggregated_candidates": [candidate_row(c) for c in result.disagg],
        "phase_goodput_rps": {k: round(v, 4) for k, v in result.phase_goodput.items()},
        "elapsed_s": round(result.elapsed_s, 3),
        "num_simulations": result.num_simulations,
    }
