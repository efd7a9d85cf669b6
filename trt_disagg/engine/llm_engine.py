"""The engine: requests in, tokens out, one scheduler iteration per `step()`.

    add_request / add_decode_request ──▶ inbox ──step()──▶ scheduler ──▶ runner.forward ──▶ sample ──▶ events
                                                              │ finished: free blocks
                                                              └ context_only: KV copied out, blocks freed,
                                                                the copy HELD until release_kv()

Block reuse (`kv_cache_config.enable_block_reuse`, prefix_cache.py): finished requests leave their full
blocks cached; a new prompt reuses its longest cached prefix and prefills only the rest. Prompt blocks are
registered after their prefill step, imported blocks once written, generated blocks when their request
ends; `drain_kv_changes` hands the changes to the instance, which publishes them as KV events.

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
from trt_disagg.engine.grammar import GrammarError, Grammars, apply_masks
from trt_disagg.engine.inbox import Inbox
from trt_disagg.engine.kv_layout import convert
from trt_disagg.engine.prefix_cache import BlockAccounting, CacheChange, PrefixCache
from trt_disagg.engine.runner import ModelRunner, make_runner
from trt_disagg.engine.sampling import make_generator, sample_batch
from trt_disagg.engine.scheduler import Scheduler, StepKind
from trt_disagg.engine.sequence import SeqState, Sequence
from trt_disagg.engine.step_input import StepInput
from trt_disagg.engine.types import FinishReason, StepStats, TokenEvent
from trt_disagg.engine_dir import EngineConfig, load_tokenizer
from trt_disagg.exported_kv import ExportedKV

log = logging.getLogger(__name__)


class EngineInputError(ValueError):
    """A request the engine refuses (too long, bad sampling values, unknown id...)."""


LogitsHook = Callable[[list[str], torch.Tensor], None]


class LLMEngine:
    def __init__(self, cfg: EngineConfig, runner: ModelRunner, block_reuse: bool | None = None,
                 grammars: Grammars | None = None) -> None:
        self.config = cfg
        self._grammars = grammars  # None: guided requests are refused
        # Called with (request ids, last-position logits [B, vocab]) after every forward pass: for
        # observability and for tests that compare logits with a reference implementation.
        self.logits_hook: LogitsHook | None = None
        self.last_step: StepStats | None = None  # this step's stats; None when it ran no forward pass
        self._runner = runner
        self._pool = BlockPool(cfg.kv_cache.num_blocks, cfg.kv_cache.tokens_per_block)
        # The salt is the model's fingerprint: every layout of one model (TP/PP) names a block the same way.
        self._cache = PrefixCache(self._pool, cfg.fingerprint.encode(),
                                  cfg.kv_cache.enable_block_reuse if block_reuse is None else block_reuse)
        self._scheduler = Scheduler(cfg.limits, self._cache)
        self._held: dict[str, ExportedKV] = {}  # prefilled KV waiting for export_kv / release_kv
        self._held_lock = threading.Lock()  # never held across a step: pulls must not wait for one
        self._prefilled: list[Sequence] = []  # finished prefills of this step, staged at its end
        self._live: dict[str, Sequence] = {}
        self._inbox = Inbox()  # accepted requests a step has not seen yet; never waits for a step
        self._lock = threading.RLock()
        self._closed = False

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, threads_per_rank: int | None = None,
                        block_reuse: bool | None = None, device: str = "cpu") -> LLMEngine:
        """The engine of a built directory, its ranks on `device` ("cpu", "cuda", "cuda:N"; the deployment's
        `device`, a serve-time choice: the weights on disk are the same for every device)."""
        path = Path(engine_dir)
        cfg = EngineConfig.load(path)
        runner = make_runner(cfg, path, threads_per_rank or cfg.threads_per_rank, device)
        return cls(cfg, runner, block_reuse, Grammars(lambda: load_tokenizer(path), cfg.shape.vocab_size))

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self._pool.capacity_tokens

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new request can get: free ones and cached ones nobody holds (evicted on demand)."""
        return self._cache.num_available_blocks

    @property
    def block_reuse(self) -> bool:
        return self._cache.enabled

    @property
    def tokens_per_block(self) -> int:
        return self._pool.tokens_per_block

    def block_accounting(self) -> BlockAccounting:
        with self._lock:
            return self._cache.accounting()

    def prefix_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the cache, of them matched) since start."""
        with self._lock:
            return self._cache.num_queried_tokens, self._cache.num_matched_tokens

    def drain_kv_changes(self) -> list[CacheChange]:
        """Changes of the reusable block set since the last call, in order (the instance publishes them)."""
        with self._lock:
            return self._cache.drain_changes()

    def cached_block_hashes(self) -> tuple[list[int], list[CacheChange]]:
        """Every reusable block hash now, and the changes not drained before it (publish those first, then
        the snapshot is current): taken together, under the lock, so no change falls between them."""
        with self._lock:
            return self._cache.cached_hashes(), self._cache.drain_changes()

    @property
    def num_total_blocks(self) -> int:
        return self._pool.num_total_blocks

    def load(self) -> InstanceLoad:
        with self._lock:
            inbox_prompt_tokens, inbox_imports = self._inbox.counts()
            return InstanceLoad(
                queued_prompt_tokens=inbox_prompt_tokens + sum(len(s.prompt_ids) for s in self._scheduler.waiting),
                running_sequences=inbox_imports + len(self._scheduler.running) + len(self._scheduler.importing),
                free_kv_blocks=self._cache.num_available_blocks,
                total_kv_blocks=self._pool.num_total_blocks,
                pending_kv_handoffs=self.num_held(),
            )

    def has_unfinished(self) -> bool:
        if self._inbox:
            return True
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
        problem = sampling.problem()
        if problem is not None:
            raise EngineInputError(problem)

    def _deliver_to_inbox(self, seq: Sequence) -> None:
        if not self._inbox.add(seq, lambda request_id: request_id in self._live or self._is_held(request_id)):
            raise EngineInputError(f"request id {seq.request_id!r} is already in use")

    def _accept(self, seq: Sequence) -> None:
        """Move one inbox arrival to the scheduler (step thread, engine lock held)."""
        self._live[seq.request_id] = seq
        queue = self._scheduler.importing if seq.state is SeqState.IMPORTING else self._scheduler.waiting
        queue.append(seq)

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
        # No engine lock: validation reads only the config, and the inbox hands the request to the next step.
        self._validate(request_id, prompt_ids, sampling)
        seq = self._new_sequence(request_id, prompt_ids, sampling, request_type)
        self._start_guide(seq)
        self._deliver_to_inbox(seq)

    def add_decode_request(self, request_id: str, prompt_ids: list[int], first_token: int, kv: ExportedKV,
                           sampling: SamplingParams) -> None:
        """Continue a request prefilled elsewhere: its KV (any layout of this model) and its first token."""
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
        self._start_guide(seq)
        seq.num_cached = len(prompt_ids)
        seq.pending_kv = kv
        seq.state = SeqState.IMPORTING
        self._deliver_to_inbox(seq)

    def _start_guide(self, seq: Sequence) -> None:
        """A guided request's matcher, having replayed what was generated before it came here (a decode
        leg's first token; a re-prefill's tokens after the original prompt)."""
        guide = seq.sampling.guide
        if guide is None:
            return
        if self._grammars is None:
            raise EngineInputError("this engine serves no guided decoding (built without a tokenizer)")
        prompt_len = len(seq.prompt_ids) if guide.prompt_len is None else guide.prompt_len
        if not 0 < prompt_len <= len(seq.prompt_ids):
            raise EngineInputError(f"guide prompt_len {prompt_len} is outside the {len(seq.prompt_ids)} input tokens")
        try:
            seq.guided = self._grammars.new_state(guide, self._end_id(seq.sampling), seq.all_ids[prompt_len:])
        except GrammarError as exc:
            raise EngineInputError(str(exc)) from None

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its blocks. Idempotent."""
        self.release_kv(request_id)
        if self._inbox.pop(request_id) is not None:  # no step has seen it: it holds nothing yet
            return
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
            self._inbox.drain(self._accept)
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
            events = self._sample(scheduled.seqs, logits)
            if scheduled.kind is StepKind.PREFILL:  # a running prompt's blocks are reusable from now on
                for seq in scheduled.seqs:
                    if seq.state is SeqState.RUNNING:
                        self._cache.register(seq.block_table, seq.block_hashes, seq.all_ids[:seq.num_cached])
            self._stage_prefilled()
            self.last_step = StepStats(scheduled.kind.value, len(scheduled.seqs), len(step.token_ids),
                                       sum(step.context_lens), time.perf_counter() - started, imported, import_s,
                                       reused_tokens=sum(s.num_matched_tokens for s in scheduled.seqs)
                                       if scheduled.kind is StepKind.PREFILL else 0)
            return events

    def _write_imported_kv(self, seq: Sequence) -> int:
        """Write a pulled prompt's KV into the blocks admission gave it, past the prefix it found cached
        here, and register its blocks for reuse; returns the token count written."""
        kv = seq.pending_kv
        assert isinstance(kv, ExportedKV)
        skip = seq.num_matched_tokens
        if skip < kv.num_tokens:
            shards = convert(kv, self.config.kv_layout())
            if skip:  # shards are [layers, 2, tokens, kv_heads, head_dim]
                shards = {rank: t[:, :, skip:] for rank, t in shards.items()}
            slots = slot_indices(seq.block_table, kv.num_tokens, self._pool.tokens_per_block)[skip:]
            self._runner.write_kv(slots, shards)
        kv.consumed()  # written (write_kv copies): the receiver may reuse the bytes' memory for its next pull
        seq.pending_kv = None
        self._cache.register(seq.block_table, seq.block_hashes, seq.prompt_ids)
        return kv.num_tokens - skip

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

    def _end_id(self, sampling: SamplingParams) -> int | None:
        return sampling.end_id if sampling.end_id is not None else self.config.shape.eos_token_id

    def _is_end(self, token: int, sampling: SamplingParams) -> bool:
        end_id = self._end_id(sampling)
        return not sampling.ignore_eos and end_id is not None and token == end_id

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """The batch's tokens in a few tensor operations (sampling.py); a sequence whose grammar or
        sampling fails ends alone (FAILED), the others go on."""
        logits = logits.float()
        failed = apply_masks(logits, [s.guided for s in seqs])
        out = sample_batch(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        failed.update(out.errors)
        events = []
        for i, seq in enumerate(seqs):
            token = out.tokens[i]
            if token is not None and i not in failed and seq.guided is not None and not seq.guided.accept(token):
                failed[i] = f"sampled token {token} does not follow the grammar"
            if token is None or i in failed:
                events.append(self._fail(seq, failed.get(i, "sampling failed")))
            else:
                events.append(self._advance(seq, token))
        return events

    def _fail(self, seq: Sequence, error: str) -> TokenEvent:
        log.warning("request %s failed in sampling: %s", seq.request_id, error)
        self._scheduler.remove(seq)
        self._live.pop(seq.request_id, None)
        self._finish(seq)
        return TokenEvent(seq.request_id, None, FinishReason.FAILED, error=error)

    def _advance(self, seq: Sequence, token: int) -> TokenEvent:
        seq.num_cached = seq.num_tokens
        seq.output_ids.append(token)
        reason: FinishReason | None = None
        if seq.request_type is RequestType.CONTEXT_ONLY:
            reason = FinishReason.PREFILL_DONE
        elif self._is_end(token, seq.sampling) or (seq.guided is not None and seq.guided.terminated):
            reason = FinishReason.STOP  # end_id, or the grammar is complete (it allows nothing more)
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
            if seq.pending_kv is None:  # else its imported KV was never written: only the matched part is valid
                self._cache.register(seq.block_table, seq.block_hashes, seq.all_ids[:seq.num_cached])
            self._cache.release(seq.block_table)
            seq.block_table = []
        seq.state = SeqState.FINISHED
        seq.pending_kv = None

    def failure(self) -> str | None:
        """Why this engine cannot serve (a rank process died), None while it can. Lock-free and cheap: the
        instance polls it from a watch thread, also while a step is blocked on that very rank."""
        return self._runner.failure()

    def shutdown(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._runner.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
