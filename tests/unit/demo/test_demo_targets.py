"""The demo's targets from its own profile (SLOs, rates, busy), its hand-off phase log, and its verdict."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trt_disagg.demo.handoff import HandoffSample, from_record, handoff_table, with_phases
from trt_disagg.demo.served_steps import StepRatios, step_ratios
from trt_disagg.demo.targets import (
    SloRule,
    busy_from,
    decode_batch_seen,
    prefill_capacity_rps,
    scaled_model,
)
from trt_disagg.planner.latency_model import Coefficients, LatencyModel, PhaseCoefficients

# prefill: 10 ms + 1.5 ms per token (0.778 s for 512); decode: 50 ms + 5 ms per sequence
COEFFS = PhaseCoefficients(Coefficients(0.01, 0.0015, 0.0), Coefficients(0.05, 0.0, 0.005),
                           Coefficients(0.05, 0.0, 0.005))


def test_slo_is_a_stated_multiple_of_the_profiled_steps() -> None:
    slo, rule = SloRule(tpot_multiple=2.0, ttft_multiple=3.0).derive(COEFFS, 512, 16, 1.0, 0.9)
    assert slo.ttft_s == pytest.approx(3.0 * 0.778, abs=1e-3)
    assert slo.tpot_s == pytest.approx(2.0 * 0.055, abs=1e-4)  # batch 1: 50 ms + 5 ms per sequence
    assert slo.attainment == 0.9
    assert "3 x prefill" in rule and "2 x decode step at batch 1" in rule
    between, _ = SloRule(tpot_multiple=1.0).derive(COEFFS, 512, 16, 1.5, 0.9)
    assert between.tpot_s == pytest.approx(0.0575, abs=1e-4)  # halfway between batch 1 and 2


def test_decode_batch_is_the_percentile_of_what_requests_decode_beside() -> None:
    # four answers alone one after the other, then two that decode side by side all along
    start = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 8.0])
    end = start + 1.0
    assert decode_batch_seen(start, end, quantile=0.5) == pytest.approx(1.0)
    assert decode_batch_seen(start, end, quantile=0.9) == pytest.approx(2.0)
    # one answer half of whose decode overlaps another: it saw batch 1.5 on average
    assert decode_batch_seen(np.array([0.0, 0.5]), np.array([1.0, 1.5]), quantile=1.0) == pytest.approx(1.5)
    assert decode_batch_seen(np.array([]), np.array([])) == 1.0


def test_rates_scale_with_the_prefill_capacity() -> None:
    assert prefill_capacity_rps(COEFFS, 512) == pytest.approx(1 / 0.778, rel=1e-3)
    slow = PhaseCoefficients(Coefficients(0.02, 0.003, 0.0), COEFFS.decode_small, COEFFS.decode_large)
    assert prefill_capacity_rps(slow, 512) == pytest.approx(prefill_capacity_rps(COEFFS, 512) / 2, rel=1e-3)


def _ratios(prefill: float, decode: float) -> list[StepRatios]:
    return [StepRatios("prefill-0", "prefill", 10, 1.0, prefill, prefill, 0.5),
            StepRatios("decode-0", "decode", 30, 1.2, decode, decode, 0.5)]


def test_busy_when_served_steps_run_past_the_threshold_and_the_model_is_scaled() -> None:
    quiet = busy_from(_ratios(1.05, 1.08), threshold=1.3)
    assert not quiet.is_busy and quiet.use_served_times  # the served steps always scale the prediction
    assert not busy_from(_ratios(1.0, 1.0), threshold=1.3).use_served_times  # ... when they differ at all
    strict = replace(busy_from(_ratios(1.05, 1.08), threshold=1.3), rescale_above=1.1)
    assert not strict.use_served_times  # a threshold, where one is set
    busy = busy_from(_ratios(1.1, 1.5), threshold=1.3)
    assert busy.is_busy and "1.50x (decode)" in busy.describe()
    model = scaled_model(LatencyModel("m", "cpu", "profile", {1: COEFFS}), 1, busy)
    assert model.for_tp(1).decode_step_s(1, 100) == pytest.approx(1.5 * COEFFS.decode_step_s(1, 100))
    assert model.for_tp(1).prefill_s(512, 512**2) == pytest.approx(1.1 * COEFFS.prefill_s(512, 512**2))
    assert busy_from([], 1.3).use_served_times is False  # no steps logged: nothing to say
    profiled_under_load = busy_from(_ratios(0.6, 0.7), threshold=1.3)  # served ran faster than profiled
    assert not profiled_under_load.is_busy and profiled_under_load.use_served_times


def test_the_model_is_scaled_by_the_total_step_time_which_sees_a_slow_tail_the_p50_does_not() -> None:
    """Decode steps at their profiled time at p50, but one in four twice as long: TPOT sees 1.25x."""
    steps = [StepRatios("decode-0", "decode", 30, 1.2, 1.0, 2.0, 0.5, served_s=1.25, profiled_s=1.0),
             StepRatios("decode-1", "decode", 10, 1.2, 1.0, 1.0, 0.5, served_s=0.25, profiled_s=0.5),
             StepRatios("prefill-0", "prefill", 10, 1.0, 1.0, 1.0, 0.5, served_s=2.0, profiled_s=2.0)]
    tail = busy_from(steps, threshold=1.3)
    assert (tail.prefill_ratio, tail.decode_ratio) == (1.0, 1.0) and not tail.is_busy
    assert tail.scales == (1.0, pytest.approx(1.5 / 1.5))
    steps[1] = StepRatios("decode-1", "decode", 10, 1.2, 1.0, 1.0, 0.5, served_s=0.5, profiled_s=0.5)
    tail = busy_from(steps, threshold=1.3)
    assert tail.scales == (1.0, pytest.approx(1.75 / 1.5)) and tail.use_served_times
    assert "1.17x in total" in tail.describe()
    model = scaled_model(LatencyModel("m", "cpu", "profile", {1: COEFFS}), 1, tail)
    assert model.for_tp(1).decode_step_s(2, 100) == pytest.approx(1.75 / 1.5 * COEFFS.decode_step_s(2, 100))


def test_handoff_phases_join_the_router_record_and_the_decode_log(tmp_path: Path) -> None:
    sample = from_record("r1", {"PREFILL_DONE": "100.000", "DECODE_DISPATCHED": "100.002", "DECODING": "100.090"})
    assert sample.total_s == pytest.approx(0.090) and sample.dispatch_s == pytest.approx(0.002)
    log = tmp_path / "decode-0.iterations.jsonl"
    rows = [{"t": 1.0, "kind": "decode", "num_seqs": 1, "num_tokens": 1, "sum_context": 513, "duration_s": 0.06},
            {"t": 1.1, "kind": "handoff", "request_id": "r1", "num_tokens": 512, "transfer_s": 0.012,
             "data_s": 0.009, "source_stage_s": 0.004, "import_s": 0.003, "first_step_s": 0.065}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [joined] = with_phases([sample], [log, tmp_path / "missing.jsonl"])
    assert joined.phases["data_s"] == pytest.approx(0.009)
    assert joined.beyond_first_step_s == pytest.approx(0.025)
    assert [r.kind for r in step_ratios(log, COEFFS)] == ["decode"]  # the handoff line is not a step
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(handoff_table([joined], "t"))
    text = console.export_text()
    assert "first_step" in text and "65.0" in text and "beyond the first decode step" in text


def test_handoff_without_a_log_line_has_no_phases() -> None:
    assert HandoffSample("x", 0.1, 0.0).beyond_first_step_s == pytest.approx(0.1)


def test_quick_plan_is_a_bisection_from_the_predicted_goodput_and_full_is_five_rates() -> None:
    from trt_disagg.demo.run import DemoOptions, _quick_search, _rate_plan

    assert _rate_plan(DemoOptions(Path("c.yaml")), 1.0) is None  # quick: a bisection per variant
    quick = _quick_search(0.42, 1.0, 0.9)
    assert quick.start_rps == 0.42 and quick.growth == 1.3 and quick.max_runs == 3 and quick.target == 0.9
    assert quick.start_rps * quick.growth <= quick.start_rps * (1 + quick.rel_tol)  # one step brackets it
    assert _quick_search(0.0, 1.0, 0.9).start_rps == 0.15  # nothing predicted: the lowest rate worth running
    assert DemoOptions(Path("c.yaml")).requests_per_rate == 20
    full = DemoOptions(Path("c.yaml"), full=True)
    assert _rate_plan(full, 1.0) == (0.15, 0.3, 0.5, 0.7, 0.9) and full.requests_per_rate == 40
    assert _rate_plan(DemoOptions(Path("c.yaml"), rates=(0.2,)), 1.0) == (0.2,)


def test_predicted_goodput_is_the_highest_simulated_rate_that_meets_the_target() -> None:
    from trt_disagg.demo.predict import predict_attainment, predicted_goodput_rps
    from trt_disagg.planner.latency_model import InstanceTiming
    from trt_disagg.sim import ColocatedPolicy, ColocatedSpec, InstanceSpec
    from trt_disagg.workload import WorkloadRequest

    timing = InstanceTiming(COEFFS, 1, 576, 3 * 2**30, 4)
    spec = ColocatedSpec(InstanceSpec(timing, 16384, 8, 2048), 1, ColocatedPolicy.PREFILL_FIRST)
    requests = [WorkloadRequest(prompt=None, prompt_ids=None, input_len=512, output_len=16) for _ in range(20)]
    g = predicted_goodput_rps(spec, requests, 0.9, 4.0, 0.2, 0.05, 3.0)
    assert 0.05 < g < 3.0
    at = predict_attainment(spec, requests, [g], 4.0, 0.2)[0]
    assert at >= 0.9
    assert predicted_goodput_rps(spec, requests, 0.9, 0.01, 0.2, 0.05, 3.0) == 0.0  # a TTFT no prefill meets


def test_verdict_never_shows_zero_vs_zero_as_a_result() -> None:
    from trt_disagg.bench.goodput import GoodputResult
    from trt_disagg.commands.demo import _verdict
    from trt_disagg.config import SLO, load_deployment
    from trt_disagg.demo.report import VariantOutcome
    from trt_disagg.demo.run import DemoResult
    from trt_disagg.demo.variants import split_variants

    disagg, colocated = split_variants(load_deployment("configs/smollm2-demo.yaml"))
    outcomes = [VariantOutcome(disagg, [], []), VariantOutcome(colocated, [], [])]

    def result(g_disagg: float, g_coloc: float, busy: float) -> DemoResult:
        goodputs = {"disaggregated": GoodputResult(0.9, g_disagg, 2, []),
                    "colocated": GoodputResult(0.9, g_coloc, 2, [])}
        return DemoResult(outcomes, SLO(ttft_s=1, tpot_s=0.1), goodputs, [], [], [], (), [],
                          busy=busy_from(_ratios(busy, busy), 1.3))

    assert "no result" in _verdict(result(0.0, 0.0, 1.6)) and "busy while serving" in _verdict(result(0, 0, 1.6))
    assert result(0.0, 0.0, 1.0).ratio is None
    assert "2.00x" in _verdict(result(0.6, 0.3, 1.0)) and "busy" not in _verdict(result(0.6, 0.3, 1.0))


@pytest.mark.parametrize("temperature", [-0.1, 2.5, float("nan")])
def test_a_temperature_outside_openais_range_is_refused_before_any_work(temperature: float) -> None:
    from trt_disagg.demo.run import DemoOptions, run_demo
    from trt_disagg.errors import UserError

    def never(*args: object) -> None:
        raise AssertionError("the demo built or reported before checking its options")

    with pytest.raises(UserError, match="--temperature"):
        run_demo(DemoOptions(Path("missing.yaml"), temperature=temperature), never, never)  # type: ignore[arg-type]


def test_the_cli_defaults_are_the_slo_rule_s() -> None:
    import inspect

    from trt_disagg.commands.demo import demo_cmd
    from trt_disagg.demo.targets import TPOT_MULTIPLE, TTFT_MULTIPLE, SloRule

    params = inspect.signature(demo_cmd).parameters
    assert params["tpot_multiple"].default == TPOT_MULTIPLE == SloRule().tpot_multiple
    assert params["ttft_multiple"].default == TTFT_MULTIPLE == SloRule().ttft_multiple
