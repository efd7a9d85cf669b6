"""`simulate(spec, workload) -> SimResult`: the discrete-event loop. Pure: no I/O, deterministic.

Disaggregated (one request's path, as the router does it):

    ARRIVAL ──shortest prefill queue──▶ PrefillInstance ──batch──▶ PREFILL_DONE (first token: TTFT)
        ──hand-off + KV bytes / link bandwidth──▶ KV_ARRIVED ──least-loaded decode lane──▶ DecodeLane
        ──(importing the KV stalls that lane's next step)──▶ finish (TPOT)

`phases` isolates one side for DistServe's Alg. 1, which sizes each phase on its own SLO: "prefill"
stops at the first token, "decode" sends each request to decode at its arrival time with its first token
already there. Colocated deployments dispatch each arrival to the least-loaded lane.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from trt_disagg.sim.events import EventKind, EventQueue
from trt_disagg.sim.instances import ChunkedLane, ColocatedLane, DecodeLane, PrefillInstance, Recorder
from trt_disagg.sim.result import SimResult
from trt_disagg.sim.spec import ColocatedSpec, DisaggSpec, SimWorkload

Phases = Literal["both", "prefill", "decode"]

COLOCATED_LANES: dict[str, type[ColocatedLane]] = {"prefill-first": ColocatedLane, "chunked": ChunkedLane}


def simulate(spec: DisaggSpec | ColocatedSpec, workload: SimWorkload, phases: Phases = "both") -> SimResult:
    """Per-request first-token and finish times of `workload` served by `spec`."""
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
    lanes = [DecodeLane(spec.decode, inp, out, rec, import_s_per_token=spec.import_s_per_token)
             for _ in range(spec.num_decode * spec.decode.pp)]
    kv_s_per_token = spec.kv_bytes_per_token / spec.kv_link_bytes_per_s
    events = EventQueue()
    for i, t in enumerate(arrivals):
        events.push(t, EventKind.ARRIVAL, i)

    def start_batch(k: int, now: float) -> None:
        started = prefills[k].try_start_batch()
        if started is None:
            prefills[k].busy = False
            return
        batch, stage_s, latency_s = started
        events.push(now + latency_s, EventKind.PREFILL_DONE, (k, batch, stage_s >= latency_s))
        if stage_s < latency_s:
            events.push(now + stage_s, EventKind.STAGE_FREE, k)

    def to_decode(i: int, now: float) -> None:
        for lane in lanes:
            lane.advance(now)
        min(lanes, key=_lane_load).add(i, now)

    while len(events):
        now, kind, payload = events.pop()
        if kind is EventKind.ARRIVAL:
            if phases == "decode":
                rec.first_token(payload, now)
                if out[payload] == 1:
                    rec.finish(payload, now)
                else:
                    to_decode(payload, now)
                continue
            k = min(range(len(prefills)), key=lambda j: (prefills[j].queued_tokens, prefills[j].busy, j))
            prefills[k].enqueue(payload)
            if not prefills[k].busy:
                start_batch(k, now)
        elif kind is EventKind.PREFILL_DONE:
            k, batch, frees_stage = payload
            for i in batch:
                rec.first_token(i, now)
                if out[i] == 1 or phases == "prefill":
                    rec.finish(i, now)
                else:
                    events.push(now + spec.handoff_s + inp[i] * kv_s_per_token, EventKind.KV_ARRIVED, i)
            if frees_stage:
                start_batch(k, now)
        elif kind is EventKind.STAGE_FREE:
            start_batch(payload, now)
        else:  # KV_ARRIVED
            to_decode(payload, now)
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
