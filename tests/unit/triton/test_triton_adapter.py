"""Instance settings from a rendered config.pbtxt (as Triton hands it to model.py) and the environment."""

from __future__ import annotations

import pytest

from trt_disagg.contract import Role
from trt_disagg.triton.adapter import InstanceSettings, load_engine
from trt_disagg.triton.fake_engine import FakeEngine


def model_config(**params: str) -> dict:
    base = {"ROLE": "prefill", "ENGINE_DIR": "/e/prefill", "KV_TRANSPORT": "shm", "HANDLE_TTL_S": "30.0",
            "MAX_PENDING_TOKENS": "", "THREADS_PER_RANK": "2"}
    base.update(params)
    return {"name": "prefill", "parameters": {k: {"string_value": v} for k, v in base.items()}}


def test_settings_from_parameters_and_environment():
    env = {"TRTD_INSTANCE_ID": "prefill-3", "TRTD_KV_PORT": "4567", "TRTD_KV_HOST": "0.0.0.0",
           "TRTD_ADVERTISE_HOST": "10.0.0.2", "REDIS_URL": "redis://r:6379/0", "TRTD_GRPC_URL": "10.0.0.2:8001"}
    s = InstanceSettings.from_model_config(model_config(), env)
    assert (s.role, s.engine_dir, s.transport, s.handle_ttl_s) == (Role.PREFILL, "/e/prefill", "shm", 30.0)
    assert s.max_pending_tokens is None and s.threads_per_rank == 2
    assert (s.instance_id, s.kv_host, s.kv_port, s.advertise_host) == ("prefill-3", "0.0.0.0", 4567, "10.0.0.2")
    assert s.redis_url == "redis://r:6379/0" and s.grpc_url == "10.0.0.2:8001"


def test_defaults_without_serve_environment():
    s = InstanceSettings.from_model_config(model_config(MAX_PENDING_TOKENS="512"), {})
    assert s.instance_id.startswith("prefill-") and s.kv_port == 0 and s.redis_url is None
    assert s.max_pending_tokens == 512


def test_missing_parameter_is_named():
    with pytest.raises(ValueError, match="ENGINE_DIR"):
        InstanceSettings.from_model_config(model_config(ENGINE_DIR=""), {})


def test_fake_engine_spec():
    eng = load_engine("fake:decode:1:2", None)
    assert isinstance(eng, FakeEngine) and eng.config.role is Role.DECODE and eng.config.pp == 2
