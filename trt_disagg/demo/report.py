"""The demo's answer: per-core goodput of both deployments and their ratio, and predicted vs measured
attainment at every rate, as tables and as one PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from trt_disagg.bench.goodput import GoodputResult, goodput_from_runs
from trt_disagg.bench.metrics import RunResult
from trt_disagg.demo.variants import Variant


@dataclass(frozen=True)
class VariantOutcome:
    variant: Variant
    runs: list[RunResult]
    predicted: list[float]  # simulated attainment at each run's rate

    def goodput(self, target: float) -> GoodputResult:
        return goodput_from_runs(self.runs, target, num_cores=self.variant.num_cores)


def goodput_table(outcomes: list[VariantOutcome], target: float, slo_text: str) -> Table:
    table = Table(title=f"Goodput at {target:.0%} SLO attainment ({slo_text})")
    for col in ("deployment", "instances", "cores", "goodput req/s", "per-core req/s", "vs colocated"):
        table.add_column(col, justify="right" if col not in ("deployment", "instances") else "left")
    base = outcomes[-1].goodput(target).per_core_goodput_rps
    for o in outcomes:
        g = o.goodput(target)
        ratio = f"{g.per_core_goodput_rps / base:.2f}x" if base > 0 else "n/a (baseline 0)"
        table.add_row(o.variant.label, o.variant.describe(), str(o.variant.num_cores), f"{g.goodput_rps:.3g}",
                      f"{g.per_core_goodput_rps:.3g}", ratio)
    return table


def prediction_table(outcomes: list[VariantOutcome]) -> Table:
    """One row per rate any variant ran (a goodput search runs different rates per variant): measured and
    predicted attainment, their difference, and how many requests the measurement rests on."""
    table = Table(title="SLO attainment: measured vs predicted (simulator on the profiled latency model)")
    table.add_column("rate req/s", justify="right")
    for o in outcomes:
        for what in ("n", "measured", "predicted", "diff pp"):
            table.add_column(f"{o.variant.label} {what}", justify="right")
    rates = sorted({r.rate_rps for o in outcomes for r in o.runs})
    for rate in rates:
        row = [f"{rate:.3g}"]
        for o in outcomes:
            at = [i for i, r in enumerate(o.runs) if r.rate_rps == rate]
            if not at:
                row += ["-", "-", "-", "-"]
                continue
            run, predicted = o.runs[at[0]], o.predicted[at[0]]
            measured = run.summary().attainment
            row += [str(len(run.records)), f"{measured:.0%}", f"{predicted:.0%}",
                    f"{(predicted - measured) * 100:+.0f}"]
        table.add_row(*row)
    return table


def plot_predicted_vs_measured(outcomes: list[VariantOutcome], target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for o, color in zip(outcomes, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        order = sorted(range(len(o.runs)), key=lambda i: o.runs[i].rate_rps)  # a search runs out of order
        rates = [o.runs[i].rate_rps for i in order]
        ax.plot(rates, [o.runs[i].summary().attainment for i in order], "o-", color=color,
                label=f"{o.variant.label} measured")
        ax.plot(rates, [o.predicted[i] for i in order], "x--", color=color, label=f"{o.variant.label} predicted")
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
