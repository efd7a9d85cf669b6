"""Where a request goes when instances cache prefixes: one function per `Routing` policy (`ROUTERS`).

    least_loaded   fewest KV tokens reserved or waiting (the simulator's dispatch without reuse)
    kv_aware       least cost = overlap_weight x unmatched prompt tokens + load tokens: Dynamo's KV router
                   scoring (prefill blocks weighted against the blocks already active on the worker). With no
                   hit anywhere every instance pays the same prompt, so it falls back to least-loaded; a
                   loaded instance loses its prefix to an idle one once its load exceeds the prefill it saves.

A candidate is anything with a `load` (tokens) and its instance's `cache`; PP instances share one cache
among their lanes, so a match is computed once per cache. Ties go to the first candidate, as without reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from trt_disagg.sim.prefix_cache import BlockCache
from trt_disagg.sim.spec import PrefixReuse, Routing


class Candidate(Protocol):
    cache: BlockCache

    @property
    def load(self) -> int: ...


Router = Callable[[Sequence[Candidate], list[int], int, int, PrefixReuse], tuple[Candidate, int]]


def least_loaded(candidates: Sequence[Candidate], names: list[int], max_blocks: int, prompt_tokens: int,
                 reuse: PrefixReuse) -> tuple[Candidate, int]:
    """(the least-loaded candidate, the tokens it would match)."""
    best = min(candidates, key=_load)
    return best, best.cache.match(names, max_blocks) * reuse.tokens_per_block


def kv_aware(candidates: Sequence[Candidate], names: list[int], max_blocks: int, prompt_tokens: int,
             reuse: PrefixReuse) -> tuple[Candidate, int]:
    """(the candidate of least overlap-weighted cost, the tokens it would match)."""
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
    return best, best_matched


def _load(c: Candidate) -> int:
    return c.load


ROUTERS: dict[Routing, Router] = {Routing.LEAST_LOADED: least_loaded, Routing.KV_AWARE: kv_aware}
