"""`simulate(spec, workload) -> SimResult`: the discrete-event loop. Pure: no I/O, deterministic.

Disaggregated (one request's path, as the router does it):

    ARRIVAL ──shortest prefill queue──▶ PrefillInstance ──batch──▶ PREFILL_DONE (first token: TTFT)
        ──hand-off + KV bytes / link bandwidth──▶ KV_ARRIVED ──least-loaded decode lane──▶ DecodeLane
        ──(importing the KV stalls that lane's next step)──▶ finish (TPOT)

`phases` isolates one side for DistServe's Alg. 1, which sizes each phase on its own SLO: Role.PREFILL
stops at the first token, Role.DECODE sends each request to decode at its arrival time with its first token
already there. Colocated deployments dispatch each arrival to the least-loaded lane of the policy's kind.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from trt_disagg.contract import Role
from trt_disagg.sim import conversation_loop
from trt_disagg.sim.events import Arrival, EventQueue, KVArrived, PrefillDone, StageFree
from trt_disagg.sim.instances import (
    COLOCATED_LANES,
    DecodeLane,
    KVLinks,
    PrefillActivity,
    PrefillInstance,
    Recorder,
    start_prefill_batch,
)
from trt_disagg.sim.result import SimResult
from trt_disagg.sim.spec import ColocatedSpec, DisaggSpec, PrefixReuse, SimWorkload

# Which side to simulate: both (end to end), or only Role.PREFILL / Role.DECODE.
Phases = Literal["both", Role.PREFILL, Role.DECODE]


def simulate(spec: DisaggSpec | ColocatedSpec, workload: SimWorkload, phases: Phases = "both",
             reuse: PrefixReuse | None = None) -> SimResult:
    """Per-request first-token and finish times of `workload` served by `spec`.

    `reuse` (block reuse on the instances) or a workload with closed-loop conversation turns runs the
    conversation loop (`conversation_loop.py`); anything else runs this module's loop, unchanged."""
    links = workload.conversations
    if (reuse is not None and reuse.enabled) or (links is not None and links.closed_loop):
        if phases != "both":
            raise ValueError("prefix reuse and closed-loop conversations are simulated end to end only")
        if isinstance(spec, ColocatedSpec):
            return conversation_loop.run_colocated(spec, workload, reuse)
        return conversation_loop.run_disagg(spec, workload, reuse)
    inp = workload.input_len.tolist()
    out = workload.output_len.tolist()
    arrivals = workload.arrival_s.tolist()
    rec = Recorder(len(arrivals))
    if isinstance(spec, ColocatedSpec):
        _run_colocated(spec, arrivals, inp, out, rec)
    else:
        _run_disagg(spec, arrivals, inp, out, rec, phases)
    if rec.num_completed != len(arrivals):
        raise RuntimeError(f"simulator bug: {len(arrivals) - rec.num_completed} requests never finished")
    return SimResult(workload.arrival_s, np.asarray(rec.first_token_s), np.asarray(rec.finish_s),
                     workload.output_len, rec.num_completed)


def _run_disagg(spec: DisaggSpec, arrivals: list[float], inp: list[int], out: list[int], rec: Recorder,
                phases: Phases) -> None:
    prefills = [PrefillInstance(spec.prefill, inp) for _ in range(spec.num_prefill)]
    activity = PrefillActivity(spec.decode_beside_prefill) if spec.decode_beside_prefill else None
    lanes = [DecodeLane(spec.decode, inp, out, rec, import_s_per_token=spec.import_s_per_token,
                        slowdown=activity.slowdown if activity is not None else None)
             for _ in range(spec.num_decode * spec.decode.pp)]
    links = KVLinks(spec.num_prefill, spec.kv_bytes_per_token / spec.kv_link_bytes_per_s)
    events = EventQueue()
    # Each arrival schedules the next one, so the heap holds only work in flight and stays small. The order
    # is the same as with every arrival queued up front: arrivals are the only events of their priority.
    if arrivals:
        events.push(Arrival(arrivals[0], 0))

    def start_batch(k: int, now: float) -> None:
        started = start_prefill_batch(prefills[k], k, now, events)
        if started is not None and activity is not None:
            activity.started(now, now + started.latency_s)

    def to_decode(i: int, now: float) -> None:
        for lane in lanes:
            lane.advance(now)
        min(lanes, key=_lane_load).add(i, now)

    while len(events):
        # `type(ev) is` rather than `match`: the loop runs inside the placement search, and this is faster.
        ev = events.pop()
        now = ev.time_s
        if type(ev) is Arrival:
            i = ev.request
            if i + 1 < len(arrivals):
                events.push(Arrival(arrivals[i + 1], i + 1))
            if phases == Role.DECODE:
                rec.first_token(i, now)
                if out[i] == 1:
                    rec.finish(i, now)
                else:
                    to_decode(i, now)
                continue
            k = min(range(len(prefills)), key=lambda j: (prefills[j].queued_tokens, prefills[j].busy, j))
            prefills[k].enqueue(i)
            if not prefills[k].busy:
                start_batch(k, now)
        elif type(ev) is PrefillDone:
            for i in ev.batch:
                rec.first_token(i, now)
                if out[i] == 1 or phases == Role.PREFILL:
                    rec.finish(i, now)
                else:
                    events.push(KVArrived(links.send(ev.instance, inp[i], now) + spec.handoff_s, i))
            if ev.frees_stage:
                start_batch(ev.instance, now)
        elif type(ev) is StageFree:
            start_batch(ev.instance, now)
        elif type(ev) is KVArrived:
            to_decode(ev.request, now)
    for lane in lanes:
        lane.advance(math.inf)


def _run_colocated(spec: ColocatedSpec, arrivals: list[float], inp: list[int], out: list[int],
                   rec: Recorder) -> None:
    lane_cls = COLOCATED_LANES[spec.policy]
    lanes = [lane_cls(spec.instance, inp, out, rec) for _ in range(spec.num_instances * spec.instance.pp)]
    for i, now in enumerate(arrivals):
        for lane in lanes:
            lane.advance(now)
        min(lanes, key=_lane_load).add(i, now)
    for lane in lanes:
        lane.advance(math.inf)


def _lane_load(lane: DecodeLane) -> int:
    return lane.load
