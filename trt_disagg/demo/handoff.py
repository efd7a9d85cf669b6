"""Where a KV hand-off's time goes: the router's record and the decode instance's log, joined per request.

    router record (Redis)       PREFILL_DONE ──dispatch──▶ DECODE_DISPATCHED ──decode leg──▶ DECODING
    decode iteration log        "handoff" line per request, at its first decode token:
                                fetch_wait │ connect │ meta (source export) │ data (stage + copy) │ release
                                │ admit │ loop_wait │ import │ first_step │ send

Both carry the router's request id (a request's first call of a role uses it as Triton's request id), so
one probe gives the whole path: what the router spent before the decode call went out, the pull's phases
on both sides, and the first decode step. Hand-off beyond the first decode step = total - first_step: the
part a faster transfer path can remove; the step itself is decode work any deployment does.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

# The decode instance's phases in the order they happen (seconds, iteration log "handoff" lines).
INSTANCE_PHASES = ("fetch_wait_s", "connect_s", "meta_s", "data_s", "release_s", "admit_s", "loop_wait_s",
                   "import_s", "first_step_s", "send_s")
SOURCE_PHASES = ("source_export_s", "source_stage_s")  # inside meta_s / data_s, reported by the prefill side


@dataclass(frozen=True)
class HandoffSample:
    """One probe request's hand-off, sent alone on a warm deployment."""

    request_id: str
    total_s: float  # router: PREFILL_DONE -> DECODING (what the simulator's hand-off stands for)
    dispatch_s: float  # router: PREFILL_DONE -> DECODE_DISPATCHED (pick, Redis write queued, call opened)
    phases: dict[str, float] = field(default_factory=dict)  # the decode instance's line; {} when not logged

    @property
    def beyond_first_step_s(self) -> float:
        """The hand-off less the decode step that produced its token."""
        return self.total_s - self.phases.get("first_step_s", 0.0)


def from_record(request_id: str, timestamps: dict[str, float | str]) -> HandoffSample:
    """A sample from the router's record of a request (timestamps: state -> wall time)."""
    done = float(timestamps["PREFILL_DONE"])
    return HandoffSample(request_id, float(timestamps["DECODING"]) - done,
                         float(timestamps.get("DECODE_DISPATCHED", done)) - done)


def read_handoff_lines(paths: Sequence[Path]) -> dict[str, dict[str, float]]:
    """request id -> its "handoff" line, from every iteration log given (missing files: none)."""
    lines: dict[str, dict[str, float]] = {}
    for path in paths:
        if not path.exists():
            continue
        for text in path.read_text().splitlines():
            row = json.loads(text) if text.strip() else {}
            if row.get("kind") == "handoff":
                lines[str(row["request_id"])] = {k: float(v) for k, v in row.items()
                                                 if k.endswith("_s") and isinstance(v, int | float)}
    return lines


def with_phases(samples: Sequence[HandoffSample], paths: Sequence[Path]) -> list[HandoffSample]:
    lines = read_handoff_lines(paths)
    return [HandoffSample(s.request_id, s.total_s, s.dispatch_s, lines.get(s.request_id, {})) for s in samples]


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def handoff_table(samples: Sequence[HandoffSample], title: str) -> Table:
    """p50 of every phase over the probes, in path order, with the total and the part beyond the step."""
    table = Table(title=title)
    for col in ("phase", "p50 ms", "where"):
        table.add_column(col, justify="right" if col == "p50 ms" else "left")

    def row(name: str, values: list[float], where: str) -> None:
        if values:
            table.add_row(name, f"{p50(values) * 1e3:.1f}", where)

    row("router dispatch", [s.dispatch_s for s in samples], "PREFILL_DONE -> decode call (router, Redis queued)")
    for phase in INSTANCE_PHASES:
        row(phase.removesuffix("_s"), [s.phases[phase] for s in samples if phase in s.phases], "decode instance")
    for phase in SOURCE_PHASES:
        row(f"  {phase.removesuffix('_s')}", [s.phases[phase] for s in samples if phase in s.phases],
            "prefill instance (inside meta / data)")
    row("total", [s.total_s for s in samples], "PREFILL_DONE -> DECODING (router record)")
    row("beyond the first decode step", [s.beyond_first_step_s for s in samples if s.phases], "total - first_step")
    return table
