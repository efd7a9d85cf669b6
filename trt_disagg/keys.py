"""Every Redis key the project uses, in one place: instances, routers and tools all build them here.

Instances and routers are separate processes (often several of each) that only meet in Redis, so a key
spelled differently on two sides is a silent outage, not an error. This module is the schema; it imports
only the standard library and `trt_disagg.contract`, so the router can use it without the engine.

    key                              type    value                                           written by
    trtd:instance:<id>               STRING  JSON of contract.InstanceInfo, TTL = heartbeat   the instance
    trtd:load:<id>                   STRING  JSON of contract.InstanceLoad, TTL = heartbeat   the instance
    trtd:role:<role>                 SET     instance ids of that role                        the instance
                                             (prefill | decode | colocated)
    trtd:kv_secret                   STRING  the deployment's KV-handle HMAC secret (hex),    first instance;
                                             set once (SET NX)                                every beat (NX)
    trtd:req:<id>                    HASH    state, router, model, path, prompt_tokens,       the router
                                             output_tokens, instance ids, created_at,
                                             t_<STATE> (first entry into each state), error
    trtd:req:<id>:events             LIST    JSON {"state", "ts", ...fields} per transition   the router
    trtd:req:<id>:handle             STRING  context_phase_params of the prefill leg,         the router
                                             TTL = handle_ttl_s
    trtd:router:<rid>:active         ZSET    unfinished request ids owned by router <rid>     the router
                                             (score: created_at)
    trtd:drain:<id>                  STRING  "1": the instance takes no new work              /admin
    trtd:removed:<id>                STRING  "1": removed by an operator; its heartbeat no    /admin (set),
                                             longer re-registers it until it restarts         the instance
                                                                                              (clears on start)
    trtd:router_inflight:<rid>       HASH    instance id -> outstanding work router <rid>     the router
                                             sent there (JSON), TTL = publish ttl
    trtd:routers                     ZSET    router ids, score: last publish (unix seconds)   the router
    trtd:kv_events                   STREAM  KV cache events, field e = JSON                  the instances
                                             (trt_disagg.kv_events), bounded (MAXLEN ~)
    trtd:kv_snapshot:<id>            STRING  an instance's reusable blocks as one "stored"    the instance
                                             event JSON, with the seq it is current to
    trtd:finished                    STREAM  one entry per request that reached a terminal    the router
                                             state: s state, t0 received, t1 first token (''
                                             if none), t2 end (unix s), p prompt tokens,
                                             o output tokens; bounded (MAXLEN ~ FINISHED_MAXLEN)
    trtd:autoscale:decisions         STREAM  autoscaler decisions, field d = JSON (observed    the autoscaler
                                             workload, predicted attainment, action, reason),
                                             bounded (MAXLEN ~ DECISIONS_MAXLEN)

Instance keys expire with the heartbeat: a crashed instance disappears after its TTL, and readers treat a
role-set member whose instance key is gone as dead (and prune it). Every heartbeat re-asserts the instance's
role-set membership, info, load and the KV secret, so an instance that was paused past its TTL, or a Redis
that restarted empty, is repopulated by the next beat; only a removal mark keeps a live instance out. Request records expire
after the request timeout plus retention even when their router never comes back.
"""

from __future__ import annotations

from trt_disagg.contract import Role

KEY_PREFIX = "trtd:"
KV_SECRET_KEY = f"{KEY_PREFIX}kv_secret"
ROUTERS_KEY = f"{KEY_PREFIX}routers"
FINISHED_MAXLEN = 20000  # finished-request summaries kept: minutes of traffic at hundreds of requests/s
DECISIONS_MAXLEN = 1000


def instance_key(instance_id: str) -> str:
    """An instance's InstanceInfo JSON."""
    return f"{KEY_PREFIX}instance:{instance_id}"


def load_key(instance_id: str) -> str:
    """An instance's latest InstanceLoad JSON."""
    return f"{KEY_PREFIX}load:{instance_id}"


def role_set_key(role: Role | str) -> str:
    """The set of instance ids serving `role`."""
    return f"{KEY_PREFIX}role:{Role(role).value}"


def record_key(request_id: str) -> str:
    """A request's record (hash)."""
    return f"{KEY_PREFIX}req:{request_id}"


def events_key(request_id: str) -> str:
    """A request's event log (list)."""
    return f"{KEY_PREFIX}req:{request_id}:events"


def handle_key(request_id: str) -> str:
    """The KV handle of a request's prefill leg."""
    return f"{KEY_PREFIX}req:{request_id}:handle"


def active_key(router_id: str) -> str:
    """The unfinished requests a router owns."""
    return f"{KEY_PREFIX}router:{router_id}:active"


def drain_key(instance_id: str) -> str:
    """Present while an instance is drained (takes no new work)."""
    return f"{KEY_PREFIX}drain:{instance_id}"


def removed_key(instance_id: str) -> str:
    """Present while an operator's removal keeps a running instance out of its role set (until it restarts)."""
    return f"{KEY_PREFIX}removed:{instance_id}"


def router_inflight_key(router_id: str) -> str:
    """What a router has outstanding on each instance, for the other routers."""
    return f"{KEY_PREFIX}router_inflight:{router_id}"


def as_text(v: str | bytes) -> str:
    """A Redis reply as text: clients return bytes unless made with decode_responses, and code here must
    work with either."""
    return v.decode() if isinstance(v, bytes) else v


def kv_events_key() -> str:
    """The deployment's stream of KV cache events (trt_disagg.kv_events)."""
    return f"{KEY_PREFIX}kv_events"


def kv_snapshot_key(instance_id: str) -> str:
    """An instance's reusable blocks, as of a given event seq (a late router starts from it)."""
    return f"{KEY_PREFIX}kv_snapshot:{instance_id}"


def finished_key() -> str:
    """The bounded stream of finished-request summaries (what the autoscaler reads as the workload)."""
    return f"{KEY_PREFIX}finished"


def autoscale_decisions_key() -> str:
    """The bounded stream of autoscaler decisions, each with its reason."""
    return f"{KEY_PREFIX}autoscale:decisions"
