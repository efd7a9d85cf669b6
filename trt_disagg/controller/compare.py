"""Autoscaled vs static over one phased trace: what `trt-disagg simulate --autoscale` reports.

    first-phase static  the cheapest shape in the budget predicted to meet target + up_margin on the first
                        phase (what `plan` would deploy for it), else the one predicted best
    oracle static       the same rule on the whole trace (phases weighted by their requests): the best one
                        shape for the trace, known in advance
    autoscaled          starts from the first-phase static shape; the controller decides every interval

All three are replayed through `simulated.replay`, so attainment and GPU-hours are measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trt_disagg.controller.observe import FinishedRequest, ObservedWorkload
from trt_disagg.controller.policy import Budget, Controller, ControllerConfig, Shape
from trt_disagg.controller.predict import SLO, SimPredictor
from trt_disagg.controller.simulated import Delays, SimulatedActuator, TraceRun, replay
from trt_disagg.sim import DisaggSpec
from trt_disagg.workload.phases import PhasedTrace


@dataclass(frozen=True)
class Comparison:
    first_phase: TraceRun
    oracle: TraceRun
    autoscaled: TraceRun
    first_phase_shape: Shape
    oracle_shape: Shape
    phase_attainment: dict[str, list[float]]  # run label -> attainment per phase


def phase_observed(trace: PhasedTrace, index: int, slo: SLO) -> ObservedWorkload:
    """A phase's requests as an observed window (lengths and mean rate; no measured latencies)."""
    sel = np.flatnonzero(trace.phase == index)
    reqs = [FinishedRequest(float(trace.arrival_s[i]), None, float(trace.arrival_s[i]), int(trace.input_len[i]),
                            int(trace.output_len[i]), True) for i in sel]
    return ObservedWorkload.from_finished(reqs, trace.phases[index].duration_s, slo.ttft_s, slo.tpot_s)


def best_static(trace: PhasedTrace, phases: list[int], predictor: SimPredictor, budget: Budget,
                config: ControllerConfig, slo: SLO) -> Shape:
    """The cheapest shape predicted >= target + up_margin on `phases` (weighted by requests), else the best."""
    observed = {k: phase_observed(trace, k, slo) for k in phases}
    weights = np.array([observed[k].num_requests for k in phases], dtype=float)
    weights /= max(weights.sum(), 1.0)
    predicted = {}
    for shape in budget.shapes():
        predicted[shape] = float(sum(w * predictor.attainment(shape, observed[k]) for w, k in zip(weights, phases, strict=True)))
    safe = [s for s, a in predicted.items() if a >= config.target + config.up_margin]
    if safe:
        return min(safe, key=lambda s: (budget.cost(s), -predicted[s], s))
    return max(predicted, key=lambda s: (predicted[s], -budget.cost(s)))


def compare(trace: PhasedTrace, base: DisaggSpec, slo: SLO, budget: Budget, config: ControllerConfig,
            delays: Delays, seed: int = 0) -> Comparison:
    predictor = SimPredictor(base, slo, horizon_s=max(4 * config.interval_s, 120.0), seed=seed)
    first = best_static(trace, [0], predictor, budget, config, slo)
    oracle = best_static(trace, list(range(len(trace.phases))), predictor, budget, config, slo)
    runs = {}
    for label, shape, controller in (
            ("first-phase static", first, None), ("oracle static", oracle, None),
            ("autoscaled", first, Controller(config, budget, predictor))):
        runs[label] = replay(trace, base, slo, SimulatedActuator(shape, budget, delays), controller,
                             config.interval_s, label)
    per_phase = {label: [float(run.ok[trace.phase == k].mean()) if (trace.phase == k).any() else 1.0
                         for k in range(len(trace.phases))] for label, run in runs.items()}
    return Comparison(runs["first-phase static"], runs["oracle static"], runs["autoscaled"], first, oracle, per_phase)
