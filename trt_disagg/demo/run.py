"""`run_demo`: disaggregated vs colocated on this machine, end to end, as one call that returns its results.

    build the engines ─▶ load the workload (the engine's tokenizer) ─▶ profile the engine (1 thread)
    ─▶ SLOs and rates from the profile (targets.py) ─▶ serve the disaggregated deployment
    ─▶ time hand-offs phase by phase (warm) ─▶ benchmark ─▶ stop
    ─▶ serve + benchmark the colocated baseline on the same cores ─▶ stop
    ─▶ served steps vs profile: busy? ─▶ predict both (simulator: profile, or served step times when busy,
       + hand-off costs) ─▶ JSON/CSV/PNG

Quick (default): a short profile grid, 20 requests per rate, and per variant a goodput bisection from half
the measured prefill capacity that stops once the crossing is bracketed. Full: the thorough grid and five
rates over the capacity at 40 requests each.

The CLI (`trt-disagg demo`) parses flags, calls `run_demo` and prints its `DemoResult`. Building takes a
`build` callable and progress goes to a `DemoProgress`, so this module neither prints nor depends on the
CLI's progress bars; a test can pass fakes for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from trt_disagg.bench.goodput import GoodputResult, SearchSpec
from trt_disagg.bench.metrics import RunResult
from trt_disagg.bench.report import write_report
from trt_disagg.config import SLO, Deployment, load_deployment
from trt_disagg.contract import Role
from trt_disagg.demo.handoff import HandoffSample
from trt_disagg.demo.measure import DEMO_TEMPERATURE, Measured, Window, measure
from trt_disagg.demo.predict import (
    DEMO_GRID,
    QUICK_GRID,
    EngineProfile,
    HandoffCosts,
    handoff_latency_s,
    predict_attainment,
    predicted_goodput_rps,
    profile,
    sim_spec,
    simulate_run,
)
from trt_disagg.demo.report import VariantOutcome, plot_predicted_vs_measured
from trt_disagg.demo.served_steps import DecodeBesidePrefill, StepRatios, decode_beside_prefill, step_ratios
from trt_disagg.demo.targets import (
    FULL_FRACTIONS,
    QUICK_MAX_FRACTION,
    QUICK_MIN_FRACTION,
    QUICK_MISS_STEP,
    Busy,
    SloRule,
    busy_from,
    decode_batch_seen,
    prefill_capacity_rps,
    scaled_model,
)
from trt_disagg.demo.variants import Variant, split_variants
from trt_disagg.engine_dir import EngineConfig, load_tokenizer
from trt_disagg.errors import UserError
from trt_disagg.planner.latency_model import LatencyModel, PhaseCoefficients
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
    rates: tuple[float, ...] | None = None  # req/s, ascending; None: from the measured prefill capacity
    num_requests: int | None = None  # per rate; None: 20 quick, 40 full
    seed: int = 0
    out_dir: Path = Path("runs/demo")
    engines_dir: Path | None = None  # default: the deployment's engines_dir
    full: bool = False  # the thorough run: full profile grid, five rates
    slo_rule: SloRule | None = SloRule()  # None: the deployment's fixed SLO
    busy_threshold: float = 1.3  # served / profiled step time above which the machine counts as busy
    temperature: float = DEMO_TEMPERATURE  # sent with every request: 0 greedy (what the profile times)

    @property
    def requests_per_rate(self) -> int:
        return self.num_requests if self.num_requests is not None else (40 if self.full else 20)


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
    rates: tuple[float, ...]  # every rate run, either variant
    paths: list[Path]  # every file written under out_dir
    slo_rule: str = ""  # how the SLO was made (from the profile, or the config's fixed one)
    capacity_rps: float = 0.0  # one prefill core's prompts per second, profiled
    handoffs: list[HandoffSample] | None = None  # the disaggregated variant's timed hand-offs (warm)
    decode_step_s: float = 0.0  # profiled batch-1 decode step at the probes' context (next to the hand-off)
    busy: Busy | None = None  # served vs profiled step times; is_busy: the prediction used the served ones

    @property
    def ratio(self) -> float | None:
        """Per-core goodput of the disaggregated deployment over the colocated baseline; None when the
        baseline's goodput is 0 (no ratio exists: the table says so instead of "inf")."""
        base = self.goodputs[self.outcomes[-1].variant.label].per_core_goodput_rps
        first = self.goodputs[self.outcomes[0].variant.label].per_core_goodput_rps
        return first / base if base > 0 else None


