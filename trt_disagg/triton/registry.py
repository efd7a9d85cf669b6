"""The instance side of the registry in Redis: register, heartbeat, deregister, and the KV secret.

The keys (and their TTLs) are `trt_disagg.keys`; the JSON is the contract's codec; readers are
`trt_disagg.registry_read`. An instance registers itself (`Registrar.start`), refreshes its info and load
keys every `interval_s` (the heartbeat is the refresh: a crashed instance disappears after `ttl_s`), and
deregisters on stop. Readers treat a role-set member whose instance key has expired as gone and prune it.

Membership heals itself: every beat re-asserts everything the instance owns (role-set member, info, load,
and the deployment's KV secret with SET NX), so an instance that was paused past its TTL (readers pruned
it) or a Redis that restarted empty is whole again after one beat, with no manual step. The one thing a
beat respects is an operator's removal mark (`keys.removed_key`): while it exists the beat writes nothing
(one Lua script, so a removal can never interleave with a half-written beat); `start` clears it, so a
removed instance comes back exactly when it restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from trt_disagg.contract import InstanceInfo, InstanceLoad, encode_info, encode_load
from trt_disagg.keys import KV_SECRET_KEY, as_text, instance_key, load_key, removed_key, role_set_key

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 5.0
DEFAULT_INTERVAL_S = 0.5

# KEYS: removal mark, instance, load, role set, KV secret.  ARGV: id, info JSON, load JSON, TTL ms, secret hex
# ("" when the instance has none to assert). Returns 0: removed (nothing written), 1: registered,
# 2: registered, but the deployment's secret is not this instance's (its handles will be refused).
_BEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[5] == '' then return 1 end
redis.call('SET', KEYS[5], ARGV[5], 'NX')
if redis.call('GET', KEYS[5]) == ARGV[5] then return 1 end
return 2
"""


# ---- sync writer (instance side) ----------------------------------------------------------------------


def get_or_create_secret(client: Any, candidate_hex: str) -> str:
    """The deployment's KV secret: the first caller's candidate wins (SET NX), later ones read it."""
    client.set(KV_SECRET_KEY, candidate_hex, nx=True)
    return as_text(client.get(KV_SECRET_KEY))


class Registrar:
    """Registers one instance, heartbeats its info and load with a TTL, deregisters on stop.

    `load_fn` is called from the heartbeat thread; it must be thread-safe and cheap. `secret_hex` is the KV
    secret this instance signs and verifies handles with: each beat puts it back (SET NX) after a Redis
    restart, so an instance that joins later adopts it instead of minting a different one.
    """

    def __init__(self, client: Any, info: InstanceInfo, load_fn: Callable[[], InstanceLoad],
                 ttl_s: float = DEFAULT_TTL_S, interval_s: float = DEFAULT_INTERVAL_S,
                 secret_hex: str | None = None) -> None:
        if interval_s >= ttl_s:
            raise ValueError(f"heartbeat interval_s ({interval_s}) must be < ttl_s ({ttl_s})")
        self._client = client
        self.info = info
        self._load_fn = load_fn
        self._ttl_ms = int(ttl_s * 1000)
        self._interval_s = interval_s
        self._secret_hex = secret_hex or ""
        # No I/O here: redis-py loads the script on first use, and again after a Redis restart forgot it.
        self._beat_script = client.register_script(_BEAT_LUA)
        self._last_outcome = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Clear an operator's removal mark (this is the restart it waited for), register, start beating."""
        self._client.delete(removed_key(self.info.instance_id))
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"registrar-{self.info.instance_id}",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> bool:
        """Re-assert membership, info, load and the KV secret now (also called by the thread every
        interval_s); False while an operator's removal keeps this instance out."""
        iid = self.info.instance_id
        outcome = int(self._beat_script(
            keys=[removed_key(iid), instance_key(iid), load_key(iid), role_set_key(self.info.role), KV_SECRET_KEY],
            args=[iid, encode_info(self.info), encode_load(self._load_fn()), self._ttl_ms, self._secret_hex]))
        if outcome != self._last_outcome:
            if outcome == 0:
                log.warning("%s was removed by an operator: not re-registering until it restarts", iid)
            elif outcome == 2:
                log.error("%s: the deployment's KV secret in Redis is not this instance's; its KV handles "
                          "will be refused (set TRT_DISAGG_KV_SECRET on every instance)", iid)
            self._last_outcome = outcome
        return outcome != 0

    def _run(self) -> None:
        failing = False  # log an outage once when it starts and once when it ends, not every beat
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except Exception as exc:  # a Redis outage must not kill the instance: the next beat heals
                if not failing:
                    log.warning("heartbeat of %s failed (%s); retrying every %.1fs", self.info.instance_id,
                                exc, self._interval_s)
                failing = True
                continue
            if failing:
                log.warning("heartbeat of %s restored: registry entries re-asserted", self.info.instance_id)
                failing = False

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
