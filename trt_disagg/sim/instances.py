"""Instance models of the simulator: what each kind of engine does with its queue over time.

    PrefillInstance   FCFS batches under a token budget; event-driven (its completions feed the decode side)
    DecodeLane        continuous batching within a KV budget: a sequence joins at the next step start and
                      leaves after output_len - 1 steps. A PP instance is pp lanes (micro-batches), each
                      with 1/pp of the KV and a step time of the full TP latency plus the engine overheads,
                      stage costs and hops; with fewer sequences than lanes, the empty lanes are its bubbles.
    ColocatedLane     vLLM-style: a waiting prompt that fits the KV runs (as a prefill batch) before the next
                      decode step, stalling every running sequence: the interference DistServe removes.
    ChunkedLane       Sarathi-style chunked prefill: each iteration carries every running sequence's decode
                      token plus prompt chunks up to the token budget.
    KVLinks           the link out of each prefill instance: a batch's KV transfers go one after another

Lanes are advanced lazily (`advance(t)` runs the steps that start before t): nothing outside a lane
depends on its steps except through `load`, which the dispatcher reads after advancing. That keeps decode
steps out of the event heap, which is what makes 10,000 requests simulate in well under a second.
Token accounting is by counters, not per-sequence updates: every step adds `batch` to `sum_ctx`, and a
finishing sequence removes input_len + output_len (its context at the end). A lane's steps are numbered, so
a joining sequence is filed under the step after which it leaves (`leaving_at_step`), and a step looks up
only the sequences that leave at it.

`COLOCATED_LANES` maps each `ColocatedPolicy` to the lane that implements it: the one place a colocated
policy becomes behaviour.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from trt_disagg.sim.events import EventQueue, PrefillDone, StageFree
from trt_disagg.sim.spec import ColocatedPolicy, InstanceSpec


class Recorder:
    """First-token and finish time of each request; refuses to record one twice (no double counting)."""

    def __init__(self, n: int) -> None:
        self.first_token_s = [-1.0] * n
        self.finish_s = [-1.0] * n
        self.num_completed = 0

    def first_token(self, i: int, t: float) -> None:
        if self.first_token_s[i] >= 0:
            raise RuntimeError(f"simulator bug: request {i} got a first token twice")
        self.first_token_s[i] = t

    def finish(self, i: int, t: float) -> None:
        if self.finish_s[i] >= 0:
            raise RuntimeError(f"simulator bug: request {i} finished twice")
        self.finish_s[i] = t
        self.num_completed += 1


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    requests: list[int]
    stage_s: float  # until the first stage can take the next batch (latency_s / pp without the hops)
    latency_s: float  # until the batch's first tokens exist


class PrefillInstance:
    def __init__(self, spec: InstanceSpec, input_len: list[int]) -> None:
        self.spec = spec
        self.input_len = input_len
        self.queue: deque[int] = deque()
        self.queued_tokens = 0
        self.busy = False  # a batch occupies the first stage

    def enqueue(self, i: int) -> None:
        self.queue.append(i)
        self.queued_tokens += self.input_len[i]

    def least_loaded_key(self) -> tuple[int, ...]:
        """The router's least-loaded order for a prefill instance: fewest queued prompt tokens."""
        return (self.queued_tokens,)

    def try_start_batch(self) -> PrefillBatch | None:
        """FCFS batch under the token budget (one over-budget prompt runs alone); None when nothing waits."""
        if not self.queue:
            return None
        budget, max_batch = self.spec.max_num_tokens, self.spec.max_batch_size
        batch: list[int] = []
        total = total_sq = 0
        while self.queue and len(batch) < max_batch:
            n = self.input_len[self.queue[0]]
            if batch and total + n > budget:
                break
            batch.append(self.queue.popleft())
            total += n
            total_sq += n * n
        self.queued_tokens -= total
        stage_s, latency_s = self.spec.timing.prefill_s(total, total_sq)
        self.busy = True
        return PrefillBatch(batch, stage_s, latency_s)