def run_demo(options: DemoOptions, build: Build, progress: DemoProgress) -> DemoResult:
    """Build, profile, serve and benchmark both variants, predict them, and write the report files."""
    if options.requests_per_rate < 1:
        raise UserError("--num-requests must be >= 1")
    if not 0 <= options.temperature <= 2:  # OpenAI's range; NaN fails too
        raise UserError(f"--temperature must be in [0, 2], got {options.temperature}")
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
    prof = _profile(dep, engine_dirs[_profiled_role(dep)], options, progress)
    coeffs = prof.fit.latency_model.for_tp(1)
    mean_input = sum(r.input_len for r in requests) / len(requests)
    capacity = prefill_capacity_rps(coeffs, mean_input)
    slo, rule, plans = _targets(options, dep, variants, engine_cfgs, prof, requests, mean_input, capacity, progress)

    measured: dict[str, Measured] = {}
    served: dict[str, list[StepRatios]] = {}
    for step, variant in enumerate(variants, start=3):
        progress.step(step, NUM_STEPS, f"serve and benchmark: {variant.label} ({variant.describe()})")
        measured[variant.label] = measure(
            variant, requests, plans[variant.label], slo, engines_root=engines_root,
            run_dir=options.out_dir / variant.label, seed=options.seed, temperature=options.temperature,
            after_rate=lambda run, logs, window: _watch(run, logs, window, coeffs, options, progress))
        served[variant.label] = [r for path in measured[variant.label].iteration_logs
                                 for r in step_ratios(path, coeffs)]

    progress.step(NUM_STEPS, NUM_STEPS, "predict and report")
    all_served = [r for rows in served.values() for r in rows]
    busy = busy_from(all_served, options.busy_threshold)
    outcomes, handoff_notes = [], []
    for variant in variants:
        # each deployment predicted on its own served steps: the disaggregated decode core shares the memory
        # bus with a prefill core, a colocated one mostly with another decode
        m = measured[variant.label]
        own = busy_from(served[variant.label], options.busy_threshold)
        model = prof.fit.latency_model
        factors: tuple[float, ...] = ()
        if own.use_served_times:
            # a decode step beside a prefill is the simulator's interference term; the model takes the rest
            beside = _decode_beside_prefill(m, coeffs)
            model = scaled_model(model, 1, own if beside is None else replace(own, decode_scale=beside.alone))
            progress.note(f"  {variant.label}: {_load_changed(own)}: {own.describe()}; predicting with its served "
                          "step times" + ("" if beside is None else f", {beside.describe()}"))
            factors = () if beside is None else beside.factors
        outcome, note = _predict(variant, m, engine_cfgs, prof, model, requests, slo, options, factors)
        outcomes.append(outcome)
        handoff_notes += [note] if note else []
    goodputs = {o.variant.label: o.goodput(slo.attainment) for o in outcomes}
    paths = write_report(goodputs, options.out_dir)
    paths.append(plot_predicted_vs_measured(outcomes, slo.attainment, options.out_dir / "predicted_vs_measured.png"))
    rates = tuple(sorted({r.rate_rps for m in measured.values() for r in m.runs}))
    disagg = measured[variants[0].label]
    probe_ctx = disagg.handoff_input_lens[0] if disagg.handoff_input_lens else int(mean_input)
    return DemoResult(outcomes, slo, goodputs, handoff_notes, all_served, requests, rates, paths, rule, capacity,
                      disagg.handoffs, coeffs.decode_step_s(1, probe_ctx + 1), busy)


