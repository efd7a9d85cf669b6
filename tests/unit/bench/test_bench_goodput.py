"""The goodput search over rates, driven by a deterministic fake measurement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.unit.bench.bench_support import hand_records, make_record, make_run
from trt_disagg.bench.goodput import GoodputResult, SearchSpec, goodput_from_runs, search_rates
from trt_disagg.config import SLO
from trt_disagg.errors import UserError


def step(threshold: float) -> Callable[[float], Awaitable[float]]:
    """Attainment 1.0 up to `threshold` requests/s, 0.5 above it."""

    async def measure(rate: float) -> float:
        return 1.0 if rate <= threshold else 0.5

    return measure


async def test_expand_then_bisect() -> None:
    trace = await search_rates(step(3.0), SearchSpec(target=0.9, start_rps=1.0, max_runs=10, rel_tol=0.1))
    assert [p.rate_rps for p in trace.probes] == pytest.approx([1, 2, 4, 3, 3.5, 3.25])
    assert [p.passed for p in trace.probes] == [True, True, False, True, False, False]
    assert trace.goodput_rps == 3.0  # 3.25 / 3 <= 1.1: stop


async def test_start_rate_failing_contracts_first() -> None:
    trace = await search_rates(step(0.3), SearchSpec(target=0.9, start_rps=1.0, max_runs=10, rel_tol=0.1))
    assert [p.rate_rps for p in trace.probes] == pytest.approx([1, 0.5, 0.25, 0.375, 0.3125, 0.28125, 0.296875])
    assert trace.goodput_rps == pytest.approx(0.296875)


async def test_number_of_runs_is_bounded() -> None:
    trace = await search_rates(step(1e9), SearchSpec(target=0.9, start_rps=1.0, max_runs=3))
    assert [p.rate_rps for p in trace.probes] == [1.0, 2.0, 4.0]
    assert trace.goodput_rps == 4.0


async def test_no_passing_rate_gives_zero_and_stops_at_min_rate() -> None:
    trace = await search_rates(step(0.0), SearchSpec(target=0.9, start_rps=1.0, max_runs=10, min_rps=0.2))
    assert [p.rate_rps for p in trace.probes] == [1.0, 0.5, 0.25]
    assert trace.goodput_rps == 0.0


async def test_a_large_miss_steps_further_down_until_a_rate_passes() -> None:
    """Attainment falls 10 points per 0.1 req/s above 0.3: a start at 1.0 (30%) misses by 60 points, three
    steps of 20 more than one: 1.0 / 2**4. Once a rate passed, the search bisects as usual."""
    async def measure(rate: float) -> float:
        return min(1.0, max(0.0, 1.0 - (rate - 0.3)))

    spec = SearchSpec(target=0.9, start_rps=1.0, growth=2.0, max_runs=3, min_rps=0.01, rel_tol=0.1, miss_step=0.2)
    trace = await search_rates(measure, spec)
    assert [p.rate_rps for p in trace.probes] == pytest.approx([1.0, 1 / 16, (1 + 1 / 16) / 2])
    assert trace.goodput_rps == pytest.approx(1 / 16)
    floor = await search_rates(measure, SearchSpec(target=0.9, start_rps=1.0, growth=2.0, max_runs=2, min_rps=0.2,
                                                   miss_step=0.2))
    assert [p.rate_rps for p in floor.probes] == pytest.approx([1.0, 0.2])  # no lower than min_rps
    one_step = await search_rates(measure, SearchSpec(target=0.9, start_rps=1.0, growth=2.0, max_runs=2))
    assert [p.rate_rps for p in one_step.probes] == pytest.approx([1.0, 0.5])  # without miss_step: one step


async def test_target_is_inclusive() -> None:
    async def measure(rate: float) -> float:
        return 0.9 if rate <= 2.0 else 0.0

    trace = await search_rates(measure, SearchSpec(target=0.9, start_rps=2.0, max_runs=2))
    assert trace.probes[0].passed
    assert trace.goodput_rps == 2.0


@pytest.mark.parametrize("spec, field", [
    (SearchSpec(target=0.0), "attainment"),
    (SearchSpec(start_rps=0.0), "start rate"),
    (SearchSpec(start_rps=-1.0), "start rate"),
    (SearchSpec(growth=1.0), "growth"),
    (SearchSpec(max_runs=0), "max-runs"),
])
async def test_bad_search_spec_is_a_user_error(spec: SearchSpec, field: str) -> None:
    with pytest.raises(UserError, match=field):
        await search_rates(step(1.0), spec)


def test_goodput_from_fixed_rates_and_per_core(slo: SLO) -> None:
    good = [make_record([0.1, 0.2], index=i) for i in range(10)]
    runs = [
        make_run(0.5, good, slo),
        make_run(1.0, good[:9] + [make_record([], 0, error="HTTP 500", index=9)], slo),  # 90%: passes
        make_run(2.0, hand_records(), slo),  # 33%: fails
    ]
    result = goodput_from_runs(runs, target=0.9, num_cores=2)
    assert isinstance(result, GoodputResult)
    assert result.goodput_rps == 1.0
    assert result.per_core_goodput_rps == 0.5
    d = result.to_dict()
    assert d["per_core_goodput_rps"] == 0.5
    assert [p["attainment"] for p in d["probes"]] == pytest.approx([1.0, 0.9, 1 / 3])
    assert goodput_from_runs(runs[2:], target=0.9).goodput_rps == 0.0
