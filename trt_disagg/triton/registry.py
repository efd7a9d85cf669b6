"""The instance registry in Redis: who serves what, where, and how loaded it is.

Key schema (the one place it is written down; the router imports these functions):

    trtd:instance:<id>   STRING  JSON of contract.InstanceInfo            TTL = heartbeat ttl_s
    trtd:load:<id>       STRING  JSON of contract.InstanceLoad            TTL = heartbeat ttl_s
    trtd:role:<role>     SET     instance ids of that role (prefill | decode | colocated)
    trtd:kv_secret       STRING  the deployment's KV-handle HMAC secret (hex), set once (SET NX)

An instance registers itself (`Registrar.start`), refreshes both keys every `interval_s` (the heartbeat
is the refresh: a crashed instance disappears after `ttl_s`), and deregisters on stop. Readers treat a
set member whose instance key has expired as gone and prune it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from trt_disagg.contract import InstanceInfo, InstanceLoad, Role

log = logging.getLogger(__name__)

KEY_PREFIX = "trtd:"
KV_SECRET_KEY = f"{KEY_PREFIX}kv_secret"
DEFAULT_TTL_S = 5.0
DEFAULT_INTERVAL_S = 0.5


def instance_key(instance_id: str) -> str:
    """Key of an instance's InstanceInfo JSON."""
    return f"{KEY_PREFIX}instance:{instance_id}"


def load_key(instance_id: str) -> str:
    """Key of an instance's latest InstanceLoad JSON."""
    return f"{KEY_PREFIX}load:{instance_id}"


def role_set_key(role: Role | str) -> str:
    """Key of the set of instance ids serving `role`."""
    return f"{KEY_PREFIX}role:{Role(role).value}"


def encode_info(info: InstanceInfo) -> str:
    d = asdict(info)
    d["role"] = Role(info.role).value
    return json.dumps(d, sort_keys=True)


def decode_info(raw: str | bytes) -> InstanceInfo:
    d = json.loads(raw)
    d["role"] = Role(d["role"])
    return InstanceInfo(**d)


def encode_load(load: InstanceLoad) -> str:
    return json.dumps(asdict(load), sort_keys=True)


def decode_load(raw: str | bytes) -> InstanceLoad:
    known = InstanceLoad.__dataclass_fields__
    return InstanceLoad(**{k: v for k, v in json.loads(raw).items() if k in known})


# ---- async readers (router side, redis.asyncio) -------------------------------------------------------


async def list_instances(redis: Any, role: Role | str) -> list[InstanceInfo]:
    """Live instances of `role`, sorted by id; members whose heartbeat expired are pruned."""
    ids = sorted(_text(m) for m in await redis.smembers(role_set_key(role)))
    if not ids:
        return []
    raws = await redis.mget([instance_key(i) for i in ids])
    out: list[InstanceInfo] = []
    for instance_id, raw in zip(ids, raws, strict=True):
        if raw is None:
            await redis.srem(role_set_key(role), instance_id)
            continue
        out.append(decode_info(raw))
    return out


async def get_instance(redis: Any, instance_id: str) -> InstanceInfo | None:
    raw = await redis.get(instance_key(instance_id))
    return None if raw is None else decode_info(raw)


async def get_load(redis: Any, instance_id: str) -> InstanceLoad | None:
    """The load an instance last published, or None when it is gone (or never published)."""
    raw = await redis.get(load_key(instance_id))
    return None if raw is None else decode_load(raw)


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


# ---- sync writer (instance side) ----------------------------------------------------------------------


def get_or_create_secret(client: Any, candidate_hex: str) -> str:
    """The deployment's KV secret: the first caller's candidate wins (SET NX), later ones read it."""
    client.set(KV_SECRET_KEY, candidate_hex, nx=True)
    return _text(client.get(KV_SECRET_KEY))


class Registrar:
    """Registers one instance, heartbeats its info and load with a TTL, deregisters on stop.

    `load_fn` is called from the heartbeat thread; it must be thread-safe and cheap.
    """

    def __init__(self, client: Any, info: InstanceInfo, load_fn: Callable[[], InstanceLoad],
                 ttl_s: float = DEFAULT_TTL_S, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s >= ttl_s:
            raise ValueError(f"heartbeat interval_s ({interval_s}) must be < ttl_s ({ttl_s})")
        self._client = client
        self.info = info
        self._load_fn = load_fn
        self._ttl_ms = int(ttl_s * 1000)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.beat()
        self._client.sadd(role_set_key(self.info.role), self.info.instance_id)
        self._thread = threading.Thread(target=self._run, name=f"registrar-{self.info.instance_id}",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Refresh info and load now (also called by the thread every interval_s)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(instance_key(self.info.instance_id), encode_info(self.info), px=self._ttl_ms)
        pipe.set(load_key(self.info.instance_id), encode_load(self._load_fn()), px=self._ttl_ms)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except Exception:  # a Redis hiccup must not kill the instance; the TTL covers long outages
                log.warning("heartbeat of %s failed", self.info.instance_id, exc_info=True)

    def stop(self) -> None:
        """Stop heartbeating and remove this instance; idempotent, tolerates Redis already gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.srem(role_set_key(self.info.role), self.info.instance_id)
            pipe.delete(instance_key(self.info.instance_id), load_key(self.info.instance_id))
            pipe.execute()
        except Exception:
            log.info("could not deregister %s (Redis gone?)", self.info.instance_id, exc_info=True)
