"""The metric definitions of DESIGN.md against values computed by hand (see bench_support.hand_records)."""

from __future__ import annotations

import pytest

from tests.unit.bench.bench_support import hand_records, make_record
from trt_disagg.bench.metrics import (
    attainment,
    attains,
    e2e_s,
    itl_s,
    percentiles,
    summarize,
    tpot_s,
    ttft_s,
)
from trt_disagg.config import SLO


def test_ttft_is_the_first_token_time_after_sending() -> None:
    a, b, c, d, e, f = hand_records()
    assert ttft_s(a) == pytest.approx(0.5)
    assert ttft_s(b) == pytest.approx(0.3)
    assert ttft_s(e) == pytest.approx(1.0)
    assert ttft_s(f) == pytest.approx(3.0)


def test_failed_requests_have_no_latency_metrics_even_with_tokens() -> None:
    _, _, c, d, _, _ = hand_records()
    for rec in (c, d):
        assert not rec.ok
        assert ttft_s(rec) is None
        assert tpot_s(rec) is None
        assert itl_s(rec) == []
        assert e2e_s(rec) is None


def test_tpot_divides_by_output_tokens_minus_one() -> None:
    a, _, _, _, e, _ = hand_records()
    assert tpot_s(a) == pytest.approx((1.1 - 0.5) / 3)  # 0.2
    # 5 tokens (usage) in 3 chunks: (t_last - t_first) / (5 - 1), not / (3 - 1)
    assert tpot_s(e) == pytest.approx((2.0 - 1.0) / 4)  # 0.25


def test_tpot_is_undefined_not_zero_for_one_output_token() -> None:
    _, b, _, _, _, f = hand_records()
    assert tpot_s(b) is None
    assert tpot_s(f) is None


def test_inter_token_latencies_and_end_to_end() -> None:
    a, b, _, _, e, _ = hand_records()
    assert itl_s(a) == pytest.approx([0.1, 0.2, 0.3])
    assert itl_s(e) == pytest.approx([0.2, 0.8])
    assert itl_s(b) == []
    assert e2e_s(a) == pytest.approx(1.2)


def test_joint_attainment_per_request(slo: SLO) -> None:
    a, b, c, d, e, f = hand_records()
    assert attains(a, slo)  # 0.5 <= 1.0 and 0.2 <= 0.21
    assert attains(b, slo)  # one token: TPOT cannot be violated
    assert not attains(c, slo)  # failed
    assert not attains(d, slo)  # failed after two fast tokens
    assert not attains(e, slo)  # TTFT 1.0 meets (<=), TPOT 0.25 misses: joint -> no
    assert not attains(f, slo)  # one token but TTFT 3.0


def test_attainment_is_over_all_requests_sent(slo: SLO) -> None:
    assert attainment(hand_records(), slo) == pytest.approx(2 / 6)


def test_attainment_is_joint_not_per_metric() -> None:
    # each request meets one SLO and misses the other: per-metric attainments would be 50% each, joint is 0
    recs = [make_record([0.1, 0.6]), make_record([2.0, 2.1])]
    assert attainment(recs, SLO(ttft_s=1.0, tpot_s=0.2)) == 0.0


def test_an_ok_stream_without_tokens_is_a_failure(slo: SLO) -> None:
    rec = make_record([], 0)
    assert not rec.ok
    assert attainment([rec], slo) == 0.0


def test_attainment_of_nothing_is_an_error(slo: SLO) -> None:
    with pytest.raises(ValueError, match="empty run"):
        attainment([], slo)


def test_percentiles_by_hand() -> None:
    p = percentiles([1.0, 0.3, None, 3.0, 0.5])  # None (undefined) is left out
    assert p is not None
    assert p.count == 4
    assert p.mean == pytest.approx(1.2)
    # sorted [0.3, 0.5, 1.0, 3.0], linear interpolation at rank q/100 * (n - 1)
    assert p.p50 == pytest.approx(0.75)  # rank 1.5
    assert p.p90 == pytest.approx(2.4)  # rank 2.7: 1.0 + 0.7 * 2.0
    assert p.p99 == pytest.approx(2.94)  # rank 2.97
    assert p.max == pytest.approx(3.0)
    assert percentiles([None, None]) is None


def test_run_summary_by_hand(slo: SLO) -> None:
    s = summarize(hand_records(), slo, rate_rps=2.0, duration_s=10.0)
    assert (s.num_sent, s.num_ok, s.num_failed, s.num_attained, s.num_short) == (6, 4, 2, 2, 0)
    assert s.attainment == pytest.approx(1 / 3)
    assert s.request_throughput_rps == pytest.approx(0.4)  # 4 completed / 10 s
    assert s.output_throughput_tps == pytest.approx(1.1)  # (4 + 1 + 5 + 1) tokens / 10 s
    assert s.ttft_s is not None and s.ttft_s.count == 4 and s.ttft_s.p50 == pytest.approx(0.75)
    assert s.tpot_s is not None and s.tpot_s.count == 2 and s.tpot_s.mean == pytest.approx(0.225)
    assert s.itl_s is not None and s.itl_s.count == 5  # A: 3 gaps, E: 2 gaps
    assert s.e2e_s is not None and s.e2e_s.max == pytest.approx(3.0)
    d = s.to_dict()
    assert d["ttft_s"]["p90"] == pytest.approx(2.4)
    assert d["num_failed"] == 2


def test_short_outputs_are_counted(slo: SLO) -> None:
    rec = make_record([0.1, 0.2], index=0)
    rec.expected_output_len = 8  # the server stopped at EOS after 2 of 8 tokens
    failed = make_record([0.1], 1, error="HTTP 500", index=1)
    failed.expected_output_len = 8  # failures are failures, not short outputs
    assert summarize([rec, failed], slo, rate_rps=1.0, duration_s=1.0).num_short == 1
