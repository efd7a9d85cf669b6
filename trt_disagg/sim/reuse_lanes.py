"""Lanes with block reuse: the instance models of `instances.py`, matching each prompt against their
instance's `BlockCache` at admission and prefilling only the unmatched suffix.

Prefill time on a suffix of x tokens after m cached ones: the latency model's `prefill_s` with x tokens in
its linear terms and x * (x + 2m) in its quadratic one. The quadratic term stands for causal attention,
whose cost over a prompt of l tokens grows as l^2 (the sum over positions of the tokens each attends to);
the x new tokens attend to m + 1 .. m + x tokens, x * (x + 2m) in the same units, which is also how the
chunked lane prices a chunk after `done` tokens. The fixed and per-iteration costs are paid as for any batch.

    ReuseColocatedLane   prefill-first colocated engine with reuse
    ReuseChunkedLane     chunked prefill with reuse: a prompt's first chunk starts after its cached prefix
    ReuseDecodeLane      a disaggregated decode instance: imported requests match cached blocks (only the
                         rest is written), and conditional disaggregation prefills short suffixes locally
    ReusePrefillInstance a prefill instance whose batches prefill suffixes; its blocks stay held until
                         the KV has moved to decode, then cached

`ReuseState` is what they share with the loop: block names, per-request matched / computed tokens, and
which cache holds each request's blocks (released when it finishes, by the loop's recorder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trt_disagg.sim.instances import (
    ChunkedLane,
    ColocatedLane,
    PrefillBatch,
    PrefillInstance,
    PromptInProgress,
    Recorder,
)
from trt_disagg.sim.prefix_cache import BlockCache, BlockNames, block_count
from trt_disagg.sim.spec import InstanceSpec


@dataclass
class ReuseState:
    names: BlockNames
    tokens_per_block: int
    matched_tokens: list[int]  # per request: prompt tokens its prefill found cached
    prefill_tokens: list[int]  # per request: prompt tokens its prefill computed
    local_prefill: list[bool]  # per request: prefilled on its decode instance (conditional disaggregation)
    holder: dict[int, BlockCache] = field(default_factory=dict)  # request -> the decode-side cache holding it

    def prefill_match_limit(self, input_len: int) -> int:
        """A prefill computes at least the last prompt token: full blocks before it may match."""
        return (input_len - 1) // self.tokens_per_block


class _ReuseMixin:
    """Admission to the cache and naming of prompt blocks at the first token; shared by the lanes that prefill."""

    cache: BlockCache
    state: ReuseState
    input_len: list[int]
    output_len: list[int]

    def _take(self, i: int, force: bool) -> int | None:
        """Admit request i to the cache for a local prefill: matched tokens, or None when it must wait."""
        st = self.state
        n_in = self.input_len[i]
        got = self.cache.try_admit(i, st.names.names(i), st.prefill_match_limit(n_in),
                                   block_count(n_in + self.output_len[i], st.tokens_per_block), force)
        if got is None:
            return None
        st.holder[i] = self.cache
        st.matched_tokens[i] = got * st.tokens_per_block
        st.prefill_tokens[i] = n_in - st.matched_tokens[i]
        return st.matched_tokens[i]

    def free_kv_tenths(self) -> int:
        """Free KV in tenths of the pool, cached blocks counted free (as the instance publishes its load)."""
        cache = self.cache
        return 10 * max(0, cache.capacity - cache.in_use) // max(1, cache.capacity)

    def _suffix_if_admitted(self, i: int) -> int:
        st = self.state
        matched = self.cache.match(st.names.names(i), st.prefill_match_limit(self.input_len[i]))
        return self.input_len[i] - matched * st.tokens_per_block

    def _name_prompt_blocks(self, batch: list[int]) -> None:
        st = self.state
        for i in batch:
            self.cache.name_blocks(i, st.names.names(i), self.input_len[i] // st.tokens_per_block)


class ReuseColocatedLane(_ReuseMixin, ColocatedLane):
    def __init__(self, spec: InstanceSpec, input_len: list[int], output_len: list[int], rec: Recorder,
                 cache: BlockCache, state: ReuseState) -> None:
        super().__init__(spec, input_len, output_len, rec)
        self.cache, self.state = cache, state

    def _prefill_batch(self) -> list[int]:
        waiting, inp, out = self.waiting, self.input_len, self.output_len
        budget = self.spec.max_num_tokens
        batch: list[int] = []
        tokens = 0
        while waiting and self.batch + len(batch) < self.max_batch:
            i = waiting[0]
            if batch and tokens + self._suffix_if_admitted(i) > budget:
                break
            matched = self._take(i, force=not batch and not self.batch)
            if matched is None:
                break
            waiting.popleft()
            self.waiting_tokens -= inp[i] + out[i]
            batch.append(i)
            tokens += inp[i] - matched
        return batch

    def _run_prefill(self, batch: list[int]) -> None:
        total = total_sq = 0
        for i in batch:
            m = self.state.matched_tokens[i]
            x = self.input_len[i] - m
            total += x
            total_sq += x * (x + 2 * m)
        _, latency_s = self.spec.timing.prefill_s(total, total_sq)
        self.clock += latency_s
        self._emit_first_tokens(batch)

    def _emit_first_tokens(self, batch: list[int]) -> None:
        self._name_prompt_blocks(batch)
        super()._emit_first_tokens(batch)


class ReuseChunkedLane(_ReuseMixin, ChunkedLane):
    def __init__(self, spec: InstanceSpec, input_len: list[int], output_len: list[int], rec: Recorder,
                 cache: BlockCache, state: ReuseState) -> None:
        super().__init__(spec, input_len, output_len, rec)
        self.cache, self.state = cache, state

    def _admit_prompts(self) -> None:
        waiting, inp, out = self.waiting, self.input_len, self.output_len
        while waiting and self.batch + len(self.prefilling) < self.max_batch:
            i = waiting[0]
            matched = self._take(i, force=not (self.batch or self.prefilling))
            if matched is None:
                return
            waiting.popleft()
            need = inp[i] + out[i]
            self.waiting_tokens -= need
            self.reserved += need
            self.prefilling.append(PromptInProgress(i, matched))

    def _emit_first_tokens(self, batch: list[int]) -> None:
        self._name_prompt_blocks(batch)
        super()._emit_first_tokens(batch)


class ReuseDecodeLane(ReuseColocatedLane):
    """`waiting` holds imported requests (first token done) and, with conditional disaggregation, prompts to
    prefill here (`state.local_prefill`). Both are admitted FCFS; an import only writes its unmatched KV."""

    def __init__(self, spec: InstanceSpec, input_len: list[int], output_len: list[int], rec: Recorder,
                 cache: BlockCache, state: ReuseState, import_s_per_token: float = 0.0) -> None:
        super().__init__(spec, input_len, output_len, rec, cache, state)
        self.import_s_per_token = import_s_per_token

    def _prefill_batch(self) -> list[int]:
        waiting, inp, out, st = self.waiting, self.input_len, self.output_len, self.state
        budget = self.spec.max_num_tokens
        batch: list[int] = []
        tokens = 0
        while waiting and self.batch + len(batch) < self.max_batch:
            i = waiting[0]
            force = not batch and not self.batch
            if st.local_prefill[i]:
                if batch and tokens + self._suffix_if_admitted(i) > budget:
                    break
                matched = self._take(i, force)
                if matched is None:
                    break
                batch.append(i)
                tokens += inp[i] - matched
            elif not self._import(i, force):
                break
            waiting.popleft()
            self.waiting_tokens -= inp[i] + out[i]
        return batch

    def _import(self, i: int, force: bool) -> bool:
        st, n_in = self.state, self.input_len[i]
        names = st.names.names(i)
        got = self.cache.try_admit(i, names, n_in // st.tokens_per_block,
                                   block_count(n_in + self.output_len[i], st.tokens_per_block), force)
        if got is None:
            return False
        st.holder[i] = self.cache
        self.clock += (n_in - got * st.tokens_per_block) * self.import_s_per_token
        self.cache.name_blocks(i, names, n_in // st.tokens_per_block)
        self.join(i)
        return True


class ReusePrefillInstance(PrefillInstance):
    """Batches are FCFS under the token budget counted in suffix tokens. The prefill pool is not modelled as a
    limit (as without reuse): admission always succeeds, evicting cached blocks to make room."""

    def __init__(self, spec: InstanceSpec, input_len: list[int], cache: BlockCache, state: ReuseState) -> None:
        super().__init__(spec, input_len)
        self.cache, self.state = cache, state

    def try_start_batch(self) -> PrefillBatch | None:
        if not self.queue:
            return None
        st, budget, max_batch = self.state, self.spec.max_num_tokens, self.spec.max_batch_size
        batch: list[int] = []
        total = total_sq = queued = 0
        while self.queue and len(batch) < max_batch:
            i = self.queue[0]
            n_in = self.input_len[i]
            names = st.names.names(i)
            if batch and total + n_in - self.cache.match(names, st.prefill_match_limit(n_in)) * st.tokens_per_block > budget:
                break
            got = self.cache.try_admit(i, names, st.prefill_match_limit(n_in), block_count(n_in, st.tokens_per_block),
                                       force=True)
            assert got is not None  # forced
            m = got * st.tokens_per_block
            st.matched_tokens[i], st.prefill_tokens[i] = m, n_in - m
            batch.append(self.queue.popleft())
            queued += n_in
            total += n_in - m
            total_sq += (n_in - m) * (n_in + m)
        self.queued_tokens -= queued
        stage_s, latency_s = self.spec.timing.prefill_s(total, total_sq)
        self.busy = True
        return PrefillBatch(batch, stage_s, latency_s)

    @property
    def load(self) -> int:
        return self.queued_tokens

    def kv_computed(self, i: int) -> None:
        st = self.state
        self.cache.name_blocks(i, st.names.names(i), self.input_len[i] // st.tokens_per_block)

    def kv_sent(self, i: int) -> None:
        self.cache.release(i)
