"""`trt-disagg simulate`: one configuration at given rates, or the tightest SLO scale met at one rate.

    flags ─▶ PlanRequest ─▶ plan_inputs ─▶ placement (flags or --deployment) ─▶ unit_spec
          ─▶ attainment per rate (+ plot) | tightest SLO scale at one rate ─▶ table or JSON

The workload/latency/SLO flags become a `planner.request.PlanRequest`, as `plan`'s do, so both commands
read them alike; the simulation itself is `planner.evaluate`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
    from trt_disagg.planner.evaluate import attainment_rows, slo_scale_row, unit_spec
    from trt_disagg.planner.request import PlanRequest, plan_inputs

    if (rates is None) == (slo_scale_rate is None):
        raise UserError("give --rates (attainment at each rate) or --slo-scale-rate (tightest SLO at one rate)")
    colocated_policy = _policy(policy)
    inp = plan_inputs(PlanRequest(
        model=model, ttft_s=ttft, tpot_s=tpot, attainment=attainment, gpu=gpu, network_gbps=network_gbps,
        workload=workload, input_len=input_len, output_len=output_len, num_requests=num_requests, arrival=arrival,
        cv=cv, seed=seed, latency_source=latency_source, coefficients=tuple(coefficients or ()),
        max_input_len=max_input_len, max_output_len=max_output_len, prefill_max_num_tokens=prefill_max_num_tokens))
    inp = _with_kv_capacity(inp, kv_capacity)
    placement, inp = _placement(inp, gpu, colocated_policy, deployment, colocated, num_colocated, prefill, decode,
                                num_prefill, num_decode)
    spec = unit_spec(inp, placement)
    if slo_scale_rate is not None:
        if not slo_scale_rate > 0:
            raise UserError(f"--slo-scale-rate must be > 0, got {slo_scale_rate}")
        rows = [slo_scale_row(inp, spec, slo_scale_rate)]
    else:
        rate_list = _rates(rates or "")
        rows = attainment_rows(inp, spec, rate_list)
        if plot is not None:
            _plot(inp, spec, placement, rate_list, plot)
    if as_json:
        typer.echo(json.dumps({"placement": str(placement), "rows": rows}, indent=2))
        return
    _print_rows(str(placement), rows)


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
