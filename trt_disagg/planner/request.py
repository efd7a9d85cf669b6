"""What `trt-disagg plan` and `trt-disagg simulate` are asked, and how it becomes the planner's inputs.

    flags ─▶ PlanRequest (names and numbers, as typed) ─▶ plan_inputs() ─▶ PlanInputs (model spec, cluster,
    request lengths, unit arrivals, SLO, latency models) ─▶ search.plan / search.spec_for + sim.simulate

Both commands build a `PlanRequest` from their options, so the workload, latency and SLO flags mean the
same in each, and neither command module depends on the other. Every bad value is a UserError naming its
flag (the CLI turns it into exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from trt_disagg.errors import UserError
from trt_disagg.planner import inputs
from trt_disagg.planner.goodput import SLOTarget
from trt_disagg.planner.models import get_model
from trt_disagg.planner.search import Affinity, PlanInputs, check_fits

AFFINITIES = ("high", "low")
MIN_NUM_REQUESTS = 10


@dataclass(frozen=True)
class PlanRequest:
    model: str  # a known model name or a config.json path
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9  # share of requests that must meet both SLOs
    gpu: str = "a100-80g"
    nodes: int = 1
    gpus_per_node: int = 8
    pools: tuple[str, ...] = ()  # GPU:NODESxGPUS[@COST] each; replace gpu/nodes/gpus_per_node when given
    network_gbps: float = 200.0  # cross-node bandwidth per node
    workload: str = "sharegpt"
    input_len: int | None = None  # the fixed workload's prompt tokens
    output_len: int | None = None  # overrides the data set's output lengths
    num_requests: int = 1000  # distinct requests sampled from the workload
    arrival: str = "poisson"
    cv: float = 1.0  # gamma arrivals: coefficient of variation
    seed: int = 0
    affinity: str = "high"  # high: fast cross-node links (Alg. 1); low: NVLink only (Alg. 2)
    latency_source: str = "auto"
    coefficients: tuple[str, ...] = ()  # latency-model JSON files (one per TP degree) instead of latency_source
    # The headline colocated baseline's engine: auto (the published vLLM fits where they exist, as the paper
    # compares; else the same engine), same, or vllm. Both are reported when both exist.
    baseline_engine: str = "auto"
    max_input_len: int | None = None  # default: only the context limits the prompt
    max_output_len: int | None = None  # default: only the context limits the output
    prefill_max_num_tokens: int = 2048
    lengths_file: str | None = None  # CSV/JSON of prompt/output lengths (and arrival times) instead of workload
    long_prompts: str = "drop"  # over-limit requests: drop or truncate
    max_pp: int = 8  # pipeline stages searched at most


def check_slo(ttft_s: float, tpot_s: float, attainment: float) -> None:
    if not ttft_s > 0:
        raise UserError(f"--ttft must be > 0 seconds, got {ttft_s}")
    if not tpot_s > 0:
        raise UserError(f"--tpot must be > 0 seconds, got {tpot_s}")
    if not 0 < attainment <= 1:
        raise UserError(f"--attainment must be in (0, 1], got {attainment}")


def plan_inputs(request: PlanRequest) -> PlanInputs:
    """Check the request and resolve its names: model spec, cluster, latency models, lengths, arrivals."""
    r = request
    check_slo(r.ttft_s, r.tpot_s, r.attainment)
    if r.affinity not in AFFINITIES:
        raise UserError(f"--affinity: expected high or low, got {r.affinity!r}")
    if r.num_requests < MIN_NUM_REQUESTS:
        raise UserError(f"--num-requests must be >= {MIN_NUM_REQUESTS}, got {r.num_requests}")
    if r.prefill_max_num_tokens < 1:
        raise UserError("--prefill-max-num-tokens must be >= 1")
    if r.max_pp < 1:
        raise UserError(f"--max-pp must be >= 1, got {r.max_pp}")
    spec = get_model(r.model)
    cluster = inputs.parse_cluster(r.gpu, r.nodes, r.gpus_per_node, list(r.pools), r.network_gbps)
    gpus = [p.gpu.name for p in cluster.pools]
    check_fits(spec, cluster)
    latency = inputs.latency_models(spec, gpus, r.latency_source, list(r.coefficients))
    baselines = inputs.baseline_engines(spec, gpus, r.baseline_engine, latency)
    loaded = inputs.plan_workload(r.workload, spec, r.num_requests, r.seed, r.max_input_len, r.max_output_len,
                                  r.input_len, r.output_len, r.lengths_file, r.long_prompts)
    num_arrivals = max(inputs.MAX_SIM_REQUESTS, len(loaded.requests))
    if loaded.arrival_s is not None:
        arrivals = inputs.trace_unit_arrivals(loaded.arrival_s, num_arrivals)
    else:
        arrivals = inputs.unit_arrivals(r.arrival, r.seed, r.cv, num_arrivals)
    return PlanInputs(spec, cluster, inputs.sim_lengths(loaded), arrivals,
                      SLOTarget(r.ttft_s, r.tpot_s, r.attainment), latency, baselines.latency,
                      cast(Affinity, r.affinity), r.prefill_max_num_tokens, baseline_engine=baselines.engine,
                      other_baseline_latency=baselines.others, max_pp=r.max_pp, workload=loaded.report)
