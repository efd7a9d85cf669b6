"""Benchmark output: JSON and CSV for machines, PNG plots and a rich table for people.

    out_dir/
      summary.json          per series: SLO, goodput (when searched), one summary per run
      runs.csv              one row per (series, rate): attainment, throughputs, TTFT/TPOT/ITL/E2E percentiles
      requests.csv          one row per request: lengths, send time, TTFT, TPOT, E2E, attained, error
      attainment_vs_rate.png
      ttft_cdf.png  tpot_cdf.png

A "series" is one deployment's runs (e.g. "disaggregated" and "colocated"); pass a mapping label → runs to
put several on the same plots. Plots use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from rich import box  # noqa: E402
from rich.table import Table  # noqa: E402

from trt_disagg.bench.goodput import GoodputResult  # noqa: E402
from trt_disagg.bench.metrics import (  # noqa: E402
    Percentiles,
    RunResult,
    RunSummary,
    attains,
    e2e_s,
    tpot_s,
    ttft_s,
)

SeriesInput = RunResult | GoodputResult | Sequence[RunResult]
Results = SeriesInput | Mapping[str, SeriesInput]
DEFAULT_LABEL = "run"
METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


def _as_series(results: Results) -> dict[str, tuple[list[RunResult], GoodputResult | None]]:
    """label → (runs sorted by rate, goodput result or None)."""
    items: Mapping[str, SeriesInput] = (results if isinstance(results, Mapping)  # type: ignore[assignment]
                                        else {DEFAULT_LABEL: results})
    out: dict[str, tuple[list[RunResult], GoodputResult | None]] = {}
    for label, value in items.items():
        if isinstance(value, GoodputResult):
            runs, goodput = list(value.runs), value
        elif isinstance(value, RunResult):
            runs, goodput = [value], None
        else:
            runs, goodput = list(value), None
        out[label] = (sorted(runs, key=lambda r: r.rate_rps), goodput)
    return out


def write_report(results: Results, out_dir: str | Path) -> list[Path]:
    """Write JSON, CSVs and PNGs for `results` into `out_dir` (created); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = _as_series(results)
    return [
        _write_json(series, out / "summary.json"),
        _write_runs_csv(series, out / "runs.csv"),
        _write_requests_csv(series, out / "requests.csv"),
        _plot_attainment(series, out / "attainment_vs_rate.png"),
        _plot_cdf(series, out / "ttft_cdf.png", metric="ttft"),
        _plot_cdf(series, out / "tpot_cdf.png", metric="tpot"),
    ]


def _write_json(series: dict[str, tuple[list[RunResult], GoodputResult | None]], path: Path) -> Path:
    doc: dict = {"series": {}}
    for label, (runs, goodput) in series.items():
        doc["series"][label] = {
            "slo": runs[0].slo.model_dump() if runs else None,
            "arrival": runs[0].arrival if runs else None,
            "goodput": goodput.to_dict() if goodput is not None else None,
            "runs": [r.summary().to_dict() for r in runs],
        }
    path.write_text(json.dumps(doc, indent=2, allow_nan=True))
    return path


def _percentile_columns(prefix: str, p: Percentiles | None) -> dict[str, float | str]:
    if p is None:
        return {f"{prefix}_{k}": "" for k in ("mean", "p50", "p90", "p99")}
    return {f"{prefix}_mean": p.mean, f"{prefix}_p50": p.p50, f"{prefix}_p90": p.p90, f"{prefix}_p99": p.p99}


def _summary_row(label: str, s: RunSummary) -> dict[str, float | int | str]:
    row: dict[str, float | int | str] = {
        "series": label, "rate_rps": s.rate_rps, "num_sent": s.num_sent, "num_ok": s.num_ok,
        "num_failed": s.num_failed, "num_refused": s.num_refused, "num_attained": s.num_attained,
        "num_short": s.num_short,
        "attainment": s.attainment,
        "duration_s": s.duration_s, "request_throughput_rps": s.request_throughput_rps,
        "output_throughput_tps": s.output_throughput_tps,
    }
    for name in METRICS:
        row.update(_percentile_columns(name.removesuffix("_s") + "_s", getattr(s, name)))
    return row


def _write_runs_csv(series: dict[str, tuple[list[RunResult], GoodputResult | None]], path: Path) -> Path:
    rows = [_summary_row(label, r.summary()) for label, (runs, _) in series.items() for r in runs]
    _write_csv(path, rows)
    return path


