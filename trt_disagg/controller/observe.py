"""What the controller sees: finished requests of a recent window, summarised as a workload.

A `FinishedRequest` is one entry of the router's `trtd:finished` stream (or one simulated request): when it
arrived, when its first and last tokens came, its lengths. `ObservedWorkload.from_finished` turns a window
of them into the arrival rate, the length samples the simulator replays, and the measured TTFT/TPOT and
SLO attainment (DESIGN.md definitions) that the prediction is checked against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

MAX_LENGTH_SAMPLES = 2000  # the simulator replays at most this many observed (prompt, output) pairs


@dataclass(frozen=True)
class FinishedRequest:
    received_s: float  # unix seconds (live) or trace seconds (simulated)
    first_token_s: float | None  # None: it ended before a first token (failed or cancelled early)
    end_s: float
    prompt_tokens: int
    output_tokens: int
    done: bool  # ended DONE (FAILED and CANCELLED count against attainment)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.received_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    @classmethod
    def from_stream_fields(cls, fields: Mapping[str, str]) -> FinishedRequest:
        """One `trtd:finished` entry (field names as `trt_disagg.keys` documents them)."""
        first = fields.get("t1", "")
        return cls(float(fields["t0"]), float(first) if first else None, float(fields["t2"]),
                   int(fields.get("p", "0") or 0), int(fields.get("o", "0") or 0), fields.get("s") == "DONE")


@dataclass(frozen=True)
class ObservedWorkload:
    """A window of finished requests, as the simulator and the decision record need it."""

    window_s: float
    num_requests: int
    arrival_rps: float
    input_len: np.ndarray  # int64 samples (prompts of >= 1 token)
    output_len: np.ndarray  # int64 samples (>= 1)
    ttft_p90_s: float | None  # measured; None without a request that got a first token
    tpot_p90_s: float | None
    measured_attainment: float | None  # joint SLO attainment of the window; None: nothing finished

    @classmethod
    def from_finished(cls, finished: Sequence[FinishedRequest], window_s: float, ttft_slo_s: float,
                      tpot_slo_s: float) -> ObservedWorkload:
        """Requests that *arrived* in the window count for the rate (the window is [now - window_s, now))."""
        reqs = list(finished)[-MAX_LENGTH_SAMPLES:]
        inp = np.array([max(1, r.prompt_tokens) for r in reqs], dtype=np.int64)
        out = np.array([max(1, r.output_tokens) for r in reqs], dtype=np.int64)
        ttft = [t for r in reqs if (t := r.ttft_s) is not None]
        tpot = [t for r in reqs if (t := r.tpot_s) is not None and r.output_tokens > 1]
        ok = [r.done and (r.ttft_s or 0.0) <= ttft_slo_s and (r.tpot_s or 0.0) <= tpot_slo_s
              and r.first_token_s is not None for r in reqs]
        return cls(window_s, len(finished), len(finished) / window_s if window_s > 0 else 0.0, inp, out,
                   float(np.percentile(ttft, 90)) if ttft else None,
                   float(np.percentile(tpot, 90)) if tpot else None,
                   float(np.mean(ok)) if ok else None)

    def at_rate(self, arrival_rps: float) -> ObservedWorkload:
        """The same requests arriving at another rate (what a shrunk shape is checked against)."""
        return replace(self, arrival_rps=arrival_rps)

    def summary(self) -> dict[str, float | int | None]:
        """The figures a decision record carries (JSON-able)."""
        return {"window_s": self.window_s, "num_requests": self.num_requests,
                "arrival_rps": round(self.arrival_rps, 4),
                "mean_input_len": round(float(self.input_len.mean()), 1) if len(self.input_len) else None,
                "mean_output_len": round(float(self.output_len.mean()), 1) if len(self.output_len) else None,
                "ttft_p90_s": self.ttft_p90_s, "tpot_p90_s": self.tpot_p90_s,
                "measured_attainment": self.measured_attainment}
