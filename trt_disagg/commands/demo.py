"""`trt-disagg demo CONFIG`: the main job, end to end on this machine.

    build the engines ─▶ load the workload (the engine's tokenizer) ─▶ profile the engine (1 thread)
    ─▶ serve the disaggregated deployment ─▶ time a few hand-offs ─▶ benchmark ─▶ stop
    ─▶ serve + benchmark the colocated baseline on the same cores ─▶ stop
    ─▶ predict both (simulator: profile + hand-off costs) ─▶ tables + JSON/CSV/PNG
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trt_disagg.errors import UserError

# Wide enough for the comparison tables when the output is a pipe or a CI log (rich defaults to 80 there).
out = Console(width=120)
err = Console(stderr=True)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rates {text!r}: expected comma-separated numbers") from None
    if not rates or min(rates) <= 0:
        raise UserError("--rates: give one or more rates > 0 (requests/s)")
    return sorted(rates)


def demo_cmd(
    config: Annotated[Path, typer.Argument(help="a deployment with context, generation and colocated servers")],
    workload: Annotated[str, typer.Option(help="sharegpt | humaneval | longbench-synthetic | fixed")] = "fixed",
    input_len: Annotated[int, typer.Option(help="fixed workload: prompt tokens")] = 512,
    output_len: Annotated[int, typer.Option(help="output tokens (fixed; ignore_eos)")] = 16,
    rates: Annotated[str, typer.Option(help="comma-separated request rates, req/s")] = "0.15,0.3,0.5,0.7,0.9",
    num_requests: Annotated[int, typer.Option(help="requests per rate")] = 40,
    seed: int = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="results: JSON, CSV, PNG")] = Path("runs/demo"),
    engines_dir: Annotated[Path | None, typer.Option("--engines-dir")] = None,
) -> None:
    """Disaggregated vs colocated on this machine: build, serve, benchmark, predict, compare."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trt_disagg.bench.report import write_report
    from trt_disagg.commands.build import build_with_progress
    from trt_disagg.config import load_deployment
    from trt_disagg.contract import Role
    from trt_disagg.demo.measure import measure
    from trt_disagg.demo.predict import HandoffCosts, handoff_latency_s, predict_attainment, profile, sim_spec
    from trt_disagg.demo.report import (
        VariantOutcome,
        goodput_table,
        plot_predicted_vs_measured,
        prediction_table,
    )
    from trt_disagg.demo.served_steps import step_ratio_table, step_ratios
    from trt_disagg.demo.variants import split_variants
    from trt_disagg.engine.tokenizer import load_tokenizer
    from trt_disagg.engine.types import EngineConfig
    from trt_disagg.sim import DisaggSpec
    from trt_disagg.workload import load_workload

    started = time.perf_counter()
    rate_list = _rates(rates)
    if num_requests < 1:
        raise UserError("--num-requests must be >= 1")
    dep = load_deployment(config)
    variants = split_variants(dep)
    engines_root = engines_dir or Path(dep.engines_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    err.rule("1/5 build the engines")
    build_with_progress(dep, engines_root=engines_root)
    engine_dirs = {role: dep.engine_dir(role, engines_root) for role in dep.groups()}
    engine_cfgs = {role: EngineConfig.load(d) for role, d in engine_dirs.items()}
    colocated_cfg = engine_cfgs[Role.COLOCATED]
    requests = load_workload(workload, num_requests=num_requests, seed=seed,
                             tokenizer=load_tokenizer(engine_dirs[Role.COLOCATED]),
                             max_input_len=colocated_cfg.limits.max_input_len, max_output_len=output_len,
                             input_len=input_len if workload == "fixed" else None, output_len=output_len)

    err.rule("2/5 profile the engine (one thread, as served)")
    threads = dep.groups()[Role.COLOCATED].threads_per_instance
    with err.status("profiling") as status:
        prof = profile(engine_dirs[Role.COLOCATED], dep.name, threads, out_dir / "profile",
                       lambda done, total: status.update(f"profiling {done}/{total}"))
    for phase, rep in prof.fit.reports.items():
        err.print(f"  fit {phase}: max rel err {rep.max_rel_error:.1%}, mean {rep.mean_rel_error:.1%}")
    err.print(f"  KV import: {prof.import_s_per_token * 1e6:.1f} us/token")
    coeffs = prof.fit.latency_model.for_tp(1)

    measured = {}
    for step, variant in enumerate(variants, start=3):
        err.rule(f"{step}/5 serve and benchmark: {variant.label} ({variant.describe()})")
        measured[variant.label] = measure(variant, requests, rate_list, dep.slo, engines_root=engines_root,
                                          run_dir=out_dir / variant.label, seed=seed)

    outcomes, handoff_notes, served = [], [], []
    for variant in variants:
        m = measured[variant.label]
        costs = HandoffCosts(prof.import_s_per_token)
        if m.handoffs_s:
            bare = sim_spec(variant, engine_cfgs, prof.fit.latency_model, costs)
            assert isinstance(bare, DisaggSpec)
            costs = HandoffCosts(prof.import_s_per_token,
                                 handoff_latency_s(m.handoffs_s, m.handoff_input_lens, bare, coeffs.decode_step_s))
            handoff_notes.append(f"{variant.label}: hand-off (prefill done -> first decode token, alone) "
                                 f"{', '.join(f'{h * 1e3:.0f}' for h in m.handoffs_s)} ms -> fixed part "
                                 f"{costs.handoff_s * 1e3:.0f} ms; KV import {prof.import_s_per_token * 1e6:.1f} us/token")
        spec = sim_spec(variant, engine_cfgs, prof.fit.latency_model, costs)
        predicted = predict_attainment(spec, requests, rate_list, dep.slo.ttft_s, dep.slo.tpot_s, seed=seed)
        outcomes.append(VariantOutcome(variant, m.runs, predicted))
        served += [r for path in m.iteration_logs for r in step_ratios(path, coeffs)]

    err.rule("5/5 report")
    target = dep.slo.attainment
    paths = write_report({o.variant.label: o.goodput(target) for o in outcomes}, out_dir)
    paths.append(plot_predicted_vs_measured(outcomes, target, out_dir / "predicted_vs_measured.png"))
    slo_text = f"TTFT <= {dep.slo.ttft_s:g} s and TPOT <= {dep.slo.tpot_s:g} s"
    out.print(goodput_table(outcomes, target, slo_text))
    out.print(prediction_table(outcomes))
    for note in handoff_notes:
        out.print(note)
    out.print(step_ratio_table(served))
    out.print(f"workload: {workload}, {len(requests)} requests per rate, "
              f"mean input {sum(r.input_len for r in requests) / len(requests):.0f} tokens, "
              f"output {output_len} tokens; rates {rate_list} req/s (Poisson)")
    for p in paths:
        out.print(f"  wrote {p}")
    out.print(f"demo finished in {time.perf_counter() - started:.0f} s; nothing left running")


def register(app: typer.Typer) -> None:
    """Add `demo` to the CLI."""
    app.command("demo")(demo_cmd)
