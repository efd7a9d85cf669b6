"""Conversations in the planner: simulate a multi-turn trace with and without prefix reuse, per routing policy.

    ConversationTrace (ShareGPT sampled, or a live benchmark's dump) ─▶ conversation_workload (at a rate,
    or at the trace's own send times) ─▶ sim.simulate(..., reuse) ─▶ conversation_row (hit rate, TTFT,
    prefill tokens computed, attainment)

`predict` is the prediction a live prefix benchmark is checked against: the same requests (token counts,
send times), each policy the benchmark ran, TTFT p50/p90 per policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_disagg.planner.goodput import SLOTarget
from trt_disagg.sim import (
    ColocatedSpec,
    ConversationLinks,
    DisaggSpec,
    PrefixReuse,
    Routing,
    SimWorkload,
    simulate,
)
from trt_disagg.workload.conversation_trace import NO_PREVIOUS, ConversationTrace


@dataclass(frozen=True)
class Policy:
    """One way to serve the trace: a label and the reuse it models (disabled: no cache at all)."""

    label: str
    reuse: PrefixReuse


def policies(tokens_per_block: int, overlap_weight: float = 1.0, local_prefill_max_tokens: int = 0) -> list[Policy]:
    """No reuse, reuse with least-loaded routing, reuse with kv-aware routing: what a comparison prints."""
    def reuse(routing: Routing) -> PrefixReuse:
        return PrefixReuse(True, tokens_per_block, routing, overlap_weight, local_prefill_max_tokens)

    return [Policy("no reuse", PrefixReuse(enabled=False, tokens_per_block=tokens_per_block)),
            Policy("reuse, least_loaded", reuse(Routing.LEAST_LOADED)),
            Policy("reuse, kv_aware", reuse(Routing.KV_AWARE))]


def conversation_workload(trace: ConversationTrace, rate: float | None = None) -> SimWorkload:
    """The trace as the simulator's workload. A replayed trace keeps its send times (open loop). A sampled one
    is closed loop (each later turn `think_s` after its previous answer); `rate` rescales its conversations'
    start times to that many conversations per second."""
    arrival = trace.arrival_s.copy()
    first = trace.previous == NO_PREVIOUS
    if rate is not None and not trace.replay:
        starts = arrival[first]
        mean_gap = starts[-1] / len(starts) if len(starts) and starts[-1] > 0 else 1.0
        arrival[first] = starts / mean_gap / rate
    arrival[~first & np.isnan(arrival)] = 0.0  # closed loop: set when the previous turn finishes
    links = ConversationLinks(trace.previous, trace.shared_prefix_len, trace.think_s, closed_loop=not trace.replay,
                              common_prefix_len=trace.common_prefix_len)
    return SimWorkload(arrival, trace.input_len, trace.output_len, links)


def conversation_row(spec: DisaggSpec | ColocatedSpec, trace: ConversationTrace, policy: Policy, slo: SLOTarget,
                     rate: float | None = None) -> dict[str, Any]:
    """One simulation of the trace under `policy`: what `trt-disagg simulate --workload conversations` prints."""
    result = simulate(spec, conversation_workload(trace, rate), reuse=policy.reuse)
    prompt = int(np.sum(trace.input_len))
    matched = int(np.sum(result.matched_tokens)) if result.matched_tokens is not None else 0
    computed = int(np.sum(result.prefill_tokens)) if result.prefill_tokens is not None else prompt
    ideal = trace.ideal_matched_tokens(policy.reuse.tokens_per_block)
    ttft = result.ttft_s
    row: dict[str, Any] = {"policy": policy.label}
    if rate is not None and not trace.replay:
        row["conv_rate"] = rate
    row.update({
        "requests": len(trace), "hit_rate": matched / prompt if prompt else 0.0,
        "hit_of_ideal": matched / ideal if ideal else 0.0, "prefill_tokens": computed,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
        "tpot_p50_s": float(np.percentile(result.tpot_s, 50)),
        "attainment": result.attainment(slo.ttft_s, slo.tpot_s)})
    if trace.measured_ttft_s is not None and trace.measured_policy == policy.label:
        row.update(measured_columns(row, trace.measured_ttft_s))
    return row


def measured_columns(row: dict[str, Any], measured_ttft_s: np.ndarray) -> dict[str, float]:
    """Measured TTFT p50/p90 (requests that have one) and the prediction's relative error on each."""
    got = measured_ttft_s[~np.isnan(measured_ttft_s)]
    out: dict[str, float] = {}
    for q in (50, 90):
        measured = float(np.percentile(got, q))
        out[f"measured_ttft_p{q}_s"] = measured
        out[f"ttft_p{q}_error"] = row[f"ttft_p{q}_s"] / measured - 1 if measured > 0 else float("nan")
    return out


def predict(spec: DisaggSpec | ColocatedSpec, trace: ConversationTrace, slo: SLOTarget,
            candidates: list[Policy], rate: float | None = None) -> list[dict[str, Any]]:
    """The trace under each policy (same requests, same send times for a replayed trace)."""
    return [conversation_row(spec, trace, p, slo, rate) for p in candidates]
