"""The comparison as rows and lines a person reads: totals, per-phase attainment, decisions per hour."""

from __future__ import annotations

from collections import Counter
from typing import Any

from trt_disagg.controller.compare import Comparison
from trt_disagg.controller.simulated import TraceRun


def summary_rows(cmp: Comparison) -> list[dict[str, Any]]:
    """One row per run: its shape, whole-trace attainment, per-phase attainment, GPU-hours, good requests per
    GPU-hour (the trace's goodput per GPU) and the number of changes."""
    shapes = {"first-phase static": str(cmp.first_phase_shape), "oracle static": str(cmp.oracle_shape),
              "autoscaled": f"from {cmp.first_phase_shape}"}
    rows = []
    for run in (cmp.first_phase, cmp.oracle, cmp.autoscaled):
        rows.append({"run": run.label, "shape": shapes[run.label], "attainment": round(run.attainment, 4),
                     "phase_attainment": [round(a, 4) for a in cmp.phase_attainment[run.label]],
                     "gpu_hours": round(run.gpu_hours, 3),
                     "good_per_gpu_hour": round(float(run.ok.sum()) / run.gpu_hours, 1) if run.gpu_hours else 0.0,
                     "changes": len(run.changes)})
    return rows


def decisions_per_hour(run: TraceRun) -> dict[int, dict[str, int]]:
    """Hour index -> action -> count (changes only)."""
    out: dict[int, Counter[str]] = {}
    for d in run.changes:
        out.setdefault(int(d.at_s // 3600), Counter())[d.action.value] += 1
    return {h: dict(c) for h, c in sorted(out.items())}


def decision_lines(run: TraceRun) -> list[str]:
    """Every change, with the time, the shapes and the reason."""
    return [f"t={d.at_s:7.0f}s  {d.shape} -> {d.next_shape}  {d.action.value}: {d.reason}" for d in run.changes]
