"""The simulator's prefix cache: the engine's block reuse (`engine/prefix_cache.py`) on block names, not tokens.

    block states (every block of an instance's pool is in exactly one)
      free      not held, not named
      in use    held by >= 1 running request (named blocks are counted once, whoever holds them)
      cached    named, held by none, in the LRU: matchable, evicted least recently released first, and only
                when an admission needs the space

A block's *name* stands for the engine's hash chain: `BlockNames` gives block b of request i the name of
block b of its conversation's previous turn when the block lies wholly inside the shared prefix, else a
fresh one; a first turn's blocks wholly inside the prefix every prompt shares (`common_prefix_len`: a chat
template's system prompt) get the same names in every conversation. So two requests share block b exactly
when the engine's hashes would match.

The engine's rules, kept: a prefill matches at most (prompt - 1) // block full blocks (it computes at least
the last prompt token); imported KV may match every full prompt block. Prompt blocks are named once their KV
exists (after prefill or import), the answer's blocks when the request ends (its KV covers prompt + answer
but the last token); a block some other request named first stays unnamed (its copy is freed at release).
Released blocks enter the LRU last block first, so a chain loses its leaves before the blocks they extend.

Admission reserves every block a request will need (prompt + answer, as the simulator reserves KV tokens
without preemption). A request admitted to an instance with nothing running may over-commit the pool (the
simulator's lanes let an oversized request run alone); nothing else does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from trt_disagg.sim.spec import ConversationLinks


class BlockNames:
    """Block names per request, built when the request arrives and dropped when no later turn needs them."""

    def __init__(self, links: ConversationLinks | None, input_len: list[int], output_len: list[int],
                 tokens_per_block: int) -> None:
        self.block = tokens_per_block
        self.input_len, self.output_len = input_len, output_len
        n = len(input_len)
        self.previous = links.previous.tolist() if links is not None else [-1] * n
        self.shared = links.shared_prefix_len.tolist() if links is not None else [0] * n
        # Names of the blocks every prompt starts with: negative, never one of the fresh names counted from 0.
        common = links.common_prefix_len // tokens_per_block if links is not None else 0
        self._common = [-1 - b for b in range(common)]
        self._names: dict[int, list[int]] = {}
        self._done: set[int] = set()  # finished, names kept for a later turn not yet named
        self._next = 0
        self._pending_children = [0] * n  # later turns not yet named, which will read this request's names
        for p in self.previous:
            if p >= 0:
                self._pending_children[p] += 1

    def names(self, i: int) -> list[int]:
        """Names of request i's full blocks of prompt + answer (built on first use)."""
        got = self._names.get(i)
        if got is not None:
            return got
        p = self.previous[i]
        inherited = self._common[: self.input_len[i] // self.block]
        if p >= 0:
            inherited = self.names(p)[: self.shared[i] // self.block]
            self._pending_children[p] -= 1
            if self._pending_children[p] == 0 and p in self._done:
                del self._names[p]
                self._done.discard(p)
        total = (self.input_len[i] + self.output_len[i]) // self.block
        fresh = total - len(inherited)
        names = inherited + list(range(self._next, self._next + fresh))
        self._next += fresh
        self._names[i] = names
        return names

    def done(self, i: int) -> None:
        """Request i finished: forget its names once every later turn that inherits them has been named."""
        if self._pending_children[i] == 0:
            self._names.pop(i, None)
        else:
            self._done.add(i)


@dataclass(slots=True)
class Holding:
    """What one admitted request holds: named blocks (in chain order) and unnamed ones."""

    named: list[int] = field(default_factory=list)
    unnamed: int = 0
    matched_blocks: int = 0


@dataclass(frozen=True)
class BlockAccounting:
    in_use: int
    cached: int
    free: int
    total: int


class BlockCache:
    """One instance's KV pool with block reuse (shared by the lanes of a pipeline-parallel instance)."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.refs: dict[int, int] = {}  # named block in use -> requests holding it
        self.lru: OrderedDict[int, None] = OrderedDict()  # named blocks held by none, least recently released first
        self.in_use = 0  # blocks held by running requests (named ones once)
        self.holdings: dict[int, Holding] = {}
        self.num_evicted = 0

    def match(self, names: list[int], max_blocks: int) -> int:
        """Leading blocks of `names` (at most max_blocks) this instance holds, in use or cached."""
        refs, lru = self.refs, self.lru
        n = 0
        for name in names[:max_blocks]:
            if name not in refs and name not in lru:
                break
            n += 1
        return n

    def try_admit(self, request: int, names: list[int], max_matched: int, total_blocks: int, force: bool) -> int | None:
        """Reserve request's blocks: its matched prefix (shared) and fresh ones for the rest, evicting cached
        blocks LRU as needed. Returns the matched blocks, or None when the pool cannot make room (unless
        `force`: nothing runs on the instance, so the request runs alone, over-committing if it must)."""
        matched = self.match(names, max_matched)
        fresh = total_blocks - matched
        lru = self.lru
        matched_cached = sum(1 for name in names[:matched] if name in lru)
        room = self.capacity - self.in_use - matched_cached  # free + cached blocks left after taking the prefix
        if fresh > room and not force:
            return None
        held = names[:matched]
        refs = self.refs
        for name in held:
            if name in lru:
                del lru[name]
                refs[name] = 1
                self.in_use += 1
            else:
                refs[name] += 1
        free = self.capacity - self.in_use - len(lru)
        if fresh > free:
            self._evict(min(fresh - free, len(lru)))
        self.in_use += fresh
        self.holdings[request] = Holding(list(held), fresh, matched)
        return matched

    def _evict(self, n: int) -> None:
        for _ in range(n):
            self.lru.popitem(last=False)
        self.num_evicted += n

    def name_blocks(self, request: int, names: list[int], upto_blocks: int) -> None:
        """Request's blocks up to `upto_blocks` now hold computed KV: name the ones it holds unnamed."""
        h = self.holdings[request]
        refs, lru = self.refs, self.lru
        for name in names[len(h.named):upto_blocks]:
            if h.unnamed == 0:
                return
            if name in refs or name in lru:
                continue  # someone named it first: this copy stays unnamed and is freed at release
            refs[name] = 1
            h.named.append(name)
            h.unnamed -= 1

    def release(self, request: int) -> None:
        """The request ended: its named blocks it was the last holder of become cached (last block first)."""
        h = self.holdings.pop(request)
        refs, lru = self.refs, self.lru
        for name in reversed(h.named):
            left = refs[name] - 1
            if left:
                refs[name] = left
            else:
                del refs[name]
                lru[name] = None
                self.in_use -= 1
        self.in_use -= h.unnamed

    def accounting(self) -> BlockAccounting:
        cached = len(self.lru)
        return BlockAccounting(self.in_use, cached, self.capacity - self.in_use - cached, self.capacity)


def block_count(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)
