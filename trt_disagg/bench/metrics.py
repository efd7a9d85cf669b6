"""Per-request records and the metric definitions of DESIGN.md, as pure functions.

One request's timeline, as the load generator sees it (all times in seconds after the request was sent):

    sent ──── token_times_s[0] ──── token_times_s[1] ── ... ── token_times_s[-1] ──── end_s
              └ TTFT                └─ inter-token latencies (ITL) ─┘              (stream closed)

- TTFT = first token received − request sent                      = token_times_s[0]
- TPOT = (t_last − t_first) / (output_tokens − 1)                 (undefined for one output token)
- A request *attains* when it did not fail, TTFT ≤ ttft_s and TPOT ≤ tpot_s (joint, per request). A
  request with one output token has no TPOT; it attains the TPOT part (nothing to violate).
- Attainment = attaining requests / **all** requests sent (failed ones count in the denominator).

These are the definitions DistServe and vLLM's benchmark_serving use, so numbers compare with theirs.
`output_tokens` is what the server reports in `usage.completion_tokens` when it does (a chunk may carry
more than one token), else the number of token-bearing chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from trt_disagg.config import SLO

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestRecord:
    """What happened to one request of a run."""

    index: int  # position in the workload, so runs at different rates line up request by request
    input_len: int  # prompt tokens (the workload's count)
    expected_output_len: int  # tokens asked for (max_tokens == min_tokens with ignore_eos)
    scheduled_s: float  # planned send time, seconds after the run started (the arrival process)
    sent_s: float  # actual send time, seconds after the run started (late when the client falls behind)
    token_times_s: list[float] = field(default_factory=list)  # token-bearing chunks, seconds after sent
    output_tokens: int = 0  # tokens received (usage.completion_tokens when reported)
    end_s: float | None = None  # seconds after sent when the stream ended, done or failed
    error: str | None = None  # None: completed; else why it failed (HTTP status, error chunk, timeout...)
    request_id: str | None = None  # the server's id (the chunks' `id`): our router's GET /v1/requests/{id}
    http_status: int | None = None  # the status of a response that was not 200 (None: 200 or no response)
    server_input_len: int | None = None  # the server's count of the prompt (usage.prompt_tokens)

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_tokens > 0 and bool(self.token_times_s)


def ttft_s(rec: RequestRecord) -> float | None:
    """Time to first token, or None when the request failed or produced nothing."""
    return rec.token_times_s[0] if rec.ok else None


def tpot_s(rec: RequestRecord) -> float | None:
    """Time per output token after the first; None when failed or with fewer than two output tokens."""
    if not rec.ok or rec.output_tokens < 2:
        return None
    return (rec.token_times_s[-1] - rec.token_times_s[0]) / (rec.output_tokens - 1)


def itl_s(rec: RequestRecord) -> list[float]:
    """Inter-token latencies: gaps between consecutive token-bearing chunks (empty when failed)."""
    if not rec.ok:
        return []
    t = rec.token_times_s
    return [b - a for a, b in zip(t, t[1:], strict=False)]


def is_refused(rec: RequestRecord) -> bool:
    """The server refused the request as bad (4xx): the benchmark sent something the deployment does not
    take, so the run measures the workload's mismatch, not the deployment. 429 is not a refusal of the
    request but of the load (admission control): under load that is a legitimate SLO miss."""
    return rec.http_status is not None and 400 <= rec.http_status < 500 and rec.http_status != 429


def e2e_s(rec: RequestRecord) -> float | None:
    """End-to-end latency: sent → stream closed, for completed requests."""
    return rec.end_s if rec.ok else None


def attains(rec: RequestRecord, slo: SLO) -> bool:
    """Joint SLO check of one request (a failed request never attains)."""
    ttft = ttft_s(rec)
    if ttft is None or ttft > slo.ttft_s:
        return False
    tpot = tpot_s(rec)
    return tpot is None or tpot <= slo.tpot_s


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """Share of all requests sent that attain both SLOs."""
    if not records:
        raise ValueError("attainment of an empty run is undefined: no request was sent")
    return sum(attains(r, slo) for r in records) / len(records)


@dataclass(frozen=True)
class Percentiles:
    """Distribution summary of one metric over the requests where it is defined."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def percentiles(values: Iterable[float | None]) -> Percentiles | None:
    """Mean, p50/p90/p99 (linear interpolation, numpy's default as in vLLM's benchmark) and max; None if empty."""
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return None
    p50, p90, p99 = (float(x) for x in np.percentile(arr, PERCENTILES))
    return Percentiles(count=int(arr.size), mean=float(arr.mean()), p50=p50, p90=p90, p99=p99,
                       max=float(arr.max()))


@dataclass(frozen=True)
class RunSummary:
    """The numbers of one run at one rate."""

    rate_rps: float
    num_sent: int
    num_ok: int
    num_failed: int
    num_refused: int  # failed with a 4xx other than 429 (is_refused): requests the deployment does not take
    num_attained: int
    num_short: int  # completed with fewer tokens than asked: the server stopped at EOS (ignore_eos not honoured)
    attainment: float
    duration_s: float
    request_throughput_rps: float  # completed requests / duration
    output_throughput_tps: float  # output tokens of completed requests / duration
    ttft_s: Percentiles | None
    tpot_s: Percentiles | None
    itl_s: Percentiles | None
    e2e_s: Percentiles | None

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            value = getattr(self, name)
            d[name] = value.to_dict() if value is not None else None
        return d


@dataclass
class RunResult:
    """One run of the load generator at one arrival rate: every request sent, with its timeline."""

    rate_rps: float
    arrival: str  # "poisson" | "gamma"
    slo: SLO
    records: list[RequestRecord]
    duration_s: float  # first send → last stream closed

    def summary(self) -> RunSummary:
        return summarize(self.records, self.slo, rate_rps=self.rate_rps, duration_s=self.duration_s)


def summarize(records: Sequence[RequestRecord], slo: SLO, *, rate_rps: float, duration_s: float) -> RunSummary:
    """All metrics of one run. Throughputs over `duration_s` (0 when the run took no time)."""
    ok = [r for r in records if r.ok]
    num_attained = sum(attains(r, slo) for r in records)
    per_s = (1.0 / duration_s) if duration_s > 0 else 0.0
    return RunSummary(
        rate_rps=rate_rps,
        num_sent=len(records),
        num_ok=len(ok),
        num_failed=len(records) - len(ok),
        num_refused=sum(is_refused(r) for r in records),
        num_attained=num_attained,
        num_short=sum(r.output_tokens < r.expected_output_len for r in ok),
        attainment=num_attained / len(records) if records else math.nan,
        duration_s=duration_s,
        request_throughput_rps=len(ok) * per_s,
        output_throughput_tps=sum(r.output_tokens for r in ok) * per_s,
        ttft_s=percentiles(ttft_s(r) for r in records),
        tpot_s=percentiles(tpot_s(r) for r in records),
        itl_s=percentiles(x for r in records for x in itl_s(r)),
        e2e_s=percentiles(e2e_s(r) for r in records),
    )
