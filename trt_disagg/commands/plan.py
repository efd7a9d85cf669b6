"""`trt-disagg plan | simulate | profile`: the planning path from the command line.

    profile ENGINE_DIR   time a real engine over a grid, fit the latency model   (planner/profile.py)
    plan                 search placements, print best disaggregated vs colocated, write the deployment YAML
    simulate             one configuration at given rates, or the tightest SLO scale met at one rate

The heavy lifting is Python API (trt_disagg.planner / trt_disagg.sim); this module parses flags and prints.
`simulate` is in commands/simulate.py; both turn their flags into a `planner.request.PlanRequest`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trt_disagg.errors import UserError

if TYPE_CHECKING:
    from trt_disagg.config import Deployment
    from trt_disagg.planner.placement import Candidate
    from trt_disagg.planner.search import PlanInputs, PlanResult
    from trt_disagg.sim import ColocatedPolicy

log = logging.getLogger(__name__)
out = Console()

Opt = typer.Option


def register(app: typer.Typer) -> None:
    """Add `plan` to the CLI."""
    app.command("plan")(plan_cmd)


def register_profile(app: typer.Typer) -> None:
    """Add `profile` to the CLI (registered after `simulate`, so `--help` lists the planning path in order)."""
    app.command("profile")(profile_cmd)


def plan_cmd(
    model: str = Opt(..., help="opt-13b, opt-66b, opt-175b, llama-3-8b, llama-3-70b, smollm2-135m, or a config.json"),
    ttft: float = Opt(..., help="TTFT SLO, seconds"),
    tpot: float = Opt(..., help="TPOT SLO, seconds"),
    attainment: float = Opt(0.9, help="share of requests that must meet both SLOs"),
    gpu: str = Opt("a100-80g", help="a100-40g, a100-80g, h100-sxm, h200, l40s"),
    nodes: int = Opt(1, help="nodes of --gpu"),
    gpus_per_node: int = Opt(8),
    pool: list[str] = Opt(None, help="mixed clusters: GPU:NODESxGPUS[@COST], repeatable (replaces --gpu/--nodes)"),
    workload: str = Opt("sharegpt", help="sharegpt (DistServe's multi-turn preprocessing), sharegpt-first-turn, "
                        "humaneval, longbench-synthetic, fixed"),
    lengths_file: Path = Opt(None, help="CSV/JSON of input_len,output_len[,arrival_s] per request, instead of "
                             "--workload (all rows are used; arrival times, when given, replace --arrival)"),
    long_prompts: str = Opt("drop", help="requests over the context or --max-input-len/--max-output-len: drop "
                            "or truncate (the plan reports how many)"),
    input_len: int = Opt(None, help="fixed workload: prompt tokens"),
    output_len: int = Opt(None, help="output tokens (fixed workload; overrides the data set's otherwise)"),
    num_requests: int = Opt(1000, help="distinct requests sampled from the workload"),
    arrival: str = Opt("poisson", help="poisson or gamma"),
    cv: float = Opt(1.0, help="gamma arrivals: coefficient of variation (burstiness)"),
    seed: int = Opt(0),
    affinity: str = Opt("high", help="high: fast cross-node links (Alg. 1); low: NVLink only (Alg. 2)"),
    network_gbps: float = Opt(200.0, help="cross-node bandwidth per node, Gbit/s"),
    latency_source: str = Opt("auto", help="auto, published, roofline"),
    coefficients: list[str] = Opt(None, help="latency-model JSON from `trt-disagg profile` instead (repeatable: "
                                  "one per TP degree)"),
    baseline_engine: str = Opt("auto", help="headline colocated baseline's engine fits: auto (published vLLM fits "
                               "where they exist, as the paper; else same), same, vllm. All are reported"),
    max_pp: int = Opt(8, help="most pipeline stages searched per instance"),
    max_input_len: int = Opt(None, help="prompt token limit (default: only the model's context limits it)"),
    max_output_len: int = Opt(None, help="output token limit (default: only the model's context limits it)"),
    prefill_max_num_tokens: int = Opt(2048, help="prefill batch token budget"),
    model_path: str = Opt(None, help="checkpoint path written into the deployment (default /models/<name>)"),
    output: Path = Opt(None, "--output", "-o", help="write the deployment YAML here"),
    plot: Path = Opt(None, help="write an attainment-vs-rate PNG here"),
    as_json: bool = Opt(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Search placements (TP/PP per phase and the prefill:decode ratio) for the best per-GPU goodput."""
    from trt_disagg.config import SLO, dump_deployment, load_deployment
    from trt_disagg.planner.deployment import placement_to_deployment
    from trt_disagg.planner.placement import Placement
    from trt_disagg.planner.report import plan_summary
    from trt_disagg.planner.request import PlanRequest, plan_inputs
    from trt_disagg.planner.search import plan

    inp = plan_inputs(PlanRequest(
        model=model, ttft_s=ttft, tpot_s=tpot, attainment=attainment, gpu=gpu, nodes=nodes,
        gpus_per_node=gpus_per_node, pools=tuple(pool or ()), network_gbps=network_gbps, workload=workload,
        input_len=input_len, output_len=output_len, num_requests=num_requests, arrival=arrival, cv=cv, seed=seed,
        affinity=affinity, latency_source=latency_source, coefficients=tuple(coefficients or ()),
        baseline_engine=baseline_engine, max_input_len=max_input_len, max_output_len=max_output_len,
        prefill_max_num_tokens=prefill_max_num_tokens, lengths_file=str(lengths_file) if lengths_file else None,
        long_prompts=long_prompts, max_pp=max_pp))
    result = plan(inp)
    best = result.cluster or result.best_disagg
    assert isinstance(best.placement, Placement)  # disaggregated candidates hold a Placement
    max_seq = inp.model.max_seq_len
    max_in = max_input_len if max_input_len is not None else int(inp.lengths.input_len.max())
    dep = placement_to_deployment(best.placement, inp.model, SLO(ttft_s=ttft, tpot_s=tpot, attainment=attainment),
                                  max_input_len=max_in, max_seq_len=max_seq,
                                  prefill_max_num_tokens=prefill_max_num_tokens,
                                  gpus_per_node={p.gpu.name: p.gpus_per_node for p in inp.cluster.pools},
                                  model_path=model_path)
    dep = _with_nodes(dep, inp)
    summary = plan_summary(inp, result)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(dump_deployment(dep))
        load_deployment(output)  # what we wrote must load back unchanged
        output.with_suffix(".plan.json").write_text(json.dumps(summary, indent=2))  # the plan behind it
    if plot is not None:
        _plot_plan(inp, result, plot)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_plan(summary)
    if output is not None:
        out.print(f"deployment written to {output} (the plan behind it: {output.with_suffix('.plan.json')})")


