"""Block reuse on the TensorRT-LLM path: `kv_cache_config.enable_block_reuse` and `event_buffer_max_size`
reach the tensorrtllm backend's parameters (and the python backend's), the engine is built with paged
context FMHA (which reuse needs), and `router.policy: kv_aware` reaches the router's settings."""

from __future__ import annotations

from pathlib import Path

import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from router.settings import RouterSettings
from trt_disagg.config import ModelSource, parse_deployment
from trt_disagg.engine_build.tensorrtllm import render_commands
from trt_disagg.triton.render import render_deployment

REPO = Path(__file__).resolve().parents[2]


def deployment(backend: str, reuse: bool, buffer: int) -> dict:
    data = yaml.safe_load((REPO / "configs" / "llama3-70b-8xh100.yaml").read_text())
    for group in ("context_servers", "generation_servers"):
        data[group]["backend"] = backend
        data[group]["kv_cache_config"].update(enable_block_reuse=reuse, event_buffer_max_size=buffer)
        if backend == "python":
            data[group]["kv_cache_config"]["dtype"] = "float32"
            data[group]["cache_transceiver_config"] = {"backend": "auto"}
    data["router"].update(policy="kv_aware", kv_overlap_score_weight=2.0, max_local_prefill_length=64)
    return data


def rendered_params(tmp_path: Path, data: dict) -> dict[str, dict[str, str]]:
    out = {}
    for plan, repo in render_deployment(parse_deployment(data), tmp_path, Path("/engines")):
        cfg = text_format.Parse((repo / plan.model_name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        out[plan.instance_id] = {k: v.string_value for k, v in cfg.parameters.items()}
    return out


def test_block_reuse_and_the_event_buffer_reach_the_tensorrtllm_backend(tmp_path: Path) -> None:
    on = rendered_params(tmp_path / "on", deployment("tensorrtllm", True, 4096))
    off = rendered_params(tmp_path / "off", deployment("tensorrtllm", False, 0))
    assert {p["enable_kv_cache_reuse"] for p in on.values()} == {"true"}
    assert {p["event_buffer_max_size"] for p in on.values()} == {"4096"}
    assert {p["enable_kv_cache_reuse"] for p in off.values()} == {"false"}
    assert {p["event_buffer_max_size"] for p in off.values()} == {"0"}


def test_the_python_backend_gets_the_event_buffer(tmp_path: Path) -> None:
    params = rendered_params(tmp_path, deployment("python", True, 123))
    assert {p["KV_EVENT_BUFFER_MAX_SIZE"] for p in params.values()} == {"123"}


def test_reuse_builds_with_paged_context_fmha() -> None:
    dep = parse_deployment(deployment("tensorrtllm", True, 4096))
    assert dep.context_servers is not None
    cmds = render_commands(ModelSource(source="hf", path="/ckpt"), dep.context_servers, model_dir="/ckpt",
                           checkpoint_dir="/c", engine_dir="/e")
    i = cmds.build.index("--use_paged_context_fmha")
    assert cmds.build[i + 1] == "enable"


def test_the_router_policy_and_its_weights_reach_the_router() -> None:
    settings = RouterSettings.from_deployment(parse_deployment(deployment("tensorrtllm", True, 1)),
                                              "redis://127.0.0.1:1/0")
    assert settings.policy == "kv_aware" and settings.kv_overlap_score_weight == 2.0
    assert settings.max_local_prefill_length == 64
