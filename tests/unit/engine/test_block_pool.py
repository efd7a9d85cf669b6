from __future__ import annotations

import pytest

from trt_disagg.engine.block_pool import BlockPool, slot_indices


def test_allocate_until_full_then_none_then_free_restores() -> None:
    pool = BlockPool(num_blocks=4, tokens_per_block=16)
    assert pool.capacity_tokens == 64
    a = pool.try_allocate(3)
    assert a is not None and len(set(a)) == 3
    assert pool.try_allocate(2) is None  # "full" is a normal answer
    assert pool.num_free_blocks == 1
    pool.free(a)
    assert pool.num_free_blocks == 4


def test_double_free_is_misuse() -> None:
    pool = BlockPool(2, 8)
    blocks = pool.try_allocate(1)
    assert blocks is not None
    pool.free(blocks)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(blocks)


def test_blocks_for_tokens_rounds_up_and_slots_follow_the_table() -> None:
    pool = BlockPool(8, 4)
    assert [pool.blocks_for_tokens(n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert slot_indices([5, 2], 6, 4) == [20, 21, 22, 23, 8, 9]
