"""Planner benchmark: planning time (target: OPT-66B on 4 x 8 A100 in <= 30 s) and the OPT-13B ShareGPT result.

    .venv/bin/python benchmarks/plan_bench.py [--out runs/plan_bench] [--num-requests 1000]

Cases (published DistServe A100 fits, ShareGPT lengths, Poisson arrivals, 90% joint attainment):
  opt-13b  1 x 8 A100-80GB  TTFT 0.25 s / TPOT 0.1 s  (DistServe's chatbot SLO; paper: >= 2.0x per-GPU goodput)
           colocated baseline on the same engine, and on the published vLLM-engine fits as in the paper
  opt-66b  4 x 8 A100-80GB  TTFT 2.5 s / TPOT 0.15 s  (DistServe's chatbot SLO for OPT-66B): planning time
Writes summary.json, the deployment YAMLs and attainment-vs-rate PNGs under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trt_disagg.config import SLO, dump_deployment, load_deployment
from trt_disagg.planner import inputs
from trt_disagg.planner.deployment import placement_to_deployment
from trt_disagg.planner.goodput import SLOTarget
from trt_disagg.planner.models import get_model
from trt_disagg.planner.placement import Placement
from trt_disagg.planner.search import PlanInputs, PlanResult, plan


def run_case(model: str, nodes: int, ttft: float, tpot: float, baseline: str, num_requests: int,
             out: Path) -> tuple[PlanResult, float]:
    spec = get_model(model)
    cluster = inputs.parse_cluster("a100-80g", nodes, 8, None, 200.0)
    latency = inputs.latency_models(spec, ["a100-80g"], "published", None)
    base = inputs.baseline_engine_models(spec, ["a100-80g"], baseline, latency)
    start = time.perf_counter()  # the planning time includes loading and tokenising the workload
    lengths = inputs.plan_lengths("sharegpt", spec, num_requests, 0, None, None)
    inp = PlanInputs(spec, cluster, lengths, inputs.unit_arrivals("poisson", 0, 1.0), SLOTarget(ttft, tpot, 0.9),
                     latency, base)
    result = plan(inp)
    elapsed = time.perf_counter() - start
    best = (result.cluster or result.best_disagg).placement
    assert isinstance(best, Placement)
    dep = placement_to_deployment(best, spec, SLO(ttft_s=ttft, tpot_s=tpot), max_input_len=1024, max_seq_len=2048,
                                  prefill_max_num_tokens=2048, gpus_per_node={"a100-80g": 8})
    path = out / f"{model}-{nodes}x8-{baseline}.yaml"
    path.write_text(dump_deployment(dep))
    load_deployment(path)
    return result, elapsed


def describe(result: PlanResult) -> dict:
    def row(c):
        return {"placement": str(c.placement), "gpus": c.unit_gpus, "goodput_rps": round(c.goodput_rps, 3),
                "per_gpu_rps": round(c.per_gpu_goodput, 3)}

    chunked = [c for c in result.colocated if c.placement.policy == "chunked"]
    first = [c for c in result.colocated if c.placement.policy == "prefill-first"]
    return {"disaggregated": row(result.best_disagg), "colocated_prefill_first": row(first[0]) if first else None,
            "colocated_chunked": row(chunked[0]) if chunked else None, "ratio_vs_best_colocated": round(result.ratio, 3),
            "ratio_vs_prefill_first": round(result.best_disagg.per_gpu_goodput / first[0].per_gpu_goodput, 3)
            if first else None, "simulations": result.num_simulations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/plan_bench"))
    ap.add_argument("--num-requests", type=int, default=1000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (model, nodes, ttft, tpot, baseline) in {
        "opt-13b sharegpt, same engine": ("opt-13b", 1, 0.25, 0.1, "same"),
        "opt-13b sharegpt, vLLM-engine baseline": ("opt-13b", 1, 0.25, 0.1, "vllm"),
        "opt-66b sharegpt 4x8 A100": ("opt-66b", 4, 2.5, 0.15, "same"),
    }.items():
        result, elapsed = run_case(model, nodes, ttft, tpot, baseline, args.num_requests, args.out)
        summary[name] = {"planning_time_s": round(elapsed, 2), **describe(result)}
        print(f"{name}: planned in {elapsed:.1f} s ({result.num_simulations} simulations)")
        print(f"  best disaggregated: {result.best_disagg.placement}  {result.best_disagg.per_gpu_goodput:.3f} req/s/GPU")
        print(f"  best colocated:     {result.best_colocated.placement}  "
              f"{result.best_colocated.per_gpu_goodput:.3f} req/s/GPU")
        print(f"  per-GPU goodput ratio disaggregated / colocated: {result.ratio:.2f}x (paper, OPT-13B chatbot: >= 2.0x)")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"written {args.out}/summary.json")


if __name__ == "__main__":
    main()
