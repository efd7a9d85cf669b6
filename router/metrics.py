"""Prometheus metrics of one router app, in the app's own registry (no process-global collectors, so two
apps in one process — two routers in a test — never share or clash).

Latency names follow DESIGN.md's definitions: TTFT = first token sent − request received (on a new
connection: when it entered the accept queue, as router/received.py estimates it); TPOT = (t_last −
t_first) / (output_tokens − 1); inter-token latency is each gap; KV hand-off = prefill done → first decode
token (the KV pull and the decode instance's admission).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.accept_queue import AcceptQueue
from router.admission import POOL_ROLE, Admission
from router.dispatch import Snapshot
from router.kv_index import KVIndex

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft_s = Histogram("trtd_router_ttft_seconds", "Time to first token", ["path"],
                                buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot_s = Histogram("trtd_router_tpot_seconds", "Time per output token after the first", ["path"],
                                buckets=_TOKEN_BUCKETS_S, registry=r)
        self.itl_s = Histogram("trtd_router_inter_token_latency_seconds", "Gap between consecutive tokens",
                               ["path"], buckets=_TOKEN_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("trtd_router_request_duration_seconds", "Request received to last token",
                               ["path"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prefill_s = Histogram("trtd_router_prefill_seconds", "Prefill call (context_only) duration",
                                   buckets=_LATENCY_BUCKETS_S, registry=r)
        self.kv_handoff_s = Histogram("trtd_router_kv_handoff_seconds", "Prefill done to first decode token",
                                      buckets=_LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter("trtd_router_requests", "Finished requests", ["path", "outcome"], registry=r)
        self.errors = Counter("trtd_router_errors", "Errors by kind", ["kind"], registry=r)
        self.retries = Counter("trtd_router_retries", "Legs moved to another instance", ["phase"], registry=r)
        self.tokens = Counter("trtd_router_generated_tokens", "Tokens streamed to clients", registry=r)
        self.in_flight = Gauge("trtd_router_in_flight", "Unfinished requests of this router by pool", ["pool"],
                               registry=r)
        self.queued = Gauge("trtd_router_queued", "Requests of this router still waiting for their first token "
                            "(queued at or running on a prefill or colocated instance) by pool", ["pool"],
                            registry=r)
        self.instances = Gauge("trtd_router_instances", "Live (not draining) instances by pool", ["pool"],
                               registry=r)
        self.accept_queue = Gauge("trtd_router_accept_queue_connections", "Connections waiting in the router's "
                                  "listening socket's accept queue (Linux; read at each scrape)", registry=r)
        self.accept_wait_s = Gauge("trtd_router_accept_wait_seconds", "Estimated accept-queue wait of the latest "
                                   "new connection (counted in its TTFT and by admission)", registry=r)
        self.retry_queue_s = Gauge("trtd_router_retry_queue_seconds", "Until the clients this router refused "
                                   "(429) will have had the places their Retry-After gave them", ["pool"],
                                   registry=r)
        self.retry_return_share = Gauge("trtd_router_retry_return_share", "Share of the clients this router "
                                        "refused that came back for their places (it weights the places)",
                                        registry=r)
        self.instance_load = Gauge("trtd_router_instance_load", "Load an instance published",
                                   ["instance", "pool", "field"], registry=r)

        # Prefix reuse (kv_aware): hit rate of a pool = matched / prompt tokens of the requests sent there.
        self.prefix_prompt_tokens = Counter("trtd_router_prefix_prompt_tokens", "Prompt tokens routed, by the "
                                            "pool that prefilled them", ["pool"], registry=r)
        self.prefix_matched_tokens = Counter("trtd_router_prefix_matched_tokens", "Of them, tokens the chosen "
                                             "instance held in its prefix cache (per the block index)", ["pool"],
                                             registry=r)
        self.kv_events = Gauge("trtd_router_kv_events", "KV cache events read, by outcome (applied, stale, gap, "
                               "malformed, forged, unknown_instance, over_capacity, ...)", ["outcome"], registry=r)
        self.kv_index_blocks = Gauge("trtd_router_kv_index_blocks", "Prefix blocks the index holds per instance",
                                     ["instance"], registry=r)

    def observe_prefix(self, pool: str, prompt_tokens: int, matched_tokens: int) -> None:
        self.prefix_prompt_tokens.labels(pool=pool).inc(prompt_tokens)
        self.prefix_matched_tokens.labels(pool=pool).inc(matched_tokens)

    def observe_kv_index(self, index: KVIndex) -> None:
        for outcome, n in index.counts.items():
            self.kv_events.labels(outcome=outcome).set(n)
        self.kv_index_blocks.clear()
        for instance, n in index.num_blocks().items():
            self.kv_index_blocks.labels(instance=instance).set(n)

    def observe_snapshot(self, snap: Snapshot) -> None:
        self.instance_load.clear()
        for role, views in snap.instances.items():
            self.instances.labels(pool=role.value).set(sum(1 for v in views if not v.draining))
            for v in views:
                for name in ("queued_prompt_tokens", "running_sequences", "free_kv_blocks", "pending_kv_handoffs"):
                    self.instance_load.labels(instance=v.info.instance_id, pool=role.value, field=name).set(
                        getattr(v.load, name))

    def observe_accept_queue(self, queue: AcceptQueue) -> None:
        self.accept_queue.set(queue.length())
        self.accept_wait_s.set(queue.last_wait_s)

    def observe_admission(self, admission: Admission) -> None:
        for path in POOL_ROLE:
            self.retry_queue_s.labels(pool=path.value).set(admission.retry_queue_s(path))
        self.retry_return_share.set(admission.returns.share())

    def render(self) -> bytes:
        return generate_latest(self.registry)
