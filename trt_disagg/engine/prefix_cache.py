"""Block reuse (TensorRT-LLM's `enable_block_reuse`): full KV blocks outlive their request, named by the
prefix hash chain of `trt_disagg.kv_events`, and a later prompt that starts with the same tokens reuses them.

    block states (every block is in exactly one)        transitions
      free      in the pool's free list, no hash          free ──allocate──▶ in use
      in use    refcount > 0 (one per sequence holding it) in use ──last release, hashed──▶ cached
      cached    refcount 0, hashed, in the LRU            in use ──last release, no hash──▶ free
                                                          cached ──matched by a new prompt──▶ in use
                                                          cached ──evicted (pool needs space)──▶ free

- A sequence's block table starts with the blocks its prompt matched (shared, read-only: only full
  blocks are ever shared and a sequence writes only past its last full cached block), then blocks of its
  own. A partial block has no hash and is never shared.
- A block gets its hash (is *registered*) once its tokens' KV is computed or imported: prompt blocks after
  the prefill step, imported blocks after they are written, generated blocks when the request ends. Two
  sequences that computed the same block both keep their copy; only the first is registered.
- Cached blocks are evicted least recently released first, and only when an allocation needs them: the
  cache never makes a request wait that would fit in an empty pool. A sequence's blocks enter the LRU
  last block first, so a chain loses its leaves before the blocks they extend.
- Every change of the reusable set is recorded as a `CacheChange` (stored / removed); the instance drains
  them and publishes KV events, so the router's block index follows the engine.

With reuse disabled nothing is ever registered: blocks go straight back to the free list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from trt_disagg.engine.block_pool import BlockPool
from trt_disagg.kv_events import KVEventKind, block_hashes


@dataclass(frozen=True)
class CacheChange:
    """One change of the reusable set, before the instance stamps it into a KVEvent (id, seq)."""

    kind: KVEventKind  # STORED or REMOVED
    blocks: tuple[int, ...]  # hashes; STORED: in chain order
    parent: int | None = None  # STORED: the hash before blocks[0]


@dataclass(frozen=True)
class BlockAccounting:
    """Where every block is: in_use + cached + free == total, always."""

    in_use: int
    cached: int
    free: int
    total: int


@dataclass(frozen=True)
class Reservation:
    """Blocks given to one sequence: the matched prefix first, then fresh ones."""

    block_table: list[int]
    matched_hashes: list[int]  # hashes of the leading matched blocks (len = matched blocks)
    num_matched_tokens: int


class PrefixCache:
    def __init__(self, pool: BlockPool, salt: bytes, enabled: bool = True) -> None:
        self.pool = pool
        self.salt = salt
        self.enabled = enabled
        self._block_of: dict[int, int] = {}  # hash -> block holding it (registered blocks only)
        self._hash_of: dict[int, int] = {}  # block -> its hash
        self._refs: dict[int, int] = {}  # block -> sequences holding it (blocks in use only)
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently released first
        self._changes: list[CacheChange] = []
        self.num_queried_tokens = 0  # prompt tokens looked up, and how many of them were matched
        self.num_matched_tokens = 0

    @property
    def tokens_per_block(self) -> int:
        return self.pool.tokens_per_block

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can get now: free ones and cached ones nobody holds (evictable)."""
        return self.pool.num_free_blocks + len(self._lru)

    def accounting(self) -> BlockAccounting:
        cached = len(self._lru)
        free = self.pool.num_free_blocks
        return BlockAccounting(self.pool.num_total_blocks - free - cached, cached, free, self.pool.num_total_blocks)

    def hashes(self, token_ids: Sequence[int], parent: int | None = None) -> list[int]:
        return block_hashes(token_ids, self.tokens_per_block, self.salt, parent)

    # -- matching and reserving ---------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached prefix of `hashes` (no state changes)."""
        if not self.enabled:
            return []
        blocks: list[int] = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def try_reserve(self, hashes: Sequence[int], num_blocks: int, max_matched_blocks: int) -> Reservation | None:
        """`num_blocks` blocks whose first ones are the cached prefix of `hashes` (at most
        `max_matched_blocks` of them), or None when the pool cannot supply the rest even by evicting."""
        matched = self.match(hashes[:max(0, min(max_matched_blocks, num_blocks))])
        fresh = num_blocks - len(matched)
        evictable_after = len(self._lru) - sum(1 for b in matched if b in self._lru)
        if fresh > self.pool.num_free_blocks + evictable_after:
            return None
        for b in matched:
            self._acquire(b)
        new = self._allocate(fresh)
        self.num_queried_tokens += len(hashes) * self.tokens_per_block
        self.num_matched_tokens += len(matched) * self.tokens_per_block
        return Reservation(matched + new, list(hashes[:len(matched)]), len(matched) * self.tokens_per_block)

    def _acquire(self, block: int) -> None:
        self._lru.pop(block, None)
        self._refs[block] = self._refs.get(block, 0) + 1

    def _allocate(self, n: int) -> list[int]:
        short = n - self.pool.num_free_blocks
        if short > 0:
            self._evict(short)
        blocks = self.pool.try_allocate(n)
        if blocks is None:  # try_reserve checked the space: this is a bug, not a full pool
            raise RuntimeError(f"prefix cache: {n} blocks promised but the pool has {self.pool.num_free_blocks}")
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def _evict(self, n: int) -> None:
        evicted: list[int] = []
        for _ in range(n):
            block, _ = self._lru.popitem(last=False)
            h = self._hash_of.pop(block)
            del self._block_of[h]
            evicted.append(h)
            self.pool.free([block])
        self._changes.append(CacheChange(KVEventKind.REMOVED, tuple(evicted)))

    # -- registering and releasing -------------------------------------------------------------------------

    def register(self, block_table: Sequence[int], chain: list[int], token_ids: Sequence[int]) -> None:
        """Name the full blocks of `token_ids` (tokens whose KV is in `block_table`) that `chain` (the
        sequence's hashes so far, extended in place) does not cover yet, and make them reusable."""
        if not self.enabled:
            return
        tpb = self.tokens_per_block
        done = len(chain)
        new = self.hashes(token_ids[done * tpb:len(token_ids) - len(token_ids) % tpb],
                          chain[-1] if chain else None)
        run: list[int] = []
        run_parent = chain[-1] if chain else None
        for i, h in enumerate(new):
            block = block_table[done + i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
                run.append(h)
            else:  # already cached elsewhere (computed twice): this copy stays private
                self._flush_run(run, run_parent)
                run, run_parent = [], h
            chain.append(h)
        self._flush_run(run, run_parent)

    def _flush_run(self, run: list[int], parent: int | None) -> None:
        if run:
            self._changes.append(CacheChange(KVEventKind.STORED, tuple(run), parent))

    def release(self, block_table: Sequence[int]) -> None:
        """A sequence lets go of its blocks: hashed ones become cached (leaves first), others free."""
        for block in reversed(block_table):
            refs = self._refs[block] - 1
            if refs > 0:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._lru[block] = None
            else:
                self.pool.free([block])

    # -- what the instance publishes ------------------------------------------------------------------------

    def drain_changes(self) -> list[CacheChange]:
        changes, self._changes = self._changes, []
        return changes

    def cached_hashes(self) -> list[int]:
        """Every reusable hash (cached or in use), parents before children within a chain (insertion order)."""
        return list(self._block_of)
