"""KV-aware routing (`router.policy: kv_aware`, TensorRT-LLM's and Dynamo's name): send a prompt where its
prefix is already cached, unless that instance is too busy, and skip disaggregation when it pays.

    prompt ─▶ KVIndex.matched_tokens(instance, prompt) per candidate (one hash chain per model)
           ─▶ cost = kv_overlap_score_weight · (prompt − matched)             tokens left to prefill
                   + kv_load_weight · (queued prompt tokens + KV tokens in use)  what it is already doing
           ─▶ the cheapest; least-loaded instead when no candidate has a hit or the cheapest cannot take
              the request now (its free KV is smaller than what the request still needs)

This is Dynamo's KV router cost (overlap-weighted prefill blocks + active decode blocks), in tokens.

Conditional disaggregation by overlap (TensorRT-LLM's `max_local_prefill_length`): when a decode or
colocated instance holds all but at most `max_local_prefill_length` prompt tokens, that instance prefills
the short suffix itself (context_and_generation): no prefill instance, no KV transfer, and the answer's
blocks stay where the next turn will look for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from router.kv_index import KVEventFollower, KVIndex
from trt_disagg.contract import InstanceInfo, Role

if TYPE_CHECKING:
    from router.dispatch import Candidate, Dispatcher
    from router.metrics import RouterMetrics
    from router.settings import RouterSettings

log = logging.getLogger(__name__)
# the longest an XREAD for KV events blocks: also how long a router stopping may wait for the follower to see it
MAX_BLOCK_S = 0.25


@dataclass(frozen=True)
class PrefixMatch:
    """Where a prompt's longest cached prefix is, and how long it is."""

    instance: InstanceInfo
    role: Role
    matched_tokens: int


def free_kv_tokens(c: Candidate) -> int:
    """KV tokens the candidate can still give a new request (cached blocks nobody holds count as free)."""
    total = c.load.total_kv_blocks
    return c.load.free_kv_blocks * c.info.kv_capacity_tokens // total if total > 0 else c.info.kv_capacity_tokens


class KVAware:
    """A DispatchPolicy: overlap against load; least-loaded when overlap says nothing or the best is full."""

    def __init__(self, kv_overlap_score_weight: float = 1.0, kv_load_weight: float = 1.0) -> None:
        from router.dispatch import LeastLoaded  # dispatch registers this class: import it late

        self.overlap_weight = kv_overlap_score_weight
        self.load_weight = kv_load_weight
        self._fallback = LeastLoaded()

    def cost(self, c: Candidate) -> float:
        used_kv_tokens = c.info.kv_capacity_tokens - free_kv_tokens(c)
        return (self.overlap_weight * (c.prompt_tokens - c.matched_tokens)
                + self.load_weight * (c.queued_prompt_tokens + used_kv_tokens))

    def choose(self, role: Role, candidates: Sequence[Candidate]) -> Candidate | None:
        if not candidates:
            return None
        if not any(c.matched_tokens for c in candidates):
            return self._fallback.choose(role, candidates)
        best = min(candidates, key=lambda c: (self.cost(c), -c.matched_tokens, c.info.instance_id))
        if free_kv_tokens(best) < best.prompt_tokens - best.matched_tokens:  # it cannot take it now
            return self._fallback.choose(role, candidates)
        return best


class KVRouting:
    """The router's prefix knowledge: annotates candidates with their overlap and finds local prefills."""

    def __init__(self, index: KVIndex, max_local_prefill_length: int = 0, route_by_overlap: bool = True) -> None:
        self.index = index
        self.max_local_prefill_length = max_local_prefill_length
        # False (policy least_loaded / round_robin): the index only measures (hit-rate metrics, records)
        self.route_by_overlap = route_by_overlap

    def annotate(self, candidates: list[Candidate], prompt_ids: Sequence[int]) -> list[Candidate]:
        memo: dict[tuple[str, int], list[int]] = {}
        return [replace(c, prompt_tokens=len(prompt_ids),
                        matched_tokens=self.index.matched_tokens(c.info, prompt_ids, memo)) for c in candidates]

    def local_target(self, dispatcher: Dispatcher, prompt_ids: Sequence[int],
                     exclude: frozenset[str] = frozenset()) -> PrefixMatch | None:
        """The decode or colocated instance that should prefill this prompt itself, or None."""
        if not self.route_by_overlap or self.max_local_prefill_length <= 0:
            return None
        best: PrefixMatch | None = None
        for role in (Role.DECODE, Role.COLOCATED):
            for c in self.annotate(dispatcher.candidates(role, exclude), prompt_ids):
                suffix = c.prompt_tokens - c.matched_tokens
                if (c.matched_tokens and suffix <= self.max_local_prefill_length
                        and free_kv_tokens(c) >= suffix
                        and (best is None or c.matched_tokens > best.matched_tokens)):
                    best = PrefixMatch(c.info, role, c.matched_tokens)
        return best

    def matched_on(self, info: InstanceInfo, prompt_ids: Sequence[int]) -> int:
        return self.index.matched_tokens(info, prompt_ids)


def policy_options(settings: RouterSettings) -> dict[str, float]:
    """The weights `make_policy` passes to kv_aware (the other policies take none)."""
    if settings.policy != "kv_aware":
        return {}
    return {"kv_overlap_score_weight": settings.kv_overlap_score_weight, "kv_load_weight": settings.kv_load_weight}


def attach(dispatcher: Dispatcher, redis: Any, settings: RouterSettings, metrics: RouterMetrics,
           spawn: Callable[[Coroutine[Any, Any, None]], object], stopping: asyncio.Event) -> KVRouting:
    """Give the dispatcher a block index and start following the KV events (a lifespan task). Every policy
    gets one, so prefix hit rates are measured the same way whatever routes; only kv_aware routes by it."""
    routing = KVRouting(KVIndex(), settings.max_local_prefill_length, route_by_overlap=settings.policy == "kv_aware")
    dispatcher.kv = routing
    spawn(_follow(dispatcher, KVEventFollower(redis, routing.index), metrics, stopping,
                  settings.refresh_interval_s))
    return routing


async def _follow(dispatcher: Dispatcher, follower: KVEventFollower, metrics: RouterMetrics,
                  stopping: asyncio.Event, interval_s: float) -> None:
    """Keep the index in step with the registry and the event stream until the router stops; a Redis
    hiccup is logged and retried. Checks `stopping` itself: redis-py can swallow a cancel that arrives while
    XREAD blocks (the read then runs on to the socket timeout and fails), so each XREAD blocks at most
    MAX_BLOCK_S, and the pause after a failure ends when the router stops."""
    block_ms = max(1, int(min(interval_s, MAX_BLOCK_S) * 1000))
    while not stopping.is_set():
        try:
            await follower.sync([v.info for views in dispatcher.snapshot.instances.values() for v in views])
            await follower.poll(block_ms=block_ms)
            metrics.observe_kv_index(follower.index)
        except asyncio.CancelledError:
            raise
        except Exception:
            if stopping.is_set():
                return  # the failure is the swallowed cancel's
            log.warning("following the KV events failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)
