"""Per-request times out of a simulation, and the SLO figures computed from them (DESIGN.md definitions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SimResult:
    arrival_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    output_len: np.ndarray
    num_completed: int
    # With prefix reuse modelled (else None): per request, prompt tokens found cached and prompt tokens computed.
    matched_tokens: np.ndarray | None = None
    prefill_tokens: np.ndarray | None = None

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> np.ndarray:
        """(t_last - t_first) / (output_tokens - 1); 0 for one-token answers."""
        steps = np.maximum(self.output_len - 1, 1)
        return np.where(self.output_len > 1, (self.finish_s - self.first_token_s) / steps, 0.0)

    def attainment(self, ttft_slo_s: float | None, tpot_slo_s: float | None) -> float:
        """Share of requests meeting both SLOs (None: that SLO is not checked)."""
        if len(self.arrival_s) == 0:
            return 1.0
        ok = np.ones(len(self.arrival_s), dtype=bool)
        if ttft_slo_s is not None:
            ok &= self.ttft_s <= ttft_slo_s
        if tpot_slo_s is not None:
            ok &= self.tpot_s <= tpot_slo_s
        return float(ok.mean())

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        out = {}
        for name, values in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s)):
            for q in qs:
                out[f"{name}_p{q:g}"] = float(np.percentile(values, q)) if len(values) else 0.0
        return out
