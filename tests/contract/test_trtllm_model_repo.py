"""Rendered model repositories: valid Triton configs, the shared tensor contract, TensorRT-LLM's parameters.

Parsed with Triton's own ModelConfig protobuf (tritonclient ships it), so a typo in a template fails here,
not when a GPU host loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trt_disagg.config import load_deployment
from trt_disagg.contract import TensorName
from trt_disagg.triton.render import render_deployment

REPO = Path(__file__).resolve().parents[2]
CONTRACT_INPUTS = {TensorName.INPUT_IDS, TensorName.INPUT_LENGTHS, TensorName.REQUEST_OUTPUT_LEN,
                   TensorName.END_ID, TensorName.PAD_ID, TensorName.STREAMING, TensorName.CONTEXT_PHASE_PARAMS,
                   TensorName.TEMPERATURE, TensorName.TOP_K, TensorName.TOP_P, TensorName.RANDOM_SEED,
                   TensorName.GUIDE_TYPE, TensorName.GUIDE}
CONTRACT_OUTPUTS = {TensorName.OUTPUT_IDS, TensorName.SEQUENCE_LENGTH, TensorName.CONTEXT_PHASE_PARAMS}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(cfg: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture(scope="module")
def trtllm_repos(tmp_path_factory):
    out = tmp_path_factory.mktemp("repos")
    dep = load_deployment(REPO / "configs" / "llama3-70b-8xh100.yaml")
    return {plan.instance_id: (plan, repo) for plan, repo in render_deployment(dep, out, Path("/engines"))}


def test_tensorrtllm_instances_render_valid_configs_with_trtllm_parameters(trtllm_repos):
    assert sorted(trtllm_repos) == ["decode-0", "prefill-0"]
    for plan, repo in trtllm_repos.values():
        cfg = parse(repo / plan.model_name / "config.pbtxt")
        assert cfg.backend == "tensorrtllm" and cfg.name == plan.role.value
        p = params(cfg)
        assert p["gpt_model_path"] == f"/engines/llama3-70b/{plan.role.value}"
        assert p["gpt_model_type"] == "inflight_fused_batching"
        assert p["batch_scheduler_policy"] in ("max_utilization", "guaranteed_no_evict")
        assert p["enable_kv_cache_reuse"] == "true" and p["exclude_input_in_output"] == "true"  # on by default
        assert p["event_buffer_max_size"] == "10000"
        assert p["guided_decoding_backend"] == "xgrammar"  # structured output / tool calls, as on the CPU path
        assert p["xgrammar_tokenizer_info_path"] == f"/engines/llama3-70b/{plan.role.value}/xgrammar_tokenizer_info.json"
        assert p["tokenizer_dir"] == f"/engines/llama3-70b/{plan.role.value}/tokenizer"
        assert not (repo / plan.model_name / "1" / "model.py").exists()  # the backend loads the engine


def test_device_and_participant_ids_do_not_overlap(trtllm_repos):
    prefill = params(parse(trtllm_repos["prefill-0"][1] / "prefill" / "config.pbtxt"))
    decode = params(parse(trtllm_repos["decode-0"][1] / "decode" / "config.pbtxt"))
    assert prefill["gpu_device_ids"] == "0,1,2,3" and decode["gpu_device_ids"] == "4,5,6,7"
    assert prefill["participant_ids"] == "1,2,3,4" and decode["participant_ids"] == "5,6,7,8"
    assert prefill["kv_cache_free_gpu_mem_fraction"] == "0.85" and decode["kv_cache_free_gpu_mem_fraction"] == "0.9"


def test_prefill_is_unary_and_decode_streams(trtllm_repos):
    prefill = parse(trtllm_repos["prefill-0"][1] / "prefill" / "config.pbtxt")
    decode = parse(trtllm_repos["decode-0"][1] / "decode" / "config.pbtxt")
    assert not prefill.model_transaction_policy.decoupled
    assert decode.model_transaction_policy.decoupled


def test_cache_transceiver_environment(trtllm_repos):
    for _, repo in trtllm_repos.values():
        meta = json.loads((repo / "instance.json").read_text())
        assert meta["env"] == {"TRTLLM_USE_UCX_KVCACHE": "1"}


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_both_backends_expose_the_same_tensor_contract(tmp_path, role):
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    rendered = {plan.role.value: repo for plan, repo in render_deployment(dep, tmp_path / "py", tmp_path)}
    python_cfg = parse(rendered[role] / role / "config.pbtxt")
    trtllm_text = (REPO / "model_repo" / "tensorrtllm" / role / "config.pbtxt").read_text()
    assert {i.name for i in python_cfg.input} == CONTRACT_INPUTS
    assert {o.name for o in python_cfg.output} == CONTRACT_OUTPUTS
    for name in CONTRACT_INPUTS | CONTRACT_OUTPUTS:
        assert f'name: "{name}"' in trtllm_text
    assert params(python_cfg)["ENGINE_DIR"] == str((tmp_path / "tiny" / role).resolve())
    assert (rendered[role] / role / "1" / "model.py").is_file()