def _write_requests_csv(series: dict[str, tuple[list[RunResult], GoodputResult | None]], path: Path) -> Path:
    rows = []
    for label, (runs, _) in series.items():
        for run in runs:
            for rec in run.records:
                rows.append({
                    "series": label, "rate_rps": run.rate_rps, "index": rec.index, "input_len": rec.input_len,
                    "expected_output_len": rec.expected_output_len, "output_tokens": rec.output_tokens,
                    "scheduled_s": rec.scheduled_s, "sent_s": rec.sent_s,
                    "ttft_s": _blank(ttft_s(rec)), "tpot_s": _blank(tpot_s(rec)), "e2e_s": _blank(e2e_s(rec)),
                    "attained": int(attains(rec, run.slo)), "error": rec.error or "",
                    "request_id": rec.request_id or "", "http_status": rec.http_status or "",
                    "server_input_len": "" if rec.server_input_len is None else rec.server_input_len,
                })
    _write_csv(path, rows)
    return path


def _blank(value: float | None) -> float | str:
    return "" if value is None else value


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot_attainment(series: dict[str, tuple[list[RunResult], GoodputResult | None]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    target = None
    for label, (runs, goodput) in series.items():
        if not runs:
            continue
        rates = [r.rate_rps for r in runs]
        values = [100 * r.summary().attainment for r in runs]
        line = ax.plot(rates, values, marker="o", label=label)[0]
        target = goodput.target if goodput is not None else runs[0].slo.attainment
        if goodput is not None and goodput.goodput_rps > 0:
            ax.axvline(goodput.goodput_rps, color=line.get_color(), linestyle=":", linewidth=1)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_cdf(series: dict[str, tuple[list[RunResult], GoodputResult | None]], path: Path, metric: str) -> Path:
    fn = ttft_s if metric == "ttft" else tpot_s
    fig, ax = plt.subplots(figsize=(6, 4))
    slo_value = None
    for label, (runs, _) in series.items():
        for run in runs:
            values = np.sort([v for v in (fn(r) for r in run.records) if v is not None])
            slo_value = run.slo.ttft_s if metric == "ttft" else run.slo.tpot_s
            if values.size == 0:
                continue
            name = f"{run.rate_rps:.3g} req/s" if label == DEFAULT_LABEL else f"{label} @ {run.rate_rps:.3g} req/s"
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=name)
    if slo_value is not None:
        ax.axvline(slo_value, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_value:g} s")
    ax.set_xlabel(f"{metric.upper()} (s)")
    ax.set_ylabel("fraction of completed requests" if metric == "ttft" else
                  "fraction of completed requests with > 1 token")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ms(p: Percentiles | None, field: str) -> str:
    return "-" if p is None else f"{1000 * getattr(p, field):.1f}"


def render_table(results: Results) -> Table:
    """Per run: attainment, failures and latency percentiles (ms); goodput rows when a search was made."""
    series = _as_series(results)
    table = Table(title="benchmark", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), show_edge=False,
                  caption="rate: requests/s; TTFT/TPOT/E2E p50, p90: ms; tok/s: output tokens/s")
    for col in ("series", "rate", "sent", "fail", "attain%", "TTFT50", "TTFT90", "TPOT50", "TPOT90", "E2E50",
                "tok/s"):
        table.add_column(col, justify="left" if col == "series" else "right", no_wrap=True)
    for label, (runs, _) in series.items():
        for run in runs:
            s = run.summary()
            table.add_row(label, f"{s.rate_rps:.3g}", str(s.num_sent), str(s.num_failed), f"{100 * s.attainment:.1f}",
                          _ms(s.ttft_s, "p50"), _ms(s.ttft_s, "p90"), _ms(s.tpot_s, "p50"), _ms(s.tpot_s, "p90"),
                          _ms(s.e2e_s, "p50"), f"{s.output_throughput_tps:.1f}")
    return table


def render_goodput_table(results: Results, baseline: str | None = None) -> Table | None:
    """Goodput and per-core goodput of each series that has one; None when none has.

    With `baseline` (a series label, e.g. "colocated"), a last column gives each series' per-core goodput
    as a multiple of the baseline's (DistServe's headline number).
    """
    series = {k: g for k, (_, g) in _as_series(results).items() if g is not None}
    if not series:
        return None
    if baseline is not None and baseline not in series:
        raise ValueError(f"baseline {baseline!r} is not one of the series {sorted(series)}")
    table = Table(title="goodput", box=box.SIMPLE_HEAD,
                  caption="requests/s within the SLOs at the target attainment")
    cols = ["series", "target%", "goodput", "cores", "per core", "runs"]
    if baseline is not None:
        cols.append(f"vs {baseline}")
    for col in cols:
        table.add_column(col, justify="left" if col == "series" else "right", no_wrap=True)
    for label, g in series.items():
        row = [label, f"{100 * g.target:g}", f"{g.goodput_rps:.3g}", str(g.num_cores),
               f"{g.per_core_goodput_rps:.3g}", str(len(g.runs))]
        if baseline is not None:
            base = series[baseline].per_core_goodput_rps
            row.append(f"{g.per_core_goodput_rps / base:.2f}x" if base > 0 else "-")
        table.add_row(*row)
    return table
