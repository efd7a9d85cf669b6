"""The controller at scale: a phased trace replayed interval by interval against simulated instances.

    for each interval [t, t + interval):
        segments of constant *serving* shape (a started instance serves after start-up; a drained one
        stops taking work at once and holds its GPUs for the drain time; a switch does both)
        each segment: simulate its arrivals plus `warmup_s` of earlier ones (so queues carry over), count
        its own requests
        at t + interval: the same `Controller.decide` as live, on the interval's finished requests
            ─▶ SimulatedActuator.apply

Static placements run through the same loop without a controller, so every number compares like with like.
GPU-hours count provisioned instances: starting and draining ones are paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from trt_disagg.controller.observe import FinishedRequest, ObservedWorkload
from trt_disagg.controller.policy import STEP, Action, Budget, Controller, Decision, Shape
from trt_disagg.controller.predict import SLO
from trt_disagg.sim import DisaggSpec, SimWorkload, simulate
from trt_disagg.workload.phases import PhasedTrace


@dataclass(frozen=True)
class Delays:
    startup_s: float = 60.0  # a started instance takes work after this (engine load, warm-up)
    drain_s: float = 30.0  # a drained instance holds its GPUs this long (in-flight requests finish)


@dataclass(frozen=True)
class _Change:
    at_s: float  # when the serving shape changes
    d_prefill: int
    d_decode: int


class SimulatedActuator:
    """Instance counts over trace time. `serving_at(t)` is what takes work; `provisioned` what is paid for."""

    def __init__(self, shape: Shape, budget: Budget, delays: Delays) -> None:
        self._target = shape
        self._start = shape
        self.budget = budget
        self.delays = delays
        self._serving: list[_Change] = []
        self._gpu_events: list[tuple[float, int]] = []  # (time, +/- GPUs provisioned)

    def shape(self) -> Shape:
        return self._target

    def busy(self, now_s: float) -> bool:
        return any(c.at_s > now_s for c in self._serving) or any(t > now_s for t, _ in self._gpu_events)

    def apply(self, action: Action, now_s: float) -> None:
        dn, dm = STEP[action]
        d = self.delays
        p_gpus, d_gpus = self.budget.prefill_gpus, self.budget.decode_gpus
        if dn < 0 or dm < 0:  # drain: no new work at once, GPUs freed after the drain
            self._serving.append(_Change(now_s, min(dn, 0), min(dm, 0)))
            if dn + dm < 0:
                self._gpu_events.append((now_s + d.drain_s, -(p_gpus if dn < 0 else d_gpus)))
        if dn > 0 or dm > 0:  # start (after a drain for a switch)
            ready_s = now_s + d.startup_s + (d.drain_s if dn + dm == 0 else 0.0)
            self._serving.append(_Change(ready_s, max(dn, 0), max(dm, 0)))
            if dn + dm > 0:
                self._gpu_events.append((now_s, p_gpus if dn > 0 else d_gpus))
        self._target = Shape(self._target.num_prefill + dn, self._target.num_decode + dm)

    def serving_at(self, t_s: float) -> Shape:
        n, m = self._start.num_prefill, self._start.num_decode
        for c in self._serving:
            if c.at_s <= t_s:
                n, m = n + c.d_prefill, m + c.d_decode
        return Shape(n, m)

    def change_times(self, start_s: float, end_s: float) -> list[float]:
        return sorted({c.at_s for c in self._serving if start_s < c.at_s < end_s})

    def gpu_seconds(self, end_s: float) -> float:
        """Provisioned GPUs integrated from 0 to `end_s`."""
        total, gpus, last = 0.0, float(self.budget.gpus(self._start)), 0.0
        for t, delta in sorted(self._gpu_events):
            t = min(t, end_s)
            total += gpus * (t - last)
            gpus, last = gpus + delta, t
        return total + gpus * max(0.0, end_s - last)


@dataclass
class TraceRun:
    """One replay of a trace: per-request outcomes, decisions, cost."""

    label: str
    ok: np.ndarray  # bool per request of the trace: met both SLOs
    gpu_hours: float
    decisions: list[Decision] = field(default_factory=list)

    @property
    def attainment(self) -> float:
        return float(self.ok.mean()) if len(self.ok) else 1.0

    @property
    def changes(self) -> list[Decision]:
        return [d for d in self.decisions if d.action is not Action.NONE]


def replay(trace: PhasedTrace, base: DisaggSpec, slo: SLO, actuator: SimulatedActuator,
           controller: Controller | None, interval_s: float, label: str, warmup_s: float = 60.0) -> TraceRun:
    """Serve `trace` interval by interval; `controller` None: the actuator's shape never changes."""
    n = len(trace.arrival_s)
    ttft, tpot = np.full(n, np.inf), np.full(n, np.inf)
    decisions: list[Decision] = []
    t = 0.0
    while t < trace.duration_s:
        end = min(t + interval_s, trace.duration_s)
        cuts = [t, *actuator.change_times(t, end), end]
        for a, b in zip(cuts, cuts[1:], strict=False):
            _serve_segment(trace, base, actuator.serving_at(a), a, b, warmup_s, ttft, tpot)
        if controller is not None:
            since = max(0.0, end - controller.config.window_s)
            window = _finished(trace, since, end, ttft, tpot)
            observed = ObservedWorkload.from_finished(window, end - since, slo.ttft_s, slo.tpot_s)
            decision = controller.decide(end, actuator.shape(), observed, busy=actuator.busy(end))
            decisions.append(decision)
            if decision.action is not Action.NONE:
                actuator.apply(decision.action, end)
        t = end
    ok = (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)
    return TraceRun(label, ok, actuator.gpu_seconds(trace.duration_s) / 3600, decisions)


def _serve_segment(trace: PhasedTrace, base: DisaggSpec, shape: Shape, a: float, b: float, warmup_s: float,
                   ttft: np.ndarray, tpot: np.ndarray) -> None:
    """Simulate arrivals in [a - warmup_s, b) on `shape`; write TTFT/TPOT of those in [a, b)."""
    arr = trace.arrival_s
    lo, mid, hi = np.searchsorted(arr, [a - warmup_s, a, b])
    if hi == mid:
        return
    if shape.num_prefill < 1 or shape.num_decode < 1:  # nothing serves one phase: these requests miss
        return
    spec = replace(base, num_prefill=shape.num_prefill, num_decode=shape.num_decode)
    work = SimWorkload(arr[lo:hi] - arr[lo], trace.input_len[lo:hi], trace.output_len[lo:hi])
    result = simulate(spec, work)
    ttft[mid:hi] = result.ttft_s[mid - lo:]
    tpot[mid:hi] = result.tpot_s[mid - lo:]


def _finished(trace: PhasedTrace, a: float, b: float, ttft: np.ndarray, tpot: np.ndarray) -> list[FinishedRequest]:
    """The interval's requests as the router's stream would summarise them."""
    lo, hi = np.searchsorted(trace.arrival_s, [a, b])
    out = []
    for i in range(lo, hi):
        t0, o = float(trace.arrival_s[i]), int(trace.output_len[i])
        first = t0 + float(ttft[i]) if np.isfinite(ttft[i]) else None
        end = (first + float(tpot[i]) * max(0, o - 1)) if first is not None else t0
        out.append(FinishedRequest(t0, first, end, int(trace.input_len[i]), o, first is not None))
    return out