def _best_colocated(result: PlanResult, policy: ColocatedPolicy) -> list[Candidate]:
    """The colocated candidates of one policy, best first."""
    from trt_disagg.planner.placement import ColocatedPlacement

    return [c for c in result.colocated if isinstance(c.placement, ColocatedPlacement) and c.placement.policy == policy]


def _print_plan(summary: dict) -> None:
    slo = summary["slo"]
    title = (f"{summary['model']} on {', '.join(summary['cluster'])} — SLO TTFT {slo['ttft_s']}s TPOT {slo['tpot_s']}s "
             f"at {slo['attainment']:.0%}")
    units = Table(title=f"{title}\none unit each (DistServe's per-GPU goodput)")
    for col in ("", "configuration (one unit)", "engine fits", "GPUs", "goodput req/s", "per-GPU req/s",
                "disaggregated is"):
        units.add_column(col)
    best = summary["best_disaggregated"]
    fits = ", ".join(sorted(set(summary["latency"].values())))
    units.add_row("disaggregated", escape(best["placement"]), fits, str(best["unit_gpus"]),
                  f"{best['goodput_rps']:.2f}", f"{best['per_gpu_goodput_rps']:.3f}", "")
    for b in summary["baselines"]:
        u = b["unit"]
        units.add_row(f"colocated {b['policy']}", escape(u["placement"]), b["engine"], str(u["unit_gpus"]),
                      f"{u['goodput_rps']:.2f}", f"{u['per_gpu_goodput_rps']:.3f}", f"{b['unit_ratio']:.2f}x")
    out.print(units)
    _print_deployment(summary)
    _print_notes(summary)


