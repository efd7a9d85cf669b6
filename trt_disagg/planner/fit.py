"""Least-squares fits of the latency model to measured times, on *relative* error.

Minimising sum(((a + b*x1 + c*x2) - y) / y)^2 weights a 5 ms batch as much as a 500 ms one, which is what a
scheduler's decisions are sensitive to (absolute least squares lets the large batches dominate). Each fit
reports its max and mean relative error so a bad profile is visible.

Decode samples are split at `decode_threshold` (batch size) into the small- and large-batch sets; a side
with fewer than 3 samples reuses the other side's fit (a CPU profile rarely has large batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trt_disagg.errors import UserError
from trt_disagg.planner.latency_model import NO_THRESHOLD, Coefficients, PhaseCoefficients

MIN_SAMPLES = 3


@dataclass(frozen=True)
class FitReport:
    coefficients: Coefficients
    num_samples: int
    max_rel_error: float
    mean_rel_error: float


@dataclass(frozen=True)
class PrefillSample:
    lengths: tuple[int, ...]  # prompt tokens of each request in the batch
    time_s: float


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    sum_ctx: int
    time_s: float


def fit_relative(x1: Sequence[float], x2: Sequence[float], y: Sequence[float], what: str) -> FitReport:
    """Coefficients of y = a + b*x1 + c*x2 minimising squared relative error."""
    ys = np.asarray(y, dtype=np.float64)
    if len(ys) < MIN_SAMPLES:
        raise UserError(f"fit {what}: need at least {MIN_SAMPLES} samples, got {len(ys)}")
    if np.any(ys <= 0):
        raise UserError(f"fit {what}: times must be > 0")
    design = np.column_stack([np.ones_like(ys), np.asarray(x1, float), np.asarray(x2, float)])
    solution, *_ = np.linalg.lstsq(design / ys[:, None], np.ones_like(ys), rcond=None)
    rel = np.abs(design @ solution - ys) / ys
    return FitReport(Coefficients(*(float(v) for v in solution)), len(ys), float(rel.max()), float(rel.mean()))


def fit_prefill(samples: Sequence[PrefillSample]) -> FitReport:
    return fit_relative([sum(s.lengths) for s in samples], [sum(n * n for n in s.lengths) for s in samples],
                        [s.time_s for s in samples], "prefill")


def fit_decode(samples: Sequence[DecodeSample], threshold: int = NO_THRESHOLD) -> tuple[FitReport, FitReport]:
    """(small-batch fit, large-batch fit); either falls back to the other when it has too few samples."""
    small = [s for s in samples if s.batch <= threshold]
    large = [s for s in samples if s.batch > threshold]

    def fit(group: Sequence[DecodeSample], what: str) -> FitReport:
        return fit_relative([s.sum_ctx for s in group], [s.batch for s in group], [s.time_s for s in group], what)

    if len(small) >= MIN_SAMPLES and len(large) >= MIN_SAMPLES:
        return fit(small, "decode_small"), fit(large, "decode_large")
    both = fit(samples, "decode")
    return both, both


def fit_phase_coefficients(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
                           threshold: int = NO_THRESHOLD) -> tuple[PhaseCoefficients, dict[str, FitReport]]:
    p = fit_prefill(prefill)
    small, large = fit_decode(decode, threshold)
    coeffs = PhaseCoefficients(p.coefficients, small.coefficients, large.coefficients, threshold)
    return coeffs, {"prefill": p, "decode_small": small, "decode_large": large}
