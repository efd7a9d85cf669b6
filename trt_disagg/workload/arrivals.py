"""Arrival processes: when each request is sent.

Poisson (exponential gaps, what DistServe and vLLM benchmark with) and Gamma gaps with a coefficient of
variation `cv` (cv > 1 is burstier than Poisson, cv < 1 smoother; cv = 1 is Poisson again), as in
DistServe's burstiness experiments. Both have mean gap 1/rate.
"""

from __future__ import annotations

import numpy as np

from trt_disagg.errors import UserError

ARRIVAL_KINDS = ("poisson", "gamma")


def make_arrivals(kind: str, rate: float, num_requests: int, seed: int = 0, cv: float = 1.0) -> np.ndarray:
    """Arrival times in seconds (sorted, float64, the first one after 0) of `num_requests` requests at `rate`/s."""
    if kind not in ARRIVAL_KINDS:
        raise UserError(f"arrival kind: unknown {kind!r}; choose one of {', '.join(ARRIVAL_KINDS)}")
    if not rate > 0:
        raise UserError(f"rate must be > 0 requests/s, got {rate}")
    if num_requests < 0:
        raise UserError(f"num_requests must be >= 0, got {num_requests}")
    if not cv > 0:
        raise UserError(f"cv must be > 0, got {cv}")
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, size=num_requests)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num_requests)
    return np.cumsum(gaps)
