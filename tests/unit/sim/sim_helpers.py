"""Helpers for simulator tests: instances with exact, hand-checkable latency coefficients."""

from __future__ import annotations

import numpy as np

from trt_disagg.planner.latency_model import Coefficients, InstanceTiming, PhaseCoefficients
from trt_disagg.sim import InstanceSpec, SimWorkload


def make_instance(prefill=(0.01, 1e-4, 0.0), decode=(0.02, 1e-6, 1e-3), pp: int = 1, kv: int = 100_000,
                  max_batch: int = 1 << 20, max_tokens: int = 2048, link: float = 1e12) -> InstanceSpec:
    d = Coefficients(*decode)
    coeffs = PhaseCoefficients(Coefficients(*prefill), d, d)
    return InstanceSpec(InstanceTiming(coeffs, pp, 64, link), kv, max_batch, max_tokens)


def make_workload(arrivals, inputs, outputs) -> SimWorkload:
    return SimWorkload.from_lengths(np.asarray(arrivals, float), inputs, outputs)

