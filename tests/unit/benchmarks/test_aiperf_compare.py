"""benchmarks/aiperf_compare.py: the load each tool put on the server and the request-by-request comparison
are computed from the two tools' own records (aiperf's export shape, our requests.csv rows)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "aiperf_compare.py"


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiperf_compare", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_counts_realized_rate_peak_in_flight_and_send_lag(compare: ModuleType) -> None:
    # three requests scheduled 0, 1, 2 s; sent 5 ms late, 5 ms late and 25 ms late; the first two overlap
    load = compare.load_of([10.005, 11.005, 12.025], [11.5, 11.7, 12.5], [0.0, 1.0, 2.0], [256, 256, 256])
    assert load["requests"] == 3 and load["peak_in_flight"] == 2
    assert load["realized_rps"] == pytest.approx(2 / 2.02)
    assert load["send_lag_max_ms"] == pytest.approx(20.0) and load["send_lag_p50_ms"] == pytest.approx(0.0)
    assert load["prompt_tokens"] == [256]


def test_per_request_differences_pair_requests_in_send_order(compare: ModuleType) -> None:
    bench = [{"error": "", "ttft_s": str(t), "tpot_s": str(p)} for t, p in ((0.100, 0.030), (0.120, 0.032),
                                                                            (0.200, 0.040))]

    def record(start_ns: int, ttft_ms: float, itl_ms: float) -> dict:
        return {"metadata": {"request_start_ns": start_ns},
                "metrics": {"time_to_first_token": {"value": ttft_ms}, "inter_token_latency": {"value": itl_ms}}}

    # aiperf's export is in completion order: request 2 finished first
    aiperf = [record(3, 190.0, 41.0), record(1, 98.0, 30.0), record(2, 118.0, 31.0)]
    out = compare.per_request_differences(bench, aiperf)
    assert out["pairs"] == 3
    assert out["ttft_s"]["median_difference_ms"] == pytest.approx(2.0)  # +2, +2, +10
    assert out["tpot_s"]["median_difference_ms"] == pytest.approx(0.0)  # 0, +1, -1
    assert out["ttft_s"]["relative"] == pytest.approx(2.0 / 118.0)
