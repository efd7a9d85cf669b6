"""What `build` writes for the python backend: config.json, one shard per rank, the tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.engine_build.build_support import LoadCounter
from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.engine.sharding import shard_state_dict
from trt_disagg.engine.weights import LoadedModel
from trt_disagg.engine_build.builder import BuildStatus, build_deployment
from trt_disagg.engine_dir import (
    CONFIG_FILE,
    EngineConfig,
    EngineLimits,
    KVCacheSpec,
    load_tokenizer,
    rank_file,
)
from trt_disagg.errors import UserError


def test_builds_every_role_from_one_load(make_dep: Callable[..., Deployment], loads: LoadCounter,
                                         tiny_model: LoadedModel) -> None:
    dep = make_dep()
    results = build_deployment(dep)
    assert [r.role for r in results] == [Role.PREFILL, Role.DECODE, Role.COLOCATED]
    assert all(r.status is BuildStatus.BUILT for r in results)
    assert loads.calls == 1

    for role, tp, pp in ((Role.PREFILL, 2, 1), (Role.DECODE, 1, 2), (Role.COLOCATED, 1, 1)):
        engine_dir = dep.engine_dir(role)
        cfg = EngineConfig.load(engine_dir)
        group = dep.groups()[role]
        assert (cfg.role, cfg.tp, cfg.pp, cfg.dtype) == (role, tp, pp, "float32")
        assert cfg.shape == tiny_model.shape
        assert cfg.fingerprint == tiny_model.fingerprint  # equal across roles: KV may move between them
        assert cfg.limits == EngineLimits(group.max_batch_size, group.max_input_len, group.max_seq_len,
                                          group.max_num_tokens)
        assert cfg.kv_cache == KVCacheSpec("float32", 16, group.kv_cache_config.max_tokens)
        assert cfg.threads_per_rank == group.threads_per_instance
        assert cfg.inputs_digest
        expected = shard_state_dict(tiny_model.state_dict, tiny_model.shape, tp, pp)
        files = sorted(p.name for p in engine_dir.iterdir() if p.suffix == ".safetensors")
        assert files == sorted(rank_file(r) for r in range(tp * pp))
        for rank, tensors in expected.items():
            on_disk = load_file(str(engine_dir / rank_file(rank)))
            assert set(on_disk) == set(tensors)
            assert all(torch.equal(on_disk[name], t) for name, t in tensors.items())
        tok = load_tokenizer(engine_dir)
        assert tok("The capital of France")["input_ids"] == \
            tiny_model.tokenizer("The capital of France")["input_ids"]


def test_kv_capacity_defaults_and_rounds_to_whole_blocks(make_dep: Callable[..., Deployment],
                                                         loads: LoadCounter) -> None:
    dep = make_dep(context_servers=None, generation_servers=None,
                   colocated_servers={"kv_cache_config": {"max_tokens": None}})
    build_deployment(dep)
    group = dep.colocated_servers
    assert group is not None
    cfg = EngineConfig.load(dep.engine_dir(Role.COLOCATED))
    assert cfg.kv_cache.max_tokens == group.max_batch_size * group.max_seq_len  # 32 * 512

    dep = make_dep(context_servers=None, generation_servers=None,
                   colocated_servers={"kv_cache_config": {"max_tokens": 1000, "tokens_per_block": 64}})
    build_deployment(dep)
    cfg = EngineConfig.load(dep.engine_dir(Role.COLOCATED))
    assert (cfg.kv_cache.max_tokens, cfg.kv_cache.num_blocks) == (960, 15)


def test_role_filter_builds_only_that_role(make_dep: Callable[..., Deployment], loads: LoadCounter) -> None:
    dep = make_dep()
    results = build_deployment(dep, roles=["decode"])
    assert [r.role for r in results] == [Role.DECODE]
    assert (dep.engine_dir(Role.DECODE) / CONFIG_FILE).is_file()
    assert not dep.engine_dir(Role.PREFILL).exists()


def test_engines_root_overrides_the_config(make_dep: Callable[..., Deployment], loads: LoadCounter,
                                           tmp_path: Path) -> None:
    dep = make_dep()
    build_deployment(dep, engines_root=tmp_path / "elsewhere", roles=["colocated"])
    assert (tmp_path / "elsewhere" / "tiny" / "colocated" / CONFIG_FILE).is_file()
    assert not Path(dep.engines_dir).exists()


def test_load_tokenizer_without_tokenizer_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer/"):
        load_tokenizer(tmp_path)
