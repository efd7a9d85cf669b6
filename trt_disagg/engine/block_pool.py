"""A pool of fixed-size KV blocks, the unit of KV memory (as in vLLM's PagedAttention and TensorRT-LLM).

    slot index of token p of a sequence = block_table[p // tokens_per_block] * tokens_per_block
                                          + p % tokens_per_block

The pool only hands out block ids; the tensors live in each rank's KV cache (`kv_cache.py`). "Full" is a
normal answer (`try_allocate` returns None), not an exception.
"""

from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int, tokens_per_block: int) -> None:
        if num_blocks <= 0 or tokens_per_block <= 0:
            raise ValueError("a block pool needs num_blocks > 0 and tokens_per_block > 0")
        self.num_total_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        # LIFO free list: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._in_use: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_total_blocks * self.tokens_per_block

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def try_allocate(self, num_blocks: int) -> list[int] | None:
        """`num_blocks` block ids, or None when the pool has fewer free."""
        if num_blocks > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(num_blocks)]
        self._in_use.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._in_use:
                raise ValueError(f"block {b} freed twice or never allocated")
            self._in_use.remove(b)
            self._free.append(b)


def slot_indices(block_table: list[int], num_tokens: int, tokens_per_block: int) -> list[int]:
    """Cache slot of each of the first `num_tokens` positions of a sequence."""
    return [block_table[p // tokens_per_block] * tokens_per_block + p % tokens_per_block for p in range(num_tokens)]
