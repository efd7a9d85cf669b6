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
    policy: str = Field(default="least_loaded", description="dispatch policy: least_loaded | round_robin")
    colocated_threshold_tokens: int = Field(default=0, ge=0, description="conditional disaggregation: "
                                            "prompts shorter than this go to a colocated instance if any")
    max_input_len: int = Field(default=1024, ge=1, description="longest prompt in tokens (engine's limit)")
    max_seq_len: int = Field(default=2048, ge=2, description="prompt + output tokens (engine's limit)")
    max_tokens_default: int = Field(default=16, ge=1)
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
            "max_queued_requests": dep.router.max_queued_requests,
            "request_timeout_s": dep.router.request_timeout_s,
            "retention_s": dep.router.retention_s,
            "max_prefill_retries": dep.router.max_prefill_retries,
            "max_input_len": min(g.max_input_len for g in groups),
            "max_seq_len": min(g.max_seq_len for g in groups),
            "engine_dir": dep.engine_dir(next(iter(dep.groups()))),
        }
        values.update(overrides)
        return cls.model_validate(values)
