"""`trt-disagg simulate`: one configuration at given rates, or the tightest SLO scale met at one rate.

    flags ─▶ PlanRequest ─▶ plan_inputs ─▶ placement (flags or --deployment) ─▶ unit_spec
          ─▶ attainment per rate (+ plot) | tightest SLO scale at one rate ─▶ table or JSON

The workload/latency/SLO flags become a `planner.request.PlanRequest`, as `plan`'s do, so both commands
read them alike; the simulation itself is `planner.evaluate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trt_disagg.commands.autoscale_sim import DEFAULT_TIMING, AutoscaleFlags, parse_flags
from trt_disagg.errors import UserError

if TYPE_CHECKING:
    from trt_disagg.planner.placement import ColocatedPlacement, Placement
    from trt_disagg.planner.search import PlanInputs
    from trt_disagg.sim import ColocatedPolicy

out = Console()

Opt = typer.Option


def register(app: typer.Typer) -> None:
    """Add `simulate` to the CLI."""
    app.command("simulate")(simulate_cmd)


def simulate_cmd(
    model: str = Opt(..., help="model name or config.json"),
    ttft: float = Opt(..., help="TTFT SLO, seconds"),
    tpot: float = Opt(..., help="TPOT SLO, seconds"),
    attainment: float = Opt(0.9),
    gpu: str = Opt("a100-80g"),
    prefill: str = Opt(None, help="prefill instance TPxPP (disaggregated)"),
    decode: str = Opt(None, help="decode instance TPxPP (disaggregated)"),
    num_prefill: int = Opt(1),
    num_decode: int = Opt(1),
    colocated: str = Opt(None, help="colocated instance TPxPP (instead of --prefill/--decode)"),
    num_colocated: int = Opt(1),
    policy: str = Opt("prefill-first", help="colocated: prefill-first or chunked"),
    deployment: Path = Opt(None, help="take instances (context/generation/colocated servers) from this YAML"),
    kv_capacity: int = Opt(None, help="KV tokens per instance (default: the deployment's max_tokens, else from "
                           "GPU memory)"),
    rates: str = Opt(None, help="comma-separated request rates (req/s)"),
    slo_scale_rate: float = Opt(None, help="SLO-scale mode: the tightest SLO scale met at this rate"),
    workload: str = Opt("sharegpt", help="sharegpt (DistServe's multi-turn preprocessing), sharegpt-first-turn, "
                        "humaneval, longbench-synthetic, fixed"),
    lengths_file: Path = Opt(None, help="CSV/JSON of input_len,output_len[,arrival_s] per request, instead of "
                             "--workload"),
    long_prompts: str = Opt("drop", help="requests over the context or the max lengths: drop or truncate"),
    input_len: int = Opt(None),
    output_len: int = Opt(None),
    num_requests: int = Opt(1000),
    arrival: str = Opt("poisson"),
    cv: float = Opt(1.0),
    seed: int = Opt(0),
    network_gbps: float = Opt(200.0),
    latency_source: str = Opt("auto"),
    baseline_engine: str = Opt("same", help="--colocated instances' engine fits: same (as --latency-source), "
                               "or vllm (the published vLLM fits)"),
    coefficients: list[str] = Opt(None, help="profile JSON(s) from `trt-disagg profile`, one per TP degree"),
    max_input_len: int = Opt(None),
    max_output_len: int = Opt(None),
    prefill_max_num_tokens: int = Opt(2048),
    plot: Path = Opt(None, help="attainment-vs-rate PNG"),
    as_json: bool = Opt(False, "--json"),
    think_time_s: float = Opt(5.0, help="conversations: wait after an answer before the next turn"),
    num_conversations: int = Opt(100, help="conversations: how many (ShareGPT, >= 2 turns each)"),
    trace: Path = Opt(None, help="conversations: replay a live benchmark's trace (JSON) at its own send times"),
    prefix_reuse: bool = Opt(True, help="conversations: block reuse on decode-capable instances"),
    routing: str = Opt("kv_aware", help="conversations with reuse: least_loaded or kv_aware"),
    tokens_per_block: int = Opt(None, help="conversations: KV block size (default: the trace's, else 16)"),
    local_prefill_max_tokens: int = Opt(0, help="conversations, disaggregated: prefill suffixes up to this many "
                                        "tokens on the decode instance holding the prefix"),
    compare_policies: bool = Opt(False, help="conversations: no reuse, least_loaded and kv_aware side by side"),
    autoscale: str = Opt(None, help="replay these phases, WORKLOAD@RATE:DURATION_S comma-separated (e.g. "
                         "sharegpt@10:1200,longbench-synthetic@8:1200,sharegpt@10:1200), autoscaled vs static"),
    autoscale_budget: int = Opt(8, help="autoscale: instances in all (--prefill/--decode: each role's instance)"),
    autoscale_timing: str = Opt(DEFAULT_TIMING, help="autoscale: seconds (and the diurnal rate swing, 0..1)"),
) -> None:
    """Simulate one configuration at given rates (attainment, goodput, percentiles), or find the tightest SLO.
    --workload conversations: multi-turn chats with prefix reuse; --rates are then conversations/s."""
    from trt_disagg.planner.request import PlanRequest, plan_inputs

    conv = None
    if workload == "conversations" or trace is not None:
        conv = ConversationFlags(think_time_s, num_conversations, trace, prefix_reuse, routing, tokens_per_block,
                                 local_prefill_max_tokens, compare_policies)
        workload, input_len, output_len = "fixed", 1, 1  # the trace brings its own lengths
        lengths_file = None  # type: ignore[assignment]
    elif autoscale is None and (rates is None) == (slo_scale_rate is None):
        raise UserError("give --rates (attainment at each rate) or --slo-scale-rate (tightest SLO at one rate)")
    colocated_policy = _policy(policy)
    inp = plan_inputs(PlanRequest(
        model=model, ttft_s=ttft, tpot_s=tpot, attainment=attainment, gpu=gpu, network_gbps=network_gbps,
        workload=workload, input_len=input_len, output_len=output_len, num_requests=num_requests, arrival=arrival,
        cv=cv, seed=seed, latency_source=latency_source, coefficients=tuple(coefficients or ()),
        baseline_engine=baseline_engine, max_input_len=max_input_len, max_output_len=max_output_len,
        prefill_max_num_tokens=prefill_max_num_tokens, lengths_file=str(lengths_file) if lengths_file else None,
        long_prompts=long_prompts))
    inp = _with_kv_capacity(inp, kv_capacity)
    placement, inp = _placement(inp, gpu, colocated_policy, deployment, colocated, num_colocated, prefill, decode,
                                num_prefill, num_decode)
    if autoscale is not None:
        _autoscale(inp, placement, parse_flags(autoscale, autoscale_budget, autoscale_timing), seed, as_json)
    else:
        _one_placement(inp, placement, conv, rates, slo_scale_rate, plot, seed, as_json)


def _one_placement(inp: PlanInputs, placement: Placement | ColocatedPlacement, conv: ConversationFlags | None,
                   rates: str | None, slo_scale_rate: float | None, plot: Path | None, seed: int,
                   as_json: bool) -> None:
    """Attainment per rate, the tightest SLO scale, or conversation rows: what `simulate` prints by default."""
    from trt_disagg.planner.evaluate import unit_spec

    spec = unit_spec(inp, placement)
    if conv is not None:
        rows = _conversation_rows(inp, spec, conv, rates, seed)
    else:
        rows = _rate_rows(inp, spec, placement, rates, slo_scale_rate, plot)
    _print_or_json(str(placement), rows, as_json)


def _rate_rows(inp: PlanInputs, spec: Any, placement: Placement | ColocatedPlacement, rates: str | None,
               slo_scale_rate: float | None, plot: Path | None) -> list[dict[str, Any]]:
    """Attainment at each of --rates (and the plot), or the tightest SLO scale at --slo-scale-rate."""
    from trt_disagg.planner.evaluate import attainment_rows, slo_scale_row

    if slo_scale_rate is not None:
        if not slo_scale_rate > 0:
            raise UserError(f"--slo-scale-rate must be > 0, got {slo_scale_rate}")
        return [slo_scale_row(inp, spec, slo_scale_rate)]
    rate_list = _rates(rates or "")
    rows = attainment_rows(inp, spec, rate_list)
    if plot is not None:
        _plot(inp, spec, placement, rate_list, plot)
    return rows


@dataclass(frozen=True)
class ConversationFlags:
    """The conversation workload's flags, checked by `_conversation_rows`."""

    think_time_s: float
    num_conversations: int
    trace: Path | None
    prefix_reuse: bool
    routing: str
    tokens_per_block: int | None
    local_prefill_max_tokens: int
    compare_policies: bool


