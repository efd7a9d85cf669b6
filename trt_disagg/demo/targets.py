"""The demo's targets from the profile it just took: SLOs, request rates, and when the machine is too busy.

    profile ──▶ prefill_s(mean prompt)  ──▶ TTFT SLO = ttft_multiple x that         capacity = 1 / that
            ──▶ decode_step_s(batch b)  ──▶ TPOT SLO = tpot_multiple x that         rates = fractions x capacity
                b: the p90 of the batch a request decodes in, on the disaggregated deployment at the highest
                   rate, simulated from the profile (decode_batch_seen)
    served steps / profiled steps, per phase: the p50 past busy_ratio ──▶ "busy": say so
                                              the total (sum served / sum profiled) ──▶ the latency model the
                                              prediction runs on (the profile scaled per phase)

Why relative targets: a fixed TPOT of 0.1 s leaves 10-40% headroom over one core's 60-90 ms decode step on
one machine and none on a slower or busier one; DistServe states its SLOs relative to the model and the
hardware. With both SLOs and rates tied to the measured step times, the comparison the demo shows
(interference vs none) is the same on a slow laptop and a fast server.

Why the batch is a percentile and not Little's mean: Poisson arrivals come in clumps, and a prefill instance
with a queue prefills several prompts in one batch, so their answers decode together even at rates where
the mean batch is below 1. A target at the batch-1 step would fail answers for sharing their decode: it
would measure the arrival pattern, not prefill/decode interference.

Why 2x that step: the target has to tell interference from noise. Measured on the reference machine (2
cores, SmolLM2 decode steps ~60 ms): a prefill landing in a colocated answer made its TPOT 2.7-3.5x the
step (0.17-0.22 s); beside a `nice -n 19` CPU-bound process, disaggregated answers that never met a prefill
reached 1.6-1.75x (0.100-0.109 s), and with a 1.6x target those alone kept that deployment below 90%
attainment at every rate, however low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from trt_disagg.config import SLO
from trt_disagg.demo.served_steps import StepRatios
from trt_disagg.planner.latency_model import Coefficients, LatencyModel, PhaseCoefficients

QUICK_MIN_FRACTION = 0.15  # the goodput search goes no lower (a variant that fails here has goodput 0) ...
QUICK_MAX_FRACTION = 1.5  # ... and its predicted start no higher than this
# Every 20 points of attainment a rate misses by (until one passes) take the bisection one more 1.3x step
# down: a start at 40% goes to 1/2.2 of it (beside a `nice -n 19` process, three single steps from a start
# 2x the goodput all missed, and the table read 0x).
QUICK_MISS_STEP = 0.2
# The prediction always uses the served step times (the profile scaled per phase by the served total): even
# 4% off the profile moved a rate's prediction by a request of twenty (5 points) on a quiet machine, and a
# deployment's own served steps are the profile taken under the benchmark's load. The threshold stays a
# parameter (1.0: any difference; no steps logged: the profile as it is).
RESCALE_ABOVE = 1.0
FULL_FRACTIONS = (0.15, 0.3, 0.5, 0.7, 0.9)  # the thorough run: five rates over the capacity


TPOT_MULTIPLE = 2.0  # of one decode step at the decode batch the workload produces (p90); see the docstring
TTFT_MULTIPLE = 4.0  # of the prefill of the mean prompt (room to queue a few prompts)


@dataclass(frozen=True)
class SloRule:
    """SLO = a stated multiple of the profiled step time the workload's requests see."""

    tpot_multiple: float = TPOT_MULTIPLE
    ttft_multiple: float = TTFT_MULTIPLE

    def derive(self, coeffs: PhaseCoefficients, mean_input: float, output_len: int, batch: float,
               attainment: float) -> tuple[SLO, str]:
        """The SLO and the sentence that says how it was made; `batch` from decode_batch_seen."""
        step_s = decode_step_at(coeffs, batch, mean_input + output_len / 2)
        prefill_s = coeffs.prefill_s(mean_input, mean_input**2)
        slo = SLO(ttft_s=round(self.ttft_multiple * prefill_s, 3), tpot_s=round(self.tpot_multiple * step_s, 4),
                  attainment=attainment)
        rule = (f"SLOs from the profile: TTFT = {self.ttft_multiple:g} x prefill of the mean prompt "
                f"({mean_input:.0f} tokens: {prefill_s * 1e3:.0f} ms) = {slo.ttft_s:.3g} s; "
                f"TPOT = {self.tpot_multiple:g} x decode step at batch {batch:.2g} ({step_s * 1e3:.1f} ms; the p90 "
                f"batch a request decodes in, simulated) = {slo.tpot_s * 1e3:.0f} ms; attainment {attainment:.0%}")
        return slo, rule


