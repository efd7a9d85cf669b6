"""The event loop for conversations and prefix reuse: `simulate` calls it when the workload has conversation
links or a `PrefixReuse` is enabled (otherwise the plain loop in `loop.py` runs, unchanged).

What it adds to `loop.py`:
- Block reuse: every decode-capable instance (colocated, decode) and every prefill instance holds a
  `BlockCache` of its KV capacity; lanes come from `reuse_lanes.py`; requests are routed by
  `routing.make_router(reuse.routing)` (one per role, as the router keeps its turns per role); with
  `local_prefill_max_tokens`, a prompt whose unmatched suffix on the decode instance holding most of it is
  that short is prefilled there (conditional disaggregation, as router/kv_routing.py `local_target`).
- Closed-loop arrivals: a conversation's next turn arrives `think_s` after its previous turn finished.
  Lanes are advanced lazily, so a finish is only seen when a lane is advanced past it. To never dispatch an
  arrival into a lane already advanced beyond it, the lanes are advanced in steps of at most the shortest
  think time (`horizon`): a finish seen while advancing to h happened after the previous step's end, so its
  next turn arrives at >= h. Think times under MIN_HORIZON_S are rounded up to it (dispatched that late).

With reuse disabled and fixed arrivals it dispatches exactly as `loop.py` does (a unit test checks that).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

from trt_disagg.sim.events import Arrival, EventQueue, KVArrived, PrefillDone, StageFree
from trt_disagg.sim.instances import (
    COLOCATED_LANES,
    DecodeLane,
    KVLinks,
    PrefillInstance,
    Recorder,
    start_prefill_batch,
)
from trt_disagg.sim.prefix_cache import BlockCache, BlockNames
from trt_disagg.sim.result import SimResult
from trt_disagg.sim.reuse_lanes import (
    ReuseChunkedLane,
    ReuseColocatedLane,
    ReuseDecodeLane,
    ReusePrefillInstance,
    ReuseState,
)
from trt_disagg.sim.routing import Router, make_router
from trt_disagg.sim.spec import ColocatedPolicy, ColocatedSpec, DisaggSpec, PrefixReuse, Routing, SimWorkload

MIN_HORIZON_S = 1e-3
REUSE_LANES = {ColocatedPolicy.PREFILL_FIRST: ReuseColocatedLane, ColocatedPolicy.CHUNKED: ReuseChunkedLane}


class Flow:
    """When each request arrives: its fixed time, or (closed loop) its previous turn's finish + think time."""

    def __init__(self, workload: SimWorkload) -> None:
        links = workload.conversations
        n = len(workload)
        self.arrival_s = workload.arrival_s.tolist()
        self.closed = links is not None and links.closed_loop
        self.next_turn = [-1] * n
        self.think_s: list[float] = []
        self.horizon_s = math.inf
        previous = links.previous.tolist() if links is not None else [-1] * n
        if links is not None and self.closed:
            self.think_s = links.think_s.tolist()
            for i, p in enumerate(previous):
                if p >= 0:
                    self.next_turn[p] = i
                    self.horizon_s = min(self.horizon_s, max(MIN_HORIZON_S, self.think_s[i]))
        self.initial = [i for i in range(n) if not self.closed or previous[i] < 0]

    def next_arrival(self, i: int, finish_s: float, floor_s: float) -> tuple[float, int] | None:
        """Request i finished: (when its next turn arrives, which), recording that arrival time."""
        j = self.next_turn[i] if self.closed else -1
        if j < 0:
            return None
        at = max(finish_s + self.think_s[j], floor_s)
        self.arrival_s[j] = at
        return at, j


class HookedRecorder(Recorder):
    """A recorder that tells the loop of each finish (to release blocks and send the next turn)."""

    def __init__(self, n: int, on_finish: Callable[[int, float], None]) -> None:
        super().__init__(n)
        self.on_finish = on_finish

    def finish(self, i: int, t: float) -> None:
        super().finish(i, t)
        self.on_finish(i, t)


def new_state(workload: SimWorkload, reuse: PrefixReuse | None, inp: list[int], out: list[int]) -> ReuseState | None:
    if reuse is None or not reuse.enabled:
        return None
    n = len(inp)
    return ReuseState(BlockNames(workload.conversations, inp, out, reuse.tokens_per_block), reuse.tokens_per_block,
                      [0] * n, list(inp), [False] * n)


