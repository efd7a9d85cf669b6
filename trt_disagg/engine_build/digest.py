"""The inputs digest of one engine: equal digest -> the engine on disk is what a build would write again.

It covers everything the build reads: the source (file digests, or the tiny seed), the weight dtype, the
role's engine-relevant fields (parallelism, limits, KV cache shape, threads) and the format versions.
Deliberately NOT covered: fields that only matter at serve time (num_instances, urls, the cache
transceiver, free_gpu_memory_fraction, gpu), so changing them does not trigger a rebuild.
"""

from __future__ import annotations

import hashlib
import json

from trt_disagg.config import ModelSource, ServerGroup
from trt_disagg.contract import Role
from trt_disagg.engine.weights import source_digest
from trt_disagg.engine_dir import ENGINE_FORMAT_VERSION

# Bump when the builder writes something different for the same inputs (sharding, file names, ...).
BUILDER_VERSION = 1

ENGINE_FIELDS = ("backend", "tensor_parallel_size", "pipeline_parallel_size", "max_batch_size",
                 "max_input_len", "max_seq_len", "max_num_tokens", "threads_per_instance")
# Every KV field the python builder writes into the engine's config.json: the engine reads block reuse from
# there, so a deployment that turns reuse off must get an engine that has it off.
KV_FIELDS = ("dtype", "tokens_per_block", "max_tokens", "enable_block_reuse")


def engine_fields(group: ServerGroup) -> dict:
    fields = {name: getattr(group, name) for name in ENGINE_FIELDS}
    fields["kv_cache_config"] = {name: getattr(group.kv_cache_config, name) for name in KV_FIELDS}
    return fields


def inputs_digest(source: ModelSource, group: ServerGroup, role: Role, *, source_id: str | None = None,
                  extra: dict | None = None) -> str:
    """sha256 of the build inputs; `source_id` skips re-hashing when the caller already has it."""
    payload = {
        "engine_format_version": ENGINE_FORMAT_VERSION,
        "builder_version": BUILDER_VERSION,
        "role": role.value,
        "source": {
            "kind": source.source,
            "id": source_id if source_id is not None else source_digest(source),
            "dtype": source.dtype,
            "hf_model_name": source.hf_model_name,
        },
        "group": engine_fields(group),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
