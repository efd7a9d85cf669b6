"""`run_demo`: disaggregated vs colocated on this machine, end to end, as one call that returns its results.

    build the engines ─▶ load the workload (the engine's tokenizer) ─▶ profile the engine (1 thread)
    ─▶ serve the disaggregated deployment ─▶ time a few hand-offs ─▶ benchmark ─▶ stop
    ─▶ serve + benchmark the colocated baseline on the same cores ─▶ stop
    ─▶ predict both (simulator: profile + hand-off costs) ─▶ JSON/CSV/PNG

The CLI (`trt-disagg demo`) parses flags, calls `run_demo` and prints its `DemoResult`. Building takes a
`build` callable and progress goes to a `DemoProgress`, so this module neither prints nor depends on the
CLI's progress bars; a test can pass fakes for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trt_disagg.bench.goodput import GoodputResult
from trt_disagg.bench.report import write_report
from trt_disagg.config import SLO, Deployment, load_deployment
from trt_disagg.contract import Role
from trt_disagg.demo.measure import Measured, measure
from trt_disagg.demo.predict import (
    EngineProfile,
    HandoffCosts,
    handoff_latency_s,
    predict_attainment,
    profile,
    sim_spec,
)
from trt_disagg.demo.report import VariantOutcome, plot_predicted_vs_measured
from trt_disagg.demo.served_steps import StepRatios, step_ratios
from trt_disagg.demo.variants import Variant, split_variants
from trt_disagg.engine_dir import EngineConfig, load_tokenizer
from trt_disagg.errors import UserError
from trt_disagg.sim import DisaggSpec
from trt_disagg.workload import WorkloadRequest, load_workload

log = logging.getLogger(__name__)

NUM_STEPS = 5


@dataclass(frozen=True)
class DemoOptions:
    config: Path  # a deployment with context, generation and colocated servers
    workload: str = "fixed"
    input_len: int = 512  # the fixed workload's prompt tokens
    output_len: int = 16  # output tokens (ignore_eos)
    rates: tuple[float, ...] = (0.15, 0.3, 0.5, 0.7, 0.9)  # req/s, ascending
    num_requests: int = 40  # per rate
    seed: int = 0
    out_dir: Path = Path("runs/demo")
    engines_dir: Path | None = None  # default: the deployment's engines_dir


class DemoProgress(Protocol):
    def step(self, number: int, total: int, title: str) -> None: ...  # a numbered stage starts
    def profiling(self, done: int, total: int) -> None: ...  # grid points profiled so far
    def note(self, text: str) -> None: ...  # a detail worth showing as it happens


Build = Callable[[Deployment, Path], object]  # builds every role's engine under the engines root


@dataclass(frozen=True)
class DemoResult:
    outcomes: list[VariantOutcome]  # disaggregated first, the colocated baseline last
    slo: SLO
    goodputs: dict[str, GoodputResult]  # variant label -> goodput at the SLO's attainment target
    handoff_notes: list[str]  # per disaggregated variant: the measured hand-offs and the fitted fixed part
    served_steps: list[StepRatios]  # served step times over the profiled ones
    requests: list[WorkloadRequest]
    rates: tuple[float, ...]
    paths: list[Path]  # every file written under out_dir

    @property
    def ratio(self) -> float:
        """Per-core goodput of the disaggregated deployment over the colocated baseline (inf: baseline 0)."""
        base = self.goodputs[self.outcomes[-1].variant.label].per_core_goodput_rps
        first = self.goodputs[self.outcomes[0].variant.label].per_core_goodput_rps
        return first / base if base > 0 else float("inf")


def run_demo(options: DemoOptions, build: Build, progress: DemoProgress) -> DemoResult:
    """Build, profile, serve and benchmark both variants, predict them, and write the report files."""
    if options.num_requests < 1:
        raise UserError("--num-requests must be >= 1")
    dep = load_deployment(options.config)
    variants = split_variants(dep)
    engines_root = options.engines_dir or Path(dep.engines_dir)
    options.out_dir.mkdir(parents=True, exist_ok=True)

    progress.step(1, NUM_STEPS, "build the engines")
    build(dep, engines_root)
    engine_dirs = {role: dep.engine_dir(role, engines_root) for role in dep.groups()}
    engine_cfgs = {role: EngineConfig.load(d) for role, d in engine_dirs.items()}
    requests = _load_requests(options, engine_dirs[Role.COLOCATED], engine_cfgs[Role.COLOCATED])

    progress.step(2, NUM_STEPS, "profile the engine (one thread, as served)")
    prof = _profile(dep, engine_dirs[Role.COLOCATED], options.out_dir, progress)

    measured = {}
    for step, variant in enumerate(variants, start=3):
        progress.step(step, NUM_STEPS, f"serve and benchmark: {variant.label} ({variant.describe()})")
        measured[variant.label] = measure(variant, requests, list(options.rates), dep.slo, engines_root=engines_root,
                                          run_dir=options.out_dir / variant.label, seed=options.seed)

    outcomes, handoff_notes, served = [], [], []
    for variant in variants:
        outcome, note = _predict(variant, measured[variant.label], engine_cfgs, prof, requests, options, dep.slo)
        outcomes.append(outcome)
        handoff_notes += [note] if note else []
        coeffs = prof.fit.latency_model.for_tp(1)
        served += [r for path in measured[variant.label].iteration_logs for r in step_ratios(path, coeffs)]

    progress.step(NUM_STEPS, NUM_STEPS, "report")
    target = dep.slo.attainment
    goodputs = {o.variant.label: o.goodput(target) for o in outcomes}
    paths = write_report(goodputs, options.out_dir)
    paths.append(plot_predicted_vs_measured(outcomes, target, options.out_dir / "predicted_vs_measured.png"))
    return DemoResult(outcomes, dep.slo, goodputs, handoff_notes, served, requests, options.rates, paths)


def _load_requests(options: DemoOptions, engine_dir: Path, cfg: EngineConfig) -> list[WorkloadRequest]:
    """The workload, tokenised by the served engine's tokenizer and cut to what its engine accepts."""
    return load_workload(options.workload, num_requests=options.num_requests, seed=options.seed,
                         tokenizer=load_tokenizer(engine_dir), max_input_len=cfg.limits.max_input_len,
                         max_output_len=options.output_len,
                         input_len=options.input_len if options.workload == "fixed" else None,
                         output_len=options.output_len)


