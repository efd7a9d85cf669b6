"""The demo's pure parts: splitting a config into its two deployments, predicting attainment, the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trt_disagg.bench.metrics import RequestRecord, RunResult
from trt_disagg.config import SLO, load_deployment, parse_deployment
from trt_disagg.contract import ModelShape, Role
from trt_disagg.demo.predict import (
    HandoffCosts,
    handoff_latency_s,
    predict_attainment,
    profile_kv_import,
    sim_spec,
)
from trt_disagg.demo.report import VariantOutcome, goodput_table, prediction_table
from trt_disagg.demo.served_steps import MIN_STEPS_PER_BATCH, decode_beside_prefill, step_ratios
from trt_disagg.demo.variants import COLOCATED, DISAGGREGATED, split_variants
from trt_disagg.engine_dir import EngineConfig, EngineLimits, KVCacheSpec
from trt_disagg.errors import UserError
from trt_disagg.planner.latency_model import Coefficients, LatencyModel, PhaseCoefficients
from trt_disagg.sim import ColocatedSpec, DisaggSpec
from trt_disagg.workload import WorkloadRequest

SHAPE = ModelShape(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                   vocab_size=49152)


def demo_config():
    return load_deployment("configs/smollm2-demo.yaml")


def engine_cfg(role: Role) -> EngineConfig:
    return EngineConfig(role, SHAPE, 1, 1, "float32", EngineLimits(32, 1024, 1280, 2048),
                        KVCacheSpec("float32", 16, 32768), "f")


# prefill 0.8 s for 512 tokens on one core; decode 50 ms + 5 ms per sequence (the CPU figures, rounded)
MODEL = LatencyModel("smollm2", "cpu", "test", {1: PhaseCoefficients(
    Coefficients(0.01, 0.0015, 0.0), Coefficients(0.05, 0.0, 0.005), Coefficients(0.05, 0.0, 0.005))})


def test_split_keeps_the_roles_of_each_variant_and_counts_cores() -> None:
    disagg, colocated = split_variants(demo_config())
    assert disagg.label == DISAGGREGATED and set(disagg.deployment.groups()) == {Role.PREFILL, Role.DECODE}
    assert colocated.label == COLOCATED and set(colocated.deployment.groups()) == {Role.COLOCATED}
    assert disagg.num_cores == colocated.num_cores == 2
    assert disagg.describe() == "1 prefill + 1 decode"


def test_split_refuses_a_config_without_the_baseline() -> None:
    dep = parse_deployment({"name": "x", "model": {"source": "tiny"}, "context_servers": {},
                            "generation_servers": {}, "slo": {"ttft_s": 1, "tpot_s": 1}})
    with pytest.raises(UserError, match="colocated_servers"):
        split_variants(dep)


def test_prediction_uses_the_variant_shape_and_falls_with_rate() -> None:
    disagg, colocated = split_variants(demo_config())
    cfgs = {role: engine_cfg(role) for role in Role}
    d_spec, c_spec = sim_spec(disagg, cfgs, MODEL), sim_spec(colocated, cfgs, MODEL)
    assert isinstance(d_spec, DisaggSpec) and (d_spec.num_prefill, d_spec.num_decode) == (1, 1)
    assert isinstance(c_spec, ColocatedSpec) and c_spec.num_instances == 2
    requests = [WorkloadRequest(None, None, 512, 32)] * 200
    for spec in (d_spec, c_spec):
        curve = predict_attainment(spec, requests, [0.2, 0.8, 3.0], ttft_s=3.0, tpot_s=0.1)
        assert curve[0] >= curve[1] >= curve[2]
        assert curve[0] > 0.9 and curve[2] < 0.5
    # Colocated prefills stall decodes; disaggregated decode never waits behind a prefill.
    c_low = predict_attainment(c_spec, requests, [0.8], ttft_s=100.0, tpot_s=0.07)[0]
    d_low = predict_attainment(d_spec, requests, [0.8], ttft_s=100.0, tpot_s=0.07)[0]
    assert d_low > c_low


def _run(rate: float, attained: int, total: int) -> RunResult:
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    records = []
    for i in range(total):
        ok = i < attained
        rec = RequestRecord(index=i, input_len=8, expected_output_len=3, scheduled_s=0.0, sent_s=0.0)
        rec.token_times_s = [0.5, 0.55, 0.6] if ok else [5.0, 5.1, 5.2]
        rec.output_tokens = 3
        records.append(rec)
    return RunResult(rate, "poisson", slo, records, 6.0)


def test_tables_report_goodput_ratio_and_prediction_error() -> None:
    disagg, colocated = split_variants(demo_config())
    outcomes = [VariantOutcome(disagg, [_run(0.5, 10, 10), _run(1.0, 10, 10)], [1.0, 0.95]),
                VariantOutcome(colocated, [_run(0.5, 10, 10), _run(1.0, 5, 10)], [1.0, 0.6])]
    assert outcomes[0].goodput(0.9).goodput_rps == 1.0
    assert outcomes[1].goodput(0.9).goodput_rps == 0.5
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(goodput_table(outcomes, 0.9, "slo"))
    console.print(prediction_table(outcomes))
    text = console.export_text()
    assert "2.00x" in text  # per-core goodput ratio, disaggregated vs colocated
    assert "+10" in text  # colocated at 1.0 req/s: predicted 60%, measured 50%


def test_handoff_latency_is_what_the_simulator_does_not_already_model() -> None:
    disagg, _ = split_variants(demo_config())
    cfgs = {role: engine_cfg(role) for role in Role}
    spec = sim_spec(disagg, cfgs, MODEL, HandoffCosts(import_s_per_token=1e-5))
    assert isinstance(spec, DisaggSpec) and spec.import_s_per_token == 1e-5
    link_s = 512 * spec.kv_bytes_per_token / spec.kv_link_bytes_per_s
    step_s = MODEL.for_tp(1).decode_step_s(1, 513)  # 50 ms + 5 ms
    observed = [link_s + 512e-5 + step_s + extra for extra in (0.030, 0.040, 0.200)]  # one outlier
    assert handoff_latency_s(observed, [512] * 3, spec, MODEL.for_tp(1).decode_step_s) == pytest.approx(0.040)
    assert handoff_latency_s([0.001], [512], spec, MODEL.for_tp(1).decode_step_s) == 0.0  # never negative


def test_step_ratios_compare_each_served_step_with_the_model(tmp_path: Path) -> None:
    coeffs = MODEL.for_tp(1)  # decode: 50 ms + 5 ms per sequence; prefill: 10 ms + 1.5 ms per token
    rows = [{"t": 0.0, "kind": "prefill", "num_seqs": 1, "num_tokens": 100, "sum_context": 100,
             "duration_s": 0.16 * 1.5},
            *({"t": 1.0 + 0.1 * k, "kind": "decode", "num_seqs": 2, "num_tokens": 2, "sum_context": 300,
               "duration_s": 0.06 * f} for k, f in enumerate((1.0, 1.0, 2.0)))]
    log = tmp_path / "decode-0.iterations.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefill, decode = step_ratios(log, coeffs)
    assert (prefill.instance, prefill.kind, prefill.num_steps) == ("decode-0", "prefill", 1)
    assert prefill.p50 == pytest.approx(1.5)
    assert (decode.num_steps, decode.mean_batch, decode.p50, decode.p90) == (3, 2.0, pytest.approx(1.0),
                                                                             pytest.approx(2.0))
    assert decode.time_ratio == pytest.approx(4 / 3)  # the one slow step counts in the total, not in the p50
    assert step_ratios(tmp_path / "missing.jsonl", coeffs) == []
    # one rate's run: only the steps that started inside its window
    (late,) = step_ratios(log, coeffs, window=(1.05, 2.0))
    assert (late.kind, late.num_steps, late.time_ratio) == ("decode", 2, pytest.approx(1.5))
    assert step_ratios(log, coeffs, window=(5.0, 6.0)) == []


def test_kv_import_profile_times_the_steps_that_write_pulled_kv(tiny_engines) -> None:
    from trt_disagg.engine.llm_engine import LLMEngine

    with LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1) as engine:
        per_token = profile_kv_import(engine, [16, 48], repeats=2)
        assert engine.num_free_blocks == engine.num_total_blocks and engine.num_held() == 0
    assert 0.0 < per_token < 1e-3  # a few microseconds per token on a CPU; never zero


def test_decode_steps_are_split_by_a_prefill_running_when_they_start(tmp_path: Path) -> None:
    coeffs = MODEL.for_tp(1)  # decode: 50 ms + 5 ms per sequence (context terms 0)
    prefill_log, decode_log = tmp_path / "prefill-0.iterations.jsonl", tmp_path / "decode-0.iterations.jsonl"
    prefill_log.write_text(json.dumps({"t": 10.0, "kind": "prefill", "num_seqs": 1, "num_tokens": 100,
                                       "sum_context": 100, "duration_s": 5.0}) + "\n")
    n = MIN_STEPS_PER_BATCH

    def step(t: float, batch: int, ratio: float) -> dict:
        return {"t": t, "kind": "decode", "num_seqs": batch, "num_tokens": batch, "sum_context": 0,
                "duration_s": ratio * coeffs.decode_step_s(batch, 0)}

    rows = [*(step(0.1 * k, 1, 1.0) for k in range(n)),          # before the prefill: alone
            *(step(10.0 + 0.1 * k, 1, 1.5) for k in range(n)),   # beside it, batch 1
            *(step(12.0 + 0.1 * k, 2, 2.0) for k in range(n)),   # beside it, batch 2
            step(14.0, 3, 3.0)]                                   # one step at batch 3: too few to count
    decode_log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = decode_beside_prefill([decode_log], [prefill_log], coeffs)
    assert split is not None and (split.num_alone, split.num_beside) == (n, 2 * n + 1)
    assert split.alone == pytest.approx(1.0)
    assert split.factors == pytest.approx((1.5, 2.0, 2.0))  # batch 3 has too few steps: batch 2's factor
    assert decode_beside_prefill([decode_log], [], coeffs) is None  # nothing ran beside a prefill


def test_the_demo_profiles_the_engine_whose_token_budget_holds_the_grid_and_predicts_with_each_groups() -> None:
    from trt_disagg.demo.run import _profiled_role

    dep = demo_config()
    groups = dep.groups()
    # the groups that prefill batch one 512-token prompt at a time; the decode engine holds the grid's 4 x 512
    assert groups[Role.PREFILL].max_num_tokens == groups[Role.COLOCATED].max_num_tokens == 512
    assert _profiled_role(dep) == Role.DECODE
    same = parse_deployment({"name": "x", "model": {"source": "tiny"}, "context_servers": {},
                             "generation_servers": {}, "colocated_servers": {}, "slo": {"ttft_s": 1, "tpot_s": 1}})
    assert _profiled_role(same) == Role.COLOCATED  # equal budgets: the baseline's engine, as served

    # the simulator batches prompts as each group's engine does: three prompts that arrive together are
    # while another prefills are prefilled one after another under a 512-token budget, in one batch (all done
    # at once) under 2048
    import numpy as np

    from trt_disagg.sim import SimWorkload, simulate

    three = SimWorkload(np.array([0.0, 0.1, 0.1, 0.1]), np.full(4, 512, dtype=np.int64), np.full(4, 4, dtype=np.int64))
    cfgs = {role: engine_cfg(role) for role in Role}
    raw = yaml.safe_load(Path("configs/smollm2-demo.yaml").read_text())
    one_by_one = simulate(sim_spec(split_variants(parse_deployment(raw))[0], cfgs, MODEL), three).ttft_s[1:]
    raw["context_servers"]["max_num_tokens"] = 2048
    together = simulate(sim_spec(split_variants(parse_deployment(raw))[0], cfgs, MODEL), three).ttft_s[1:]
    prefill_s = MODEL.for_tp(1).prefill_s(512, 512 * 512)
    assert np.allclose(np.sort(one_by_one) + 0.1, [2 * prefill_s, 3 * prefill_s, 4 * prefill_s], rtol=0.05)
    assert np.allclose(together, together[0]) and together[0] + 0.1 > 3.9 * prefill_s
