"""The instance side of the registry in Redis: register, heartbeat, deregister, and the KV secret.

The keys (and their TTLs) are `trt_disagg.keys`; the JSON is the contract's codec; readers are
`trt_disagg.registry_read`. An instance registers itself (`Registrar.start`), refreshes its info and load
keys every `interval_s` (the heartbeat is the refresh: a crashed instance disappears after `ttl_s`), and
deregisters on stop. Readers treat a role-set member whose instance key has expired as gone and prune it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from trt_disagg.contract import InstanceInfo, InstanceLoad, encode_info, encode_load
from trt_disagg.keys import KV_SECRET_KEY, as_text, instance_key, load_key, role_set_key

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 5.0
DEFAULT_INTERVAL_S = 0.5


# ---- sync writer (instance side) ----------------------------------------------------------------------


def get_or_create_secret(client: Any, candidate_hex: str) -> str:
    """The deployment's KV secret: the first caller's candidate wins (SET NX), later ones read it."""
    client.set(KV_SECRET_KEY, candidate_hex, nx=True)
    return as_text(client.get(KV_SECRET_KEY))


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
