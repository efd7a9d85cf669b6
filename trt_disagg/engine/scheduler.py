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
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from trt_disagg.engine.block_pool import BlockPool
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
    def __init__(self, limits: EngineLimits, pool: BlockPool) -> None:
        self.limits = limits
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.importing: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def _try_reserve(self, seq: Sequence) -> bool:
        blocks = self.pool.try_allocate(self.pool.blocks_for_tokens(seq.max_total_tokens(self.limits.max_seq_len)))
        if blocks is None:
            return False
        seq.block_table = blocks
        return True

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
            n = len(seq.prompt_ids)
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
