"""Where a request goes when instances cache prefixes: one router per `Routing` policy (`make_router`), as
the router process routes (router/dispatch.py LeastLoaded, router/kv_routing.py KVAware).

    least_loaded   the router's least-loaded order: a decode or colocated instance with the fewest sequences,
                   then the most free KV in tenths of its pool (a prefill instance: fewest queued prompt
                   tokens); instances that tie take turns. At light load nearly every choice is a tie, so
                   a conversation's turns alternate between instances and find their prefix only where the
                   turns happen to land: the hit rate least_loaded measures.
    kv_aware       least cost = overlap_weight x unmatched prompt tokens + load tokens: Dynamo's KV router
                   scoring (prefill blocks weighted against the blocks already active on the worker). With no
                   hit anywhere it falls back to least-loaded (with its own turns, as the router's does); a
                   loaded instance loses its prefix to an idle one once its load exceeds the prefill it saves.

A candidate is anything with a `load` (tokens), a `least_loaded_key()` and its instance's `cache`; PP
instances share one cache among their lanes, so a match is computed once per cache. A router keeps its
turn counter, so each simulation makes its own (`make_router`) and stays deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

from trt_disagg.sim.prefix_cache import BlockCache
from trt_disagg.sim.spec import PrefixReuse, Routing


class Candidate(Protocol):
    cache: BlockCache

    @property
    def load(self) -> int: ...

    def least_loaded_key(self) -> tuple[int, ...]: ...


Router = Callable[[Sequence[Candidate], list[int], int, int, PrefixReuse], tuple[Candidate, int]]


class LeastLoaded:
    """The least-loaded candidate by the router's key; ties take turns (one counter step per choice)."""

    def __init__(self) -> None:
        self._turns = itertools.count()

    def __call__(self, candidates: Sequence[Candidate], names: list[int], max_blocks: int, prompt_tokens: int,
                 reuse: PrefixReuse) -> tuple[Candidate, int]:
        """(the chosen candidate, the tokens it would match)."""
        keys = [c.least_loaded_key() for c in candidates]
        least = min(keys)
        tied = [c for c, k in zip(candidates, keys, strict=True) if k == least]
        best = tied[next(self._turns) % len(tied)]
        return best, best.cache.match(names, max_blocks) * reuse.tokens_per_block


class KVAware:
    """The candidate of least overlap-weighted cost; least-loaded when no candidate holds any of the prompt."""

    def __init__(self) -> None:
        self._fallback = LeastLoaded()

    def __call__(self, candidates: Sequence[Candidate], names: list[int], max_blocks: int, prompt_tokens: int,
                 reuse: PrefixReuse) -> tuple[Candidate, int]:
        """(the chosen candidate, the tokens it would match)."""
        matched_by_cache: dict[int, int] = {}
        best, best_cost, best_matched = candidates[0], float("inf"), 0
        for c in candidates:
            key = id(c.cache)
            matched = matched_by_cache.get(key)
            if matched is None:
                matched = matched_by_cache[key] = c.cache.match(names, max_blocks) * reuse.tokens_per_block
            cost = reuse.overlap_weight * (prompt_tokens - matched) + c.load
            if cost < best_cost:
                best, best_cost, best_matched = c, cost, matched
        if not any(matched_by_cache.values()):
            return self._fallback(candidates, names, max_blocks, prompt_tokens, reuse)
        return best, best_matched


ROUTER_CLASSES: dict[Routing, Callable[[], Router]] = {Routing.LEAST_LOADED: LeastLoaded, Routing.KV_AWARE: KVAware}


def make_router(routing: Routing) -> Router:
    """A fresh router of the policy (its own turn counter)."""
    return ROUTER_CLASSES[Routing(routing)]()