def _conversation_rows(inp: PlanInputs, spec: Any, conv: ConversationFlags, rates: str | None,
                       seed: int) -> list[dict[str, Any]]:
    """Per rate (conversations/s; one row at the trace's own send times for --trace) and policy: hit rate,
    TTFT, prefill tokens computed, attainment."""
    from trt_disagg.planner import conversations as plan_conv
    from trt_disagg.planner.inputs import smollm2_tokenizer
    from trt_disagg.sim import PrefixReuse, Routing
    from trt_disagg.workload import conversation_trace as ct
    from trt_disagg.workload.datasets import sharegpt_conversations

    if conv.routing not in tuple(Routing):
        raise UserError(f"--routing: expected one of {', '.join(Routing)}, got {conv.routing!r}")
    block = conv.tokens_per_block
    if block is None:
        block = (ct.trace_tokens_per_block(conv.trace) if conv.trace else None) or 16
    if block < 1 or conv.local_prefill_max_tokens < 0:
        raise UserError("--tokens-per-block must be >= 1 and --local-prefill-max-tokens >= 0")
    rate_list: list[float | None] = [None]
    if conv.trace is not None:
        trace = ct.load_conversation_trace(conv.trace)
    else:
        rate_list = list(_rates(rates)) if rates else [1.0]
        tokenizer = smollm2_tokenizer() if inp.model.name == "smollm2-135m" else None
        trace = ct.build_conversation_trace(sharegpt_conversations(), num_conversations=conv.num_conversations,
                                            rate=1.0, think_s=conv.think_time_s, seed=seed, tokenizer=tokenizer,
                                            max_seq_len=inp.model.max_seq_len)
    candidates = plan_conv.policies(block, local_prefill_max_tokens=conv.local_prefill_max_tokens)
    if not conv.compare_policies:
        chosen = PrefixReuse(conv.prefix_reuse, block, Routing(conv.routing),
                             local_prefill_max_tokens=conv.local_prefill_max_tokens)
        label = f"reuse, {conv.routing}" if conv.prefix_reuse else "no reuse"
        candidates = [plan_conv.Policy(label, chosen)]
    return [row for rate in rate_list for row in plan_conv.predict(spec, trace, inp.slo, candidates, rate)]


