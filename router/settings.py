"""Router settings: environment variables `TRT_DISAGG_ROUTER_*`, or built from a deployment config.

Served to routes by `deps.get_settings` (through `Depends`), so tests override them with
`app.dependency_overrides`; nothing reads the environment at import time.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trt_disagg.config import Deployment


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRT_DISAGG_ROUTER_", frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis or Valkey holding the "
                           "instance registry and the request records")
    router_id: str = Field(default="", description="owner of this router's request records; stable across "
                           "restarts so a restarted router settles its unfinished requests (default host:port; "
                           "env TRT_DISAGG_ROUTER_ROUTER_ID gives a router an identity that survives a new port)")
    served_model_name: str = Field(default="default", description="the `model` clients must name")
    engine_dir: Path | None = Field(default=None, description="an engine directory: its tokenizer/ and limits")
    policy: str = Field(default="least_loaded", description="dispatch policy: least_loaded | round_robin | "
                        "kv_aware (prefix overlap against load, fed by the instances' KV events)")
    kv_overlap_score_weight: float = Field(default=1.0, ge=0, description="kv_aware: weight of the prompt "
                                           "tokens an instance would still have to prefill")
    kv_load_weight: float = Field(default=1.0, ge=0, description="kv_aware: weight of an instance's queued "
                                  "prompt tokens and KV tokens in use")
    max_local_prefill_length: int = Field(default=0, ge=0, description="kv_aware conditional disaggregation: "
                                          "a decode/colocated instance holding all but at most this many prompt "
                                          "tokens prefills them itself (0: never)")
    colocated_threshold_tokens: int = Field(default=0, ge=0, description="conditional disaggregation: "
                                            "prompts shorter than this go to a colocated instance if any")
    max_input_len: int = Field(default=1024, ge=1, description="longest prompt in tokens (engine's limit)")
    max_seq_len: int = Field(default=2048, ge=2, description="prompt + output tokens (engine's limit)")
    max_tokens_default: int = Field(default=16, ge=1)
    max_body_bytes: int = Field(default=16 << 20, ge=1024, description="largest request body (413 above it, "
                                "refused before it is read)")
    max_chars_per_token: int = Field(default=32, ge=1, description="a prompt with more than max_input_len x this "
                                     "many characters is refused (400) before it is tokenized")
    max_queued_requests: int = Field(default=256, ge=1, description="unfinished requests this router holds "
                                     "before it answers 429")
    max_queued_prompt_tokens: int = Field(default=65536, ge=1, description="a prefill instance with more "
                                          "outstanding prompt tokens takes no new request")
    retry_after_s: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    prefill_timeout_s: float = Field(default=60.0, gt=0)
    retention_s: float = Field(default=3600.0, gt=0, description="how long finished records stay in Redis")
    handle_ttl_s: float = Field(default=60.0, gt=0, description="TTL of the stored context_phase_params")
    kv_release_timeout_s: float = Field(default=2.0, gt=0, description="how long giving back the KV of a "
                                        "request that ended before its decode may take (then its TTL frees it)")
    max_prefill_retries: int = Field(default=2, ge=0)
    max_decode_retries: int = Field(default=2, ge=0, description="decode legs lost mid-stream that are "
                                    "continued on another instance")
    leg_inactivity_timeout_s: float = Field(default=10.0, gt=0, description="a decode or colocated leg with no "
                                            "token for this long is lost (a hung instance): it continues on "
                                            "another instance")
    instance_lost_after_s: float = Field(default=2.0, gt=0, description="an instance missing from the registry "
                                         "this long (its heartbeat expired) has its legs moved elsewhere; "
                                         "longer than a heartbeat, so a Redis restart moves nothing")
    record_retry_s: float = Field(default=60.0, ge=0, description="a record write that cannot reach Redis is "
                                  "retried this long (the record catches up after a short outage)")
    record_wait_s: float = Field(default=2.0, gt=0, description="how long the end of a request waits for its "
                                 "record before the response completes anyway")
    admission_target_s: float | None = Field(default=None, gt=0, description="refuse (429) a request whose "
                                             "estimated queueing wait exceeds this; default request_timeout_s "
                                             "(serve sets the deployment's TTFT SLO with router.admission: ttft)")
    admission_window_s: float = Field(default=10.0, gt=0, description="the window over which each pool's "
                                      "prefill rate is measured for admission")
    drain_timeout_s: float = Field(default=10.0, gt=0, description="on SIGTERM: how long requests in flight may "
                                   "take to finish before they end with a shutting_down error")
    shutdown_timeout_s: float = Field(default=5.0, gt=0, description="how long each shutdown step (stopping "
                                      "background tasks, closing channels and Redis) may take before it is "
                                      "abandoned with a warning")
    refresh_interval_s: float = Field(default=0.2, gt=0, description="how often the instance view and "
                                      "the shared load are re-read from Redis")
    admin_token: SecretStr | None = Field(default=None, description="bearer token of /admin; unset: disabled")
    end_id: int | None = Field(default=None, description="end token; default: the tokenizer's eos")

    @model_validator(mode="after")
    def _defaults(self) -> RouterSettings:
        if not self.router_id:
            object.__setattr__(self, "router_id", f"{socket.gethostname()}:{self.port}")
        if self.max_input_len >= self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) must be < max_seq_len ({self.max_seq_len})")
        return self

    @classmethod
    def from_deployment(cls, dep: Deployment, redis_url: str, **overrides: object) -> RouterSettings:
        """Settings for the router of `dep` (what `trt-disagg serve` uses)."""
        groups = list(dep.groups().values())
        values: dict[str, object] = {
            "host": dep.router.host,
            "port": dep.router.port,
            "redis_url": redis_url,
            "served_model_name": dep.name,
            "policy": dep.router.policy,
            "colocated_threshold_tokens": dep.router.colocated_threshold_tokens,
            "kv_overlap_score_weight": dep.router.kv_overlap_score_weight,
            "kv_load_weight": dep.router.kv_load_weight,
            "max_local_prefill_length": dep.router.max_local_prefill_length,
            "max_queued_requests": dep.router.max_queued_requests,
            "request_timeout_s": dep.router.request_timeout_s,
            "retention_s": dep.router.retention_s,
            "max_prefill_retries": dep.router.max_prefill_retries,
            # a leg is hung when it misses many decode steps' worth of tokens; never below a few seconds,
            # which a KV pull or a long prefill ahead of it in a colocated batch can take
            "leg_inactivity_timeout_s": max(5.0, 50 * dep.slo.tpot_s),
            "admission_target_s": dep.slo.ttft_s if dep.router.admission == "ttft" else None,
            "max_input_len": min(g.max_input_len for g in groups),
            "max_seq_len": min(g.max_seq_len for g in groups),
            "engine_dir": dep.engine_dir(next(iter(dep.groups()))),
        }
        values.update(overrides)
        return cls.model_validate(values)