def _targets(options: DemoOptions, dep: Deployment, variants: list[Variant], engine_cfgs: dict[Role, EngineConfig],
             prof: EngineProfile, requests: list[WorkloadRequest], mean_input: float, capacity: float,
             progress: DemoProgress) -> tuple[SLO, str, dict[str, tuple[float, ...] | SearchSpec]]:
    """The SLO and each variant's rates, from the profile: both simulated on the requests and arrivals the
    benchmark sends. The TPOT target uses the p90 decode batch of the disaggregated deployment at the highest
    rate (targets.py); the quick bisection starts each variant at its predicted goodput, so a good prediction
    brackets the measured one in two runs."""
    fixed = _rate_plan(options, capacity)
    max_rate = max(fixed) if fixed is not None else capacity * max(FULL_FRACTIONS)
    model = prof.fit.latency_model
    specs = {v.label: sim_spec(v, engine_cfgs, model, HandoffCosts(prof.import_s_per_token)) for v in variants}
    if options.slo_rule is None:
        slo, rule = dep.slo, f"fixed SLOs from {options.config}"
    else:
        sim = simulate_run(specs[variants[0].label], requests, max_rate, seed=options.seed)
        slo, rule = options.slo_rule.derive(model.for_tp(1), mean_input, options.output_len,
                                            decode_batch_seen(sim.first_token_s, sim.finish_s), dep.slo.attainment)
    progress.note(f"  {rule}")
    progress.note(f"  prefill capacity {capacity:.3g} req/s per core (prompt {mean_input:.0f} tokens); "
                  f"{options.requests_per_rate} requests per rate")
    plans: dict[str, tuple[float, ...] | SearchSpec] = {}
    for v in variants:
        if fixed is not None:
            plans[v.label] = fixed
            progress.note(f"  {v.label}: rates {', '.join(f'{r:.3g}' for r in fixed)} req/s")
            continue
        predicted = predicted_goodput_rps(specs[v.label], requests, slo.attainment, slo.ttft_s, slo.tpot_s,
                                          QUICK_MIN_FRACTION * capacity, QUICK_MAX_FRACTION * capacity,
                                          seed=options.seed)
        plans[v.label] = spec = _quick_search(predicted, capacity, slo.attainment)
        progress.note(f"  {v.label}: predicted goodput {predicted:.3g} req/s; goodput bisection from "
                      f"{spec.start_rps:.3g} req/s, at most {spec.max_runs} rates")
    return slo, rule, plans


def _decode_beside_prefill(m: Measured, coeffs: PhaseCoefficients) -> DecodeBesidePrefill | None:
    """The decode steps of a disaggregated deployment, split by whether a prefill step ran beside them."""
    def role_logs(role: Role) -> list[Path]:
        return [p for p in m.iteration_logs if p.name.startswith(f"{role.value}-")]

    return decode_beside_prefill(role_logs(Role.DECODE), role_logs(Role.PREFILL), coeffs)


def _load_changed(busy: Busy) -> str:
    if busy.is_busy:
        return "the machine was busy while serving"
    return "the machine was busy while profiling" if busy.profile_was_busy else "served steps differ from the profile"


def _rate_plan(options: DemoOptions, capacity_rps: float) -> tuple[float, ...] | None:
    """Explicit rates; the full run's five fractions of the capacity; None: the quick goodput bisection."""
    if options.rates is not None:
        return options.rates
    if options.full:
        return tuple(round(f * capacity_rps, 3) for f in FULL_FRACTIONS)
    return None


def _quick_search(predicted_rps: float, capacity_rps: float, target: float) -> SearchSpec:
    """A bisection from the predicted goodput in steps of 1.3x, stopping once the crossing is bracketed that
    closely: two runs when the prediction holds, three when it is a step off. A start that misses by more
    steps further down at once (QUICK_MISS_STEP), so a prediction far off still finds a passing rate within
    the three runs. With no predicted goodput it starts at the lowest rate worth running."""
    min_rps = QUICK_MIN_FRACTION * capacity_rps
    return SearchSpec(target=target, start_rps=round(max(predicted_rps, min_rps), 3), growth=1.3, rel_tol=0.35,
                      max_runs=3, min_rps=min_rps, miss_step=QUICK_MISS_STEP)


