"""Latency model data: published fits, roofline estimates, PP timing, memory capacity."""

from __future__ import annotations

import json

import pytest

from trt_disagg.errors import UserError
from trt_disagg.planner.hardware import GPUS, get_gpu
from trt_disagg.planner.latency_model import (
    DISTSERVE_OVERHEADS,
    HOP_LATENCY_S,
    Coefficients,
    EngineOverheads,
    InstanceTiming,
    LatencyModel,
    PhaseCoefficients,
    published_latency_model,
)
from trt_disagg.planner.memory import kv_capacity_tokens, published_kv_capacity
from trt_disagg.planner.models import MODELS, get_model, model_from_hf_config
from trt_disagg.planner.roofline import roofline_coefficients, roofline_latency_model


def test_published_fits_are_read_in_seconds():
    lm = published_latency_model("opt-13b", "a100-80g")
    assert lm is not None and lm.tps() == [1, 2, 4]
    c = lm.for_tp(1)
    assert (c.prefill.a, c.prefill.b, c.prefill.c) == pytest.approx((0.0181, 0.10191e-3, 7.12e-9))
    assert c.decode_threshold == 95
    # small set at batch 95, large above it
    assert c.decode_step_s(95, 1000) == pytest.approx(0.01993 + 6.269e-7 * 1000 + 3.851e-5 * 95)
    assert c.decode_step_s(96, 1000) == pytest.approx(0.00717 + 5.798e-7 * 1000 + 1.5831e-4 * 96)
    assert published_latency_model("opt-13b", "h100-sxm") is None
    with pytest.raises(UserError, match="no TP 8"):
        lm.for_tp(8)


def test_roofline_is_the_right_size_against_the_published_a100_fit():
    roof = roofline_coefficients(MODELS["opt-13b"], GPUS["a100-80g"], 1)
    pub = published_latency_model("opt-13b", "a100-80g").for_tp(1)  # type: ignore[union-attr]
    for mine, theirs in ((roof.prefill.a, pub.prefill.a), (roof.prefill.b, pub.prefill.b),
                         (roof.decode_small.a, pub.decode_small.a), (roof.decode_small.b, pub.decode_small.b)):
        assert 0.5 < mine / theirs < 2.0
    faster = roofline_coefficients(MODELS["opt-13b"], GPUS["h100-sxm"], 1)
    assert faster.prefill.b < roof.prefill.b and faster.decode_small.a < roof.decode_small.a
    assert roofline_coefficients(MODELS["opt-13b"], GPUS["a100-80g"], 4).prefill.b < roof.prefill.b


def test_roofline_skips_tp_that_does_not_divide_the_heads():
    assert roofline_latency_model(MODELS["smollm2-135m"], GPUS["l40s"]).tps() == [1]  # 9 heads


def test_pipeline_parallel_divides_the_stage_time_and_adds_hops():
    coeffs = PhaseCoefficients(Coefficients(0.1, 0.0, 0.0), Coefficients(0.02, 0, 0), Coefficients(0.02, 0, 0))
    one = InstanceTiming(coeffs, 1, 1000, 1e9)
    four = InstanceTiming(coeffs, 4, 1000, 1e9)
    assert one.prefill_s(100, 0) == (0.1, 0.1)
    stage, latency = four.prefill_s(100, 0)
    hop = HOP_LATENCY_S + 100 * 1000 * 2 / 1e9
    assert stage == pytest.approx(0.025) and latency == pytest.approx(0.1 + 3 * hop)
    assert four.decode_step_s(10, 0) == pytest.approx(0.02 + 3 * (HOP_LATENCY_S + 10 * 1000 * 2 / 1e9))


