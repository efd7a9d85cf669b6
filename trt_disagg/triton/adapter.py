"""Start-up and shut-down of one instance inside Triton's Python backend (model.py stays a thin shell).

Static settings come from the rendered config.pbtxt `parameters` (engine dir, role, transport, TTL...);
per-process ones from the environment `trt-disagg serve` sets (instance id, ports, Redis, the secret):

    TRTD_INSTANCE_ID  TRTD_KV_HOST  TRTD_KV_PORT  TRTD_ADVERTISE_HOST  TRTD_GRPC_URL  TRTD_HTTP_URL
    TRTD_KV_SHM_PREFIX  TRTD_ITERATION_LOG (a JSONL file: one line per engine step)
    REDIS_URL         TRT_DISAGG_KV_SECRET (hex)

Without them (a repository served by hand) the instance still works: ephemeral KV port, no registry, and
a secret from Redis or, failing that, a random one (then only this instance can read its own handles).

Health: a watch thread polls the engine (`Engine.failure`: is every rank process alive?) and the server
(`server_alive`: a stub whose tritonserver was killed must not keep heartbeating a dead gRPC port). When
either fails, the instance deregisters (routers stop picking it at their next refresh), fails what it holds
with an `internal` error naming the cause (routers retry those elsewhere) and calls `on_failure`, which in
Triton makes the server exit: the engine is not restarted in place, its supervisor (`trt-disagg serve`,
or Kubernetes) starts a fresh instance, which registers itself again when ready.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_disagg.contract import InstanceInfo, Role
from trt_disagg.keys import kv_snapshot_key
from trt_disagg.kv.handle import new_secret, secret_from_env
from trt_disagg.kv.transport import make_sender
from trt_disagg.triton.fake_engine import FAKE_PREFIX, FakeEngine
from trt_disagg.triton.instance import Engine, InstanceServer
from trt_disagg.triton.kv_event_publisher import KVEventPublisher
from trt_disagg.triton.registry import Registrar, get_or_create_secret

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.2  # how often the watch thread asks the engine whether every rank is alive
REDIS_TIMEOUT_S = 2.0  # a Redis that hangs (paused, partitioned) must not hang a heartbeat or the stop path


@dataclass(frozen=True)
class InstanceSettings:
    engine_dir: str
    role: Role
    model_name: str
    instance_id: str
    transport: str
    handle_ttl_s: float
    max_pending_tokens: int | None
    threads_per_rank: int | None
    kv_host: str
    kv_port: int
    advertise_host: str
    grpc_url: str
    http_url: str
    redis_url: str | None
    kv_shm_prefix: str | None  # names of this instance's /dev/shm KV segments (serve removes them after a kill)
    iteration_log: str | None = None  # append one JSON line per engine step here
    kv_event_buffer: int = 10000  # kv_cache_config.event_buffer_max_size: the KV event stream's length; 0: none
    device: str = "cpu"  # the group's `device`: where the engine's ranks run (cpu, cuda, cuda:N)

    @classmethod
    def from_model_config(cls, model_config: dict, env: dict[str, str] | None = None) -> InstanceSettings:
        env = dict(os.environ) if env is None else env
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}

        def need(key: str) -> str:
            if not params.get(key):
                raise ValueError(f"model {model_config.get('name')}: parameter {key} is missing in config.pbtxt")
            return params[key]

        role = Role(need("ROLE"))
        pending = params.get("MAX_PENDING_TOKENS", "")
        threads = params.get("THREADS_PER_RANK", "")
        event_buffer = params.get("KV_EVENT_BUFFER_MAX_SIZE", "")
        kv_host = env.get("TRTD_KV_HOST", "127.0.0.1")
        return cls(
            engine_dir=need("ENGINE_DIR"), role=role, model_name=str(model_config.get("name", role.value)),
            instance_id=env.get("TRTD_INSTANCE_ID") or f"{role.value}-{socket.gethostname()}-{os.getpid()}",
            transport=params.get("KV_TRANSPORT") or "auto",
            handle_ttl_s=float(params.get("HANDLE_TTL_S") or 60.0),
            max_pending_tokens=int(pending) if pending else None,
            threads_per_rank=int(threads) if threads else None,
            kv_host=kv_host, kv_port=int(env.get("TRTD_KV_PORT", "0")),
            advertise_host=env.get("TRTD_ADVERTISE_HOST", kv_host),
            grpc_url=env.get("TRTD_GRPC_URL", ""), http_url=env.get("TRTD_HTTP_URL", ""),
            redis_url=env.get("REDIS_URL") or None, kv_shm_prefix=env.get("TRTD_KV_SHM_PREFIX") or None,
            iteration_log=env.get("TRTD_ITERATION_LOG") or None,
            kv_event_buffer=int(event_buffer) if event_buffer else 10000,
            device=params.get("DEVICE") or "cpu",
        )


def load_engine(engine_dir: str, threads_per_rank: int | None, device: str = "cpu") -> Engine:
    """The real engine, or the fake one for ENGINE_DIR "fake:<role>[:tp:pp]" (tests)."""
    if engine_dir.startswith(FAKE_PREFIX):
        return FakeEngine.from_spec(engine_dir)
    from trt_disagg.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_dir(engine_dir, threads_per_rank=threads_per_rank, device=device)


class RunningInstance:
    """Engine + InstanceServer (+ KV server) + Redis registrar + health watch, started and stopped together.

    `on_failure(reason)` is called once, from the watch thread, after the instance has deregistered and
    failed its requests because the engine broke or `server_alive()` said no; the Triton model passes one
    that stops the server, and a check that its tritonserver still runs.
    """

    def __init__(self, settings: InstanceSettings, on_failure: Callable[[str], None] | None = None,
                 server_alive: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        self._redis: Any = None
        self.registrar: Registrar | None = None
        self.kv_events: KVEventPublisher | None = None
        self._on_failure = on_failure
        self._server_alive = server_alive
        self._stopping = threading.Event()
        secret = self._secret()
        engine = load_engine(settings.engine_dir, settings.threads_per_rank, settings.device)
        try:
            sender = None
            if settings.role is Role.PREFILL:
                sender = make_sender(
                    "fake" if settings.transport == "fake" else "tcp", source=engine, secret=secret,
                    instance_id=settings.instance_id, layout=engine.config.kv_layout(), host=settings.kv_host,
                    port=settings.kv_port, advertise_host=settings.advertise_host,
                    handle_ttl_s=settings.handle_ttl_s, max_pending_tokens=settings.max_pending_tokens,
                    shm_prefix=settings.kv_shm_prefix, prewarm_tokens=engine.config.limits.max_input_len)
            self.server = InstanceServer(settings.role, engine, secret, sender=sender,
                                         transport=settings.transport,
                                         iteration_log=Path(settings.iteration_log) if settings.iteration_log else None)
            self.server.start()
            self.kv_url = sender.url if sender is not None else ""
        except Exception:
            engine.shutdown()
            raise
        if self._redis is not None:
            self.registrar = Registrar(self._redis, self.info(), self.server.load, secret_hex=secret.hex())
            self.registrar.start()
            self._start_kv_events(engine)
        self._watch = threading.Thread(target=self._watch_engine, name="engine-health", daemon=True)
        self._watch.start()

    def _start_kv_events(self, engine: Engine) -> None:
        """Publish KV cache events when the engine reuses blocks (after registering: readers index only
        registered instances, and load our snapshot once they see us)."""
        if self.settings.kv_event_buffer <= 0 or not getattr(engine, "block_reuse", False):
            return
        self.kv_events = KVEventPublisher(self._redis, self.settings.instance_id, engine,  # type: ignore[arg-type]
                                          max_stream_len=self.settings.kv_event_buffer)
        self.kv_events.start()

    def _stop_kv_events(self) -> None:
        if self.kv_events is None:
            return
        self.kv_events.stop()
        self.kv_events = None
        try:
            self._redis.delete(kv_snapshot_key(self.settings.instance_id))
        except Exception:
            log.info("could not delete the KV snapshot of %s", self.settings.instance_id, exc_info=True)

    def _watch_engine(self) -> None:
        """Poll engine and server until the instance stops; on a failure deregister, fail requests, report."""
        while not self._stopping.wait(HEALTH_POLL_S):
            reason = self.server.engine.failure()
            if reason is None and self._server_alive is not None and not self._server_alive():
                reason = "its tritonserver is gone"
            if reason is None:
                continue
            log.error("instance %s cannot serve (%s); deregistering and failing its requests",
                      self.settings.instance_id, reason)
            if self.registrar is not None:
                self.registrar.stop()
            self.server.fail_engine(reason)
            if self._on_failure is not None:
                self._on_failure(reason)
            return

    def _secret(self) -> bytes:
        secret = secret_from_env()
        if self.settings.redis_url:
            import redis

            self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                               socket_connect_timeout=REDIS_TIMEOUT_S)
            if secret is None:
                secret = bytes.fromhex(get_or_create_secret(self._redis, new_secret().hex()))
        if secret is None:
            log.warning("no TRT_DISAGG_KV_SECRET and no Redis: KV handles of %s are readable only by itself",
                        self.settings.instance_id)
            secret = new_secret()
        return secret

    def info(self) -> InstanceInfo:
        cfg = self.server.engine.config
        return InstanceInfo(
            instance_id=self.settings.instance_id, role=self.settings.role, host=self.settings.advertise_host,
            grpc_url=self.settings.grpc_url, http_url=self.settings.http_url, kv_url=self.kv_url,
            tp=cfg.tp, pp=cfg.pp, kv_capacity_tokens=int(self.server.engine.kv_capacity_tokens),
            fingerprint=cfg.fingerprint, model_name=self.settings.model_name,
            extra={"transport": self.settings.transport, "backend": "python"})

    def stop(self) -> None:
        """Deregister first (the router stops picking us), then drain and stop everything."""
        self._stopping.set()
        if self._watch is not threading.current_thread():
            self._watch.join(timeout=REDIS_TIMEOUT_S)
        self._stop_kv_events()
        if self.registrar is not None:
            self.registrar.stop()
            self.registrar = None
        self.server.stop()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
