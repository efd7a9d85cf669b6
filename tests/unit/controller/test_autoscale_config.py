"""The deployment's `autoscale:` section: a budget the deployment cannot fit in, or an instance whose GPUs
cannot hold the weights, is a config error naming the field (`serve --autoscale` exits 2 before starting
anything); a valid section builds the controller the live loop runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from trt_disagg import cli
from trt_disagg.config import parse_deployment
from trt_disagg.contract import ModelShape
from trt_disagg.controller.from_deployment import build_autoscale
from trt_disagg.controller.observe import ObservedWorkload
from trt_disagg.controller.policy import Action, Shape
from trt_disagg.engine_build.python_engine import engine_config
from trt_disagg.engine_dir import CONFIG_FILE
from trt_disagg.errors import EXIT_USAGE, UserError

REPO = Path(__file__).resolve().parents[3]


def tiny(**autoscale: object) -> dict:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data.pop("colocated_servers")
    data["generation_servers"]["num_instances"] = 2
    data["autoscale"] = autoscale
    return data


@pytest.mark.parametrize(("autoscale", "message"), [
    ({"max_instances": 1}, "autoscale.max_instances must be >= 2"),
    ({"max_instances": 2}, r"autoscale.max_instances \(2\) cannot hold the deployment: it starts 1 prefill \+ 2"),
    ({"max_instances": 3, "min_prefill": 2, "min_decode": 2}, "autoscale.min_prefill \\+ autoscale.min_decode"),
    ({"min_prefill": 2}, r"autoscale.min_prefill \(2\) > context_servers.num_instances"),
    ({"interval_s": 60, "window_s": 30}, r"autoscale: .*window_s \(30.0\) must be >= interval_s"),
    ({"interval_s": 0}, "autoscale.interval_s: Input should be greater than 0"),
    ({"enabled": True, "unknown": 1}, "autoscale.unknown: Extra inputs are not permitted"),
])
def test_a_budget_that_cannot_hold_the_deployment_names_the_field(autoscale: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_deployment(tiny(**autoscale), "tiny.yaml")


def test_fixed_urls_cannot_be_autoscaled() -> None:
    data = tiny(max_instances=4)
    data["generation_servers"]["urls"] = ["127.0.0.1:9001", "127.0.0.1:9002"]
    with pytest.raises(UserError, match="generation_servers.urls fixes every instance's address"):
        parse_deployment(data, "tiny.yaml")


def test_the_budget_defaults_to_the_instances_started() -> None:
    assert parse_deployment(tiny(), "t").autoscale_budget() == 3
    assert parse_deployment(tiny(max_instances=5), "t").autoscale_budget() == 5


def gpu_deployment(gpu: str, tp: int, model: str) -> dict:
    data = tiny(max_instances=4, model=model)
    for group in ("context_servers", "generation_servers"):
        data[group].update(backend="tensorrtllm", gpu=gpu, tensor_parallel_size=tp, pipeline_parallel_size=1)
        data[group]["cache_transceiver_config"] = {"backend": "UCX"}
    return data


def test_gpus_that_cannot_hold_the_weights_name_the_group() -> None:
    dep = parse_deployment(gpu_deployment("a100-40g", 1, "opt-66b"), "t")
    with pytest.raises(UserError, match=r"context_servers: 1x1 a100-40g GPU\(s\) per instance cannot hold opt-66b"):
        build_autoscale(dep)


def test_gpu_groups_build_the_planners_latency_model() -> None:
    setup = build_autoscale(parse_deployment(gpu_deployment("a100-80g", 1, "opt-13b"), "t"))
    assert setup.controller.budget.max_instances == 4 and setup.controller.config.target == 0.9
    assert setup.actuator.drain_timeout_s == 60.0


def test_the_python_engine_needs_a_profile(tmp_path: Path) -> None:
    dep = parse_deployment({**tiny(max_instances=3), "engines_dir": str(tmp_path)}, "t")
    with pytest.raises(UserError, match="autoscale.profile: the controller predicts with the engine's latency"):
        build_autoscale(dep)


def test_serve_autoscale_with_a_bad_budget_exits_2_naming_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**tiny(max_instances=2, enabled=True), "engines_dir": str(tmp_path)}))
    monkeypatch.setattr(sys, "argv", ["trt-disagg", "serve", str(cfg), "--autoscale"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == EXIT_USAGE
    assert "autoscale.max_instances (2) cannot hold the deployment" in capsys.readouterr().err.replace("\n", "")


# A CPU engine whose prefill costs 20 ms + 0.1 ms per prompt token and whose decode step costs 10 ms:
# 1000-token prompts take ~0.12 s, so one prefill instance saturates near 8 requests/s.
SLOW_PREFILL = {"model": "tiny", "gpu": "cpu", "source": "profile:hand-written", "by_tp": {"1": {
    "prefill": {"a": 0.02, "b": 1e-4, "c": 0.0}, "decode_small": {"a": 0.01, "b": 0.0, "c": 0.0},
    "decode_large": {"a": 0.01, "b": 0.0, "c": 0.0}}}}


TINY_SHAPE = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4,
                        vocab_size=49152, eos_token_id=2)


@pytest.fixture
def tiny_1p2d(tmp_path: Path) -> tuple[dict, Path]:
    """A 1P2D tiny deployment (prefill TP1, decode PP1) whose engine directories hold the config.json the
    build writes (the controller reads nothing else of an engine), and a profile of its TP."""
    data = tiny(max_instances=3, interval_s=10, window_s=20, cooldown_s=30, min_requests=5)
    data["context_servers"].update(tensor_parallel_size=1, max_batch_size=4)
    data["generation_servers"].update(pipeline_parallel_size=1)
    data["engines_dir"] = str(tmp_path / "engines")
    dep = parse_deployment(data, "t")
    for role, group in dep.groups().items():
        cfg = engine_config(role, group, TINY_SHAPE, dtype="float32", fingerprint="f", inputs_digest="d", where="t")
        dep.engine_dir(role).mkdir(parents=True)
        (dep.engine_dir(role) / CONFIG_FILE).write_text(cfg.to_json())
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"latency_model": SLOW_PREFILL}))
    return data, profile


def test_python_groups_build_the_controller_from_the_profile_and_the_built_engines(tiny_1p2d: tuple[dict, Path]) -> None:
    data, profile = tiny_1p2d
    setup = build_autoscale(parse_deployment({**data, "autoscale": {**data["autoscale"], "profile": str(profile)}},
                                             "t"))
    ctl = setup.controller
    assert (ctl.config.interval_s, ctl.config.window_s, ctl.config.cooldown_s, ctl.config.min_requests) == (10, 20, 30, 5)
    assert ctl.config.target == 0.9 and ctl.budget.max_instances == 3
    assert (ctl.budget.prefill_gpus, ctl.budget.decode_gpus) == (1, 1)
    spec = ctl.predictor.base  # type: ignore[attr-defined]
    # each role's limits and KV pool as built (configs/tiny.yaml), the profile's timings
    assert (spec.prefill.kv_capacity_tokens, spec.decode.kv_capacity_tokens) == (8192, 16384)
    assert (spec.prefill.max_batch_size, spec.decode.max_batch_size) == (4, 32)
    assert spec.prefill.timing.coeffs.prefill.a == 0.02
    assert spec.kv_bytes_per_token == 2 * 4 * 4 * (256 // 8) * 4  # K and V x layers x KV heads x head dim x fp32


def test_python_controller_moves_a_decode_instance_to_prefill_for_long_prompts(tiny_1p2d: tuple[dict, Path]) -> None:
    """The built controller on a prefill-bound window: the shape it predicts better is 2P1D, one role switch."""
    data, profile = tiny_1p2d
    data = {**data, "slo": {"ttft_s": 0.4, "tpot_s": 0.1, "attainment": 0.9}}
    ctl = build_autoscale(parse_deployment({**data, "autoscale": {**data["autoscale"], "profile": str(profile)}},
                                           "t")).controller
    n = 140  # 20 s at 7 requests/s of 1000-token prompts, 2 tokens out: one prefill instance ~85% busy
    window = ObservedWorkload(20.0, n, 7.0, np.full(n, 1000), np.full(n, 2), None, None, None)
    assert ctl.predictor.attainment(Shape(1, 2), window) < 0.9 <= ctl.predictor.attainment(Shape(2, 1), window)
    decision = ctl.decide(1000.0, Shape(1, 2), window)
    assert decision.action is Action.DECODE_TO_PREFILL and decision.next_shape == Shape(2, 1), decision.reason


def test_a_profile_without_the_groups_tp_names_the_field(tiny_1p2d: tuple[dict, Path], tmp_path: Path) -> None:
    data, _ = tiny_1p2d
    other = tmp_path / "tp2.json"
    other.write_text(json.dumps({**SLOW_PREFILL, "by_tp": {"2": SLOW_PREFILL["by_tp"]["1"]}}))
    dep = parse_deployment({**data, "autoscale": {**data["autoscale"], "profile": str(other)}}, "t")
    with pytest.raises(UserError, match=r"no latency coefficients for TP 1 \(context_servers.tensor_parallel_size\)"):
        build_autoscale(dep)


def test_an_engine_not_built_is_named_with_the_command_that_builds_it(tiny_1p2d: tuple[dict, Path],
                                                                     tmp_path: Path) -> None:
    data, profile = tiny_1p2d
    dep = parse_deployment({**data, "engines_dir": str(tmp_path / "none"),
                            "autoscale": {**data["autoscale"], "profile": str(profile)}}, "t")
    with pytest.raises(UserError, match=r"the prefill engine .* is needed for its timings: .*trt-disagg build CONFIG"):
        build_autoscale(dep)