def decode_step_at(coeffs: PhaseCoefficients, batch: float, ctx_per_seq: float) -> float:
    """The profiled decode step at a fractional batch: linear between the whole batches around it (a request
    that spends part of its decode alone and part beside another sees a mix of the two step times)."""
    lo = max(1, math.floor(batch))
    hi = max(lo, math.ceil(batch))

    def step(b: int) -> float:
        return coeffs.decode_step_s(b, b * ctx_per_seq)

    return step(lo) + (batch - lo) * (step(hi) - step(lo)) if hi > lo else step(lo)


def decode_batch_seen(first_token_s: np.ndarray, finish_s: np.ndarray, quantile: float = 0.9) -> float:
    """The `quantile` over requests of the batch each one decodes in: the time-weighted mean number of
    answers decoding at once (itself included) between its first and last token, at least 1."""
    start, end = np.asarray(first_token_s, dtype=float), np.asarray(finish_s, dtype=float)
    if len(start) == 0:
        return 1.0
    overlap = np.clip(np.minimum(end[:, None], end[None, :]) - np.maximum(start[:, None], start[None, :]), 0, None)
    span = end - start
    seen = np.where(span > 0, overlap.sum(axis=1) / np.where(span > 0, span, 1.0), 1.0)
    return max(1.0, float(np.quantile(seen, quantile)))


def prefill_capacity_rps(coeffs: PhaseCoefficients, mean_input: float) -> float:
    """Prompts per second one prefill core finishes back to back: the scale the demo's rates are set on."""
    return 1.0 / coeffs.prefill_s(mean_input, mean_input**2)


@dataclass(frozen=True)
class Busy:
    """How much slower the served steps ran than the profile said, per phase: the p50 (over instances) says
    whether the load changed between profile and benchmark (past the threshold, either way); the total
    time ratio is what the prediction scales the profile by (a slow tail adds to TPOT and queues as it
    adds to the total, while the p50 ignores it)."""

    prefill_ratio: float
    decode_ratio: float
    threshold: float
    rescale_above: float = RESCALE_ABOVE  # the prediction takes the served step times past this, either way
    prefill_scale: float | None = None  # served / profiled total step time (None: the p50)
    decode_scale: float | None = None

    @property
    def scales(self) -> tuple[float, float]:
        """(prefill, decode): what the prediction multiplies the profiled step times by."""
        return (self.prefill_ratio if self.prefill_scale is None else self.prefill_scale,
                self.decode_ratio if self.decode_scale is None else self.decode_scale)

    @property
    def is_busy(self) -> bool:
        """Served steps ran slower than profiled past the threshold: something else took the cores."""
        return max(self.prefill_ratio, self.decode_ratio) > self.threshold

    @property
    def profile_was_busy(self) -> bool:
        """Served steps ran faster than profiled past the threshold: the profile itself ran under load."""
        return min(self.prefill_ratio, self.decode_ratio) < 1 / self.threshold

    @property
    def use_served_times(self) -> bool:
        """The profile does not describe the machine the benchmark ran on closely enough: predict from the
        served steps (the profile taken under the benchmark's own conditions)."""
        ratios = (self.prefill_ratio, self.decode_ratio, *self.scales)
        return self.is_busy or self.profile_was_busy or max(ratios) > self.rescale_above \
            or min(ratios) < 1 / self.rescale_above

    def describe(self) -> str:
        prefill, decode = self.scales
        return (f"served steps ran {self.prefill_ratio:.2f}x (prefill) and {self.decode_ratio:.2f}x (decode) "
                f"their profiled time at p50, {prefill:.2f}x and {decode:.2f}x in total (busy above "
                f"{self.threshold:.2f}x)")


def busy_from(ratios: list[StepRatios], threshold: float = 1.3) -> Busy:
    """Per phase: the served/profiled p50, weighted by each instance's step count, and the ratio of the total
    served to the total profiled step time (1.0 with no steps)."""
    def phase(kind: str) -> tuple[float, float]:
        rows = [r for r in ratios if r.kind == kind and r.num_steps > 0]
        steps = sum(r.num_steps for r in rows)
        if not steps:
            return 1.0, 1.0
        p50 = sum(r.p50 * r.num_steps for r in rows) / steps
        profiled = sum(r.profiled_s for r in rows)
        return p50, sum(r.served_s for r in rows) / profiled if profiled > 0 else p50

    (prefill, prefill_total), (decode, decode_total) = phase("prefill"), phase("decode")
    return Busy(prefill, decode, threshold, prefill_scale=prefill_total, decode_scale=decode_total)


def scaled_model(model: LatencyModel, tp: int, busy: Busy) -> LatencyModel:
    """The latency model as this machine ran while serving: each phase's coefficients times its served /
    profiled ratio (the served steps are a profile taken under the same load as the benchmark)."""
    c = model.for_tp(tp)

    def times(k: Coefficients, f: float) -> Coefficients:
        return Coefficients(k.a * f, k.b * f, k.c * f)

    prefill, decode = busy.scales
    scaled = replace(c, prefill=times(c.prefill, prefill), decode_small=times(c.decode_small, decode),
                     decode_large=times(c.decode_large, decode))
    return replace(model, source=f"{model.source} x served/profiled", by_tp={**model.by_tp, tp: scaled})
