"""The prefix cache's block lifecycle: free → in use → cached → reused or evicted, and every block accounted
for at each step; evictions only when an allocation needs the space, leaves before their parents."""

from __future__ import annotations

from trt_disagg.engine.block_pool import BlockPool
from trt_disagg.engine.prefix_cache import PrefixCache
from trt_disagg.kv_events import KVEventKind

TPB = 4


def make_cache(num_blocks: int = 8, enabled: bool = True) -> PrefixCache:
    return PrefixCache(BlockPool(num_blocks, TPB), b"salt", enabled)


def assert_accounted(cache: PrefixCache) -> None:
    acc = cache.accounting()
    assert acc.in_use + acc.cached + acc.free == acc.total
    assert acc.in_use >= 0 and acc.cached >= 0 and acc.free >= 0


def run_sequence(cache: PrefixCache, tokens: list[int], num_blocks: int | None = None) -> list[int]:
    """Reserve, 'compute' and release one sequence of `tokens`; returns its block table."""
    hashes = cache.hashes(tokens)
    n = num_blocks if num_blocks is not None else -(-len(tokens) // TPB)
    res = cache.try_reserve(hashes, n, (len(tokens) - 1) // TPB)
    assert res is not None
    chain = list(res.matched_hashes)
    cache.register(res.block_table, chain, tokens)
    cache.release(res.block_table)
    assert_accounted(cache)
    return res.block_table


def test_a_released_sequence_leaves_its_full_blocks_cached_and_a_later_prompt_reuses_them() -> None:
    cache = make_cache()
    first = list(range(1, 11))  # 2 full blocks + a partial one
    table = run_sequence(cache, first)
    acc = cache.accounting()
    assert (acc.in_use, acc.cached, acc.free) == (0, 2, 6)  # the partial block went back to the free list
    stored = cache.drain_changes()
    assert [c.kind for c in stored] == [KVEventKind.STORED]
    assert stored[0].blocks == tuple(cache.hashes(first)) and stored[0].parent is None

    second = first[:8] + [99, 98, 97]  # shares the 2 full blocks, not the partial one
    res = cache.try_reserve(cache.hashes(second), 3, (len(second) - 1) // TPB)
    assert res is not None and res.block_table[:2] == table[:2] and res.num_matched_tokens == 8
    assert cache.accounting().in_use == 3 and cache.accounting().cached == 0
    cache.release(res.block_table)
    assert_accounted(cache)


def test_a_fully_cached_prompt_still_computes_its_last_block() -> None:
    cache = make_cache()
    tokens = list(range(1, 9))  # exactly 2 blocks
    run_sequence(cache, tokens)
    res = cache.try_reserve(cache.hashes(tokens), 2, (len(tokens) - 1) // TPB)
    assert res is not None and res.num_matched_tokens == 4  # the last token must be computed for its logits
    cache.release(res.block_table)
    assert_accounted(cache)


def test_eviction_happens_only_when_the_pool_needs_space_and_takes_the_oldest_leaves_first() -> None:
    cache = make_cache(num_blocks=6)
    a = list(range(1, 13))  # 3 blocks
    run_sequence(cache, a + [0])  # 3 cached + partial freed
    cache.drain_changes()
    b = list(range(100, 108))  # 2 blocks: fits in the 3 free ones, nothing evicted
    run_sequence(cache, b + [0])
    assert not [c for c in cache.drain_changes() if c.kind is KVEventKind.REMOVED]
    assert cache.accounting().cached == 5
    # A sequence needing all 6 blocks: every cached block must go, none is refused.
    res = cache.try_reserve([], 6, 0)
    assert res is not None
    removed = [h for c in cache.drain_changes() if c.kind is KVEventKind.REMOVED for h in c.blocks]
    ha, hb = cache.hashes(a), cache.hashes(b)
    assert removed[:3] == [ha[2], ha[1], ha[0]]  # a's chain went first (released first), leaf first
    assert sorted(removed) == sorted(ha + hb)
    assert cache.cached_hashes() == []
    cache.release(res.block_table)
    assert_accounted(cache)


def test_a_reservation_that_does_not_fit_changes_nothing() -> None:
    cache = make_cache(num_blocks=4)
    run_sequence(cache, list(range(1, 9)) + [0])
    before = cache.accounting()
    held = cache.try_reserve([], 3, 0)
    assert held is not None  # 2 free + evicting 1 of the 2 cached
    assert cache.try_reserve(cache.hashes(list(range(1, 9))), 3, 1) is None
    assert cache.accounting().in_use == 3
    cache.release(held.block_table)
    assert cache.accounting().total == before.total
    assert_accounted(cache)


def test_blocks_shared_by_two_sequences_are_cached_only_after_both_release() -> None:
    cache = make_cache()
    tokens = list(range(1, 10))
    run_sequence(cache, tokens)
    r1 = cache.try_reserve(cache.hashes(tokens), 3, 2)
    r2 = cache.try_reserve(cache.hashes(tokens), 3, 2)
    assert r1 is not None and r2 is not None and r1.block_table[:2] == r2.block_table[:2]
    cache.release(r1.block_table)
    assert cache.accounting().cached == 0  # r2 still holds the shared two
    cache.release(r2.block_table)
    assert cache.accounting().cached == 2
    assert_accounted(cache)


def test_a_block_computed_twice_is_registered_once() -> None:
    cache = make_cache()
    tokens = list(range(1, 9)) + [0]
    r1 = cache.try_reserve(cache.hashes(tokens), 3, 2)
    r2 = cache.try_reserve(cache.hashes(tokens), 3, 2)
    assert r1 is not None and r2 is not None and set(r1.block_table).isdisjoint(r2.block_table)
    for r in (r1, r2):
        cache.register(r.block_table, list(r.matched_hashes), tokens)
    stored = [h for c in cache.drain_changes() for h in c.blocks]
    assert stored == cache.hashes(tokens)  # once, from the first
    cache.release(r1.block_table)
    cache.release(r2.block_table)
    assert cache.accounting().cached == 2 and cache.accounting().free == 6


def test_disabled_reuse_never_caches() -> None:
    cache = make_cache(enabled=False)
    run_sequence(cache, list(range(1, 10)))
    assert cache.accounting().free == 8 and cache.drain_changes() == [] and cache.cached_hashes() == []
