"""Retiring one instance without losing a request: drain, wait until idle, deregister, (stop), clear.

    drain mark (trtd:drain:<id>)      every router stops sending it new work at its next refresh (~0.2 s)
    wait until idle                   its published load (queued prompt tokens, running sequences, KV
                                      hand-offs not yet pulled) and every router's outstanding work on it
                                      are all zero, continuously for `settle_s` (a router that picked it
                                      just before the mark was read publishes that work within its refresh)
                                      -- or the drain deadline passes: what is still in flight fails over
                                      through the router's continuation when the process stops
    deregister                        removal mark (the heartbeat respects it) + out of its role set
    (the caller stops the process)
    clear                             drain, removal, registration, load and KV-snapshot keys

Synchronous (redis-py): `LocalCluster` calls it from the actuator's worker thread. The keys are
`trt_disagg.keys`; the same steps an operator takes through the router's /admin routes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from trt_disagg.contract import Role, decode_load
from trt_disagg.keys import (
    ROUTERS_KEY,
    as_text,
    drain_key,
    instance_key,
    kv_snapshot_key,
    load_key,
    removed_key,
    role_set_key,
    router_inflight_key,
)

POLL_S = 0.1
SETTLE_S = 1.0  # > a router's refresh (0.2 s) + an instance's load heartbeat (0.5 s)
ROUTER_RECENT_S = 10.0  # routers that published within this long count (a dead one's leases expire anyway)


@dataclass(frozen=True)
class DrainResult:
    """How a drain ended: idle (nothing lost) or cut at the deadline (in-flight work failed over)."""

    idle: bool
    waited_s: float
    in_flight: str  # what was still there at the deadline ("" when idle)


def in_flight(client: Any, instance_id: str) -> str:
    """What is still in flight on an instance, in words; "" when nothing is."""
    parts = []
    raw = client.get(load_key(instance_id))
    if raw is not None:
        load = decode_load(raw)
        if load.queued_prompt_tokens or load.running_sequences or load.pending_kv_handoffs:
            parts.append(f"{load.queued_prompt_tokens} queued prompt tokens, {load.running_sequences} running "
                         f"sequences, {load.pending_kv_handoffs} KV hand-offs not yet pulled")
    routers = client.zrangebyscore(ROUTERS_KEY, time.time() - ROUTER_RECENT_S, "+inf")
    for router in routers:
        entry = client.hget(router_inflight_key(as_text(router)), instance_id)
        if entry is None:
            continue
        prompt_tokens, sequences = json.loads(entry)
        if prompt_tokens or sequences:
            parts.append(f"router {as_text(router)}: {sequences} sequences, {prompt_tokens} prompt tokens outstanding")
    return "; ".join(parts)


def drain(client: Any, instance_id: str, timeout_s: float, abort: threading.Event | None = None,
          settle_s: float = SETTLE_S) -> DrainResult:
    """Mark the instance drained and wait until it is idle for `settle_s`, or `timeout_s` passes (or `abort`)."""
    client.set(drain_key(instance_id), "1")
    t0 = time.monotonic()
    idle_since: float | None = None
    last = ""
    while True:
        now = time.monotonic()
        last = in_flight(client, instance_id)
        if last:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        if idle_since is not None and now - idle_since >= settle_s and now - t0 >= settle_s:
            return DrainResult(True, now - t0, "")
        if now - t0 >= timeout_s or (abort is not None and abort.is_set()):
            return DrainResult(False, now - t0, last or "not idle long enough to be sure")
        time.sleep(POLL_S)  # polling other processes' published state: there is no event to wait on


def deregister(client: Any, instance_id: str, role: Role) -> None:
    """Out of the registry for good: the removal mark first, so no heartbeat re-adds it in between."""
    pipe = client.pipeline(transaction=True)
    pipe.set(removed_key(instance_id), "1")
    pipe.srem(role_set_key(role), instance_id)
    pipe.delete(instance_key(instance_id), load_key(instance_id))
    pipe.execute()


def clear(client: Any, instance_id: str) -> None:
    """Every key the retired instance left (its process is gone: no heartbeat can write them again)."""
    client.delete(drain_key(instance_id), removed_key(instance_id), instance_key(instance_id),
                  load_key(instance_id), kv_snapshot_key(instance_id))