def test_engine_overheads_add_per_iteration_per_token_and_per_stage_costs():
    coeffs = PhaseCoefficients(Coefficients(0.1, 0.0, 0.0), Coefficients(0.02, 0, 0), Coefficients(0.02, 0, 0))
    ovh = EngineOverheads(iteration_s=0.002, per_token_s=1e-7, prefill_stage_s=0.001, decode_stage_s=0.0005)
    one = InstanceTiming(coeffs, 1, 1000, 1e12, overheads=ovh)
    assert one.prefill_s(500, 0) == pytest.approx((0.1 + 0.002 + 5e-5 + 0.001,) * 2)
    assert one.decode_step_s(4, 1000) == pytest.approx(0.02 + 0.002 + 1e-4 + 0.0005)
    four = InstanceTiming(coeffs, 4, 1000, 1e12, overheads=ovh)
    stage, latency = four.prefill_s(500, 0)
    hops = 3 * (HOP_LATENCY_S + 500 * 1000 * 2 / 1e12)
    # The first stage pays the iteration overhead and its stage cost (4 x 1 ms at PP4, as DistServe's simulator);
    # the batch crosses all four stages.
    assert stage == pytest.approx(0.025 + 0.002 + 5e-5 + 4 * 0.001)
    assert latency == pytest.approx(0.1 + 0.002 + 5e-5 + 16 * 0.001 + hops)
    # A decode micro-batch step crosses every stage: no division by pp, four stage costs.
    assert four.decode_step_s(4, 1000) == pytest.approx(0.02 + 0.002 + 1e-4 + 4 * 0.0005
                                                        + 3 * (HOP_LATENCY_S + 4 * 1000 * 2 / 1e12))
    terms = four.decode_terms()
    assert terms.a_small + terms.b_small * 1000 + terms.c_small * 4 + terms.hop_fixed_s + terms.hop_per_seq_s * 4 \
        == pytest.approx(four.decode_step_s(4, 1000))


def test_published_and_roofline_models_carry_distserves_overheads_profiles_none(tmp_path):
    published = published_latency_model("opt-13b", "a100-80g")
    assert published is not None and published.overheads == DISTSERVE_OVERHEADS
    roofline = roofline_latency_model(MODELS["opt-13b"], GPUS["a100-80g"])
    assert roofline.overheads.iteration_s == 0.0  # its `a` already holds the launch overhead
    assert roofline.overheads.prefill_stage_s == DISTSERVE_OVERHEADS.prefill_stage_s
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"model": "m", "gpu": "cpu", "by_tp": {"1": published.for_tp(1).to_dict()}}))
    assert LatencyModel.from_json(path).overheads == EngineOverheads()  # a fit holds the engine's own


def test_latency_model_json_round_trip(tmp_path):
    lm = published_latency_model("opt-66b", "a100-80g", "vllm")
    assert lm is not None
    path = tmp_path / "lm.json"
    path.write_text(lm.to_json())
    assert LatencyModel.from_json(path) == lm
    path.write_text(json.dumps({"latency_model": json.loads(lm.to_json())}))  # a profile result wraps it
    assert LatencyModel.from_json(path).by_tp == lm.by_tp
    path.write_text("{}")
    with pytest.raises(UserError, match="lacks field"):
        LatencyModel.from_json(path)


def test_kv_capacity_uses_published_rows_and_the_formula_is_close_to_them():
    import trt_disagg.planner.memory as memory

    for (model, gpu, tp, pp), published in published_kv_capacity().items():
        assert kv_capacity_tokens(MODELS[model], GPUS[gpu], tp, pp) == published
        free = memory.MEMORY_UTILISATION * GPUS[gpu].memory_bytes * tp * pp - MODELS[model].weight_bytes
        formula = free * (1 - memory.ACTIVATION_RESERVE) / MODELS[model].kv_bytes_per_token
        assert formula == pytest.approx(published, rel=0.1)


def test_configurations_that_do_not_fit_are_none():
    assert kv_capacity_tokens(MODELS["opt-66b"], GPUS["a100-80g"], 1, 1) is None  # 131 GB of weights
    assert kv_capacity_tokens(MODELS["opt-175b"], GPUS["a100-40g"], 8, 1) is None
    assert kv_capacity_tokens(MODELS["opt-13b"], GPUS["a100-80g"], 3, 1) is None  # 40 heads % 3
    assert kv_capacity_tokens(MODELS["llama-3-70b"], GPUS["h100-sxm"], 4, 1) > 100_000  # type: ignore[operator]


def test_model_and_gpu_lookup(tmp_path):
    assert get_model("OPT-13B") is MODELS["opt-13b"]
    assert 12.8e9 < MODELS["opt-13b"].num_params < 13.0e9
    assert 8.0e9 < MODELS["llama-3-8b"].num_params < 8.1e9
    assert get_gpu("H100").name == "h100-sxm"
    with pytest.raises(UserError, match="--gpu: unknown GPU 'tpu'"):
        get_gpu("tpu")
    with pytest.raises(UserError, match="--model: unknown model"):
        get_model("gpt-5")
    cfg = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = get_model(str(tmp_path))
    assert spec.shape.num_kv_heads == 2 and spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    with pytest.raises(UserError, match="lacks or has a bad field"):
        model_from_hf_config({"model_type": "opt"}, "broken")
