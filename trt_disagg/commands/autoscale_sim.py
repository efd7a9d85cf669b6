"""`trt-disagg simulate --autoscale`: the controller against simulated instances over a phased trace.

    --phases sharegpt@10:1200,longbench-synthetic@8:1200,sharegpt@10:1200
        ─▶ lengths per phase (the planner's workloads) ─▶ workload.phases.build_phased_trace
        ─▶ controller.compare (first-phase static, oracle static, autoscaled) ─▶ table + decisions per hour
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from trt_disagg.errors import UserError

if TYPE_CHECKING:
    from trt_disagg.planner.placement import Placement
    from trt_disagg.planner.search import PlanInputs

out = Console()


@dataclass(frozen=True)
class AutoscaleFlags:
    phases: str
    max_instances: int
    interval_s: float
    cooldown_s: float
    startup_s: float
    drain_s: float
    diurnal_amplitude: float
    diurnal_period_s: float


DEFAULT_TIMING = "interval=30,cooldown=90,startup=60,drain=30,diurnal=0,diurnal_period=86400"


def parse_flags(phases: str, budget: int, timing: str) -> AutoscaleFlags:
    """--autoscale-timing 'interval=30,cooldown=90,...' over the defaults; a bad key or value names itself."""
    values = dict(kv.split("=", 1) for kv in DEFAULT_TIMING.split(","))
    for part in timing.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in values:
            raise UserError(f"--autoscale-timing {part!r}: expected KEY=VALUE with KEY one of {', '.join(values)}")
        values[key] = value
    try:
        v = {k: float(x) for k, x in values.items()}
    except ValueError:
        raise UserError(f"--autoscale-timing {timing!r}: values must be numbers") from None
    return AutoscaleFlags(phases, budget, v["interval"], v["cooldown"], v["startup"], v["drain"], v["diurnal"],
                          v["diurnal_period"])


def run(inp: PlanInputs, placement: Placement, flags: AutoscaleFlags, seed: int, as_json: bool) -> None:
    """Build the trace, compare, print."""
    from trt_disagg.controller.compare import compare
    from trt_disagg.controller.policy import Budget, ControllerConfig
    from trt_disagg.controller.predict import SLO
    from trt_disagg.controller.report import decision_lines, decisions_per_hour, summary_rows
    from trt_disagg.controller.simulated import Delays
    from trt_disagg.planner import inputs
    from trt_disagg.planner.search import spec_for
    from trt_disagg.sim import DisaggSpec
    from trt_disagg.workload.phases import Diurnal, Phase, build_phased_trace, parse_phases

    if flags.startup_s < 0 or flags.drain_s < 0:
        raise UserError("--startup-s and --drain-s must be >= 0")
    specs = parse_phases(flags.phases)
    lengths = {s.workload: inputs.plan_lengths(s.workload, inp.model, len(inp.lengths), seed, None, None)
               for s in specs}
    phases = [Phase(s.workload, s.rate_rps, s.duration_s, lengths[s.workload].input_len,
                    lengths[s.workload].output_len) for s in specs]
    trace = build_phased_trace(phases, seed, Diurnal(flags.diurnal_amplitude, flags.diurnal_period_s))
    base = spec_for(inp, placement)
    assert isinstance(base, DisaggSpec)  # a Placement gives a disaggregated spec
    budget = Budget(flags.max_instances, placement.prefill.num_gpus, placement.decode.num_gpus)
    config = ControllerConfig(interval_s=flags.interval_s, cooldown_s=flags.cooldown_s,
                              target=inp.slo.attainment, window_s=max(120.0, flags.interval_s))
    assert inp.slo.ttft_s is not None and inp.slo.tpot_s is not None
    cmp = compare(trace, base, SLO(inp.slo.ttft_s, inp.slo.tpot_s), budget, config,
                  Delays(flags.startup_s, flags.drain_s), seed)
    rows = summary_rows(cmp)
    per_hour = decisions_per_hour(cmp.autoscaled)
    lines = decision_lines(cmp.autoscaled)
    if as_json:
        typer.echo(json.dumps({"trace": _trace_info(trace), "runs": rows, "decisions_per_hour": per_hour,
                               "decisions": [d.to_json() for d in cmp.autoscaled.changes]}, indent=2))
        return
    _print(rows, _trace_info(trace), per_hour, lines)


def _trace_info(trace: Any) -> dict[str, Any]:
    return {"requests": len(trace.arrival_s), "duration_s": trace.duration_s,
            "phases": [f"{p.name}@{p.rate_rps:g}:{p.duration_s:g}" for p in trace.phases]}


def _print(rows: list[dict[str, Any]], info: dict[str, Any], per_hour: dict[int, dict[str, int]],
           lines: list[str]) -> None:
    table = Table(title=f"{info['requests']} requests over {info['duration_s']:.0f} s: {', '.join(info['phases'])}")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)
    out.print("decisions per hour: " + (", ".join(f"hour {h}: {c}" for h, c in per_hour.items()) or "none"))
    for line in lines:
        out.print(line, markup=False)
