"""Goodput: the highest Poisson rate at which SLO attainment stays at the target (DESIGN.md definition).

The arrivals at rate r are one fixed unit-rate sequence divided by r, so every rate sees the same draws
and attainment falls (almost) monotonically with r; the search brackets the answer by doubling or halving
from a guess, then bisects to `rel_tol`.

A finite workload flatters high rates: N requests sent in a burst shorter than one request's lifetime
never queue behind each other (the system is never in steady state). So each rate simulates at least
`min_duration_s` of arrivals (the request lengths repeat), up to `len(unit_arrivals)` requests;
`min_duration_for` sets it to a few SLO-bound request lifetimes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trt_disagg.sim import ColocatedSpec, DisaggSpec, SimWorkload, simulate
from trt_disagg.sim.loop import Phases

MIN_RATE = 1e-4


@dataclass(frozen=True)
class SLOTarget:
    ttft_s: float | None
    tpot_s: float | None
    attainment: float


@dataclass(frozen=True)
class GoodputResult:
    rate_rps: float
    num_simulations: int


def max_rate(attainment_at: Callable[[float], float], target: float, guess: float, rel_tol: float = 0.03,
             max_evals: int = 40) -> float:
    """Largest rate r (to rel_tol) with attainment_at(r) >= target; 0.0 when even MIN_RATE misses."""
    lo, hi = 0.0, float("inf")
    rate = max(guess, MIN_RATE)
    evals = 0
    while evals < max_evals and (hi == float("inf") or lo == 0.0):
        evals += 1
        if attainment_at(rate) >= target:
            lo = rate
            if hi != float("inf"):
                break
            rate *= 2
        else:
            hi = rate
            if lo > 0.0:
                break
            rate /= 2
            if rate < MIN_RATE:
                return 0.0
    while evals < max_evals and hi != float("inf") and (hi - lo) > rel_tol * hi:
        evals += 1
        mid = (lo + hi) / 2
        if attainment_at(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


LIFETIMES_SIMULATED = 3.0


def min_duration_for(slo: SLOTarget, mean_output_len: float) -> float:
    """A few lifetimes of a request that just meets its SLOs."""
    lifetime = (slo.ttft_s or 0.0) + (slo.tpot_s or 0.0) * max(0.0, mean_output_len - 1)
    return LIFETIMES_SIMULATED * lifetime


def workload_at(lengths: SimWorkload, unit_arrivals: np.ndarray, rate: float, min_duration_s: float) -> SimWorkload:
    """`lengths` (repeated as needed) arriving at `rate`: at least len(lengths) requests and min_duration_s."""
    n = min(len(unit_arrivals), max(len(lengths), int(np.searchsorted(unit_arrivals, rate * min_duration_s)) + 1))
    reps = -(-n // len(lengths))
    return SimWorkload(unit_arrivals[:n] / rate, np.tile(lengths.input_len, reps)[:n],
                       np.tile(lengths.output_len, reps)[:n])


def goodput_search(spec: DisaggSpec | ColocatedSpec, lengths: SimWorkload, unit_arrivals: np.ndarray,
                   slo: SLOTarget, guess: float, phases: Phases = "both", rel_tol: float = 0.03,
                   min_duration_s: float = 0.0) -> GoodputResult:
    """Goodput of `spec` on the request lengths of `lengths`, arriving as `unit_arrivals` / rate."""
    if len(unit_arrivals) < len(lengths):
        raise ValueError("unit_arrivals must have at least one arrival per request of `lengths`")
    calls = 0

    def attainment_at(rate: float) -> float:
        nonlocal calls
        calls += 1
        result = simulate(spec, workload_at(lengths, unit_arrivals, rate, min_duration_s), phases)
        return result.attainment(slo.ttft_s, slo.tpot_s)

    rate = max_rate(attainment_at, slo.attainment, guess, rel_tol)
    return GoodputResult(rate, calls)


def attainment_curve(spec: DisaggSpec | ColocatedSpec, lengths: SimWorkload, unit_arrivals: np.ndarray,
                     slo: SLOTarget, rates: np.ndarray, min_duration_s: float = 0.0) -> np.ndarray:
    """Joint SLO attainment at each rate (for plots)."""
    return np.array([simulate(spec, workload_at(lengths, unit_arrivals, float(r), min_duration_s))
                     .attainment(slo.ttft_s, slo.tpot_s) for r in rates])
