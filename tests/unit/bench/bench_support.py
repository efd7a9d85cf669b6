"""Hand-built records for the benchmark's tests."""

from __future__ import annotations

from trt_disagg.bench.metrics import RequestRecord, RunResult
from trt_disagg.config import SLO


def make_record(token_times: list[float], output_tokens: int | None = None, *, error: str | None = None,
                index: int = 0, end_s: float | None = None) -> RequestRecord:
    """A request that received tokens at `token_times` (s after sent); output_tokens defaults to their count."""
    n = len(token_times) if output_tokens is None else output_tokens
    return RequestRecord(index=index, input_len=8, expected_output_len=max(n, 1), scheduled_s=0.1 * index,
                         sent_s=0.1 * index, token_times_s=list(token_times), output_tokens=n,
                         end_s=end_s if end_s is not None else (token_times[-1] if token_times else 0.0),
                         error=error)


def hand_records() -> list[RequestRecord]:
    """The six requests whose metrics test_bench_metrics computes by hand (SLO: TTFT 1.0 s, TPOT 0.21 s)."""
    return [
        make_record([0.5, 0.6, 0.8, 1.1], index=0, end_s=1.2),  # A: TTFT 0.5, TPOT 0.2 -> attains
        make_record([0.3], index=1, end_s=0.35),  # B: one token, no TPOT -> attains
        make_record([], 0, error="HTTP 500: engine exploded", index=2, end_s=0.01),  # C: failed
        make_record([0.2, 0.3], 2, error="error in stream: decode instance lost", index=3),  # D: failed mid-way
        make_record([1.0, 1.2, 2.0], 5, index=4, end_s=2.1),  # E: 5 tokens in 3 chunks, TPOT 0.25 -> misses
        make_record([3.0], index=5, end_s=3.0),  # F: one token, TTFT 3.0 -> misses
    ]


def make_run(rate: float, records: list[RequestRecord], slo: SLO, duration_s: float = 10.0) -> RunResult:
    return RunResult(rate_rps=rate, arrival="poisson", slo=slo, records=records, duration_s=duration_s)
