"""Chooses what the next forward pass runs.

Policy (the same for every role; a role only changes which requests arrive):
- prefill-prioritised, as vLLM's default scheduler: if waiting prompts can be admitted, the step is a
  prefill batch of them, FCFS, bounded by max_num_tokens (prompt tokens), max_batch_size (sequences
  running + admitted) and free KV blocks; otherwise the step is one decode token for every running sequence
  (continuous batching).
  * prefill role: requests are context_only, they leave after their first token -> pure FCFS prefill batches;
  * decode role: generation_only requests arrive with KV and join the running batch when blocks allow;
  * colocated role: both phases on one engine: a prefill batch stalls running decodes (the interference
    that disaggregation removes).
- admission reserves blocks for the request's whole life (prompt + max_new_tokens), TensorRT-LLM's
  GUARANTEED_NO_EVICT capacity policy: nothing is ever preempted, and "full" means "wait".
- block reuse (prefix_cache.py): admission first takes the cached blocks of the prompt's longest cached
  prefix, so a prefill computes (and the token budget counts) only the unmatched suffix; an imported
  prompt writes only the blocks not cached here. Cached blocks nobody holds count as free space.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from trt_disagg.engine.block_pool import BlockPool
from trt_disagg.engine.prefix_cache import PrefixCache
from trt_disagg.engine.sequence import SeqState, Sequence
from trt_disagg.engine_dir import EngineLimits


class StepKind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class ScheduledStep:
    kind: StepKind
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, limits: EngineLimits, pool: BlockPool | PrefixCache) -> None:
        self.limits = limits
        # A bare pool is a cache that never reuses (what tests of the policy alone pass).
        self.cache = pool if isinstance(pool, PrefixCache) else PrefixCache(pool, b"", enabled=False)
        self.pool = self.cache.pool
        self.waiting: deque[Sequence] = deque()
        self.importing: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def _prompt_hashes(self, seq: Sequence) -> list[int]:
        if not self.cache.enabled:
            return []
        if not seq.block_hashes:  # computed once per sequence (admission may be tried many times)
            seq.block_hashes = self.cache.hashes(seq.prompt_ids)
        return seq.block_hashes

    def _max_matched_blocks(self, seq: Sequence) -> int:
        # A prefill must compute at least the last prompt token (its logits give the first token); an
        # imported prompt has all its KV already, so every full block may come from the cache.
        n = len(seq.prompt_ids) if seq.state is SeqState.IMPORTING else len(seq.prompt_ids) - 1
        return n // self.pool.tokens_per_block

    def _try_reserve(self, seq: Sequence) -> bool:
        hashes = self._prompt_hashes(seq)
        res = self.cache.try_reserve(hashes, self.pool.blocks_for_tokens(seq.max_total_tokens(self.limits.max_seq_len)),
                                     self._max_matched_blocks(seq))
        if res is None:
            return False
        seq.block_table = res.block_table
        seq.block_hashes = res.matched_hashes  # the chain registration extends
        seq.num_matched_tokens = res.num_matched_tokens
        if seq.state is SeqState.WAITING:
            seq.num_cached = res.num_matched_tokens
        return True

    def num_prefill_tokens(self, seq: Sequence) -> int:
        """Prompt tokens a prefill of `seq` would compute if admitted now (the suffix past its cached prefix)."""
        matched = self.cache.match(self._prompt_hashes(seq)[:self._max_matched_blocks(seq)])
        return len(seq.prompt_ids) - len(matched) * self.pool.tokens_per_block

    def admit_imports(self) -> list[Sequence]:
        """generation_only sequences that got their blocks now (FCFS); the engine writes their KV."""
        admitted: list[Sequence] = []
        while self.importing and len(self.running) < self.limits.max_batch_size:
            if not self._try_reserve(self.importing[0]):
                break
            seq = self.importing.popleft()
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self) -> ScheduledStep | None:
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.limits.max_batch_size:
            seq = self.waiting[0]
            n = self.num_prefill_tokens(seq)
            if batch and tokens + n > self.limits.max_num_tokens:
                break
            if not self._try_reserve(seq):
                break
            self.waiting.popleft()
            batch.append(seq)
            tokens += n
        if batch:
            return ScheduledStep(StepKind.PREFILL, batch)
        if self.running:
            return ScheduledStep(StepKind.DECODE, list(self.running))
        return None

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of every queue (it finished, was held, or was aborted)."""
        for queue in (self.waiting, self.importing):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
