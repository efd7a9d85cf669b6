"""A request inside the engine. Counters, not flags: `num_cached` says how much of the sequence
has KV in the cache; the state says where the scheduler keeps it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from trt_disagg.contract import RequestType, SamplingParams
from trt_disagg.engine.grammar import GuidedState


class SeqState(enum.Enum):
    WAITING = "waiting"  # needs a prefill (prompt not in cache)
    IMPORTING = "importing"  # generation_only: KV in hand, waiting for blocks
    RUNNING = "running"  # decoding, one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    request_type: RequestType
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    state: SeqState = SeqState.WAITING
    # generation_only: the exported KV until it is written into this engine's cache.
    pending_kv: object | None = None
    # guided requests: the grammar matcher (engine.grammar.GuidedState), fed every generated token.
    guided: GuidedState | None = None
    # Block reuse: the hash chain of this sequence's full blocks registered or matched so far, and how many
    # prompt tokens came from the cache (their KV was neither computed nor imported here).
    block_hashes: list[int] = field(default_factory=list)
    num_matched_tokens: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def max_total_tokens(self, max_seq_len: int) -> int:
        """Tokens this sequence can ever hold: what admission reserves KV for."""
        if self.request_type is RequestType.CONTEXT_ONLY:
            return len(self.prompt_ids)
        return min(len(self.prompt_ids) + self.sampling.max_new_tokens, max_seq_len)