def _autoscale(inp: PlanInputs, placement: Placement | ColocatedPlacement, flags: AutoscaleFlags, seed: int,
               as_json: bool) -> None:
    from trt_disagg.commands import autoscale_sim
    from trt_disagg.planner.placement import Placement

    if not isinstance(placement, Placement):
        raise UserError("--autoscale: give --prefill and --decode (the instance of each role), not --colocated")
    autoscale_sim.run(inp, placement, flags, seed, as_json)


def _print_or_json(title: str, rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"placement": title, "rows": rows}, indent=2))
    else:
        _print_rows(title, rows)


def _policy(name: str) -> ColocatedPolicy:
    from trt_disagg.sim import ColocatedPolicy

    try:
        return ColocatedPolicy(name)
    except ValueError:
        raise UserError(f"--policy: expected one of {', '.join(ColocatedPolicy)}, got {name!r}") from None


def _with_kv_capacity(inp: PlanInputs, kv_capacity: int | None) -> PlanInputs:
    """--kv-capacity fixes every role's KV tokens per instance (the deployment's own values never override it)."""
    from trt_disagg.contract import Role

    if kv_capacity is None:
        return inp
    if kv_capacity < 1:
        raise UserError(f"--kv-capacity must be >= 1 tokens, got {kv_capacity}")
    return replace(inp, kv_capacity_by_role=dict.fromkeys(Role, kv_capacity))


def _placement(inp: PlanInputs, gpu: str, policy: ColocatedPolicy, deployment: Path | None, colocated: str | None,
               num_colocated: int, prefill: str | None, decode: str | None, num_prefill: int,
               num_decode: int) -> tuple[Placement | ColocatedPlacement, PlanInputs]:
    """The placement the flags name, and the inputs with the KV capacities a --deployment fixes."""
    from trt_disagg.planner.evaluate import placement_from_deployment
    from trt_disagg.planner.inputs import parse_parallel
    from trt_disagg.planner.placement import ColocatedPlacement, Placement

    placement: Placement | ColocatedPlacement
    if deployment is not None:
        found = placement_from_deployment(deployment, gpu, policy)
        placement = found.placement
        inp = replace(inp, kv_capacity_by_role={**found.kv_capacity_by_role, **inp.kv_capacity_by_role})
    elif colocated is not None:
        placement = ColocatedPlacement(parse_parallel(colocated, gpu, "--colocated"), policy, num_colocated)
    elif prefill is not None and decode is not None:
        placement = Placement(parse_parallel(prefill, gpu, "--prefill"), parse_parallel(decode, gpu, "--decode"),
                              num_prefill, num_decode)
    else:
        raise UserError("give --prefill and --decode, or --colocated, or --deployment")
    if isinstance(placement, ColocatedPlacement) and placement.replicas < 1:
        raise UserError("--num-colocated must be >= 1")
    return placement, inp


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise UserError(f"--rates {text!r}: expected comma-separated numbers") from None
    if not rates or min(rates) <= 0:
        raise UserError("--rates must all be > 0")
    return rates


def _plot(inp: PlanInputs, spec: Any, placement: Placement | ColocatedPlacement, rates: list[float],
          path: Path) -> None:
    import numpy as np

    from trt_disagg.planner.goodput import attainment_curve, min_duration_for
    from trt_disagg.planner.plots import plot_attainment

    arr = np.array(rates)
    duration = min_duration_for(inp.slo, float(np.mean(inp.lengths.output_len)))
    att = attainment_curve(spec, inp.lengths, inp.unit_arrivals, inp.slo, arr, duration)
    plot_attainment({str(placement): (arr, att)}, inp.slo.attainment, path, f"{inp.model.name}: {placement}")


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=escape(title))
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    out.print(table)
