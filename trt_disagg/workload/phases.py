"""Time-varying workloads: phases whose rate and length distributions change, and a diurnal rate curve.

    phase 1 (chat, 12 req/s, 20 min) ─▶ phase 2 (long documents, 3 req/s, 20 min) ─▶ phase 3 (chat) ...
    rate(t) = phase rate x (1 + amplitude x sin(2 pi t / period))        (amplitude 0: constant per phase)

Arrivals are a non-homogeneous Poisson process (thinning against the peak rate); each request draws its
(prompt, output) pair from its phase's length samples. What the autoscaler is tested against: the same
trace is replayed against static placements and against the controller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from trt_disagg.errors import UserError

_PHASE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)@(?P<rate>[0-9.]+):(?P<dur>[0-9.]+)$")


@dataclass(frozen=True)
class PhaseSpec:
    """A phase as the user names it: a workload name, its rate (req/s) and its duration (s)."""

    workload: str
    rate_rps: float
    duration_s: float


@dataclass(frozen=True)
class Phase:
    name: str
    rate_rps: float
    duration_s: float
    input_len: np.ndarray  # length samples the phase's requests draw from
    output_len: np.ndarray


@dataclass(frozen=True)
class Diurnal:
    amplitude: float = 0.0  # 0 <= amplitude < 1: the rate swings by this share around each phase's rate
    period_s: float = 86400.0

    def __post_init__(self) -> None:
        if not 0 <= self.amplitude < 1:
            raise UserError(f"--diurnal-amplitude must be in [0, 1), got {self.amplitude}")
        if not self.period_s > 0:
            raise UserError(f"--diurnal-period must be > 0 seconds, got {self.period_s}")

    def factor(self, t_s: np.ndarray) -> np.ndarray:
        return 1.0 + self.amplitude * np.sin(2 * math.pi * t_s / self.period_s)


@dataclass(frozen=True)
class PhasedTrace:
    arrival_s: np.ndarray  # float64, sorted
    input_len: np.ndarray  # int64
    output_len: np.ndarray  # int64
    phase: np.ndarray  # int64: index into `phases` of each request
    phases: tuple[Phase, ...]

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def phase_start_s(self, index: int) -> float:
        return sum(p.duration_s for p in self.phases[:index])


def parse_phases(text: str) -> list[PhaseSpec]:
    """'sharegpt@12:1200,longbench-synthetic@3:1200' -> phases (workload@rate:duration_s, comma-separated)."""
    specs = []
    for part in text.split(","):
        m = _PHASE.match(part.strip())
        if m is None:
            raise UserError(f"--phases {part!r}: expected WORKLOAD@RATE:DURATION_S, e.g. sharegpt@12:1200")
        spec = PhaseSpec(m["name"], float(m["rate"]), float(m["dur"]))
        if not spec.rate_rps > 0 or not spec.duration_s > 0:
            raise UserError(f"--phases {part!r}: rate and duration must be > 0")
        specs.append(spec)
    return specs


def build_phased_trace(phases: list[Phase], seed: int = 0, diurnal: Diurnal | None = None) -> PhasedTrace:
    """The requests of every phase, in time order (phase k starts where phase k-1 ends)."""
    if not phases:
        raise UserError("a phased workload needs at least one phase")
    curve = diurnal or Diurnal()
    rng = np.random.default_rng(seed)
    times, inp, out, idx = [], [], [], []
    start = 0.0
    for k, phase in enumerate(phases):
        peak = phase.rate_rps * (1 + curve.amplitude)
        n = rng.poisson(peak * phase.duration_s)
        t = np.sort(rng.uniform(start, start + phase.duration_s, n))
        kept = t[rng.uniform(0, peak, n) < phase.rate_rps * curve.factor(t)]
        pick = rng.integers(0, len(phase.input_len), len(kept))
        times.append(kept)
        inp.append(phase.input_len[pick])
        out.append(phase.output_len[pick])
        idx.append(np.full(len(kept), k, dtype=np.int64))
        start += phase.duration_s
    return PhasedTrace(np.concatenate(times), np.concatenate(inp).astype(np.int64),
                       np.concatenate(out).astype(np.int64), np.concatenate(idx), tuple(phases))
