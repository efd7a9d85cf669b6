"""Served engine steps next to the profiled latency model: where a prediction's error comes from.

Each instance's iteration log has one JSON line per engine step (kind, batch, tokens, context, duration).
The profile times the engine alone on an idle core; served, the same step shares the two cores with the
router, the load generator, Triton and Redis. served / profiled > 1 is that cost, per instance and phase.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from trt_disagg.planner.latency_model import PhaseCoefficients
from trt_disagg.sim.instances import BusySpans


@dataclass(frozen=True)
class StepRatios:
    instance: str
    kind: str  # "prefill" | "decode"
    num_steps: int
    mean_batch: float
    p50: float  # served / profiled step time
    p90: float
    busy_fraction: float  # of the instance's logged span spent in steps of this kind
    served_s: float = 0.0  # the steps' total served time ...
    profiled_s: float = 0.0  # ... and what the profile says they take: their ratio is what sums of steps see

    @property
    def time_ratio(self) -> float:
        """Served / profiled over the steps' total time (p50 without totals): a request's TPOT is a mean of
        its steps and a queue's wait a sum of them, so a slow tail counts here as it counts there."""
        return self.served_s / self.profiled_s if self.profiled_s > 0 else self.p50


def read_iteration_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _profiled_s(row: dict, model: PhaseCoefficients) -> float:
    if row["kind"] == "decode":
        return model.decode_step_s(row["num_seqs"], row["sum_context"])
    # Prefill: the log has the batch's total tokens; equal prompt lengths give its sum of squares.
    n, b = row["num_tokens"], max(1, row["num_seqs"])
    return model.prefill_s(n, n * n / b)


def step_ratios(path: Path, model: PhaseCoefficients,
                window: tuple[float, float] | None = None) -> list[StepRatios]:
    """Per phase: served / profiled step time (p50, p90) over every step in the log, or over the steps that
    started inside `window` (wall-clock start, end: one rate's run)."""
    rows = [r for r in read_iteration_log(path) if r["kind"] in ("prefill", "decode")  # not "handoff" lines
            and (window is None or window[0] <= r["t"] < window[1])]
    if not rows:
        return []
    span = max(r["t"] + r["duration_s"] for r in rows) - min(r["t"] for r in rows)
    instance = path.name.removesuffix(".iterations.jsonl")
    out = []
    for kind in ("prefill", "decode"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        profiled = [_profiled_s(r, model) for r in mine]
        ratios = sorted(r["duration_s"] / p for r, p in zip(mine, profiled, strict=True))
        served_s = sum(r["duration_s"] for r in mine)
        out.append(StepRatios(instance, kind, len(mine), statistics.fmean(r["num_seqs"] for r in mine),
                              statistics.median(ratios), ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))],
                              served_s / span if span > 0 else 0.0, served_s, sum(profiled)))
    return out


MIN_STEPS_PER_BATCH = 10  # fewer beside-prefill steps of one batch size than this: pooled with larger ones


@dataclass(frozen=True)
class DecodeBesidePrefill:
    """Served / profiled total time of the decode steps that started while no prefill step ran on another
    instance, and, by batch size, of those that started while one did: the interference between instances
    on one host. It grows with the batch (measured beside a `nice -n 19` process: 1.4x the profile at batch
    1, 1.7x at batch 3), so one factor for all batches under-predicts TPOT when prompts arrive together."""

    alone: float
    beside: tuple[float, ...]  # by batch size 1, 2, ...; the last one also for larger batches
    num_alone: int
    num_beside: int

    @property
    def factors(self) -> tuple[float, ...]:
        """How much longer a decode step of each batch size takes beside a prefill than alone (the
        simulator's DisaggSpec.decode_beside_prefill)."""
        return tuple(b / self.alone for b in self.beside)

    def describe(self) -> str:
        return (f"decode steps beside a prefill {', '.join(f'{f:.2f}x' for f in self.factors)} (batch 1, 2, ...) "
                f"those alone ({self.alone:.2f}x the profile; {self.num_beside} and {self.num_alone} steps)")


def decode_beside_prefill(decode_logs: list[Path], prefill_logs: list[Path],
                          model: PhaseCoefficients) -> DecodeBesidePrefill | None:
    """Split the decode steps by whether a prefill step was running when they started; None without
    steps on both sides."""
    prefilling = BusySpans()
    for start, end in sorted((r["t"], r["t"] + r["duration_s"]) for path in prefill_logs
                             for r in read_iteration_log(path) if r["kind"] == "prefill"):
        prefilling.started(start, end)
    alone: list[tuple[float, float]] = []  # (served, profiled)
    beside: dict[int, list[tuple[float, float]]] = {}  # by batch size
    for path in decode_logs:
        for row in read_iteration_log(path):
            if row["kind"] != "decode":
                continue
            times = (row["duration_s"], _profiled_s(row, model))
            if prefilling.covers(row["t"]):
                beside.setdefault(row["num_seqs"], []).append(times)
            else:
                alone.append(times)
    if not alone or not beside:
        return None
    factors: list[float] = []
    for batch in range(1, max(beside) + 1):
        rows = beside.get(batch, [])
        if len(rows) < MIN_STEPS_PER_BATCH:  # pooled with the larger batches (at batch 1: every step)
            rows = [t for b, ts in beside.items() if b >= batch for t in ts]
        factors.append(_total_ratio(rows) if len(rows) >= MIN_STEPS_PER_BATCH or not factors else factors[-1])
    return DecodeBesidePrefill(_total_ratio(alone), tuple(factors), len(alone),
                               sum(len(ts) for ts in beside.values()))


def _total_ratio(times: list[tuple[float, float]]) -> float:
    return sum(served for served, _ in times) / sum(profiled for _, profiled in times)


def step_ratio_table(ratios: list[StepRatios]) -> Table:
    table = Table(title="Engine steps while served vs the profiled latency model (served / profiled time)")
    for col in ("instance", "phase", "steps", "mean batch", "p50", "p90", "total", "busy"):
        table.add_column(col, justify="left" if col in ("instance", "phase") else "right")
    for r in ratios:
        table.add_row(r.instance, r.kind, str(r.num_steps), f"{r.mean_batch:.1f}", f"{r.p50:.2f}", f"{r.p90:.2f}",
                      f"{r.time_ratio:.2f}", f"{r.busy_fraction:.0%}")
    return table