def _profile(dep: Deployment, engine_dir: Path, out_dir: Path, progress: DemoProgress) -> EngineProfile:
    threads = dep.groups()[Role.COLOCATED].threads_per_instance
    prof = profile(engine_dir, dep.name, threads, out_dir / "profile", progress.profiling)
    for phase, rep in prof.fit.reports.items():
        progress.note(f"  fit {phase}: max rel err {rep.max_rel_error:.1%}, mean {rep.mean_rel_error:.1%}")
    progress.note(f"  KV import: {prof.import_s_per_token * 1e6:.1f} us/token")
    return prof


def _predict(variant: Variant, m: Measured, engine_cfgs: dict[Role, EngineConfig], prof: EngineProfile,
             requests: list[WorkloadRequest], options: DemoOptions, slo: SLO) -> tuple[VariantOutcome, str | None]:
    """The variant's simulated attainment at every rate; for a disaggregated variant the hand-off costs are
    fitted to the measured hand-offs first (returned as a note for the report)."""
    costs = HandoffCosts(prof.import_s_per_token)
    note = None
    if m.handoffs_s:
        decode_step_s = prof.fit.latency_model.for_tp(1).decode_step_s
        bare = sim_spec(variant, engine_cfgs, prof.fit.latency_model, costs)
        assert isinstance(bare, DisaggSpec)  # only a disaggregated variant hands off
        costs = HandoffCosts(prof.import_s_per_token,
                             handoff_latency_s(m.handoffs_s, m.handoff_input_lens, bare, decode_step_s))
        note = (f"{variant.label}: hand-off (prefill done -> first decode token, alone) "
                f"{', '.join(f'{h * 1e3:.0f}' for h in m.handoffs_s)} ms -> fixed part "
                f"{costs.handoff_s * 1e3:.0f} ms; KV import {prof.import_s_per_token * 1e6:.1f} us/token")
    spec = sim_spec(variant, engine_cfgs, prof.fit.latency_model, costs)
    predicted = predict_attainment(spec, requests, list(options.rates), slo.ttft_s, slo.tpot_s, seed=options.seed)
    return VariantOutcome(variant, m.runs, predicted), note
