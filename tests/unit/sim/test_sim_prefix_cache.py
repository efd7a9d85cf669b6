"""The simulator's block cache: LRU eviction of released blocks only, shared blocks counted once, and every
block in use, cached or free after each step; block names shared exactly over a conversation's prefix."""

from __future__ import annotations

import numpy as np

from trt_disagg.sim import ConversationLinks
from trt_disagg.sim.prefix_cache import BlockCache, BlockNames


def _check(cache: BlockCache) -> None:
    acc = cache.accounting()
    assert acc.in_use + acc.cached + acc.free == acc.total
    assert acc.free >= 0 and acc.in_use >= len(cache.refs)
    assert not set(cache.refs) & set(cache.lru)
    held: dict[int, int] = {}
    for h in cache.holdings.values():
        for name in h.named:
            held[name] = held.get(name, 0) + 1
    assert held == cache.refs


def test_released_blocks_are_cached_and_evicted_leaf_first_only_when_space_is_needed():
    cache = BlockCache(4)
    assert cache.try_admit(0, [1, 2], 2, 2, force=False) == 0
    cache.name_blocks(0, [1, 2], 2)
    cache.release(0)
    _check(cache)
    assert cache.accounting().cached == 2 and cache.match([1, 2], 2) == 2
    assert cache.try_admit(1, [10, 11], 2, 2, force=False) == 0  # fits in the free blocks: nothing evicted
    assert cache.num_evicted == 0
    _check(cache)
    assert cache.try_admit(2, [20], 1, 1, force=False) == 0  # needs one cached block: the leaf (2) goes
    assert cache.num_evicted == 1 and cache.match([1, 2], 2) == 1
    _check(cache)


def test_blocks_in_use_are_never_evicted_and_a_full_pool_makes_a_request_wait():
    cache = BlockCache(3)
    assert cache.try_admit(0, [1, 2, 3], 3, 3, force=False) == 0
    assert cache.try_admit(1, [7], 1, 1, force=False) is None
    assert cache.try_admit(1, [7], 1, 1, force=True) == 0  # alone on its instance: runs over-committed
    assert cache.accounting().in_use == 4
    cache.release(1)
    cache.release(0)
    assert cache.accounting().in_use == 0


def test_a_shared_prefix_is_held_once_and_cached_when_its_last_holder_ends():
    cache = BlockCache(10)
    cache.try_admit(0, [1, 2, 3], 3, 4, force=False)
    cache.name_blocks(0, [1, 2, 3], 3)
    assert cache.try_admit(1, [1, 2, 9], 3, 4, force=False) == 2  # matches blocks in use
    assert cache.accounting().in_use == 4 + 2  # 4 of request 0 + 2 fresh of request 1
    cache.name_blocks(1, [1, 2, 9], 3)
    _check(cache)
    cache.release(0)
    assert cache.refs == {1: 1, 2: 1, 9: 1} and list(cache.lru) == [3]
    cache.release(1)
    _check(cache)
    assert cache.accounting().in_use == 0 and set(cache.lru) == {1, 2, 3, 9}
    assert list(cache.lru)[1:] == [9, 2, 1]  # each request's blocks enter the LRU last block first


def test_a_block_named_by_another_request_first_stays_unnamed_and_is_freed():
    cache = BlockCache(10)
    cache.try_admit(0, [1, 2], 2, 2, force=False)
    cache.try_admit(1, [1, 2], 2, 2, force=False)  # both computed the same blocks concurrently
    cache.name_blocks(0, [1, 2], 2)
    cache.name_blocks(1, [1, 2], 2)
    assert cache.refs == {1: 1, 2: 1}
    cache.release(1)
    cache.release(0)
    _check(cache)
    assert cache.accounting().cached == 2 and cache.accounting().in_use == 0


def test_block_names_are_shared_over_whole_blocks_of_the_shared_prefix():
    # request 1 = turn 2 of request 0: shares its 20 prompt + 10 answer tokens; block 4 tokens
    links = ConversationLinks(np.array([-1, 0]), np.array([0, 30]), np.array([0.0, 1.0]))
    names = BlockNames(links, [20, 40], [10, 5], 4)
    first, second = names.names(0), names.names(1)
    assert len(first) == 30 // 4 and len(second) == 45 // 4
    assert second[:7] == first[:7] and not set(second[7:]) & set(first)
    names.done(0)
    names.done(1)
    assert names._names == {}


def test_first_turns_share_the_blocks_of_the_prefix_every_prompt_starts_with():
    # two conversations whose prompts start with the same 10 tokens (a system prompt): 2 whole blocks of 4
    links = ConversationLinks(np.array([-1, -1, 0]), np.array([0, 0, 28]), np.zeros(3), common_prefix_len=10)
    names = BlockNames(links, [20, 6, 40], [8, 2, 4], 4)
    a, b, a2 = names.names(0), names.names(1), names.names(2)
    # a prompt shorter than the common prefix shares only the common blocks wholly inside it
    assert len(a) == 7 and len(b) == 2 and b[0] == a[0] and b[1] not in a
    assert a2[:7] == a[:7] and not set(a2[7:]) & (set(a) | set(b))
    cache = BlockCache(64)
    assert cache.try_admit(0, a, 4, len(a), force=False) == 0
    cache.name_blocks(0, a, 5)
    assert cache.match(b, 2) == 1  # the other conversation finds the common block
    assert cache.match(names.names(1)[:1] + a[1:2], 2) == 2
