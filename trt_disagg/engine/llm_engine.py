"""The engine: requests in, tokens out, one scheduler iteration per `step()`.

    add_request / add_decode_request ──▶ inbox ──step()──▶ scheduler ──▶ runner.forward ──▶ sample ──▶ events
                                                              │ finished: free blocks
                                                              └ context_only: KV copied out, blocks freed,
                                                                the copy HELD until release_kv()

`step()` is meant to be driven by one loop thread (the Triton model's); the `add_*`, `abort`, `export_kv`
and `release_kv` methods may be called from other threads: they validate at once (so a bad request fails
in its caller) and hand the work to the loop through the inbox under a lock.

A prefilled (context_only) request's KV is copied out of the paged pool at the end of the step that
prefilled it, while the runner is idle, and its blocks go back at once. `export_kv` then only hands that
copy out under its own small lock: a KV pull never waits for the engine lock, which a running step holds
for up to seconds on a CPU. (Reading the blocks at pull time did, and delayed each decode start by up to a
whole prefill step of the next request: measured ~0.2-1 s of extra first inter-token gap under load.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trt_disagg.contract import InstanceLoad, RequestType, SamplingParams
from trt_disagg.engine.block_pool import BlockPool, slot_indices
from trt_disagg.engine.kv_layout import convert
from trt_disagg.engine.runner import ModelRunner, make_runner
from trt_disagg.engine.sampling import make_generator, sample_token
from trt_disagg.engine.scheduler import Scheduler, StepKind
from trt_disagg.engine.sequence import SeqState, Sequence
from trt_disagg.engine.step_input import StepInput
from trt_disagg.engine.types import FinishReason, StepStats, TokenEvent
from trt_disagg.engine_dir import EngineConfig
from trt_disagg.exported_kv import ExportedKV

log = logging.getLogger(__name__)


class EngineInputError(ValueError):
    """A request the engine refuses (too long, bad sampling values, unknown id...)."""


LogitsHook = Callable[[list[str], torch.Tensor], None]


class LLMEngine:
    def __init__(self, cfg: EngineConfig, runner: ModelRunner) -> None:
        self.config = cfg
        # Called with (request ids, last-position logits [B, vocab]) after every forward pass: for
        # observability and for tests that compare logits with a reference implementation.
        self.logits_hook: LogitsHook | None = None
        self.last_step: StepStats | None = None  # this step's stats; None when it ran no forward pass
        self._runner = runner
        self._pool = BlockPool(cfg.kv_cache.num_blocks, cfg.kv_cache.tokens_per_block)
        self._scheduler = Scheduler(cfg.limits, self._pool)
        self._held: dict[str, ExportedKV] = {}  # prefilled KV waiting for export_kv / release_kv
        self._held_lock = threading.Lock()  # never held across a step: pulls must not wait for one
        self._prefilled: list[Sequence] = []  # finished prefills of this step, staged at its end
        self._live: dict[str, Sequence] = {}
        self._lock = threading.RLock()
        self._closed = False

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, threads_per_rank: int | None = None) -> LLMEngine:
        path = Path(engine_dir)
        cfg = EngineConfig.load(path)
        runner = make_runner(cfg, path, threads_per_rank or cfg.threads_per_rank)
        return cls(cfg, runner)

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self._pool.capacity_tokens

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self._pool.num_total_blocks

    def load(self) -> InstanceLoad:
        with self._lock:
            return InstanceLoad(
                queued_prompt_tokens=sum(len(s.prompt_ids) for s in self._scheduler.waiting),
                running_sequences=len(self._scheduler.running) + len(self._scheduler.importing),
                free_kv_blocks=self._pool.num_free_blocks,
                total_kv_blocks=self._pool.num_total_blocks,
                pending_kv_handoffs=self.num_held(),
            )

    def has_unfinished(self) -> bool:
        with self._lock:
            s = self._scheduler
            return bool(s.waiting or s.importing or s.running)

    # -- requests in ----------------------------------------------------------------------------------------

    def _validate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> None:
        lim, vocab = self.config.limits, self.config.shape.vocab_size
        if not prompt_ids:
            raise EngineInputError("the prompt is empty")
        if len(prompt_ids) > lim.max_input_len:
            raise EngineInputError(f"prompt has {len(prompt_ids)} tokens, more than max_input_len {lim.max_input_len}")
        if sampling.max_new_tokens < 1:
            raise EngineInputError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if len(prompt_ids) + sampling.max_new_tokens > lim.max_seq_len:
            raise EngineInputError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({sampling.max_new_tokens}) "
                                   f"exceeds max_seq_len {lim.max_seq_len}")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise EngineInputError(f"token ids must be in [0, {vocab})")
        if sampling.temperature < 0 or sampling.top_k < 0 or not 0.0 < sampling.top_p <= 1.0:
            raise EngineInputError("sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if request_id in self._live or self._is_held(request_id):
            raise EngineInputError(f"request id {request_id!r} is already in use")

    def _new_sequence(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                      request_type: RequestType) -> Sequence:
        seq = Sequence(request_id, list(prompt_ids), sampling, request_type, make_generator(sampling))
        if self._pool.blocks_for_tokens(seq.max_total_tokens(self.config.limits.max_seq_len)) > self._pool.num_total_blocks:
            raise EngineInputError("the request needs more KV blocks than this engine has in total")
        return seq

    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                    request_type: RequestType = RequestType.CONTEXT_AND_GENERATION) -> None:
        if request_type is RequestType.GENERATION_ONLY:
            raise EngineInputError("generation_only requests need KV: use add_decode_request")
        with self._lock:
            self._validate(request_id, prompt_ids, sampling)
            seq = self._new_sequence(request_id, prompt_ids, sampling, request_type)
            self._live[request_id] = seq
            self._scheduler.waiting.append(seq)

    def add_decode_request(self, request_id: str, prompt_ids: list[int], first_token: int, kv: ExportedKV,
                           sampling: SamplingParams) -> None:
        """Continue a request prefilled elsewhere: its KV (any layout of this model) and its first token."""
        with self._lock:
            self._validate(request_id, prompt_ids, sampling)
            why = kv.layout.compatible_with(self.config.kv_layout())
            if why is not None:
                raise EngineInputError(f"cannot import KV: {why}")
            if kv.num_tokens != len(prompt_ids):
                raise EngineInputError(f"KV holds {kv.num_tokens} tokens but the prompt has {len(prompt_ids)}")
            if sampling.max_new_tokens < 2 or self._is_end(first_token, sampling):
                raise EngineInputError("nothing to decode: the first token already ends this request")
            seq = self._new_sequence(request_id, prompt_ids, sampling, RequestType.GENERATION_ONLY)
            seq.output_ids = [first_token]
            seq.num_cached = len(prompt_ids)
            seq.pending_kv = kv
            seq.state = SeqState.IMPORTING
            self._live[request_id] = seq
            self._scheduler.importing.append(seq)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its blocks. Idempotent."""
        self.release_kv(request_id)
        with self._lock:
            seq = self._live.pop(request_id, None)
            if seq is None:
                return
            self._scheduler.remove(seq)
            self._finish(seq)

    # -- KV hand-off ------------------------------------------------------------------------------------------

    def export_kv(self, request_id: str) -> ExportedKV:
        """The prompt's KV of a finished context_only request, in this engine's layout (never waits a step)."""
        with self._held_lock:
            kv = self._held.get(request_id)
        if kv is None:
            raise KeyError(f"no prefilled KV held for request {request_id!r}")
        return kv

    def release_kv(self, request_id: str) -> None:
        """Drop a held context_only request's KV (pulled, cancelled or expired). Idempotent."""
        with self._held_lock:
            self._held.pop(request_id, None)

    def num_held(self) -> int:
        with self._held_lock:
            return len(self._held)

    def _is_held(self, request_id: str) -> bool:
        with self._held_lock:
            return request_id in self._held

    def _stage_prefilled(self) -> None:
        """Copy each just-prefilled prompt's KV out of the pool and free its blocks (loop thread, runner idle)."""
        for seq in self._prefilled:
            slots = slot_indices(seq.block_table, len(seq.prompt_ids), self._pool.tokens_per_block)
            kv = ExportedKV(self.config.kv_layout(), len(seq.prompt_ids), self._runner.read_kv(slots))
            self._finish(seq)
            with self._held_lock:
                self._held[seq.request_id] = kv
        self._prefilled.clear()

    # -- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        with self._lock:
            self.last_step = None  # set again below only when this step runs a forward pass
            started = time.perf_counter()
            imported = 0
            for seq in self._scheduler.admit_imports():
                imported += self._write_imported_kv(seq)
            import_s = time.perf_counter() - started
            scheduled = self._scheduler.schedule()
            if scheduled is None:
                return []
            step = self._step_input(scheduled.kind, scheduled.seqs)
            logits = self._runner.forward(step)
            if self.logits_hook is not None:
                self.logits_hook([seq.request_id for seq in scheduled.seqs], logits)
            events = [self._advance(seq, logits[i]) for i, seq in enumerate(scheduled.seqs)]
            self._stage_prefilled()
            self.last_step = StepStats(scheduled.kind.value, len(scheduled.seqs), len(step.token_ids),
                                       sum(step.context_lens), time.perf_counter() - started, imported, import_s)
            return events

    def _write_imported_kv(self, seq: Sequence) -> int:
        """Write a pulled prompt's KV into the blocks admission gave it; returns its token count."""
        kv = seq.pending_kv
        assert isinstance(kv, ExportedKV)
        shards = convert(kv, self.config.kv_layout())
        slots = slot_indices(seq.block_table, kv.num_tokens, self._pool.tokens_per_block)
        self._runner.write_kv(slots, shards)
        seq.pending_kv = None
        return kv.num_tokens

    def _step_input(self, kind: StepKind, seqs: list[Sequence]) -> StepInput:
        token_ids: list[int] = []
        query_lens: list[int] = []
        for seq in seqs:
            new = seq.all_ids[seq.num_cached:] if kind is StepKind.PREFILL else [seq.all_ids[-1]]
            token_ids.extend(new)
            query_lens.append(len(new))
        return StepInput(token_ids=token_ids, query_lens=query_lens,
                         context_lens=[s.num_cached + q for s, q in zip(seqs, query_lens, strict=True)],
                         block_tables=[s.block_table for s in seqs])

    def _is_end(self, token: int, sampling: SamplingParams) -> bool:
        end_id = sampling.end_id if sampling.end_id is not None else self.config.shape.eos_token_id
        return not sampling.ignore_eos and end_id is not None and token == end_id

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> TokenEvent:
        seq.num_cached = seq.num_tokens
        token = sample_token(logits, seq.sampling, seq.generator)
        seq.output_ids.append(token)
        reason: FinishReason | None = None
        if seq.request_type is RequestType.CONTEXT_ONLY:
            reason = FinishReason.PREFILL_DONE
        elif self._is_end(token, seq.sampling):
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= seq.sampling.max_new_tokens or seq.num_tokens >= self.config.limits.max_seq_len:
            reason = FinishReason.LENGTH
        if reason is None:
            if seq.state is SeqState.WAITING:
                seq.state = SeqState.RUNNING
                self._scheduler.running.append(seq)
        else:
            self._scheduler.remove(seq)
            del self._live[seq.request_id]
            if reason is FinishReason.PREFILL_DONE:
                self._prefilled.append(seq)
            else:
                self._finish(seq)
        return TokenEvent(seq.request_id, token, reason)

    def _finish(self, seq: Sequence) -> None:
        if seq.block_table:
            self._pool.free(seq.block_table)
            seq.block_table = []
        seq.state = SeqState.FINISHED
        seq.pending_kv = None

    def shutdown(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._runner.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