def _with_nodes(dep: Deployment, inp: PlanInputs) -> Deployment:
    """On a multi-node cluster, the node of each instance (trt_disagg/node_placement.py)."""
    from trt_disagg.node_placement import NodePool, with_node_placement

    pools = [NodePool(p.gpu.name, p.nodes, p.gpus_per_node) for p in inp.cluster.pools]
    return with_node_placement(dep, pools, inp.affinity)


def _print_deployment(summary: dict) -> None:
    dep = summary["deployment"]
    if dep is None:
        return
    table = Table(title="whole cluster (goodput per GPU of the cluster, idle GPUs counted)")
    for col in ("", "deployment", "engine fits", "GPUs used / cluster", "goodput req/s", "per cluster GPU",
                "disaggregated is"):
        table.add_column(col)
    fits = ", ".join(sorted(set(summary["latency"].values())))
    table.add_row("disaggregated", escape(dep["placement"]), fits, f"{dep['gpus_used']}/{dep['cluster_gpus']}",
                  f"{dep['goodput_rps']:.2f}", f"{dep['per_gpu_goodput_rps']:.3f}", "")
    for b in summary["baselines"]:
        d = b["deployment"]
        table.add_row(f"colocated {b['policy']}", escape(d["placement"]), b["engine"],
                      f"{d['gpus_used']}/{d['cluster_gpus']}", f"{d['goodput_rps']:.2f}",
                      f"{d['per_gpu_goodput_rps']:.3f}", f"{b['deployment_ratio']:.2f}x")
    out.print(table)
    if dep["idle_gpus"]:
        out.print(f"idle: {dep['idle_gpus']} of {dep['cluster_gpus']} GPUs — {escape(dep['idle_reason'] or '')}")


def _print_notes(summary: dict) -> None:
    top = summary["headline"]
    if top is not None:
        out.print(f"headline: {top['unit_ratio']:.2f}x vs {escape(top['baseline'])} per GPU of a unit "
                  f"({top['deployment_ratio']:.2f}x per GPU of the whole cluster)")
    w = summary["workload"]
    dropped = ", ".join(f"{n} {reason}" for reason, n in (w.get("dropped") or {}).items()) or "none"
    out.print(f"workload: {escape(str(w.get('source', '')))}, {w['num_requests']} requests, mean {w['mean_input_len']:.0f} "
              f"in / {w['mean_output_len']:.0f} out tokens; token counts: {escape(w['token_counts'])}; "
              f"long prompts {w.get('long_prompts')}: dropped {dropped}, truncated {w.get('truncated', 0)} "
              f"(of {w.get('examined')} examined)")
    out.print(f"latency model: {summary['latency']}; engine overheads {summary['engine_overheads']}; "
              f"PP <= {summary['max_pp']}; {summary['num_simulations']} simulations in {summary['elapsed_s']:.1f}s")


