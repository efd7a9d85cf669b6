"""Goodput: the highest arrival rate whose SLO attainment reaches the target, found by a bounded search.

Each probe is a whole benchmark run (tens of seconds on a CPU deployment), so the search spends as few as
it can:

    1. expand   : start at `start_rps`; while it passes, multiply by `growth` (×2) → first failing rate
                  (or, when the start already fails, divide by `growth` until one passes or `min_rps`)
    2. bisect   : between the highest passing rate `lo` and the lowest failing rate `hi`, probe the
                  midpoint until hi/lo ≤ 1 + rel_tol
    3. stop     : at most `max_runs` probes in all; goodput = `lo` (0 when no probed rate passed)

Attainment is assumed to fall as the rate grows (DistServe's curves); a noisy non-monotone point only moves
`lo`/`hi`, it never breaks the loop. The search takes the measurement as a callback, so it is pure and
unit-testable, and the simulator-based planner can drive it with a simulated measurement too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from trt_disagg.bench.metrics import RunResult
from trt_disagg.errors import UserError


@dataclass(frozen=True)
class SearchSpec:
    """How the goodput search probes rates."""

    target: float = 0.9  # attainment a rate must reach to count
    start_rps: float = 1.0
    growth: float = 2.0  # expansion / contraction factor
    rel_tol: float = 0.1  # stop bisecting when hi / lo <= 1 + rel_tol
    max_runs: int = 8
    min_rps: float | None = None  # lowest rate worth probing; default start_rps / growth**(max_runs - 1)
    # Until a rate passes, each this many points of attainment a probe missed by adds a growth step down
    # (None: one step): a start far above the goodput is left in one probe, not max_runs of them.
    miss_step: float | None = None

    def validate(self) -> None:
        if not 0 < self.target <= 1:
            raise UserError(f"--attainment (target) must be in (0, 1], got {self.target}")
        if not self.start_rps > 0:
            raise UserError(f"start rate must be > 0 requests/s, got {self.start_rps}")
        if not self.growth > 1:
            raise UserError(f"growth must be > 1, got {self.growth}")
        if not self.rel_tol > 0:
            raise UserError(f"rel_tol must be > 0, got {self.rel_tol}")
        if self.max_runs < 1:
            raise UserError(f"--max-runs must be >= 1, got {self.max_runs}")
        if self.miss_step is not None and not 0 < self.miss_step <= 1:
            raise UserError(f"miss_step must be in (0, 1], got {self.miss_step}")


@dataclass(frozen=True)
class Probe:
    rate_rps: float
    attainment: float
    passed: bool


@dataclass
class SearchTrace:
    """Every probe in the order made, and the answer."""

    goodput_rps: float  # highest passing rate probed; 0.0 when none passed
    probes: list[Probe] = field(default_factory=list)


async def search_rates(measure: Callable[[float], Awaitable[float]], spec: SearchSpec) -> SearchTrace:
    """Find the highest rate with measure(rate) >= spec.target in at most spec.max_runs probes."""
    spec.validate()
    min_rps = spec.min_rps if spec.min_rps is not None else spec.start_rps / spec.growth ** (spec.max_runs - 1)
    lo: float | None = None  # highest passing rate so far
    hi: float | None = None  # lowest failing rate so far
    probes: list[Probe] = []
    rate: float | None = spec.start_rps
    while rate is not None and len(probes) < spec.max_runs:
        value = await measure(rate)
        passed = value >= spec.target
        probes.append(Probe(rate_rps=rate, attainment=value, passed=passed))
        if passed:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        rate = _next_rate(lo, hi, spec, min_rps, spec.target - value)
    return SearchTrace(goodput_rps=lo if lo is not None else 0.0, probes=probes)


def _next_rate(lo: float | None, hi: float | None, spec: SearchSpec, min_rps: float,
               missed_by: float = 0.0) -> float | None:
    """The next rate to probe, or None when the answer is known well enough; `missed_by`: how far the last
    probe's attainment fell short of the target."""
    if hi is None:
        return lo * spec.growth if lo is not None else None
    if lo is None:
        steps = 1 + (int(max(0.0, missed_by) / spec.miss_step + 1e-9) if spec.miss_step else 0)
        lower = max(hi / spec.growth ** steps, min_rps)
        return lower if hi / spec.growth >= min_rps * (1 - 1e-9) else None
    if hi <= lo * (1 + spec.rel_tol):
        return None
    return (lo + hi) / 2


@dataclass
class GoodputResult:
    """The goodput of one deployment under one workload and SLO, with the runs that measured it."""

    target: float
    goodput_rps: float
    num_cores: int  # processors the deployment uses (GPUs on a GPU deployment, cores here)
    runs: list[RunResult]  # in the order they were made

    @property
    def per_core_goodput_rps(self) -> float:
        return self.goodput_rps / self.num_cores

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "goodput_rps": self.goodput_rps,
            "num_cores": self.num_cores,
            "per_core_goodput_rps": self.per_core_goodput_rps,
            "probes": [{"rate_rps": r.rate_rps, "attainment": r.summary().attainment} for r in self.runs],
        }


def goodput_from_runs(runs: list[RunResult], target: float, num_cores: int = 1) -> GoodputResult:
    """Goodput read off runs at fixed rates: the highest measured rate whose attainment reaches `target`.

    Coarser than `search_rates` (only the rates given are candidates), but needs no extra runs.
    """
    passing = [r.rate_rps for r in runs if r.summary().attainment >= target]
    return GoodputResult(target=target, goodput_rps=max(passing, default=0.0), num_cores=num_cores,
                         runs=list(runs))
