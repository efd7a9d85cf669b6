"""Predicting a shape's attainment on the observed workload: the planner's simulator, on the fitted timings.

The observed window becomes a synthetic trace: Poisson arrivals at the observed rate, (prompt, output)
pairs drawn from the observed ones with a fixed seed (so two shapes are compared on the same requests, and
the same window always predicts the same), long enough to reach steady state (`min_requests`, a few
request lifetimes). Predictions are cached per window: the search asks about every shape once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from trt_disagg.controller.observe import ObservedWorkload
from trt_disagg.controller.policy import Shape
from trt_disagg.sim import DisaggSpec, SimWorkload, simulate

MIN_PREDICT_REQUESTS = 200
MAX_PREDICT_REQUESTS = 3000


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


class SimPredictor:
    """`Predictor` over the discrete-event simulator. `base` gives the instance timings and the link; its
    instance counts are replaced by each shape's."""

    def __init__(self, base: DisaggSpec, slo: SLO, horizon_s: float, seed: int = 0) -> None:
        self.base = base
        self.slo = slo
        self.horizon_s = horizon_s
        self.seed = seed
        self._window: ObservedWorkload | None = None
        self._workload: SimWorkload | None = None
        self._cache: dict[Shape, float] = {}
        self.num_simulations = 0

    def attainment(self, shape: Shape, observed: ObservedWorkload) -> float:
        if observed is not self._window:
            self._window, self._workload, self._cache = observed, self.workload(observed), {}
        if shape not in self._cache:
            assert self._workload is not None
            spec = replace(self.base, num_prefill=shape.num_prefill, num_decode=shape.num_decode)
            self._cache[shape] = simulate(spec, self._workload).attainment(self.slo.ttft_s, self.slo.tpot_s)
            self.num_simulations += 1
        return self._cache[shape]

    def workload(self, observed: ObservedWorkload) -> SimWorkload:
        """The synthetic trace of `observed`: its rate, its length pairs, `horizon_s` (or enough requests)."""
        rng = np.random.default_rng(self.seed)
        rate = max(observed.arrival_rps, 1e-6)
        n = int(min(MAX_PREDICT_REQUESTS, max(MIN_PREDICT_REQUESTS, rate * self.horizon_s)))
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
        pick = rng.integers(0, len(observed.input_len), n)
        return SimWorkload(arrivals, observed.input_len[pick], observed.output_len[pick])