class DecodeLane:
    def __init__(self, spec: InstanceSpec, input_len: list[int], output_len: list[int], rec: Recorder,
                 import_s_per_token: float = 0.0, slowdown: Callable[[float, int], float] | None = None) -> None:
        self.import_s_per_token = import_s_per_token  # disaggregated: writing pulled KV delays the next step
        self.slowdown = slowdown  # a step of batch b starting at t takes slowdown(t, b) x its model time
        self.capacity = spec.kv_capacity_tokens // spec.pp
        self.max_batch = max(1, spec.max_batch_size // spec.pp)
        self.terms = spec.timing.decode_terms()
        self.input_len, self.output_len, self.rec = input_len, output_len, rec
        self.clock = 0.0  # start of the next step (or when the lane went idle)
        self.waiting: deque[int] = deque()
        self.waiting_tokens = 0
        self.batch = 0
        self.sum_ctx = 0
        self.reserved = 0  # KV tokens reserved for running sequences (input + output, no preemption)
        self.step = 0
        self.leaving_at_step: dict[int, list[int]] = {}  # step number -> running requests that leave after it

    @property
    def load(self) -> int:
        return self.reserved + self.waiting_tokens

    @property
    def num_sequences(self) -> int:
        """Sequences running or waiting here: what the router's least-loaded policy counts first."""
        return self.batch + len(self.waiting)

    def free_kv_tenths(self) -> int:
        """Free KV in tenths of the pool: the router's least-loaded tie-break (a few blocks are noise)."""
        return 10 * max(0, self.capacity - self.reserved) // max(1, self.capacity)

    def least_loaded_key(self) -> tuple[int, ...]:
        """The router's least-loaded order for a decode or colocated instance (router.dispatch.LeastLoaded)."""
        return (self.num_sequences, -self.free_kv_tenths())

    def add(self, i: int, now: float) -> None:
        """A request whose first token exists joins (at the next step start)."""
        if self.batch == 0 and not self.waiting and self.clock < now:
            self.clock = now
        self.waiting.append(i)
        self.waiting_tokens += self.input_len[i] + self.output_len[i]

    def _admit(self) -> None:
        waiting, inp, out = self.waiting, self.input_len, self.output_len
        while waiting and self.batch < self.max_batch:
            i = waiting[0]
            need = inp[i] + out[i]
            if self.batch and self.reserved + need > self.capacity:
                return
            waiting.popleft()
            self.waiting_tokens -= need
            self.clock += inp[i] * self.import_s_per_token
            self.join(i)

    def join(self, i: int) -> None:
        n_in, n_out = self.input_len[i], self.output_len[i]
        self.batch += 1
        self.reserved += n_in + n_out
        self.sum_ctx += n_in + 1
        leave = self.step + max(n_out - 1, 1)  # a step is taken before its leavers are looked up
        leaving = self.leaving_at_step.get(leave)
        if leaving is None:
            self.leaving_at_step[leave] = [i]
        else:
            leaving.append(i)

    def decode_step(self) -> None:
        t, batch = self.terms, self.batch
        if batch <= t.threshold:
            dt = t.a_small + t.b_small * self.sum_ctx + t.c_small * batch
        else:
            dt = t.a_large + t.b_large * self.sum_ctx + t.c_large * batch
        if self.slowdown is not None:
            dt *= self.slowdown(self.clock, batch)
        self.clock += dt + t.hop_fixed_s + t.hop_per_seq_s * batch
        self.step += 1
        self.sum_ctx += batch
        for i in self.leaving_at_step.pop(self.step, ()):
            done = self.input_len[i] + self.output_len[i]
            self.batch -= 1
            self.sum_ctx -= done
            self.reserved -= done
            self.rec.finish(i, self.clock)

    def advance(self, t: float) -> None:
        while self.clock < t:
            self._admit()
            if self.batch == 0:
                return
            self.decode_step()


class ColocatedLane(DecodeLane):
    """`waiting` holds prompts not yet prefilled; a prefill batch runs whenever the head prompt fits."""

    def __init__(self, spec: InstanceSpec, input_len: list[int], output_len: list[int], rec: Recorder) -> None:
        super().__init__(spec, input_len, output_len, rec)
        self.spec = spec

    def _prefill_batch(self) -> list[int]:
        waiting, inp, out = self.waiting, self.input_len, self.output_len
        budget = self.spec.max_num_tokens
        batch: list[int] = []
        tokens = reserved = 0
        while waiting and self.batch + len(batch) < self.max_batch:
            i = waiting[0]
            need = inp[i] + out[i]
            if (batch or self.batch) and self.reserved + reserved + need > self.capacity:
                break
            if batch and tokens + inp[i] > budget:
                break
            batch.append(waiting.popleft())
            tokens += inp[i]
            reserved += need
        self.waiting_tokens -= reserved
        return batch

    def _run_prefill(self, batch: list[int]) -> None:
        lengths = [self.input_len[i] for i in batch]
        _, latency_s = self.spec.timing.prefill_s(sum(lengths), sum(n * n for n in lengths))
        self.clock += latency_s
        self._emit_first_tokens(batch)

    def _emit_first_tokens(self, batch: list[int]) -> None:
        for i in batch:
            self.rec.first_token(i, self.clock)
            if self.output_len[i] == 1:
                self.rec.finish(i, self.clock)
            else:
                self.join(i)

    def advance(self, t: float) -> None:
        while self.clock < t:
            batch = self._prefill_batch()
            if batch:
                self._run_prefill(batch)
                continue
            if self.batch == 0:
                return
            self.decode_step()


@dataclass(slots=True)
class PromptInProgress:
    """A prompt admitted to a chunked lane (its KV reserved) whose prefill is not finished yet."""

    request: int
    prefilled_tokens: int = 0


class ChunkedLane(ColocatedLane):
    """Each iteration: one decode token per running sequence + prompt chunks filling the token budget."""

    def __init__(self, spec: InstanceSpec, input_len: list[int], output_len: list[int], rec: Recorder) -> None:
        super().__init__(spec, input_len, output_len, rec)
        self.prefilling: list[PromptInProgress] = []  # in admission order

    @property
    def load(self) -> int:
        return self.reserved + self.waiting_tokens + sum(self.input_len[p.request] for p in self.prefilling)

    @property
    def num_sequences(self) -> int:
        return self.batch + len(self.waiting) + len(self.prefilling)

    def _admit_prompts(self) -> None:
        waiting, inp, out = self.waiting, self.input_len, self.output_len
        while waiting and self.batch + len(self.prefilling) < self.max_batch:
            i = waiting[0]
            need = inp[i] + out[i]
            if (self.batch or self.prefilling) and self.reserved + need > self.capacity:
                return
            waiting.popleft()
            self.waiting_tokens -= need
            self.reserved += need  # held from admission on; handed over to join() at the first token
            self.prefilling.append(PromptInProgress(i))

    def _emit_first_tokens(self, batch: list[int]) -> None:
        for i in batch:
            self.reserved -= self.input_len[i] + self.output_len[i]
        super()._emit_first_tokens(batch)

    def advance(self, t: float) -> None:
        timing = self.spec.timing
        prefill = timing.coeffs.prefill
        per_chunk_token_s = self.terms.hop_per_seq_s + timing.overheads.per_token_s
        alone_s = prefill.a + timing.overheads.iteration_s  # an iteration without decode tokens pays these itself
        while self.clock < t:
            self._admit_prompts()
            if self.batch == 0 and not self.prefilling:
                return
            budget = self.spec.max_num_tokens - self.batch
            chunk_tokens = 0
            attn = 0.0
            completed: list[int] = []
            for prompt in self.prefilling:
                if budget <= 0:
                    break
                i, done = prompt.request, prompt.prefilled_tokens
                x = min(budget, self.input_len[i] - done)
                attn += x * (x + 2 * done)
                chunk_tokens += x
                budget -= x
                prompt.prefilled_tokens = done + x
                if done + x == self.input_len[i]:
                    completed.append(i)
            # The chunks ride along the decode step (one launch): their linear and attention terms add to it.
            extra_s = prefill.b * chunk_tokens + prefill.c * attn + per_chunk_token_s * chunk_tokens
            if self.batch:
                self.clock += extra_s
                self.decode_step()  # stamps finishes at the end of the whole iteration
            else:
                self.clock += alone_s + extra_s
            if completed:
                self.prefilling = [p for p in self.prefilling if p.prefilled_tokens < self.input_len[p.request]]
                self._emit_first_tokens(completed)


COLOCATED_LANES: dict[ColocatedPolicy, type[ColocatedLane]] = {
    ColocatedPolicy.PREFILL_FIRST: ColocatedLane,
    ColocatedPolicy.CHUNKED: ChunkedLane,
}


def start_prefill_batch(prefill: PrefillInstance, k: int, now: float, events: EventQueue) -> PrefillBatch | None:
    """Start prefill instance `k`'s next batch, if any: its PrefillDone, and a StageFree when its first
    pipeline stage frees before the batch is done (the next batch may enter behind it)."""
    started = prefill.try_start_batch()
    if started is None:
        prefill.busy = False
        return None
    frees_stage = started.stage_s >= started.latency_s
    events.push(PrefillDone(now + started.latency_s, k, started.requests, frees_stage))
    if not frees_stage:
        events.push(StageFree(now + started.stage_s, k))
    return started


class KVLinks:
    """One KV link out of each prefill instance, first come first served: the requests of a batch are sent
    one after another at the link's bandwidth, not all at once as if each had the link to itself.

    Why it matters beyond the bytes: transfers that end even a few milliseconds apart reach the decode
    instance after the first of them has started a step, so the rest join the step after (on the CPU engine,
    the 2nd and 3rd of three prompts prefilled together waited 57-93 ms for the running step, and their KV
    came 44-78 ms after the prefill against 6-8 ms for a prompt alone)."""

    def __init__(self, num_prefill: int, s_per_token: float) -> None:
        self._free_at = [0.0] * num_prefill
        self._s_per_token = s_per_token

    def send(self, instance: int, tokens: int, now: float) -> float:
        """Queue `tokens` of KV on prefill instance `instance`'s link at `now`; returns when they are sent."""
        done = max(now, self._free_at[instance]) + tokens * self._s_per_token
        self._free_at[instance] = done
        return done


class BusySpans:
    """Spans of time (prefill batches, possibly on several instances, overlapping), added in the order of
    their starts: whether any of them covers a moment. It does when the latest end among the spans started
    by then is past it."""

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._max_ends: list[float] = []  # max end of the spans started so far, per start

    def started(self, start_s: float, end_s: float) -> None:
        self._starts.append(start_s)
        self._max_ends.append(max(end_s, self._max_ends[-1]) if self._max_ends else end_s)

    def covers(self, t: float) -> bool:
        k = bisect_right(self._starts, t) - 1
        return k >= 0 and self._max_ends[k] > t


class PrefillActivity(BusySpans):
    """When any prefill instance runs a batch, for the interference between instances that share a host.

    Batches start in event order, so their starts only grow, and every batch started by t is known when a
    lane computes a step starting at t (lanes only advance to the current event's time)."""

    def __init__(self, factors: tuple[float, ...]) -> None:
        super().__init__()
        self.factors = factors  # by decode batch size: 1, 2, ..., the last for larger batches

    def slowdown(self, t: float, batch: int) -> float:
        return self.factors[min(batch, len(self.factors)) - 1] if self.covers(t) else 1.0
