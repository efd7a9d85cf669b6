"""`trt-disagg simulate`: one configuration at given rates, or the tightest SLO scale met at one rate.

Registered by commands/plan.py's `register`; the workload/latency/SLO flags are turned into planner
inputs by the same `plan_inputs` that `plan` uses, so both commands read them alike.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trt_disagg.commands.plan import plan_inputs
from trt_disagg.errors import UserError

out = Console()

Opt = typer.Option


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
    workload: str = Opt("sharegpt"),
    input_len: int = Opt(None),
    output_len: int = Opt(None),
    num_requests: int = Opt(1000),
    arrival: str = Opt("poisson"),
    cv: float = Opt(1.0),
    seed: int = Opt(0),
    network_gbps: float = Opt(200.0),
    latency_source: str = Opt("auto"),
    coefficients: list[str] = Opt(None, help="profile JSON(s) from `trt-disagg profile`, one per TP degree"),
    max_input_len: int = Opt(None),
    max_output_len: int = Opt(None),
    prefill_max_num_tokens: int = Opt(2048),
    plot: Path = Opt(None, help="attainment-vs-rate PNG"),
    as_json: bool = Opt(False, "--json"),
) -> None:
    """Simulate one configuration at given rates (attainment, goodput, percentiles), or find the tightest SLO."""
    from trt_disagg.planner.goodput import attainment_curve, min_duration_for, workload_at
    from trt_disagg.planner.inputs import parse_parallel
    from trt_disagg.planner.placement import ColocatedPlacement, Placement
    from trt_disagg.planner.search import spec_for
    from trt_disagg.sim import COLOCATED_POLICIES, simulate

    if (rates is None) == (slo_scale_rate is None):
        raise UserError("give --rates (attainment at each rate) or --slo-scale-rate (tightest SLO at one rate)")
    if policy not in COLOCATED_POLICIES:
        raise UserError(f"--policy: expected one of {', '.join(COLOCATED_POLICIES)}, got {policy!r}")
    inp = plan_inputs(model, gpu, 1, 8, None, network_gbps, workload, num_requests, seed, arrival, cv, ttft, tpot,
                       attainment, "high", latency_source, coefficients, "same", max_input_len, max_output_len,
                       prefill_max_num_tokens, input_len, output_len)
    placement: Placement | ColocatedPlacement
    if kv_capacity is not None:
        if kv_capacity < 1:
            raise UserError(f"--kv-capacity must be >= 1 tokens, got {kv_capacity}")
        inp = replace(inp, kv_capacity_by_role=dict.fromkeys(("prefill", "decode", "colocated"), kv_capacity))
    if deployment is not None:
        placement, capacities = _placement_from_deployment(deployment, gpu, policy)
        inp = replace(inp, kv_capacity_by_role={**capacities, **inp.kv_capacity_by_role})
    elif colocated is not None:
        placement = ColocatedPlacement(parse_parallel(colocated, gpu, "--colocated"), policy, num_colocated)
    elif prefill is not None and decode is not None:
        placement = Placement(parse_parallel(prefill, gpu, "--prefill"), parse_parallel(decode, gpu, "--decode"),
                              num_prefill, num_decode)
    else:
        raise UserError("give --prefill and --decode, or --colocated, or --deployment")
    if isinstance(placement, ColocatedPlacement) and placement.replicas < 1:
        raise UserError("--num-colocated must be >= 1")
    spec = spec_for(inp, placement)
    if isinstance(placement, ColocatedPlacement) and placement.replicas > 1:
        from trt_disagg.sim import ColocatedSpec

        spec = ColocatedSpec(spec.instance, placement.replicas, placement.policy)  # type: ignore[union-attr]
    duration = min_duration_for(inp.slo, float(np.mean(inp.lengths.output_len)))
    rows = []
    if slo_scale_rate is not None:
        if not slo_scale_rate > 0:
            raise UserError(f"--slo-scale-rate must be > 0, got {slo_scale_rate}")
        result = simulate(spec, workload_at(inp.lengths, inp.unit_arrivals, slo_scale_rate, duration))
        scale = _tightest_scale(result, ttft, tpot, attainment)
        rows.append({"rate_rps": slo_scale_rate, "slo_scale": scale, "ttft_s": ttft * scale, "tpot_s": tpot * scale,
                     **result.percentiles()})
    else:
        try:
            rate_list = [float(r) for r in rates.split(",")]  # type: ignore[union-attr]
        except ValueError:
            raise UserError(f"--rates {rates!r}: expected comma-separated numbers") from None
        if not rate_list or min(rate_list) <= 0:
            raise UserError("--rates must all be > 0")
        for rate in rate_list:
            result = simulate(spec, workload_at(inp.lengths, inp.unit_arrivals, rate, duration))
            rows.append({"rate_rps": rate, "attainment": result.attainment(ttft, tpot), "num_requests": len(
                result.arrival_s), **result.percentiles()})
        if plot is not None:
            from trt_disagg.planner.plots import plot_attainment

            arr = np.array(rate_list)
            att = attainment_curve(spec, inp.lengths, inp.unit_arrivals, inp.slo, arr, duration)
            plot_attainment({str(placement): (arr, att)}, attainment, plot, f"{inp.model.name}: {placement}")
    if as_json:
        typer.echo(json.dumps({"placement": str(placement), "rows": rows}, indent=2))
        return
    table = Table(title=escape(str(placement)))
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    out.print(table)


def _tightest_scale(result: Any, ttft: float, tpot: float, target: float) -> float:
    """Smallest s with attainment(s*ttft, s*tpot) >= target, from one simulation (attainment grows with s)."""
    lo, hi = 0.0, 1.0
    while result.attainment(ttft * hi, tpot * hi) < target:
        hi *= 2
        if hi > 1e6:
            return float("inf")
    for _ in range(40):
        mid = (lo + hi) / 2
        if result.attainment(ttft * mid, tpot * mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _placement_from_deployment(path: Path, gpu: str, policy: str) -> tuple[Any, dict[str, int]]:
    """The deployment's instances as a placement, and the KV capacities it fixes (role -> tokens)."""
    from trt_disagg.config import load_deployment
    from trt_disagg.contract import Role
    from trt_disagg.planner.placement import ColocatedPlacement, ParallelConfig, Placement

    dep = load_deployment(path)
    capacities = {role.value: group.kv_cache_config.max_tokens for role, group in dep.groups().items()
                  if group.kv_cache_config.max_tokens is not None}

    def cfg(group: Any) -> ParallelConfig:
        return ParallelConfig(group.gpu or gpu, group.tp, group.pp)

    groups = dep.groups()
    if Role.PREFILL in groups and Role.DECODE in groups:
        p, d = groups[Role.PREFILL], groups[Role.DECODE]
        return Placement(cfg(p), cfg(d), p.num_instances, d.num_instances), capacities
    c = groups[Role.COLOCATED]  # load_deployment checked that the roles come in one of these two shapes
    return ColocatedPlacement(cfg(c), policy, c.num_instances), capacities
