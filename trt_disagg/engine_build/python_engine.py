"""Write one engine directory for the `python` (CPU torch) backend; layout in trt_disagg/engine_dir.py.

Order inside the staging dir: rank shards, tokenizer, then config.json last; the whole dir is renamed into
place only after that (staging.staged_dir), so a directory named `<role>/` is always complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trt_disagg.config import ServerGroup
from trt_disagg.contract import ModelShape, Role
from trt_disagg.engine_dir import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    EngineConfig,
    EngineLimits,
    KVCacheSpec,
    rank_file,
)
from trt_disagg.errors import UserError

from .staging import staged_dir

log = logging.getLogger(__name__)

PYTHON_KV_DTYPES = ("float32", "float16", "bfloat16")


def kv_cache_spec(group: ServerGroup, where: str) -> KVCacheSpec:
    """The KV pool of one instance: whole blocks, at least one max-length sequence."""
    kv = group.kv_cache_config
    if kv.dtype not in PYTHON_KV_DTYPES:
        raise UserError(f"{where}.kv_cache_config.dtype: {kv.dtype!r} needs the tensorrtllm backend; the python "
                        f"engine supports {', '.join(PYTHON_KV_DTYPES)}")
    wanted = kv.max_tokens if kv.max_tokens is not None else group.max_batch_size * group.max_seq_len
    max_tokens = (wanted // kv.tokens_per_block) * kv.tokens_per_block
    if max_tokens < group.max_seq_len:
        raise UserError(f"{where}.kv_cache_config.max_tokens: {wanted} tokens ({max_tokens} in whole blocks of "
                        f"{kv.tokens_per_block}) cannot hold one sequence of max_seq_len {group.max_seq_len}")
    return KVCacheSpec(dtype=kv.dtype, tokens_per_block=kv.tokens_per_block, max_tokens=max_tokens,
                       enable_block_reuse=kv.enable_block_reuse)


def engine_config(role: Role, group: ServerGroup, shape: ModelShape, *, dtype: str, fingerprint: str,
                  inputs_digest: str, where: str) -> EngineConfig:
    return EngineConfig(
        role=role,
        shape=shape,
        tp=group.tp,
        pp=group.pp,
        dtype=dtype,
        limits=EngineLimits(max_batch_size=group.max_batch_size, max_input_len=group.max_input_len,
                            max_seq_len=group.max_seq_len, max_num_tokens=group.max_num_tokens),
        kv_cache=kv_cache_spec(group, where),
        fingerprint=fingerprint,
        threads_per_rank=group.threads_per_instance,
        inputs_digest=inputs_digest,
    )


def existing_digest(engine_dir: Path) -> str | None:
    """The inputs digest of a complete python engine at `engine_dir`, or None when there is none."""
    cfg_path = engine_dir / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        cfg = EngineConfig.from_json(cfg_path.read_text())
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        log.warning("unreadable %s; rebuilding", cfg_path)
        return None
    files = [engine_dir / rank_file(r) for r in range(cfg.world_size)] + [engine_dir / TOKENIZER_DIR]
    if not all(f.exists() for f in files):
        log.warning("%s is missing files; rebuilding", engine_dir)
        return None
    return cfg.inputs_digest


def write_python_engine(target: Path, config: EngineConfig, shards: dict[int, dict[str, torch.Tensor]],
                        tokenizer: Any, on_step: Callable[[str], None] | None = None) -> None:
    """Write shards, tokenizer and config into a staging dir and move it to `target` atomically."""
    from safetensors.torch import save_file

    step = on_step or (lambda _desc: None)
    metadata = {"role": config.role.value, "tp": str(config.tp), "pp": str(config.pp),
                "fingerprint": config.fingerprint}
    with staged_dir(target) as tmp:
        for rank in sorted(shards):
            path = tmp / rank_file(rank)
            save_file(shards[rank], str(path), metadata={**metadata, "rank": str(rank)})
            os.chmod(path, 0o644)  # safetensors writes 0600; Triton may run as another user
            step(f"rank {rank} of {config.world_size}")
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        (tmp / CONFIG_FILE).write_text(config.to_json())
        step("tokenizer + config")
