"""Planner benchmark: planning time (target: OPT-66B on 4 x 8 A100 in <= 30 s) and the OPT-13B ShareGPT result.

    .venv/bin/python benchmarks/plan_bench.py [--out runs/plan_bench] [--num-requests 1000]

Cases (published DistServe A100 fits with DistServe's simulator overheads, ShareGPT with DistServe's
multi-turn preprocessing, token counts estimated (OPT's tokenizer is not available offline), Poisson
arrivals, 90% joint attainment):
  opt-13b  1 x 8 A100-80GB  TTFT 0.25 s / TPOT 0.1 s  (DistServe's chatbot SLO; paper: prefill TP2 + decode TP1,
           >= 2.0x per-GPU goodput over vLLM). Every plan reports each baseline: colocated prefill-first and
           chunked, on the published vLLM fits (the paper's baseline) and on the same DistServe fits.
  opt-66b  4 x 8 A100-80GB  TTFT 2.5 s / TPOT 0.15 s  (DistServe's chatbot SLO for OPT-66B): planning time
Writes summary.json and the deployment YAMLs under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trt_disagg.config import SLO, dump_deployment, load_deployment
from trt_disagg.planner.deployment import placement_to_deployment
from trt_disagg.planner.placement import Placement
from trt_disagg.planner.report import plan_summary
from trt_disagg.planner.request import PlanRequest, plan_inputs
from trt_disagg.planner.search import PlanInputs, PlanResult, plan


def run_case(model: str, nodes: int, ttft: float, tpot: float, num_requests: int,
             out: Path) -> tuple[PlanInputs, PlanResult, float]:
    start = time.perf_counter()  # the planning time includes loading and tokenising the workload
    inp = plan_inputs(PlanRequest(model=model, ttft_s=ttft, tpot_s=tpot, nodes=nodes, num_requests=num_requests,
                                  latency_source="published", baseline_engine="vllm"))
    result = plan(inp)
    elapsed = time.perf_counter() - start
    best = (result.cluster or result.best_disagg).placement
    assert isinstance(best, Placement)
    dep = placement_to_deployment(best, inp.model, SLO(ttft_s=ttft, tpot_s=tpot),
                                  max_input_len=int(inp.lengths.input_len.max()), max_seq_len=inp.model.max_seq_len,
                                  prefill_max_num_tokens=2048, gpus_per_node={"a100-80g": 8})
    path = out / f"{model}-{nodes}x8.yaml"
    path.write_text(dump_deployment(dep))
    load_deployment(path)
    return inp, result, elapsed


def print_case(name: str, inp: PlanInputs, result: PlanResult, elapsed: float) -> None:
    w = inp.workload
    print(f"{name}: planned in {elapsed:.1f} s ({result.num_simulations} simulations)")
    if w is not None:
        print(f"  workload {w.source}: {len(inp.lengths)} requests, mean {inp.lengths.input_len.mean():.0f} in / "
              f"{inp.lengths.output_len.mean():.0f} out tokens ({w.token_counts} token counts), dropped {w.dropped}")
    best = result.best_disagg
    print(f"  best disaggregated unit: {best.placement}  {best.per_gpu_goodput:.3f} req/s/GPU")
    dep = result.deployment
    if dep is not None:
        print(f"  deployment: {dep.deployed.placement}  {dep.per_gpu_goodput:.3f} req/s per cluster GPU, "
              f"{dep.idle_gpus} idle{' (' + dep.idle_reason + ')' if dep.idle_gpus else ''}")
    for r in result.baselines:
        print(f"  vs {r.label}: {r.unit.placement} {r.unit.per_gpu_goodput:.3f} req/s/GPU -> "
              f"{r.unit_ratio:.2f}x per unit GPU, {r.deployment_ratio:.2f}x per cluster GPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/plan_bench"))
    ap.add_argument("--num-requests", type=int, default=1000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (model, nodes, ttft, tpot) in {
        "opt-13b sharegpt 1x8 A100": ("opt-13b", 1, 0.25, 0.1),
        "opt-66b sharegpt 4x8 A100": ("opt-66b", 4, 2.5, 0.15),
    }.items():
        inp, result, elapsed = run_case(model, nodes, ttft, tpot, args.num_requests, args.out)
        summary[name] = {"planning_time_s": round(elapsed, 2), **plan_summary(inp, result)}
        print_case(name, inp, result, elapsed)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"written {args.out}/summary.json")


if __name__ == "__main__":
    main()