def _plot_plan(inp: PlanInputs, result: PlanResult, path: Path) -> None:
    from trt_disagg.planner.goodput import attainment_curve, min_duration_for
    from trt_disagg.planner.plots import plot_attainment
    from trt_disagg.planner.search import spec_for
    from trt_disagg.sim import ColocatedPolicy

    curves = {}
    picks = (result.disagg[:2] + _best_colocated(result, ColocatedPolicy.PREFILL_FIRST)[:1]
             + _best_colocated(result, ColocatedPolicy.CHUNKED)[:1])
    top = max(c.per_gpu_goodput for c in picks) or 1.0
    per_gpu_rates = np.linspace(0.1, 2.0, 12) * top
    duration = min_duration_for(inp.slo, float(np.mean(inp.lengths.output_len)))
    for cand in picks:
        rates = per_gpu_rates * cand.unit_gpus
        att = attainment_curve(spec_for(inp, cand.placement, cand.engine), inp.lengths, inp.unit_arrivals, inp.slo,
                               rates, duration)
        label = str(cand.placement) + (f" ({cand.engine} fits)" if cand.engine else "")
        curves[label] = (per_gpu_rates, att)
    plot_attainment(curves, inp.slo.attainment, path, f"{inp.model.name}: attainment vs rate")


def profile_cmd(
    engine_dir: Path = typer.Argument(..., help="an engine directory built by `trt-disagg build`"),
    output: Path = Opt(None, "--output", "-o", help="output directory (default ENGINE_DIR/profile)"),
    batch_sizes: str = Opt("1,2,4,8"),
    lengths: str = Opt("16,64,128,256"),
    repeats: int = Opt(5, help="timed rounds per grid point; the fastest is fitted"),
    warmup: int = Opt(1),
    decode_steps: int = Opt(4),
    threads_per_rank: int = Opt(None),
    device: str = Opt("cpu", help="where the engine's ranks run: cpu, cuda, cuda:N (as a group's `device`)"),
) -> None:
    """Time the engine over a grid of batch sizes and prompt lengths, fit the latency model, write both."""
    from rich.progress import Progress

    from trt_disagg.engine.llm_engine import LLMEngine
    from trt_disagg.planner.latency_model import NO_THRESHOLD
    from trt_disagg.planner.profile import ProfileGrid, fit_profile, profile_engine, write_profile

    if not (engine_dir / "config.json").is_file():
        raise UserError(f"ENGINE_DIR {engine_dir}: no config.json (build one with `trt-disagg build`)")
    grid = ProfileGrid(_ints(batch_sizes, "--batch-sizes"), _ints(lengths, "--lengths"), repeats, warmup, decode_steps)
    # block reuse off: the profile times compute; a prefix cache hit would time a lookup instead
    engine = LLMEngine.from_engine_dir(engine_dir, threads_per_rank=threads_per_rank, device=device,
                                       block_reuse=False)
    try:
        with Progress(console=Console(stderr=True)) as progress:
            task = progress.add_task("profiling", total=None)
            data = profile_engine(engine, grid, lambda done, total: progress.update(task, completed=done, total=total))
        cfg = engine.config
    finally:
        engine.shutdown()
    fit = fit_profile(data, cfg.tp, f"engine:{engine_dir.name}", device, f"profile:{engine_dir}")
    out_dir = output or engine_dir / "profile"
    write_profile(out_dir, data, fit, grid, str(engine_dir))
    table = Table(title=f"latency fit of {engine_dir} (TP{cfg.tp} PP{cfg.pp})")
    for col in ("phase", "samples", "a (ms)", "b (ms)", "c (ms)", "max rel err", "mean rel err"):
        table.add_column(col)
    for phase, rep in fit.reports.items():
        c = rep.coefficients
        table.add_row(phase, str(rep.num_samples), f"{c.a * 1e3:.4g}", f"{c.b * 1e3:.4g}", f"{c.c * 1e3:.4g}",
                      f"{rep.max_rel_error:.1%}", f"{rep.mean_rel_error:.1%}")
    out.print(table)
    threshold = fit.latency_model.for_tp(cfg.tp).decode_threshold
    if threshold < NO_THRESHOLD:
        out.print(f"decode_small covers batch <= {threshold}, decode_large the rest (the split that fits best)")
    out.print(f"measurements and fit written to {out_dir}/profile.csv, profile.json")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None