def _watch(run: RunResult, logs: list[Path], window: Window, coeffs: PhaseCoefficients, options: DemoOptions,
           progress: DemoProgress) -> None:
    """After each rate: its attainment, how many requests it rests on, and its served/profiled step times."""
    s = run.summary()
    busy = busy_from([r for path in logs for r in step_ratios(path, coeffs, window)], options.busy_threshold)
    progress.note(f"  {run.rate_rps:.3g} req/s: attainment {s.attainment:.0%} of {len(run.records)} requests; "
                  f"{busy.describe()}" + (" [busy]" if busy.is_busy else ""))


def _load_requests(options: DemoOptions, engine_dir: Path, cfg: EngineConfig) -> list[WorkloadRequest]:
    """The workload, tokenised by the served engine's tokenizer and cut to what its engine accepts."""
    return load_workload(options.workload, num_requests=options.requests_per_rate, seed=options.seed,
                         tokenizer=load_tokenizer(engine_dir), max_input_len=cfg.limits.max_input_len,
                         max_output_len=options.output_len,
                         input_len=options.input_len if options.workload == "fixed" else None,
                         output_len=options.output_len)


def _profiled_role(dep: Deployment) -> Role:
    """The engine to profile: every group serves the same model and weights, so the one built with the largest
    token budget, where the grid's batched prefills (up to 4 x 512 tokens) fit. The groups that prefill may
    batch fewer prompts than that (configs/smollm2-demo.yaml says why); the simulator batches as they do."""
    groups = dep.groups()
    return max(groups, key=lambda role: (groups[role].max_num_tokens, role == Role.COLOCATED))


def _profile(dep: Deployment, engine_dir: Path, options: DemoOptions, progress: DemoProgress) -> EngineProfile:
    threads = dep.groups()[Role.COLOCATED].threads_per_instance
    prof = profile(engine_dir, dep.name, threads, options.out_dir / "profile", progress.profiling,
                   DEMO_GRID if options.full else QUICK_GRID)
    for phase, rep in prof.fit.reports.items():
        progress.note(f"  fit {phase}: max rel err {rep.max_rel_error:.1%}, mean {rep.mean_rel_error:.1%}")
    progress.note(f"  KV import: {prof.import_s_per_token * 1e6:.1f} us/token")
    return prof


def _predict(variant: Variant, m: Measured, engine_cfgs: dict[Role, EngineConfig], prof: EngineProfile,
             model: LatencyModel, requests: list[WorkloadRequest], slo: SLO, options: DemoOptions,
             decode_beside_prefill: tuple[float, ...] = ()) -> tuple[VariantOutcome, str | None]:
    """The variant's simulated attainment at every rate it ran; for a disaggregated variant the hand-off
    costs are fitted to the measured hand-offs first (returned as a note for the report), and its decode
    steps that start beside a prefill take `decode_beside_prefill` (by batch size) times longer."""
    costs = HandoffCosts(prof.import_s_per_token)
    note = None
    if m.handoffs_s:
        decode_step_s = model.for_tp(1).decode_step_s
        bare = sim_spec(variant, engine_cfgs, model, costs)
        assert isinstance(bare, DisaggSpec)  # only a disaggregated variant hands off
        costs = HandoffCosts(prof.import_s_per_token,
                             handoff_latency_s(m.handoffs_s, m.handoff_input_lens, bare, decode_step_s))
        note = (f"{variant.label}: hand-off (prefill done -> first decode token, alone, warm) "
                f"{', '.join(f'{h * 1e3:.0f}' for h in m.handoffs_s)} ms -> fixed part "
                f"{costs.handoff_s * 1e3:.0f} ms; KV import {prof.import_s_per_token * 1e6:.1f} us/token")
    spec = sim_spec(variant, engine_cfgs, model, costs)
    if isinstance(spec, DisaggSpec):
        spec = replace(spec, decode_beside_prefill=decode_beside_prefill)
    rates = [r.rate_rps for r in m.runs]
    predicted = predict_attainment(spec, requests, rates, slo.ttft_s, slo.tpot_s, seed=options.seed)
    return VariantOutcome(variant, m.runs, predicted), note