class Driver:
    """Shared bookkeeping of both loops: arrivals, the recorder's finish hook, lane advancing by horizon."""

    def __init__(self, workload: SimWorkload, reuse: PrefixReuse | None) -> None:
        self.inp = workload.input_len.tolist()
        self.out = workload.output_len.tolist()
        self.flow = Flow(workload)
        self.state = new_state(workload, reuse, self.inp, self.out)
        self.reuse = reuse or PrefixReuse(enabled=False)
        self.decode_router: Router = make_router(self.reuse.routing)  # decode-capable instances
        self.prefill_router: Router = make_router(self.reuse.routing)
        self.rec = HookedRecorder(len(self.inp), self._finished)
        self.advanced_s = 0.0  # every lane has been advanced to here
        self.push: Callable[[float, int], None] = lambda t, i: None
        self.lanes: Sequence[DecodeLane] = ()

    def _finished(self, i: int, t: float) -> None:
        st = self.state
        if st is not None:
            holder = st.holder.pop(i, None)
            if holder is not None:
                holder.name_blocks(i, st.names.names(i), (self.inp[i] + self.out[i] - 1) // st.tokens_per_block)
                holder.release(i)
            st.names.done(i)
        nxt = self.flow.next_arrival(i, t, self.advanced_s)
        if nxt is not None:
            self.push(*nxt)

    def advance_to(self, t: float) -> None:
        for lane in self.lanes:
            lane.advance(t)
        self.advanced_s = max(self.advanced_s, t)

    def step_until(self, next_event_s: Callable[[], float]) -> None:
        """Closed loop: advance every lane by horizons until the next event (or until all is idle)."""
        if not self.flow.closed:
            return
        horizon = self.flow.horizon_s
        while True:
            t = next_event_s()
            if self.advanced_s + horizon >= t or (t == math.inf and not any(map(_busy, self.lanes))):
                return
            self.advance_to(self.advanced_s + horizon)

    def result(self, workload: SimWorkload) -> SimResult:
        rec = self.rec
        if rec.num_completed != len(self.inp):
            raise RuntimeError(f"simulator bug: {len(self.inp) - rec.num_completed} requests never finished")
        st = self.state
        return SimResult(np.asarray(self.flow.arrival_s), np.asarray(rec.first_token_s), np.asarray(rec.finish_s),
                         workload.output_len, rec.num_completed,
                         matched_tokens=np.asarray(st.matched_tokens if st else [0] * len(self.inp), dtype=np.int64),
                         prefill_tokens=np.asarray(st.prefill_tokens if st else self.inp, dtype=np.int64))


def _busy(lane: DecodeLane) -> bool:
    return bool(lane.batch or lane.waiting or getattr(lane, "prefilling", None))


def run_colocated(spec: ColocatedSpec, workload: SimWorkload, reuse: PrefixReuse | None) -> SimResult:
    d = Driver(workload, reuse)
    inp, out, st = d.inp, d.out, d.state
    lanes: list[DecodeLane] = []
    for _ in range(spec.num_instances):
        if st is None:
            lanes += [COLOCATED_LANES[spec.policy](spec.instance, inp, out, d.rec) for _ in range(spec.instance.pp)]
            continue
        cache = BlockCache(spec.instance.kv_capacity_tokens // st.tokens_per_block)
        lanes += [REUSE_LANES[spec.policy](spec.instance, inp, out, d.rec, cache, st) for _ in range(spec.instance.pp)]
    d.lanes = lanes
    heap = [(d.flow.arrival_s[i], i) for i in d.flow.initial]
    heapq.heapify(heap)
    d.push = lambda t, i: heapq.heappush(heap, (t, i))
    while True:
        d.step_until(lambda: heap[0][0] if heap else math.inf)
        if not heap:
            break
        now, i = heapq.heappop(heap)
        d.advance_to(now)
        _pick_lane(d, lanes, i, (inp[i] - 1) // d.reuse.tokens_per_block).add(i, now)
    d.advance_to(math.inf)
    return d.result(workload)


def _pick_lane(d: Driver, lanes: Sequence[DecodeLane], i: int, max_blocks: int) -> DecodeLane:
    if d.state is None:
        return min(lanes, key=_lane_load)
    lane, _ = d.decode_router(lanes, d.state.names.names(i), max_blocks, d.inp[i], d.reuse)  # type: ignore[arg-type]
    return lane  # type: ignore[return-value]


def _lane_load(lane: DecodeLane) -> int:
    return lane.load


def run_disagg(spec: DisaggSpec, workload: SimWorkload, reuse: PrefixReuse | None) -> SimResult:
    d = Driver(workload, reuse)
    inp, out, st = d.inp, d.out, d.state
    prefills = _prefill_instances(spec, inp, st)
    lanes = _decode_lanes(spec, d)
    d.lanes = lanes
    links = KVLinks(spec.num_prefill, spec.kv_bytes_per_token / spec.kv_link_bytes_per_s)
    events = EventQueue()
    for i in d.flow.initial:
        events.push(Arrival(d.flow.arrival_s[i], i))
    d.push = lambda t, i: events.push(Arrival(t, i))
    prefill_of: dict[int, int] = {}

    def start_batch(k: int, now: float) -> None:
        start_prefill_batch(prefills[k], k, now, events)

    while True:
        d.step_until(lambda: events.peek_time() if len(events) else math.inf)
        if not len(events):
            break
        ev = events.pop()
        now = ev.time_s
        if type(ev) is Arrival:
            i = ev.request
            if _prefilled_locally(d, i, now):
                continue
            k = _pick_prefill(d, prefills, i)
            prefill_of[i] = k
            prefills[k].enqueue(i)
            if not prefills[k].busy:
                start_batch(k, now)
        elif type(ev) is PrefillDone:
            for i in ev.batch:
                _prefill_done(d, prefills[ev.instance], i, now)
                if out[i] == 1:
                    _kv_sent(prefills, prefill_of, i)
                else:
                    events.push(KVArrived(links.send(ev.instance, inp[i], now) + spec.handoff_s, i))
            if ev.frees_stage:
                start_batch(ev.instance, now)
        elif type(ev) is StageFree:
            start_batch(ev.instance, now)
        elif type(ev) is KVArrived:
            i = ev.request
            _kv_sent(prefills, prefill_of, i)
            d.advance_to(now)
            _pick_lane(d, lanes, i, inp[i] // d.reuse.tokens_per_block).add(i, now)
    d.advance_to(math.inf)
    return d.result(workload)


def _prefill_instances(spec: DisaggSpec, inp: list[int], st: ReuseState | None) -> list[PrefillInstance]:
    if st is None:
        return [PrefillInstance(spec.prefill, inp) for _ in range(spec.num_prefill)]
    return [ReusePrefillInstance(spec.prefill, inp, BlockCache(spec.prefill.kv_capacity_tokens // st.tokens_per_block),
                                 st) for _ in range(spec.num_prefill)]


def _decode_lanes(spec: DisaggSpec, d: Driver) -> list[DecodeLane]:
    st = d.state
    if st is None:
        return [DecodeLane(spec.decode, d.inp, d.out, d.rec, import_s_per_token=spec.import_s_per_token)
                for _ in range(spec.num_decode * spec.decode.pp)]
    lanes: list[DecodeLane] = []
    for _ in range(spec.num_decode):
        cache = BlockCache(spec.decode.kv_capacity_tokens // st.tokens_per_block)
        lanes += [ReuseDecodeLane(spec.decode, d.inp, d.out, d.rec, cache, st, spec.import_s_per_token)
                  for _ in range(spec.decode.pp)]
    return lanes


def _prefilled_locally(d: Driver, i: int, now: float) -> bool:
    """Conditional disaggregation: send request i straight to the decode instance that holds the most of its
    prompt when all but a short suffix is held there (the router's `local_target`: the longest match, the
    first such lane on a tie), skipping prefill and transfer."""
    st = d.state
    if st is None or d.reuse.local_prefill_max_tokens <= 0 or d.reuse.routing is not Routing.KV_AWARE:
        return False
    d.advance_to(now)
    names, limit = st.names.names(i), st.prefill_match_limit(d.inp[i])
    matched_blocks = [lane.cache.match(names, limit) for lane in d.lanes]  # type: ignore[attr-defined]
    best = max(matched_blocks, default=0)
    matched = best * st.tokens_per_block
    if best == 0 or d.inp[i] - matched > d.reuse.local_prefill_max_tokens:
        return False
    lane = d.lanes[matched_blocks.index(best)]
    st.local_prefill[i] = True
    lane.add(i, now)  # type: ignore[attr-defined]
    return True


def _pick_prefill(d: Driver, prefills: list[PrefillInstance], i: int) -> int:
    st = d.state
    if st is None or d.reuse.routing is Routing.LEAST_LOADED:
        return min(range(len(prefills)), key=lambda j: (prefills[j].queued_tokens, prefills[j].busy, j))
    chosen, _ = d.prefill_router(prefills, st.names.names(i), st.prefill_match_limit(d.inp[i]),  # type: ignore[arg-type]
                                 d.inp[i], d.reuse)
    return prefills.index(chosen)  # type: ignore[arg-type]


def _prefill_done(d: Driver, prefill: PrefillInstance, i: int, now: float) -> None:
    d.rec.first_token(i, now)
    if isinstance(prefill, ReusePrefillInstance):
        prefill.kv_computed(i)
    if d.out[i] == 1:
        d.rec.finish(i, now)


def _kv_sent(prefills: list[PrefillInstance], prefill_of: dict[int, int], i: int) -> None:
    prefill = prefills[prefill_of.pop(i)]
    if isinstance(prefill, ReusePrefillInstance):
        prefill.kv_sent(i)
