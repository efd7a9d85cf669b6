"""A fake LLMEngine with the real one's API: deterministic tokens, a real block count, checkable KV.

Why it ships: the instance adapter, the KV transports and the Triton model can be tested (and a model
repository served, ENGINE_DIR "fake:<role>[:tp:pp]") without loading weights. Its KV is not random: every
element of position p holds float(prompt[p]), so `add_decode_request` can prove the bytes arrived intact and
in order after any TP/PP re-slicing. Its next token depends on the whole context, so a decode that lost
track of the prompt or the first token gives different tokens from the colocated path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from trt_disagg.contract import InstanceLoad, ModelShape, RequestType, Role, SamplingParams, pp_layer_ranges
from trt_disagg.engine.types import FinishReason, TokenEvent
from trt_disagg.engine_dir import EngineConfig, EngineLimits, KVCacheSpec
from trt_disagg.exported_kv import ExportedKV

FAKE_PREFIX = "fake:"
FAKE_SHAPE = ModelShape(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4,
                        vocab_size=1000, eos_token_id=2)


def fake_next_token(context: list[int], vocab_size: int = FAKE_SHAPE.vocab_size) -> int:
    """The fake model: a hash of the whole context, never the end id 2 unless the context sums to it."""
    return (sum(context) * 31 + len(context) * 7 + 3) % vocab_size


@dataclass
class _Seq:
    request_id: str
    tokens: list[int]
    num_prompt: int
    sampling: SamplingParams
    request_type: RequestType
    blocks: int
    prefilled: bool = False
    num_generated: int = 0
    done: bool = False
    kept: bool = field(default=False)  # context_only finished, KV held for export


class FakeEngine:
    """Same methods as trt_disagg.engine.llm_engine.LLMEngine; no threads, no processes."""

    def __init__(self, role: Role = Role.COLOCATED, tp: int = 1, pp: int = 1, max_tokens: int = 4096,
                 tokens_per_block: int = 16, max_input_len: int = 256, step_s: float = 0.0) -> None:
        # Emulated compute time of a step that produces tokens: keeps streams in flight long enough for
        # tests that act on them mid-stream (a real engine takes tens of milliseconds per step).
        self.step_s = step_s
        self.config = EngineConfig(
            role=role, shape=FAKE_SHAPE, tp=tp, pp=pp, dtype="float32",
            limits=EngineLimits(max_batch_size=64, max_input_len=max_input_len, max_seq_len=max_input_len * 2,
                                max_num_tokens=4096),
            kv_cache=KVCacheSpec(dtype="float32", tokens_per_block=tokens_per_block, max_tokens=max_tokens),
            fingerprint="fake-fingerprint")
        self.num_total_blocks = self.config.kv_cache.num_blocks
        self.num_free_blocks = self.num_total_blocks
        self.kv_capacity_tokens = self.config.kv_cache.max_tokens
        self._seqs: dict[str, _Seq] = {}
        self.shut_down = False
        self.broken: str | None = None  # set by a test to play a dead rank: failure() reports it

    @classmethod
    def from_spec(cls, spec: str) -> FakeEngine:
        """"fake:<role>[:tp:pp[:step_ms]]" as used for ENGINE_DIR in tests (step_ms: emulated compute time)."""
        parts = spec.removeprefix(FAKE_PREFIX).split(":")
        tp, pp = (int(parts[1]), int(parts[2])) if len(parts) >= 3 else (1, 1)
        step_s = float(parts[3]) / 1000 if len(parts) >= 4 else 0.0
        return cls(role=Role(parts[0]), tp=tp, pp=pp, step_s=step_s)

    # ---- admission ----
    def _alloc(self, request_id: str, num_tokens: int) -> int:
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id} is already in the engine")
        if num_tokens == 0 or num_tokens > self.config.limits.max_input_len:
            raise ValueError(f"prompt of {num_tokens} tokens (allowed 1..{self.config.limits.max_input_len})")
        need = math.ceil(num_tokens / self.config.kv_cache.tokens_per_block)
        if need > self.num_free_blocks:
            raise ValueError(f"KV cache full: {need} blocks needed, {self.num_free_blocks} free")
        self.num_free_blocks -= need
        return need

    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    request_type: RequestType = RequestType.CONTEXT_AND_GENERATION) -> None:
        blocks = self._alloc(request_id, len(prompt_ids))
        self._seqs[request_id] = _Seq(request_id, list(prompt_ids), len(prompt_ids), sampling, request_type,
                                      blocks)

    def add_decode_request(self, request_id: str, prompt_ids: list[int], first_token: int, kv: ExportedKV,
                           sampling: SamplingParams) -> None:
        if kv.num_tokens != len(prompt_ids):
            raise ValueError(f"KV holds {kv.num_tokens} tokens, prompt has {len(prompt_ids)}")
        expected = torch.tensor(prompt_ids, dtype=torch.float32)
        for rank, shard in kv.shards.items():  # [layers, 2, T, heads, dim]: every element of p is prompt[p]
            got = shard.float().amin(dim=(0, 1, 3, 4))
            if not torch.equal(got, expected) or not torch.equal(shard.float().amax(dim=(0, 1, 3, 4)), expected):
                raise ValueError(f"KV shard of rank {rank} does not hold this prompt")
        blocks = self._alloc(request_id, len(prompt_ids))
        seq = _Seq(request_id, [*prompt_ids, first_token], len(prompt_ids), sampling,
                   RequestType.GENERATION_ONLY, blocks, prefilled=True, num_generated=1)
        self._seqs[request_id] = seq

    # ---- running ----
    def step(self) -> list[TokenEvent]:
        events = self._step()
        if events and self.step_s > 0:
            time.sleep(self.step_s)  # the emulated forward pass, not synchronisation
        return events

    def _step(self) -> list[TokenEvent]:
        events = []
        for seq in list(self._seqs.values()):
            if seq.done:
                continue
            if seq.request_type is RequestType.GENERATION_ONLY and seq.num_generated >= seq.sampling.max_new_tokens:
                events.append(self._finish(seq, None, FinishReason.LENGTH))
                continue
            token = fake_next_token(seq.tokens)
            seq.tokens.append(token)
            seq.num_generated += 1
            seq.prefilled = True
            if seq.request_type is RequestType.CONTEXT_ONLY:
                seq.done, seq.kept = True, True
                events.append(TokenEvent(seq.request_id, token, FinishReason.PREFILL_DONE))
            elif not seq.sampling.ignore_eos and token == (seq.sampling.end_id or FAKE_SHAPE.eos_token_id):
                events.append(self._finish(seq, token, FinishReason.STOP))
            elif seq.num_generated >= seq.sampling.max_new_tokens:
                events.append(self._finish(seq, token, FinishReason.LENGTH))
            else:
                events.append(TokenEvent(seq.request_id, token, None))
        return [e for e in events if e is not None]

    def _finish(self, seq: _Seq, token: int | None, reason: FinishReason) -> TokenEvent | None:
        self._free(seq.request_id)
        return None if token is None else TokenEvent(seq.request_id, token, reason)

    def _free(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.num_free_blocks += seq.blocks

    def has_unfinished(self) -> bool:
        return any(not s.done for s in self._seqs.values())

    def abort(self, request_id: str) -> None:
        self._free(request_id)

    def export_kv(self, request_id: str) -> ExportedKV:
        seq = self._seqs.get(request_id)
        if seq is None or not seq.kept:
            raise KeyError(f"request {request_id} has no exported KV (not a finished context_only request)")
        layout = self.config.kv_layout()
        prompt = torch.tensor(seq.tokens[:seq.num_prompt], dtype=torch.float32)
        heads = layout.num_kv_heads // layout.tp
        shards = {}
        for pp_rank, layers in enumerate(pp_layer_ranges(layout.num_layers, layout.pp)):
            for tp_rank in range(layout.tp):
                shard = prompt.view(1, 1, -1, 1, 1).expand(len(layers), 2, seq.num_prompt, heads,
                                                           layout.head_dim).contiguous()
                shards[pp_rank * layout.tp + tp_rank] = shard
        return ExportedKV(layout=layout, num_tokens=seq.num_prompt, shards=shards)

    def release_kv(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.kept:
            self._free(request_id)

    def load(self) -> InstanceLoad:
        waiting = [s for s in self._seqs.values() if not s.prefilled]
        return InstanceLoad(queued_prompt_tokens=sum(s.num_prompt for s in waiting),
                            running_sequences=sum(1 for s in self._seqs.values() if not s.done),
                            free_kv_blocks=self.num_free_blocks, total_kv_blocks=self.num_total_blocks)

    def failure(self) -> str | None:
        return self.broken

    def shutdown(self) -> None:
        self.shut_down = True
